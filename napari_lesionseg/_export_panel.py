"""Export panel: write one mask file per case (plus provenance sidecars) in a worker.

The settings form is built by magicgui from the signature of `export_settings` (its parameter
names are ``export_masks``'s keywords); the format choices come from the format registry
(`training_backend.project.formats.export_formats`), so a new export format shows up here by itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, get_type_hints

from magicgui import magicgui
from napari.utils import progress
from napari.utils.notifications import show_info
from qtpy.QtWidgets import QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from napari_lesionseg._tasks import progress_relay, run_task

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.project.export import ExportReport

    from napari_lesionseg._state import WorkspaceState

SOURCES = ("annotation", "prediction", "reference")
#: (label, ``export_masks`` values) of the pixel-value choices
VALUES = (("class indices", "index"), ("viewable 0/255", "binary"), ("class colours (RGB)", "color"))


def export_formats() -> dict:
    """name -> `FileFormat` the export offers (the registry; torch-free, imports no store)."""
    from training_backend.project.formats import export_formats as offered

    return offered()


def export_settings(out_dir: Path = Path(), fmt: str = "png", source: str = "annotation",
                    values: str = "index") -> dict:
    """The export's settings; the panel's form is built from this signature.

    Args:
        out_dir: output folder.
        fmt: file format (a registered export format).
        source: which masks: the latest annotation, the latest prediction or the hidden reference.
        values: what pixels hold: class indices, 0/255, or class colours (RGB; png/tiff only).
    """
    return {"out_dir": out_dir, "fmt": fmt, "source": source, "values": values}


# magicgui reads annotations as types; ``from __future__ import annotations`` left strings
export_settings.__annotations__ = get_type_hints(export_settings)


def _export_in_worker(project_path: str, out_dir: str, fmt: str, source: str,
                      on_progress: Callable[[int, int], None], values: str = "index") -> ExportReport:
    from training_backend.project.export import export_masks
    from training_backend.project.store import Project

    project = Project.open(project_path, mode="r")
    return export_masks(project, out_dir, fmt=fmt, source=source, on_progress=on_progress,
                        values=values)


def _settings_form():
    """The magicgui form of `export_settings` (no call button: the panel's button exports)."""
    names = list(export_formats())
    rgb = [n for n, f in export_formats().items() if f.writes_rgb]
    return magicgui(
        export_settings, call_button=False, labels=False,
        out_dir={"mode": "d", "label": "folder",
                 "tooltip": "output folder (created if missing)"},
        fmt={"choices": names,
             "tooltip": " / ".join(f"{n} ({f.suffix})" for n, f in export_formats().items())},
        source={"choices": list(SOURCES),
                "tooltip": "annotation: latest saved version · prediction: latest model "
                           "output · reference: hidden reference masks"},
        values={"choices": list(VALUES),
                "tooltip": "class indices: for pipelines (look black in an image viewer) · "
                           f"0/255: any lesion white · class colours: RGB, {'/'.join(rgb)} only"},
    )


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
        self.form = _settings_form()
        self._folder, self._format = self.form.out_dir, self.form.fmt
        self._source, self._values = self.form.source, self.form.values
        self.form.native.layout().setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.form.native)
        self._values.changed.connect(self._on_values)
        self._export_btn = QPushButton("Export masks")
        self._export_btn.clicked.connect(lambda: self.export())
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
        """Colour masks are RGB images: only formats that write RGB hold them."""
        colour = self._values.value == "color"
        offered = export_formats()
        model = self._format.native.model()
        for i, name in enumerate(self._format.choices):
            model.item(i).setEnabled(not colour or offered[name].writes_rgb)
        if colour and not offered[self._format.value].writes_rgb:
            self._format.value = next(n for n, f in offered.items() if f.writes_rgb)

    def _on_project(self, project) -> None:
        self._export_btn.setEnabled(project is not None)
        if project is not None and str(self._folder.value) in ("", "."):
            self._folder.value = Path(project.path) / "export"

    def export(self, out_dir: str | None = None, fmt: str | None = None,
               source: str | None = None, values: str | None = None) -> None:
        """Export in a worker; arguments default to the form's values."""
        project = self.state.project
        if project is None:
            return
        out_dir = out_dir or str(self._folder.value).strip()
        if not out_dir or out_dir == ".":
            self._summary.setText("choose an output folder first")
            return
        fmt, source = fmt or self._format.value, source or self._source.value
        values = values or self._values.value
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
