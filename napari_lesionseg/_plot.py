"""A tiny QPainter line plot: validation Dice against the number of annotated cases.

No plotting dependency; it draws axes, ticks, the points (joined in x order) and a caption.
"""
from __future__ import annotations

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QPainter, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget


class LearningCurve(QWidget):
    """Label-efficiency plot: ``(n_annotations, dice)`` points, Dice axis fixed to [0, 1]."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._points: list[tuple[int, float]] = []
        self.setMinimumHeight(110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
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

    def sizeHint(self):  # noqa: N802 - Qt API
        size = super().sizeHint()
        size.setHeight(120)
        return size

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt API
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        font = QFont(self.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() - 2))
        p.setFont(font)
        fg = self.palette().color(self.foregroundRole())
        dim = QColor(fg)
        dim.setAlpha(90)
        left, right, top, bottom = 30, 8, 14, 18
        plot = QRectF(left, top, max(10, self.width() - left - right),
                      max(10, self.height() - top - bottom))
        p.setPen(QPen(dim, 1))
        p.drawRect(plot)
        for frac in (0.5,):
            y = plot.bottom() - frac * plot.height()
            p.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
        p.setPen(fg)
        p.drawText(QRectF(0, plot.top() - 6, left - 4, 12),
                   Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, "1")
        p.drawText(QRectF(0, plot.center().y() - 6, left - 4, 12),
                   Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, ".5")
        p.drawText(QRectF(0, plot.bottom() - 6, left - 4, 12),
                   Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter, "0")
        p.drawText(QRectF(plot.left(), 0, plot.width(), top),
                   Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter,
                   "validation Dice vs annotated cases")
        if not self._points:
            p.setPen(dim)
            p.drawText(plot, Qt.AlignmentFlag.AlignCenter, "no trained model yet")
            p.end()
            return
        xs = [n for n, _ in self._points]
        x0, x1 = min(xs), max(xs)
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
        p.setPen(fg)
        for value, align in ((x0, Qt.AlignmentFlag.AlignLeft), (x1, Qt.AlignmentFlag.AlignRight)):
            p.drawText(QRectF(plot.left(), plot.bottom() + 2, plot.width(), bottom - 2),
                       align | Qt.AlignmentFlag.AlignTop, str(value))

        def to_px(n: int, d: float) -> QPointF:
            x = plot.left() + (n - x0) / (x1 - x0) * plot.width()
            y = plot.bottom() - max(0.0, min(1.0, d)) * plot.height()
            return QPointF(x, y)

        accent = QColor("#4fc3f7")
        p.setPen(QPen(accent, 1.5))
        pts = [to_px(n, d) for n, d in self._points]
        for a, b in zip(pts, pts[1:]):
            p.drawLine(a, b)
        p.setBrush(accent)
        for pt in pts:
            p.drawEllipse(pt, 2.5, 2.5)
        p.setPen(fg)
        p.drawText(QRectF(plot.left(), plot.top() + 2, plot.width() - 4, 12),
                   Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                   f"best {max(v for _, v in self._points):.2f}")
        p.end()
