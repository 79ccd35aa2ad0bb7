"""The trainer panel's "Start from" row: scratch, the project's latest model, or a starter model.

A starter model (`training_backend.learning.starters`: trained beforehand and shipped with the
package, e.g. ``fundus-starter``) is offered when it predicts exactly the project's lesion
classes; otherwise the row's tooltip says why none is. Choosing one sets the image size (and
crop) the starter was trained at, and Start fine-tunes it (``TrainConfig.init_from`` = its
name). "Predict with <starter>" predicts the project with it right away, without training: the
case on screen first, then the top of the ranking, then the rest, each part in a short-lived
``lesionseg predict`` child process (the window never imports torch), with progress in the
row and napari's activity dock; each part's layers refresh as soon as it is written. It is
offered for a project open for writing while no training runs (the trainer writes
predictions too), and the starter's model file is checked against its card before any child
starts (a broken install is one clear line).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from napari.utils import progress
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from training_backend.errors import InputError
from training_backend.learning.starters import (Starter, find_starter, fitting_starters,
                                                starter_checkpoint)

from napari_lesionseg._tasks import error_message, run_child, run_task

if TYPE_CHECKING:  # pragma: no cover
    from napari_lesionseg._state import WorkspaceState

SCRATCH = "scratch"
PREDICT_TIP = ("Predict every case with the starter model now, without training: the case on "
               "screen first")
LATEST = "latest model"
#: Cases per ``lesionseg predict`` child after the case on screen (each child loads torch and
#: the model once: ~2-3 s).
PREDICT_CHUNK = 16
#: Cases of the ranking predicted right after the case on screen.
PREDICT_FIRST_RANKED = 20


def starter_label(name: str) -> str:
    """How a starter is listed in the combo box."""
    return f"{name} (starter model)"


def starter_tooltip(starter: Starter) -> str:
    """A starter's description, data and holdout scores."""
    card = starter.card
    return "\n".join(t for t in (card.get("description", ""), f"Trained on: {card.get('data', '')}",
                                 starter.score_text(), card.get("licence", "")) if t)


def predict_parts(project_path: str, checkpoint: str, parts: list[list[str]]
                  ) -> Iterator[tuple[int, int, tuple[str, ...]]]:
    """Predict ``parts`` of cases one after the other, each in a ``lesionseg predict`` child.

    Args:
        project_path: the project.
        checkpoint: the model file.
        parts: lists of case ids, in the order to predict them.

    Yields:
        (cases done, total, the case ids just written).
    """
    import training_backend

    root = str(Path(training_backend.__file__).resolve().parent.parent)
    total, done = sum(len(p) for p in parts), 0
    for part in parts:
        run_child([sys.executable, "-m", "training_backend", "predict", "--project", project_path,
                   "--model", checkpoint, "--cases", ",".join(part)], pythonpath=root,
                  timeout_s=120.0 + 30.0 * len(part))
        done += len(part)
        yield done, total, tuple(part)


class StartFromControl(QWidget):
    """"Start from" (scratch / latest model / fitting starters), a note, "Predict with …".

    Args:
        state: the workspace state.
        on_starter: called with the starter chosen (the panel adopts its image size).
    """

    def __init__(self, state: WorkspaceState, on_starter: Callable[[Starter], None],
                 parent=None):
        super().__init__(parent)
        self.state = state
        self._on_starter = on_starter
        self._why_none = ""
        self.predicting = False
        self._activity: progress | None = None
        self._build()
        state.training_changed.connect(lambda _running: self._update_predict())

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.label = QLabel("Start from")
        self.combo = QComboBox()
        self.combo.currentIndexChanged.connect(lambda _i: self._on_choice())
        row.addWidget(self.label)
        row.addWidget(self.combo, 1)
        lay.addLayout(row)
        self.note = QLabel("")
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        lay.addWidget(self.note)
        self.predict_btn = QPushButton("Predict with starter")
        self.predict_btn.setToolTip(PREDICT_TIP)
        self.predict_btn.clicked.connect(lambda: self.predict_all())
        lay.addWidget(self.predict_btn)
        self.refresh()

    # ------------------------------------------------------------------ choices
    def refresh(self) -> None:
        """Refill the choices for the project: scratch, its latest model when it has one, the
        starters that predict its classes. The choice is kept while it is still offered."""
        project = self.state.project
        keep = self.combo.currentText()
        self.combo.blockSignals(True)
        try:
            self.combo.clear()
            self.combo.addItem(SCRATCH, None)
            self.combo.addItem(LATEST, LATEST)
            fit, self._why_none = (fitting_starters(project.classes) if project is not None
                                   else ([], ""))
            for starter in fit:
                self.combo.addItem(starter_label(starter.name), starter.name)
                self.combo.setItemData(self.combo.count() - 1, starter_tooltip(starter),
                                       Qt.ItemDataRole.ToolTipRole)
            index = self.combo.findText(keep)
            self.combo.setCurrentIndex(max(index, 0))
        finally:
            self.combo.blockSignals(False)
        tip = ("What training starts from: random weights, this project's newest model (when "
               "it has one), or a starter model shipped with the package that predicts this "
               "project's classes")
        if self._why_none:
            tip += f"\n(no starter offered: {self._why_none})"
        self.combo.setToolTip(tip)
        self._on_choice(adopt=False)

    def choice(self) -> str | None:
        """None (scratch), ``"latest model"``, or a starter's name."""
        return self.combo.currentData()

    def starter(self) -> Starter | None:
        """The chosen starter (None: scratch or the latest model)."""
        data = self.choice()
        return None if data in (None, LATEST) else find_starter(data)

    @property
    def why_no_starter(self) -> str:
        """Why no starter model is offered for the project ("" when one is)."""
        return self._why_none

    def starter_names(self) -> list[str]:
        """The starters offered for this project."""
        return [self.combo.itemData(i) for i in range(self.combo.count())
                if self.combo.itemData(i) not in (None, LATEST)]

    def set_choice(self, value: str | None) -> None:
        """Choose scratch (None / ``"scratch"``), ``"latest model"`` or a starter by name.

        Raises:
            ValueError: the choice is not offered for this project.
        """
        if value in (None, SCRATCH):
            index = 0
        else:
            index = next((i for i in range(self.combo.count()) if self.combo.itemData(i) == value),
                         -1)
        if index < 0:
            offered = [self.combo.itemText(i) for i in range(self.combo.count())]
            why = f" ({self._why_none})" if self._why_none else ""
            raise ValueError(f"cannot start from {value!r} here; offered: "
                             f"{', '.join(offered)}{why}")
        self.combo.setCurrentIndex(index)

    def why_no_predict(self) -> str:
        """Why "Predict with <starter>" cannot run now ("" when it can)."""
        project = self.state.project
        if project is None or self.starter() is None:
            return "no starter model is chosen"
        if project.mode != "r+":
            return "the project is open read-only: predictions cannot be saved"
        if self.state.training:
            return "a training runs (it writes the predictions): wait for it or stop it"
        if self.predicting:
            return "a prediction runs"
        return ""

    def _update_predict(self) -> None:
        """"Predict with <starter>" only when it can run; its tooltip says why not."""
        why = self.why_no_predict()
        self.predict_btn.setEnabled(not why)
        self.predict_btn.setToolTip(PREDICT_TIP + (f"\n(not now: {why})" if why else ""))

    def _on_choice(self, adopt: bool = True) -> None:
        starter = self.starter()
        self.predict_btn.setVisible(starter is not None)
        self._update_predict()
        if starter is None:
            self.note.setText(self._latest_note() if self.choice() == LATEST else "")
            return
        self.predict_btn.setText(f"Predict with {starter.name}")
        size = f"{starter.image_size} px" + (f", crops of {starter.crop_size} px"
                                             if starter.crop_size else "")
        self.note.setText(f"fine-tunes {starter.name} ({', '.join(starter.classes)}; "
                          f"{starter.score_text()}); trained at {size}, which training uses too")
        if adopt:
            self._on_starter(starter)

    def _latest_note(self) -> str:
        project = self.state.project
        latest = project.latest_model() if project is not None else None
        if latest is None or not latest[1].get("checkpoint"):
            return "no model of this project yet: the first training starts from scratch"
        return f"fine-tunes {latest[0]}, this project's newest model"

    def init_from(self) -> str | None:
        """``TrainConfig.init_from`` for the choice: the latest checkpoint, a starter's name."""
        data, project = self.choice(), self.state.project
        if data is None or project is None:
            return None
        if data == LATEST:
            latest = project.latest_model()
            return latest[1].get("checkpoint") if latest is not None else None
        return data

    # ------------------------------------------------------------------ predict
    def predict_all(self) -> bool:
        """Predict every case with the chosen starter (see the module docstring).

        Returns:
            False when no starter is chosen, a prediction or a training runs, the project is
            read-only, or the model file is missing or does not match its card (said).
        """
        project, starter = self.state.project, self.starter()
        if project is None or starter is None or self.predicting:
            return False
        why = self.why_no_predict()
        if why:
            show_info(f"Cannot predict with {starter.name} now: {why}")
            return False
        try:  # its model file against its card: a broken install is one clear line
            checkpoint = str(starter_checkpoint(starter.name))
        except InputError as exc:
            show_error(str(exc))
            return False
        first = [c for c in [self.state.case_id, *self.state.suggested[:PREDICT_FIRST_RANKED]]
                 if c]
        order = list(dict.fromkeys(first + project.case_ids()))
        parts = [order[:1]] + [order[i:i + PREDICT_CHUNK] for i in range(1, len(order),
                                                                      PREDICT_CHUNK)]
        parts = [p for p in parts if p]
        self.predicting = True
        self._update_predict()
        self._activity = progress(total=len(order), desc=f"Predicting with {starter.name}")
        self.note.setText(f"predicting {len(order)} cases with {starter.name} …")

        def step(item: tuple[int, int, tuple[str, ...]]) -> None:
            done, total, ids = item
            if self._activity is not None:
                self._activity.update(len(ids))
            self.note.setText(f"{total} cases predicted with {starter.name}" if done == total
                              else f"predicting with {starter.name}: {done}/{total} cases")
            if project is self.state.project:
                project.refresh()
                self.state.outputs_changed.emit(ids)

        def done(_result) -> None:  # (the last part's progress may arrive after this)
            self.note.setText(f"{len(order)} cases predicted with {starter.name}")
            show_info(f"{len(order)} cases predicted with {starter.name}")

        def failed(exc: BaseException) -> None:
            self.note.setText("")
            show_error(f"predicting with {starter.name} failed: {error_message(exc)}")

        def finished() -> None:
            self.predicting = False
            self._update_predict()
            if self._activity is not None:
                self._activity.close()
                self._activity = None

        run_task(predict_parts, str(project.path), checkpoint, parts,
                 on_yield=step, on_done=done, on_error=failed, on_finish=finished)
        return True
