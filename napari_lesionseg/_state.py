"""The workspace's shared state: a small observable object the panels subscribe to.

Panels never call each other. They read and write this object; its psygnal signals tell the other
panels what changed. Everything here lives on the GUI thread.
"""
from __future__ import annotations

import getpass
from typing import TYPE_CHECKING

from psygnal import Signal

from napari_lesionseg._status import TrainingStatus
from training_backend.active.acquisition import DEFAULT_STRATEGY

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.project.store import Project


def current_user() -> str:
    """The name recorded as ``author`` of annotations saved from the GUI."""
    try:
        return getpass.getuser() or "user"
    except Exception:  # no login name (containers)
        return "user"


class WorkspaceState:
    """Observable state of one workspace.

    Signals:
        project_changed(project): a project was opened (or ``None``: closed).
        case_changed(new_cid, old_cid): the case being annotated changed.
        case_updated(cid): labels/annotations of one case were saved.
        cases_changed(): many cases changed (import, another process wrote the index).
        outputs_changed(case_ids): new model outputs were written for these cases.
        training_changed(running): the trainer started or stopped.
        strategy_changed(name): the active-learning strategy changed.
        save_requested(): save pending edits now (e.g. before training starts).

    Attributes:
        run: the evented status of the training run on show (`TrainingStatus`): the trainer
            panel feeds it the trainer's events, widgets subscribe to its fields; its
            ``predictions_ready`` re-reads the project and becomes ``outputs_changed``.
    """

    project_changed = Signal(object)
    case_changed = Signal(object, object)
    case_updated = Signal(str)
    cases_changed = Signal()
    outputs_changed = Signal(tuple)
    training_changed = Signal(bool)
    strategy_changed = Signal(str)
    save_requested = Signal()

    def __init__(self) -> None:
        self._project: Project | None = None
        self._case_id: str | None = None
        self._training = False
        self._strategy = DEFAULT_STRATEGY
        self.user = current_user()
        #: Cases that got a new annotation or image label since the last training started.
        self.new_labels: set[str] = set()
        #: The current active-learning ranking, best first (set by the cases panel).
        self.suggested: list[str] = []
        self.run = TrainingStatus()
        self.run.predictions_ready.connect(self._on_predictions_ready)

    # ---- project
    @property
    def project(self) -> Project | None:
        return self._project

    @project.setter
    def project(self, project: Project | None) -> None:
        self._project = project
        self._case_id = None
        self.new_labels.clear()
        self.project_changed.emit(project)

    # ---- current case
    @property
    def case_id(self) -> str | None:
        return self._case_id

    @case_id.setter
    def case_id(self, cid: str | None) -> None:
        if cid == self._case_id:
            return
        old, self._case_id = self._case_id, cid
        self.case_changed.emit(cid, old)

    # ---- training
    @property
    def training(self) -> bool:
        return self._training

    @training.setter
    def training(self, running: bool) -> None:
        if running != self._training:
            self._training = running
            self.training_changed.emit(running)

    # ---- acquisition
    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, name: str) -> None:
        if name != self._strategy:
            self._strategy = name
            self.strategy_changed.emit(name)

    # ---- notifications from panels
    def labels_saved(self, cid: str) -> None:
        """A panel saved an annotation or image label of ``cid``."""
        self.new_labels.add(cid)
        self.case_updated.emit(cid)

    def _on_predictions_ready(self, _model_id: str, case_ids: tuple) -> None:
        """A run wrote outputs of ``case_ids``: re-read the project, tell the panels."""
        if self._project is not None:
            self._project.refresh()
        self.outputs_changed.emit(tuple(case_ids))

    def reload_index(self) -> None:
        """Re-read the project's indexes (another process wrote them) and tell the panels."""
        if self._project is not None and self._project.refresh():
            self.cases_changed.emit()
