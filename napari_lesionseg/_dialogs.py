"""Small modal dialogs of the project panel: new project, CSV column mapping."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.importer import CsvTable
    from training_backend.store import Project

NONE = "(none)"


def split_names(text: str) -> list[str]:
    """``"MA, HE ,EX"`` -> ``["MA", "HE", "EX"]`` (empty parts dropped)."""
    return [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]


def _finish_form(dialog: QDialog, form: QFormLayout) -> None:
    """Lay out ``form`` above OK / Cancel buttons that accept / reject ``dialog``."""
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok
                               | QDialogButtonBox.StandardButton.Cancel)
    buttons.accepted.connect(dialog.accept)
    buttons.rejected.connect(dialog.reject)
    lay = QVBoxLayout(dialog)
    lay.addLayout(form)
    lay.addWidget(buttons)


class NewProjectDialog(QDialog):
    """Ask for a folder, lesion classes and image classes of a new project."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("New lesionseg project")
        form = QFormLayout()
        row = QHBoxLayout()
        self.folder = QLineEdit()
        self.folder.setPlaceholderText("an empty or new folder")
        browse = QPushButton("…")
        browse.setFixedWidth(28)
        browse.clicked.connect(lambda: self._browse())
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        form.addRow("Folder", row)
        self.classes = QLineEdit("lesion")
        self.classes.setToolTip("Lesion classes, comma-separated; class k is pixel value k")
        form.addRow("Lesion classes", self.classes)
        self.image_classes = QLineEdit()
        self.image_classes.setPlaceholderText("e.g. normal, benign, malignant (optional)")
        form.addRow("Image classes", self.image_classes)
        _finish_form(self, form)

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Project folder")
        if path:
            self.folder.setText(path)

    def values(self) -> tuple[str, list[str], list[str]]:
        return (self.folder.text().strip(), split_names(self.classes.text()),
                split_names(self.image_classes.text()))


class CsvImportDialog(QDialog):
    """Map the columns of a CSV onto ``import_csv`` arguments.

    Each column choice shows that column's first values and how many distinct values it has;
    the image-label column is guessed by content (the column whose values are the project's
    image classes), and a line above the buttons says, before anything is imported, how many
    rows would be imported and how many skipped, and why (``importer.check_csv``).

    Args:
        project: the open project (its classes).
        table: the CSV as read by ``training_backend.importer.read_csv_table``.
    """

    def __init__(self, project: Project, table: CsvTable, parent: QWidget | None = None):
        from training_backend.importer import guess_label_column

        super().__init__(parent)
        self.setWindowTitle(f"Import {Path(table.path).name}")
        self._project, self._table = project, table
        self._header = list(table.header)
        form = QFormLayout()
        form.addRow(QLabel(f"{len(table.rows)} rows; paths relative to the CSV's folder"))
        self.image = self._combo(optional=False, guess=("image", "images", "path", "file"))
        self._add(form, "Image column", self.image)
        self.masks: dict[str, QComboBox] = {}
        for cls in project.classes:
            self.masks[cls] = self._combo(guess=(f"{cls}_mask", f"{cls} mask", cls, "mask", "masks"))
            self._add(form, f"Mask of {cls}", self.masks[cls])
        by_content = guess_label_column(table, project.image_classes)
        self.label = self._combo(guess=((by_content,) if by_content else ("label", "class", "diagnosis")))
        self.label.setEnabled(bool(project.image_classes))
        self._add(form, "Image label", self.label)
        self.split = self._combo(guess=("split", "set"))
        self._add(form, "Split (train/holdout)", self.split)
        self.reference = QCheckBox("masks are a hidden reference (evaluation only)")
        form.addRow(self.reference)
        self.check_line = QLabel()
        self.check_line.setWordWrap(True)
        form.addRow(self.check_line)
        _finish_form(self, form)
        self._recheck()

    def _add(self, form: QFormLayout, title: str, combo: QComboBox) -> None:
        """A combo with the chosen column's values below it; both refresh on change."""
        preview = QLabel()
        preview.setStyleSheet("color: gray;")
        preview.setWordWrap(True)
        box = QVBoxLayout()
        box.setSpacing(0)
        box.addWidget(combo)
        box.addWidget(preview)
        form.addRow(title, box)
        combo.preview = preview  # type: ignore[attr-defined]
        combo.currentTextChanged.connect(lambda _t, c=combo: self._show_values(c))
        combo.currentTextChanged.connect(lambda _t: self._recheck())
        self._show_values(combo)

    def _show_values(self, combo: QComboBox) -> None:
        from training_backend.importer import column_summary

        col = self._value(combo) if combo is not self.image else combo.currentText()
        combo.preview.setText("" if col is None else column_summary(self._table, col))

    def _recheck(self) -> None:
        """Count the rows that would be skipped with the current choices, and why."""
        from training_backend.importer import check_csv

        if not hasattr(self, "check_line"):
            return  # still building
        kw = self.kwargs()
        check = check_csv(self._project, self._table, kw["image_col"], kw["mask_cols"],
                          kw["label_col"], kw["split_col"])
        self.check_line.setText(check.summary())
        self.check_line.setStyleSheet("color: #d08000;" if check.n_skipped else "")
        self.check = check

    def _combo(self, optional: bool = True, guess: tuple[str, ...] = ()) -> QComboBox:
        combo = QComboBox()
        if optional:
            combo.addItem(NONE)
        combo.addItems(self._header)
        lower = {h.lower(): h for h in self._header}
        for g in guess:
            if g.lower() in lower:
                combo.setCurrentText(lower[g.lower()])
                break
        return combo

    @staticmethod
    def _value(combo: QComboBox) -> str | None:
        text = combo.currentText()
        return None if text == NONE or not combo.isEnabled() else text

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``training_backend.importer.import_csv``."""
        mask_cols = [(col, cls) for cls, combo in self.masks.items()
                     if (col := self._value(combo)) is not None]
        return {"image_col": self.image.currentText(), "mask_cols": mask_cols,
                "label_col": self._value(self.label), "split_col": self._value(self.split),
                "reference": self.reference.isChecked()}
