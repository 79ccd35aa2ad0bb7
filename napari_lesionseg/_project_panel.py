"""Project panel: open / create a project, import images or a CSV, show the classes."""
from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QDialog,
    QFileDialog,
    QGridLayout,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_lesionseg import _layers
from napari_lesionseg._dialogs import CsvImportDialog, NewProjectDialog
from napari_lesionseg._tasks import error_message, progress_relay, run_task

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.project.importer import ImportReport
    from training_backend.project.store import Project

    from napari_lesionseg._state import WorkspaceState


def _import_in_worker(project_path: str, what: str, source: str, kwargs: dict,
                      on_progress: Callable[[int, int], None]) -> ImportReport:
    """Run an import on the worker's own handle of the project (the GUI keeps its own)."""
    from training_backend.project import importer
    from training_backend.project.store import Project

    project = Project.open(project_path)
    fn = importer.import_folder if what == "folder" else importer.import_csv
    return fn(project, source, on_progress=on_progress, **kwargs)


class ProjectPanel(QWidget):
    """Open/create/import controls and the project's class legend.

    Args:
        state: the workspace state.
    """

    def __init__(self, state: WorkspaceState, parent=None):
        super().__init__(parent)
        self.state = state
        self._import_progress: progress | None = None
        #: called after the user opened a project from this panel (the workspace shows its
        #: first suggested case)
        self.on_opened = lambda: None
        self._build()
        state.project_changed.connect(self._on_project)
        state.cases_changed.connect(self._update_summary)
        state.case_updated.connect(self._update_summary)
        self._on_project(state.project)

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self._title = QLabel("No project open")
        self._title.setWordWrap(True)
        self._title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self._title)
        grid = QGridLayout()
        self._open_btn = QPushButton("Open…")
        self._open_btn.setToolTip("Open a lesionseg project folder")
        self._open_btn.clicked.connect(lambda: self._ask_open())
        self._new_btn = QPushButton("New…")
        self._new_btn.clicked.connect(lambda: self._ask_new())
        self._sample_btn = QPushButton("Sample…")
        self._sample_btn.setToolTip("Create the bundled IDRiD sample project in a folder")
        self._sample_btn.clicked.connect(lambda: self._ask_sample())
        self._import_dir_btn = QPushButton("Import folder…")
        self._import_dir_btn.setToolTip("Add every image of a folder as an unlabelled case")
        self._import_dir_btn.clicked.connect(lambda: self._ask_import_folder())
        self._import_csv_btn = QPushButton("Import CSV…")
        self._import_csv_btn.setToolTip("Add images with masks / labels listed in a CSV")
        self._import_csv_btn.clicked.connect(lambda: self._ask_import_csv())
        grid.addWidget(self._open_btn, 0, 0)
        grid.addWidget(self._new_btn, 0, 1)
        grid.addWidget(self._sample_btn, 0, 2)
        grid.addWidget(self._import_dir_btn, 1, 0, 1, 2)
        grid.addWidget(self._import_csv_btn, 1, 2)
        lay.addLayout(grid)
        self._progress = QProgressBar()
        self._progress.setVisible(False)
        self._progress.setFormat("importing %v / %m")
        lay.addWidget(self._progress)
        self._classes = QLabel("")
        self._classes.setWordWrap(True)
        self._classes.setTextFormat(Qt.TextFormat.RichText)
        lay.addWidget(self._classes)

    # ------------------------------------------------------------------ display
    def _on_project(self, project: Project | None) -> None:
        for w in (self._import_dir_btn, self._import_csv_btn):
            w.setEnabled(project is not None)
        if project is None:
            self._title.setText("No project open — Open…, New… or Sample…")
            self._classes.setText("")
            return
        swatches = " ".join(
            f"<span style='color:{_layers.class_color(project, i)}'>■</span>&nbsp;{i + 1}&nbsp;"
            f"{html.escape(name)}" for i, name in enumerate(project.classes))
        text = f"Lesions: {swatches}"
        if project.image_classes:
            labels = ", ".join(html.escape(c) for c in project.image_classes)
            text += f"<br>Image labels: {labels}"
        self._classes.setText(text)
        self._update_summary()

    def _update_summary(self, *_args) -> None:
        project = self.state.project
        if project is None:
            return
        self._title.setText(f"<b>{html.escape(project.name)}</b> — {len(project)} cases"
                            f"<br><span style='color:#9aa4b1; font-size:11px'>"
                            f"{html.escape(str(Path(project.path).resolve()))}</span>")

    # ------------------------------------------------------------------ open / create
    def open_project(self, path: str | Path) -> Project | None:
        """Open the project folder ``path`` (errors are shown, not raised)."""
        from training_backend.errors import ReadOnlyError
        from training_backend.project.store import Project

        try:
            try:
                project = Project.open(path)
            except ReadOnlyError:  # look without saving
                project = Project.open(path, mode="r")
                show_warning(f"{Path(path)}: the folder is read-only; the project is open for "
                             f"looking only: nothing you change will be saved")
        except Exception as exc:  # noqa: BLE001 - shown to the user
            show_error(error_message(exc))
            return None
        self.set_project(project)
        return project

    def set_project(self, project: Project | None) -> None:
        self.state.case_id = None  # saves the case being edited in the old project
        self.state.project = project

    def create_project(self, path: str | Path, classes: list[str],
                       image_classes: list[str] = ()) -> Project | None:
        """Create a project and open it (errors are shown, not raised)."""
        from training_backend.project.store import Project

        try:
            project = Project.create(path, classes, image_classes)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            show_error(error_message(exc))
            return None
        self.set_project(project)
        return project

    def create_sample(self, path: str | Path, unlabelled: bool = False) -> Project | None:
        """Create the bundled sample project in ``path`` (or open it if it is one already).

        Args:
            path: an empty or new folder.
            unlabelled: keep the sample's masks and labels hidden as a reference (start from
                unlabelled images; evaluation can still score the work).
        """
        from training_backend.project.sample import create_sample_project
        from training_backend.project.store import Project

        try:
            project = (Project.open(path) if Project.is_project(path)
                       else create_sample_project(path, reference=unlabelled,
                                                  hide_labels=unlabelled))
        except Exception as exc:  # noqa: BLE001 - shown to the user
            show_error(error_message(exc))
            return None
        self.set_project(project)
        return project

    def _ask_open(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open lesionseg project")
        if path and self.open_project(path) is not None:
            self.on_opened()

    def _ask_new(self) -> None:
        dialog = NewProjectDialog(self)
        if dialog.exec() != QDialog.DialogCode.Accepted:
            return
        folder, classes, image_classes = dialog.values()
        if not folder or not classes:
            show_warning("A new project needs a folder and at least one lesion class")
            return
        self.create_project(folder, classes, image_classes)

    def _ask_sample(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder for the sample project (empty)")
        if not path:
            return
        answer = QMessageBox.question(
            self, "IDRiD sample",
            "Start from unlabelled images?\n\nYes: the sample's lesion masks and labels are "
            "kept hidden as a reference (try annotating and active learning).\nNo: they are "
            "imported as annotations.")
        if self.create_sample(path, unlabelled=answer == QMessageBox.StandardButton.Yes) is not None:
            self.on_opened()

    # ------------------------------------------------------------------ import
    def _ask_import_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Import every image of a folder")
        if path:
            self.import_folder(path)

    def _ask_import_csv(self) -> None:
        from training_backend.project.importer import read_csv_table

        project = self.state.project
        path, _ = QFileDialog.getOpenFileName(self, "Import a CSV", "", "CSV (*.csv *.tsv *.txt)")
        if not path or project is None:
            return
        try:
            table = read_csv_table(path)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            show_error(error_message(exc))
            return
        dialog = CsvImportDialog(project, table, self)
        if dialog.exec() == QDialog.DialogCode.Accepted:
            self.import_csv(path, **dialog.kwargs())

    def import_folder(self, folder: str | Path, **kwargs: Any) -> None:
        """Import a folder of images in a worker (``import_folder`` keyword arguments)."""
        self._start_import("folder", str(folder), kwargs)

    def import_csv(self, csv_path: str | Path, **kwargs: Any) -> None:
        """Import a CSV in a worker (``import_csv`` keyword arguments)."""
        self._start_import("csv", str(csv_path), kwargs)

    def _start_import(self, what: str, source: str, kwargs: dict) -> None:
        project = self.state.project
        if project is None:
            return
        self._set_busy(True)
        self._import_progress = progress(total=0, desc=f"Importing {Path(source).name}")
        run_task(_import_in_worker, str(project.path), what, source, kwargs,
                 progress_relay(self._on_import_progress),
                 on_done=self._on_import_done, on_finish=lambda: self._set_busy(False))

    def _on_import_progress(self, done: int, total: int) -> None:
        self._progress.setMaximum(max(total, 1))
        self._progress.setValue(done)
        if self._import_progress is not None:
            self._import_progress.total = total
            self._import_progress.n = done
            self._import_progress.refresh()

    def _on_import_done(self, report: ImportReport) -> None:
        from training_backend.project.importer import describe_skipped

        self.state.reload_index()
        msg = report.summary()
        if report.skipped:
            lines = describe_skipped(report, limit=3)
            show_warning(msg + " — " + "; ".join(lines))
        else:
            show_info(msg)

    def _set_busy(self, busy: bool) -> None:
        self._progress.setVisible(busy)
        if busy:
            self._progress.setValue(0)
        for w in (self._open_btn, self._new_btn, self._sample_btn, self._import_dir_btn,
                  self._import_csv_btn):
            w.setEnabled(not busy and (self.state.project is not None
                                       or w in (self._open_btn, self._new_btn, self._sample_btn)))
        if not busy and self._import_progress is not None:
            self._import_progress.close()
            self._import_progress = None
