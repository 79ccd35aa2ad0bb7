"""The lesion workspace: one dock widget holding every panel, wired to one shared state.

Panels (each in its own module) talk only through :class:`~napari_lesionseg._state.WorkspaceState`.
This module builds them, binds the keyboard shortcuts on the viewer and keeps the project index
fresh when another process (the trainer, the CLI) writes it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qtpy.QtCore import QEvent, QObject, Qt, QTimer
from qtpy.QtWidgets import QApplication, QFrame, QLabel, QScrollArea, QVBoxLayout, QWidget
from superqt import QCollapsible

from napari_lesionseg._annotate_panel import AnnotatePanel
from napari_lesionseg._cases_panel import CasesPanel
from napari_lesionseg._export_panel import ExportPanel
from napari_lesionseg._project_panel import ProjectPanel
from napari_lesionseg._state import WorkspaceState
from napari_lesionseg._tasks import shutdown_tasks
from napari_lesionseg._trainer_panel import TrainerPanel

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from training_backend.project.store import Project

#: (key, what it does) -- shown in the help label and bound on the viewer.
SHORTCUTS = (
    ("N / Shift+N", "next suggested / previous case"),
    ("1…9 / 0", "paint lesion class / background"),
    ("Alt+1…9 / Alt+0", "image label / clear it"),
    ("A / Shift+A", "accept / edit the prediction"),
    ("Shift+F", "lesion-free: save an empty full mask"),
    ("Shift+P", "predict this case with the latest model"),
    ("H", "show/hide model layers"),
    ("P E F Z", "napari: paint, erase, fill, pan"),
)
INDEX_REFRESH_MS = 3000
MIN_WIDTH = 380


def shortcuts_html() -> str:
    rows = "".join(f"<tr><td><b>{k}</b>&nbsp;&nbsp;</td><td>{v}</td></tr>" for k, v in SHORTCUTS)
    return f"<table style='font-size:11px'>{rows}</table>"


class LesionWorkspace(QWidget):
    """Project, cases, annotation, training and export in one dock widget.

    Args:
        viewer: the napari viewer (injected by napari when opened from the Plugins menu).
    """

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.state = WorkspaceState()
        self.project_panel = ProjectPanel(self.state)
        self.cases_panel = CasesPanel(self.state)
        self.annotate_panel = AnnotatePanel(viewer, self.state)
        self.trainer_panel = TrainerPanel(self.state)
        self.export_panel = ExportPanel(self.state)
        self._build()
        self._bind_keys()
        self.project_panel.on_opened = self.show_first_case
        self._closing_filter: QObject | None = None
        self._shut_down = False

        self._index_timer = QTimer(self)
        self._index_timer.setInterval(INDEX_REFRESH_MS)
        self._index_timer.timeout.connect(self._refresh_index)
        self._index_timer.start()
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)
        # The dock itself may be closed while the viewer stays: end the trainer with it (only
        # plain Python attributes are touched: the Qt side is gone by then).
        trainer = self.trainer_panel
        self.destroyed.connect(lambda *_: _end_process(trainer))

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        content = QWidget()
        lay = QVBoxLayout(content)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.setSpacing(2)
        self.sections: dict[str, QCollapsible] = {}
        help_label = QLabel(shortcuts_html())
        help_label.setToolTip("Shortcuts act on the viewer canvas; digits act while the "
                              "'annotation' layer is selected (napari's own mode keys stay on "
                              "letters).")
        for title, widgets, expanded in (
            ("Project", [self.project_panel], True),
            ("Cases", [self.cases_panel], True),
            ("Annotate", [self.annotate_panel, help_label], True),
            ("Training", [self.trainer_panel], True),
            ("Export", [self.export_panel], False),
        ):
            section = QCollapsible(title)
            section.setDuration(0)
            for w in widgets:
                section.addWidget(w)
            (section.expand if expanded else section.collapse)(animate=False)
            self.sections[title] = section
            lay.addWidget(section)
        lay.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self._content, self._scroll = content, scroll
        self._fit_width()
        self.state.project_changed.connect(lambda _p: QTimer.singleShot(0, self._fit_width))

    def _fit_width(self) -> None:
        """Never clip the panels: the dock is at least as wide as their minimum width."""
        needed = (self._content.minimumSizeHint().width()
                  + self._scroll.verticalScrollBar().sizeHint().width() + 2)
        self.setMinimumWidth(max(MIN_WIDTH, needed))

    # ------------------------------------------------------------------ keys
    def _bind_keys(self) -> None:
        v = self.viewer
        ws = self

        def bind(key: str, fn, doc: str) -> None:
            def handler(_viewer):
                fn()
            handler.__doc__ = doc
            handler.__name__ = "lesionseg_" + doc.replace(" ", "_").replace("/", "_")
            v.bind_key(key, handler, overwrite=True)

        bind("n", lambda: ws.cases_panel.next_case(), "next suggested case")
        bind("Shift-N", lambda: ws.cases_panel.previous_case(), "previous case")
        bind("a", lambda: ws.annotate_panel.accept_prediction(), "accept prediction")
        bind("Shift-A", lambda: ws.annotate_panel.edit_prediction(), "edit prediction")
        bind("Shift-F", lambda: ws.annotate_panel.mark_lesion_free(), "mark lesion-free")
        bind("Shift-P", lambda: ws.annotate_panel.predict_case(), "predict this case")
        bind("h", lambda: ws.annotate_panel.toggle_model_layers(), "toggle model layers")
        for k in range(10):
            bind(f"Alt-{k}", lambda k=k: ws.annotate_panel.on_key_alt_digit(k),
                 f"image label {k}")

    # ------------------------------------------------------------------ API
    @property
    def project(self) -> Project | None:
        return self.state.project

    def open_project(self, path: str | Path) -> Project | None:
        """Open a project folder in the workspace (errors shown as napari notifications)."""
        return self.project_panel.open_project(path)

    def set_project(self, project: Project) -> None:
        """Show an already open :class:`~training_backend.project.store.Project`."""
        self.project_panel.set_project(project)

    def go_to(self, cid: str) -> None:
        """Show case ``cid``."""
        self.cases_panel.go_to(cid)

    def show_first_case(self) -> None:
        """Show the project's first suggested case when no case is shown (a project that was
        just opened; an empty one waits for an import)."""
        project = self.project
        if project is not None and len(project) and self.annotate_panel.shown_case is None:
            self.cases_panel.next_case()

    def _refresh_index(self) -> None:
        if not self.state.training:  # while training the trainer's events drive refreshes
            self.state.reload_index()

    # ------------------------------------------------------------------ shutdown
    def showEvent(self, event) -> None:  # noqa: N802 - Qt API
        super().showEvent(event)
        window = self.window()
        if self._closing_filter is None and window is not None and window is not self:
            self._closing_filter = _CloseWatcher(self)
            window.installEventFilter(self._closing_filter)

    def shutdown(self) -> None:
        """Save pending edits and stop a running trainer (the window is closing)."""
        if self._shut_down:
            return
        self._shut_down = True
        try:
            self._index_timer.stop()
            self.annotate_panel.save_now()
            self.trainer_panel.close_process()
        except RuntimeError:  # Qt objects already deleted
            pass
        shutdown_tasks()


def _end_process(trainer: TrainerPanel) -> None:
    proc, trainer.process = trainer.process, None
    if proc is not None:
        try:
            proc.close()
        except Exception:  # noqa: BLE001 - already gone
            pass


class _CloseWatcher(QObject):
    """Calls ``workspace.shutdown()`` when the napari main window closes."""

    def __init__(self, workspace: LesionWorkspace):
        super().__init__(workspace)
        self._workspace = workspace

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt API
        if event.type() == QEvent.Type.Close:
            # The close may still be refused (napari asks for confirmation): act only once the
            # window is really gone.
            QTimer.singleShot(0, self._check_closed)
        return False

    def _check_closed(self) -> None:
        try:
            window = self._workspace.window()
            if window is None or not window.isVisible():
                self._workspace.shutdown()
        except RuntimeError:  # already deleted by Qt
            pass
