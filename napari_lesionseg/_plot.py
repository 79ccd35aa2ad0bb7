"""Two tiny QPainter line plots for the training panel (no plotting dependency).

* `RunCurve`: the current run — training loss (scaled to its largest value) and validation Dice
  against steps, with a mark where the validation cases join the training.
* `LearningCurve`: label efficiency across runs — each model's validation Dice against the
  number of annotated cases it learned from; models at the same number are drawn as their mean
  with a band from the lowest to the highest (`training_backend.active.curves.aggregate`, the curve
  ``lesionseg simulate`` draws too).
"""
from __future__ import annotations

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

from training_backend.active.curves import CurveStat, aggregate

DICE_COLOR = "#4fc3f7"
LOSS_COLOR = "#ffb74d"
MARGINS = (30, 8, 14, 18)  # left, right, top, bottom


class _Plot(QWidget):
    """Axes with a [0, 1] y range, a title and x-range labels; subclasses draw series."""

    title = ""
    empty_text = ""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def sizeHint(self):  # noqa: N802 - Qt API
        size = super().sizeHint()
        size.setHeight(120)
        return size

    def x_range(self) -> tuple[float, float] | None:
        raise NotImplementedError

    def draw_series(self, p: QPainter, to_px) -> None:
        raise NotImplementedError

    def caption(self) -> str:
        return ""

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        font = QFont(self.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() - 2))
        p.setFont(font)
        fg = self.palette().color(self.foregroundRole())
        dim = QColor(fg)
        dim.setAlpha(90)
        left, right, top, bottom = MARGINS
        plot = QRectF(left, top, max(10, self.width() - left - right),
                      max(10, self.height() - top - bottom))
        p.setPen(QPen(dim, 1))
        p.drawRect(plot)
        y = plot.bottom() - 0.5 * plot.height()
        p.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
        p.setPen(fg)
        right_v = Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
        for text, yy in (("1", plot.top()), (".5", plot.center().y()), ("0", plot.bottom())):
            p.drawText(QRectF(0, yy - 6, left - 4, 12), right_v, text)
        p.drawText(QRectF(plot.left(), 0, plot.width(), top),
                   Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, self.title)
        xr = self.x_range()
        if xr is None:
            p.setPen(dim)
            p.drawText(plot, Qt.AlignmentFlag.AlignCenter, self.empty_text)
            p.end()
            return
        x0, x1 = xr
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
        for value, align in ((x0, Qt.AlignmentFlag.AlignLeft), (x1, Qt.AlignmentFlag.AlignRight)):
            p.drawText(QRectF(plot.left(), plot.bottom() + 2, plot.width(), bottom - 2),
                       align | Qt.AlignmentFlag.AlignTop, f"{value:g}")

        def to_px(x: float, v: float) -> QPointF:
            return QPointF(plot.left() + (x - x0) / (x1 - x0) * plot.width(),
                           plot.bottom() - max(0.0, min(1.0, v)) * plot.height())

        self.draw_series(p, to_px)
        p.setPen(fg)
        p.setBrush(Qt.BrushStyle.NoBrush)
        p.drawText(QRectF(plot.left(), plot.top() + 2, plot.width() - 4, 12), right_v,
                   self.caption())
        p.end()


def _line(p: QPainter, pts: list[QPointF], color: str, dots: bool) -> None:
    c = QColor(color)
    p.setPen(QPen(c, 1.5))
    for a, b in zip(pts, pts[1:]):
        p.drawLine(a, b)
    if dots:
        p.setBrush(c)
        for pt in pts:
            p.drawEllipse(pt, 2.5, 2.5)


class LearningCurve(_Plot):
    """Label-efficiency plot: ``(n_annotations, dice)`` points, Dice axis fixed to [0, 1]."""

    title = "validation Dice vs annotated cases (all runs)"
    empty_text = "no validation Dice yet (it needs ≥ 4 full masks)"

    def __init__(self, parent=None):
        super().__init__(parent)
        self._points: list[tuple[int, float]] = []
        self.setToolTip("Validation Dice of each trained model against the number of "
                        "cases with labels it was trained on")

    @property
    def points(self) -> list[tuple[int, float]]:
        return list(self._points)

    def set_points(self, points: list[tuple[int, float]]) -> None:
        """Replace all points (``None`` Dice values are dropped)."""
        self._points = sorted((int(n), float(d)) for n, d in points if d is not None)
        self.update()

    def add_point(self, n: int, dice: float | None) -> None:
        if dice is not None:
            self.set_points(self._points + [(n, dice)])

    @property
    def curve(self) -> list[CurveStat]:
        """The drawn curve: mean Dice per number of annotated cases, with its lowest and highest."""
        return aggregate(self._points)

    def x_range(self):
        xs = [n for n, _ in self._points]
        return (min(xs), max(xs)) if xs else None

    def draw_series(self, p, to_px) -> None:
        curve = self.curve
        band = QColor(DICE_COLOR)
        band.setAlpha(60)
        p.setPen(QPen(band, 3))
        for s in curve:  # the spread of runs with the same number of annotations
            if s.high > s.low:
                p.drawLine(to_px(s.x, s.low), to_px(s.x, s.high))
        _line(p, [to_px(s.x, s.mean) for s in curve], DICE_COLOR, dots=True)

    def caption(self) -> str:
        return f"best {max(v for _, v in self._points):.2f}"


class RunCurve(_Plot):
    """The current run: loss (orange, scaled to its largest value) and validation Dice (blue)
    against steps; a dashed line where the validation cases join the training."""

    title = "this run: loss (scaled) and validation Dice vs step"
    empty_text = "start a training to follow its loss"

    def __init__(self, parent=None):
        super().__init__(parent)
        self.loss: list[tuple[int, float]] = []
        self.dice: list[tuple[int, float]] = []
        self.folded_at: int | None = None
        self.setToolTip("Training loss (scaled to its largest value) and validation Dice of "
                        "the run in progress or the last one")

    def clear(self) -> None:
        self.loss, self.dice, self.folded_at = [], [], None
        self.update()

    def set_run(self, loss, dice, folded_at: int | None) -> None:
        """Show a run's points (`TrainingStatus.loss_curve`, ``dice_curve``, ``folded_at``).

        Args:
            loss: ``(step, loss)`` pairs.
            dice: ``(step, validation Dice)`` pairs.
            folded_at: the step the validation cases joined the training (None: not yet).
        """
        self.loss = [(int(s), float(v)) for s, v in loss]
        self.dice = [(int(s), float(d)) for s, d in dice]
        self.folded_at = None if folded_at is None else int(folded_at)
        self.update()

    def x_range(self):
        xs = [s for s, _ in self.loss + self.dice]
        return (0, max(xs)) if xs else None

    def draw_series(self, p, to_px) -> None:
        top = max((v for _, v in self.loss), default=1.0) or 1.0
        _line(p, [to_px(s, v / top) for s, v in self.loss], LOSS_COLOR, dots=False)
        _line(p, [to_px(s, d) for s, d in self.dice], DICE_COLOR, dots=True)
        if self.folded_at is not None:
            pen = QPen(QColor(DICE_COLOR), 1, Qt.PenStyle.DashLine)
            p.setPen(pen)
            p.drawLine(to_px(self.folded_at, 0.0), to_px(self.folded_at, 1.0))

    def caption(self) -> str:
        parts = []
        if self.loss:
            parts.append(f"loss {self.loss[-1][1]:.3f}")
        if self.dice:
            parts.append(f"Dice {self.dice[-1][1]:.2f}")
        return " · ".join(parts)
