"""Export panel: write one mask file per case (plus provenance sidecars) in a worker."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from napari.utils import progress
from napari.utils.notifications import show_info
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_lesionseg._tasks import progress_relay, run_task

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.export import ExportReport

    from napari_lesionseg._state import WorkspaceState

FORMATS = ("png", "tiff", "nifti", "zarr")
SOURCES = ("annotation", "prediction", "reference")
#: (label, ``export_masks`` values) of the pixel-value choices
VALUES = (("class indices", "index"), ("viewable 0/255", "binary"), ("class colours (RGB)", "color"))


def _export_in_worker(project_path: str, out_dir: str, fmt: str, source: str,
                      on_progress: Callable[[int, int], None], values: str = "index") -> ExportReport:
    from training_backend.export import export_masks
    from training_backend.store import Project

    project = Project.open(project_path, mode="r")
    return export_masks(project, out_dir, fmt=fmt, source=source, on_progress=on_progress,
                        values=values)


class ExportPanel(QWidget):
    """Folder, format and source of an export; the result is summarised in one line.

    Args:
        state: the workspace state.
    """

    def __init__(self, state: WorkspaceState, parent=None):
        super().__init__(parent)
        self.state = state
        self.last_report: ExportReport | None = None
        self._activity: progress | None = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self._folder = QLineEdit()
        self._folder.setPlaceholderText("output folder")
        browse = QPushButton("…")
        browse.setFixedWidth(28)
        browse.clicked.connect(lambda: self._browse())
        row.addWidget(self._folder, 1)
        row.addWidget(browse)
        lay.addLayout(row)
        row2 = QHBoxLayout()
        self._format = QComboBox()
        self._format.addItems(FORMATS)
        self._format.setToolTip("png / tiff / nifti (.nii.gz) / zarr")
        self._source = QComboBox()
        self._source.addItems(SOURCES)
        self._source.setToolTip("annotation: latest saved version · prediction: latest model "
                                "output · reference: hidden reference masks")
        self._values = QComboBox()
        for label, value in VALUES:
            self._values.addItem(label, value)
        self._values.setToolTip("class indices: for pipelines (look black in an image viewer) · "
                                "0/255: any lesion white · class colours: RGB, png/tiff only")
        self._values.currentIndexChanged.connect(self._on_values)
        self._export_btn = QPushButton("Export masks")
        self._export_btn.clicked.connect(lambda: self.export())
        row2.addWidget(self._format)
        row2.addWidget(self._source)
        row2.addWidget(self._values)
        lay.addLayout(row2)
        lay.addWidget(self._export_btn)
        self._bar = QProgressBar()
        self._bar.setVisible(False)
        lay.addWidget(self._bar)
        self._summary = QLabel("")
        self._summary.setWordWrap(True)
        self._summary.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        lay.addWidget(self._summary)
        state.project_changed.connect(self._on_project)
        self._on_project(state.project)

    def _on_values(self, *_args) -> None:
        """Colour masks are RGB images: only png and tiff hold them."""
        colour = self._values.currentData() == "color"
        for i, fmt in enumerate(FORMATS):
            self._format.model().item(i).setEnabled(not colour or fmt in ("png", "tiff"))
        if colour and self._format.currentText() not in ("png", "tiff"):
            self._format.setCurrentText("png")

    def _on_project(self, project) -> None:
        self._export_btn.setEnabled(project is not None)
        if project is not None and not self._folder.text():
            self._folder.setText(str(Path(project.path) / "export"))

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Export masks to")
        if path:
            self._folder.setText(path)

    def export(self, out_dir: str | None = None, fmt: str | None = None,
               source: str | None = None, values: str | None = None) -> None:
        """Export in a worker; arguments default to the widgets' values."""
        project = self.state.project
        if project is None:
            return
        out_dir = out_dir or self._folder.text().strip()
        if not out_dir:
            self._summary.setText("choose an output folder first")
            return
        fmt, source = fmt or self._format.currentText(), source or self._source.currentText()
        values = values or self._values.currentData()
        self.state.save_requested.emit()
        self._export_btn.setEnabled(False)
        self._bar.setVisible(True)
        self._bar.setValue(0)
        self._activity = progress(total=0, desc=f"Exporting {source} masks")
        run_task(_export_in_worker, str(project.path), out_dir, fmt, source,
                 progress_relay(self._on_progress), values, on_done=self._on_done,
                 on_finish=self._on_finish)

    def _on_progress(self, done: int, total: int) -> None:
        self._bar.setMaximum(max(total, 1))
        self._bar.setValue(done)
        if self._activity is not None:
            self._activity.total = total
            self._activity.n = done
            self._activity.refresh()

    def _on_done(self, report: ExportReport) -> None:
        self.last_report = report
        text = report.summary()
        self._summary.setText(text)
        show_info(text)

    def _on_finish(self) -> None:
        self._export_btn.setEnabled(self.state.project is not None)
        self._bar.setVisible(False)
        if self._activity is not None:
            self._activity.close()
            self._activity = None
