"""The image-label box of the annotate panel: image-class buttons and per-class presence.

It shows a case's image label and presence and tells its owner (``on_change``) when the user
changes them; saving is the owner's (`napari_lesionseg._annotate_panel.AnnotatePanel`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from qtpy.QtCore import Qt
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import QCheckBox, QGridLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from napari_lesionseg import _layers

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.project.store import CaseRecord, Project


def caption(text: str) -> QLabel:
    """A rich-text, word-wrapped label (section titles)."""
    label = QLabel(text)
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setWordWrap(True)
    return label


def swatch(color: str, size: int = 12) -> QIcon:
    """A square icon of one colour (class swatches)."""
    pix = QPixmap(size, size)
    pix.fill(QColor(color))
    return QIcon(pix)


def clear_grid(grid: QGridLayout) -> None:
    """Remove (and delete) every widget of a grid layout."""
    while grid.count():
        item = grid.takeAt(0)
        if item.widget() is not None:
            item.widget().deleteLater()


class ImageLabelBox(QWidget):
    """Image-label buttons (one per image class) and tri-state lesion-presence boxes.

    Args:
        on_change: called after the user changed the label or a presence box.
        on_toggle: called with an image class when its button is clicked (the owner decides
            whether that sets or clears the label).
    """

    def __init__(self, on_change: Callable[[], None], on_toggle: Callable[[str], None],
                 parent: QWidget | None = None):
        super().__init__(parent)
        self._on_change, self._on_toggle = on_change, on_toggle
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self._label_title = caption("Image label <span style='color:#9aa4b1'>(Alt+1…9; "
                                    "Alt+0 clears)</span>")
        lay.addWidget(self._label_title)
        self._label_box = QGridLayout()
        lay.addLayout(self._label_box)
        self.buttons: dict[str, QPushButton] = {}
        self._presence_title = caption("Lesions present <span style='color:#9aa4b1'>(click: "
                                       "unknown → present → absent)</span>")
        lay.addWidget(self._presence_title)
        self._presence_box = QGridLayout()
        lay.addLayout(self._presence_box)
        self.presence_boxes: dict[str, QCheckBox] = {}

    def rebuild(self, project: Project | None) -> None:
        """One button per image class and one presence box per lesion class of ``project``."""
        for grid in (self._label_box, self._presence_box):
            clear_grid(grid)
        self.buttons.clear()
        self.presence_boxes.clear()
        if project is None:
            return
        cols = 3
        for i, name in enumerate(project.image_classes):
            btn = QPushButton(f"{i + 1} {name}" if i < 9 else name)
            btn.setCheckable(True)
            btn.setToolTip(f"Image label: {name} (Alt+{i + 1})" if i < 9 else name)
            btn.clicked.connect(lambda _checked=False, n=name: self._on_toggle(n))
            self.buttons[name] = btn
            self._label_box.addWidget(btn, i // cols, i % cols)
        self._label_title.setVisible(bool(project.image_classes))
        for i, name in enumerate(project.classes):
            box = QCheckBox(name)
            box.setTristate(True)
            box.setCheckState(Qt.CheckState.PartiallyChecked)
            box.setIcon(swatch(_layers.class_color(project, i)))
            box.stateChanged.connect(lambda *_a: self._on_change())
            self.presence_boxes[name] = box
            self._presence_box.addWidget(box, i // 4, i % 4)

    def widgets(self) -> list[QWidget]:
        """The controls enabled only while a case is shown."""
        return [*self.buttons.values(), *self.presence_boxes.values()]

    def show_record(self, rec: CaseRecord) -> None:
        """Show a case's saved label and presence (without reporting a change)."""
        for name, btn in self.buttons.items():
            btn.setChecked(rec.image_label == name)
        for name, box in self.presence_boxes.items():
            value = (rec.presence or {}).get(name)
            box.blockSignals(True)
            box.setCheckState(_check_state(value))
            box.blockSignals(False)

    def image_label(self) -> str | None:
        """The image class whose button is down, or None."""
        return next((name for name, btn in self.buttons.items() if btn.isChecked()), None)

    def presence(self) -> dict[str, bool] | None:
        """``{class: present}`` for the boxes not left unknown, or None when all are."""
        out = {name: box.checkState() == Qt.CheckState.Checked
               for name, box in self.presence_boxes.items()
               if box.checkState() != Qt.CheckState.PartiallyChecked}
        return out or None

    def set_image_label(self, name: str | None) -> bool:
        """Press the button of ``name`` (None: none) and report the change.

        Returns:
            False when ``name`` is no image class of the project (nothing changes).
        """
        if name is not None and name not in self.buttons:
            return False
        for n, btn in self.buttons.items():
            btn.setChecked(n == name)
        self._on_change()
        return True

    def set_presence(self, name: str, present: bool | None) -> None:
        """Set one lesion class present / absent / unknown (None); the change is reported."""
        self.presence_boxes[name].setCheckState(_check_state(present))


def _check_state(value: bool | None) -> Qt.CheckState:
    return (Qt.CheckState.PartiallyChecked if value is None else
            Qt.CheckState.Checked if value else Qt.CheckState.Unchecked)
