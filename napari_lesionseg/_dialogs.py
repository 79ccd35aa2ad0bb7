"""Small modal dialogs of the project panel: new project, CSV column mapping.

Their forms are magicgui widgets: the new-project form is built from the signature of
`new_project_settings`, the CSV form from ``import_csv``'s column parameters (names and help
from its docstring); each sits in a `QDialog` with OK / Cancel.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

import docstring_parser
from magicgui import magicgui
from magicgui.widgets import CheckBox, ComboBox, Container, Label
from qtpy.QtWidgets import QDialog, QDialogButtonBox, QSizePolicy, QVBoxLayout, QWidget

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.project.importer import CsvTable
    from training_backend.project.store import Project

NONE = "(none)"


def split_names(text: str) -> list[str]:
    """``"MA, HE ,EX"`` -> ``["MA", "HE", "EX"]`` (empty parts dropped)."""
    return [part.strip() for part in text.replace(";", ",").split(",") if part.strip()]


def _finish_form(dialog: QDialog, *widgets: QWidget) -> None:
    """Lay out ``widgets`` above OK / Cancel buttons that accept / reject ``dialog``."""
    buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok
                               | QDialogButtonBox.StandardButton.Cancel)
    buttons.accepted.connect(dialog.accept)
    buttons.rejected.connect(dialog.reject)
    lay = QVBoxLayout(dialog)
    for widget in widgets:
        lay.addWidget(widget)
    lay.addWidget(buttons)


# ----------------------------------------------------------------------------- new project
def new_project_settings(folder: Path = Path(), classes: str = "lesion",
                         image_classes: str = "") -> tuple[str, list[str], list[str]]:
    """A new project's folder and classes; the New-project form is built from this signature.

    Args:
        folder: an empty or new folder for the project.
        classes: lesion classes, comma-separated; class k is pixel value k.
        image_classes: image-level classes, comma-separated (optional).
    """
    text = str(folder).strip()
    return ("" if text in ("", ".") else text, split_names(classes), split_names(image_classes))


# magicgui reads annotations as types; ``from __future__ import annotations`` left strings
new_project_settings.__annotations__ = get_type_hints(new_project_settings)


class NewProjectDialog(QDialog):
    """Ask for a folder, lesion classes and image classes of a new project."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("New lesionseg project")
        self.form = magicgui(new_project_settings, call_button=False,
                             folder={"mode": "d", "label": "Folder"},
                             classes={"label": "Lesion classes"},
                             image_classes={"label": "Image classes"})
        self.folder, self.classes = self.form.folder, self.form.classes
        self.image_classes = self.form.image_classes
        self.folder.line_edit.native.setPlaceholderText("an empty or new folder")
        self.image_classes.native.setPlaceholderText("e.g. normal, benign, malignant (optional)")
        _finish_form(self, self.form.native)

    def values(self) -> tuple[str, list[str], list[str]]:
        """``(folder, lesion classes, image classes)`` as typed (folder "" when empty)."""
        return self.form()


# ----------------------------------------------------------------------------- CSV import
def import_help() -> dict[str, str]:
    """Help of ``import_csv``'s parameters, from its docstring."""
    from training_backend.project.importer import import_csv

    doc = docstring_parser.parse(import_csv.__doc__ or "")
    return {p.arg_name: " ".join((p.description or "").split()).replace("``", "")
            for p in doc.params}


class CsvImportDialog(QDialog):
    """Map the columns of a CSV onto ``import_csv`` arguments.

    Each column choice shows that column's first values and how many distinct values it has;
    the image-label column is guessed by content (the column whose values are the project's
    image classes), and a line above the buttons says, before anything is imported, how many
    rows would be imported and how many skipped, and why (``importer.check_csv``).

    Args:
        project: the open project (its classes).
        table: the CSV as read by ``training_backend.project.importer.read_csv_table``.
    """

    def __init__(self, project: Project, table: CsvTable, parent: QWidget | None = None):
        from training_backend.project.importer import guess_label_column

        super().__init__(parent)
        self.setWindowTitle(f"Import {Path(table.path).name}")
        self._project, self._table = project, table
        self._header = list(table.header)
        self._help = import_help()
        self._building = True
        #: each column choice's preview line (its first values), by the choice's name
        self.previews: dict[str, Label] = {}
        rows: list = []
        self.image = self._combo("image_col", optional=False,
                                 guess=("image", "images", "path", "file"))
        rows.append(self._with_preview(self.image, "Image column"))
        self.masks: dict[str, ComboBox] = {}
        for i, cls in enumerate(project.classes):
            self.masks[cls] = self._combo(f"mask_{i}", help_of="mask_cols", guess=(
                f"{cls}_mask", f"{cls} mask", cls, "mask", "masks"))
            rows.append(self._with_preview(self.masks[cls], f"Mask of {cls}"))
        by_content = guess_label_column(table, project.image_classes)
        self.label = self._combo("label_col", guess=((by_content,) if by_content
                                                     else ("label", "class", "diagnosis")))
        self.label.enabled = bool(project.image_classes)
        rows.append(self._with_preview(self.label, "Image label"))
        self.split = self._combo("split_col", guess=("split", "set"))
        rows.append(self._with_preview(self.split, "Split (train/holdout)"))
        self.reference = CheckBox(name="reference", value=False, tooltip=self._help.get("reference"),
                                  text="masks are a hidden reference (evaluation only)")
        self.check_line = Label(name="check_line", value="")
        self.check_line.native.setWordWrap(True)
        self.check_line.native.setSizePolicy(QSizePolicy.Policy.Expanding,
                                             QSizePolicy.Policy.Preferred)
        self.form = Container(labels=True)
        self.form.extend(rows)  # added one by one: the labels get one width
        self.form.margins = (0, 0, 0, 0)
        intro = Label(value=f"{len(table.rows)} rows; paths relative to the CSV's folder")
        _finish_form(self, intro.native, self.form.native, self.reference.native,
                     self.check_line.native)
        self._building = False
        self._recheck()

    def showEvent(self, event) -> None:  # noqa: N802 - Qt's name
        from napari_lesionseg._train_form import align_labels, form_labels

        super().showEvent(event)
        align_labels(form_labels(self.form))

    def _combo(self, name: str, optional: bool = True, guess: tuple[str, ...] = (),
               help_of: str | None = None) -> ComboBox:
        """A column choice (``(none)`` first when optional), set to the first guessed column."""
        choices = ([NONE] if optional else []) + self._header
        lower = {h.lower(): h for h in self._header}
        value = next((lower[g.lower()] for g in guess if g.lower() in lower), choices[0] if
                     choices else None)
        return ComboBox(name=name, choices=choices, value=value,
                        tooltip=self._help.get(help_of or name))

    def _with_preview(self, combo: ComboBox, title: str) -> Container:
        """``combo`` with its column's values below it; both refresh when it changes."""
        preview = Label(value="")
        preview.native.setStyleSheet("color: gray; font-size: 11px;")
        self.previews[combo.name] = preview
        box = Container(widgets=[combo, preview], labels=False, label=title)
        box.margins = (0, 0, 0, 0)
        box.native.layout().setSpacing(0)
        combo.changed.connect(lambda _v, c=combo: self._show_values(c))
        combo.changed.connect(lambda _v: self._recheck())
        self._show_values(combo)
        return box

    def _show_values(self, combo: ComboBox) -> None:
        from training_backend.project.importer import column_summary

        col = self._value(combo) if combo is not self.image else combo.value
        self.previews[combo.name].value = ("" if col is None
                                           else column_summary(self._table, col))

    def _recheck(self) -> None:
        """Count the rows that would be skipped with the current choices, and why."""
        from training_backend.project.importer import check_csv

        if self._building:
            return
        kw = self.kwargs()
        check = check_csv(self._project, self._table, kw["image_col"], kw["mask_cols"],
                          kw["label_col"], kw["split_col"])
        self.check_line.value = check.summary()
        self.check_line.native.setStyleSheet("color: #d08000;" if check.n_skipped else "")
        self.check = check

    @staticmethod
    def _value(combo: ComboBox) -> str | None:
        value = combo.value
        return None if value in (NONE, None) or not combo.enabled else value

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``training_backend.project.importer.import_csv``."""
        mask_cols = [(col, cls) for cls, combo in self.masks.items()
                     if (col := self._value(combo)) is not None]
        return {"image_col": self.image.value, "mask_cols": mask_cols,
                "label_col": self._value(self.label), "split_col": self._value(self.split),
                "reference": self.reference.value}
