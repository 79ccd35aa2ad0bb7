"""Trainer panel: choose a method, start/stop the background trainer process, watch it learn.

The trainer runs in its own process (``training_backend.process.TrainerProcess``); a QTimer on
the GUI thread polls its events every ``POLL_MS`` and maps them onto widgets, napari's activity
dock (``napari.utils.progress``) and the workspace state. This module never imports torch: the
panel builds a real ``TrainConfig`` and reads the methods from ``config.METHOD_CATALOG``, both
torch-free (the child process builds the networks).
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from training_backend.config import METHOD_CATALOG, MethodSpec, TrainConfig, available_methods

from napari_lesionseg._plot import LearningCurve, RunCurve
from napari_lesionseg._tasks import guarded, logger

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.store import Project

    from napari_lesionseg._state import WorkspaceState

POLL_MS = 200
DEVICES = ("auto", "cpu", "cuda", "mps")
REAP_INTERVAL_MS = 200
REAP_TIMEOUT_S = 30.0
#: Default method when the labels allow it (masks or scribbles); otherwise the first available.
PREFERRED_METHOD = "supervised"
#: The best measured method for a project without masks or scribbles, only image labels (the
#: BUSI benchmark in the README: `cam` is the one method that learns masks from image labels).
IMAGE_LABEL_METHOD = "cam"
#: What each kind of annotation is called in the panel.
KIND_NAMES = {"full": "full masks", "sparse": "scribbles", "image_label": "image labels",
              "unlabelled": "unlabelled images"}
AUTO_BUDGET_S = 15  # seconds of fine-tuning in an automatic retrain
#: After a round the case on screen is predicted first, then this many of the ranking's top.
PREDICT_FIRST_RANKED = 20


def trainer_threads() -> int:
    """CPU threads for a trainer started from the window: every core but one, so the viewer
    (painting, loading cases) keeps a core of its own."""
    return max(1, (os.cpu_count() or 1) - 1)


def method_table() -> list[MethodSpec]:
    """Every method of ``config.METHOD_CATALOG`` (torch-free), in catalog order."""
    return list(METHOD_CATALOG.values())


def supervision_counts(project: Project) -> dict[str, int]:
    """How many training cases have each kind of supervision (the store counts them)."""
    return project.supervision_counts()


def available(table: list[MethodSpec], counts: dict[str, int]) -> list[str]:
    """Methods whose ``requires`` is met by ``counts`` (``config.available_methods``), in
    table order."""
    names = set(available_methods(counts, {m.name: m for m in table}))
    return [m.name for m in table if m.name in names]


def recommended(names: list[str], counts: dict[str, int]) -> str | None:
    """The best measured method for what the project holds: `supervised` once there are
    masks or scribbles, `cam` with image labels only, else the first available."""
    if PREFERRED_METHOD in names and (counts.get("full", 0) or counts.get("sparse", 0)):
        return PREFERRED_METHOD
    if IMAGE_LABEL_METHOD in names and counts.get("image_label", 0):
        return IMAGE_LABEL_METHOD
    return names[0] if names else None


def usage_note(spec: MethodSpec, counts: dict[str, int], table: list[MethodSpec]) -> str:
    """Which of the project's annotations a method learns from, and which it leaves unused
    (and which available method would use them)."""
    uses = spec.supervision.uses
    present = [k for k in KIND_NAMES if counts.get(k, 0) > 0]
    used = [f"{counts[k]} {KIND_NAMES[k]}" for k in present if k in uses]
    unused = [k for k in present if k not in uses]
    text = f"{spec.name} uses " + (", ".join(used) if used else "none of your annotations")
    if unused:
        text += "; not used: " + ", ".join(f"{counts[k]} {KIND_NAMES[k]}" for k in unused)
        trainable = set(available(table, counts))
        better = [m.name for m in table if m.name != spec.name and m.name in trainable
                  and set(unused) & set(m.supervision.uses)]
        if better:
            text += f" ({' or '.join(better[:2])} would use them)"
    return text


class TrainerPanel(QWidget):
    """Method/device/budget controls, start/stop, progress, loss, Dice and the learning curve.

    Args:
        state: the workspace state.
    """

    def __init__(self, state: WorkspaceState, parent=None):
        super().__init__(parent)
        self.state = state
        self.process = None                     # the running TrainerProcess
        self._methods: list[MethodSpec] = method_table()
        self._user_method: str | None = None    # a method the user picked (else: recommended)
        self._counts: dict[str, int] = {}
        self._names: list[str] = []
        self._cancel_sent = False
        self._loss_text = ""
        self._activity: progress | None = None
        self._model_id: str | None = None
        self._last_dice: float | None = None
        self._folded_at: int | None = None  # step the validation cases joined the training
        self._n_labelled: int | None = None
        self.events_seen: list[Any] = []        # every event of the current run (tests, debugging)
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(guarded(self.poll))
        self._build()
        state.project_changed.connect(self._on_project)
        state.cases_changed.connect(self._update_methods)
        state.case_updated.connect(self._on_labels_saved)
        self._on_project(state.project)

    # ------------------------------------------------------------------ widgets
    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        self._method = QComboBox()
        self._method.setToolTip("Only methods whose supervision your labels meet are listed")
        self._method.activated.connect(lambda _i: self._on_method_picked())
        self._method.currentTextChanged.connect(lambda _t: self._show_usage())
        form.addRow("Method", self._method)
        self._method_note = QLabel("")
        self._method_note.setWordWrap(True)
        self._method_note.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        form.addRow(self._method_note)
        row = QHBoxLayout()
        self._device = QComboBox()
        self._device.addItems(DEVICES)
        self._budget = QSpinBox()
        self._budget.setRange(0, 7 * 24 * 3600)
        self._budget.setValue(120)
        self._budget.setSuffix(" s")
        self._budget.setSpecialValueText("none")
        self._budget.setToolTip("Wall-clock training budget (0 = use steps only)")
        row.addWidget(self._device)
        row.addWidget(QLabel("budget"))
        row.addWidget(self._budget, 1)
        form.addRow("Device", row)
        row2 = QHBoxLayout()
        self._steps = QSpinBox()
        self._steps.setRange(0, 10_000_000)
        self._steps.setSpecialValueText("—")
        self._steps.setToolTip("Optimisation steps (— = budget only); with both, first one ends")
        self._image_size = QSpinBox()
        self._image_size.setRange(16, 2048)
        self._image_size.setSingleStep(32)
        self._image_size.setValue(128)
        self._image_size.setSuffix(" px")
        self._image_size.setToolTip("Training resolution (square)")
        row2.addWidget(self._steps, 1)
        row2.addWidget(QLabel("size"))
        row2.addWidget(self._image_size, 1)
        form.addRow("Steps", row2)
        lay.addLayout(form)
        self._continue = QCheckBox("fine-tune the latest model")
        self._continue.setToolTip("Start from the newest checkpoint instead of from scratch")
        lay.addWidget(self._continue)
        auto = QHBoxLayout()
        self._auto = QCheckBox("retrain after")
        self._auto_n = QSpinBox()
        self._auto_n.setRange(1, 1000)
        self._auto_n.setValue(5)
        self._auto_budget = QSpinBox()
        self._auto_budget.setRange(5, 3600)
        self._auto_budget.setValue(AUTO_BUDGET_S)
        self._auto_budget.setSuffix(" s")
        self._auto_budget.setToolTip("Budget of an automatic retrain: it fine-tunes the latest "
                                     "model, so a short run refreshes the predictions quickly")
        auto.addWidget(self._auto)
        auto.addWidget(self._auto_n)
        auto.addWidget(QLabel("new labels,"))
        auto.addWidget(self._auto_budget)
        lay.addLayout(auto)
        buttons = QHBoxLayout()
        self._start_btn = QPushButton("Start training")
        self._start_btn.clicked.connect(lambda: self.start())
        self._stop_btn = QPushButton("Stop")
        self._stop_btn.setToolTip("Stop after the current step (a second click kills the process)")
        self._stop_btn.clicked.connect(lambda: self.stop())
        self._stop_btn.setEnabled(False)
        buttons.addWidget(self._start_btn, 2)
        buttons.addWidget(self._stop_btn, 1)
        lay.addLayout(buttons)
        self._bar = QProgressBar()
        self._bar.setRange(0, 1000)
        self._bar.setTextVisible(True)
        self._bar.setFormat("idle")
        lay.addWidget(self._bar)
        self._metrics = QLabel("")
        self._metrics.setWordWrap(True)
        self._metrics.setStyleSheet("font-size: 11px;")
        lay.addWidget(self._metrics)
        self._status = QLabel("")
        self._status.setWordWrap(True)
        self._status.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        lay.addWidget(self._status)
        self.run_curve = RunCurve()
        lay.addWidget(self.run_curve)
        self.curve = LearningCurve()
        lay.addWidget(self.curve)

    # ------------------------------------------------------------------ methods
    def _update_methods(self, *_args) -> None:
        project = self.state.project
        current = self._method.currentText()
        self._method.clear()
        self._names = []
        self._method_note.setText("")
        if project is None:
            return
        counts = self._counts = supervision_counts(project)
        names = self._names = available(self._methods, counts)
        info = {m.name: m for m in self._methods}
        self._method.blockSignals(True)
        for i, name in enumerate(names):
            self._method.addItem(name)
            tip = info[name].description + "\n" + usage_note(info[name], counts, self._methods)
            self._method.setItemData(i, tip, Qt.ItemDataRole.ToolTipRole)
        # the method follows the annotations unless the user picked one that still can train
        if self._user_method in names:
            self._method.setCurrentText(self._user_method)
        elif (best := recommended(names, counts)) is not None:
            self._method.setCurrentText(best)
        self._method.blockSignals(False)
        if self._method.currentText() != current:
            logger.debug("method %s -> %s", current, self._method.currentText())
        self._show_usage()
        self._method.setEnabled(bool(names) and not self.state.training)
        self._start_btn.setEnabled(bool(names) and not self.state.training)
        if not names:
            self._status.setText("No method can train yet: give some cases an image label, "
                                 "scribbles or a full mask.")
        elif not self.state.training:
            c = counts
            self._status.setText(f"labels: {c.get('full', 0)} full · {c.get('sparse', 0)} sparse · "
                                 f"{c.get('image_label', 0)} image labels · "
                                 f"{c.get('unlabelled', 0)} unlabelled")

    def _on_method_picked(self) -> None:
        """The user chose a method in the combo: keep it while it can train."""
        name = self._method.currentText()
        if name in self._names:
            self._user_method = name if name != recommended(self._names, self._counts) else None
        self._show_usage()

    def _show_usage(self) -> None:
        """Under the combo: which annotations the chosen method uses, and which it does not."""
        info = {m.name: m for m in self._methods}
        name = self._method.currentText()
        self._method_note.setText(usage_note(info[name], self._counts, self._methods)
                                  if name in info and name in self._names else "")

    def available_methods(self) -> list[str]:
        """Methods the current labels can train (empty without a project)."""
        return list(self._names) if self.state.project is not None else []

    # ------------------------------------------------------------------ project
    def _on_project(self, project: Project | None) -> None:
        if self.process is not None:
            # another project: stop the run gracefully (it checkpoints, registers its model and
            # exits); the old process is reaped in the background, the window never waits
            self.process.cancel()
            self._finish_run(wait=False)
            show_info("Training stopped because another project was opened; the model so far "
                      "is saved with its project.")
        self._user_method = None  # another project: the method follows its annotations
        self._update_methods()
        # another project: nothing of the previous one's run stays on screen
        self._last_dice, self._folded_at, self._loss_text = None, None, ""
        self._metrics.setText("")
        self.run_curve.clear()
        self.curve.set_points(self._history_points(project))
        for w in (self._start_btn, self._continue):
            w.setEnabled(project is not None)

    @staticmethod
    def _history_points(project: Project | None) -> list[tuple[int, float]]:
        if project is None:
            return []
        points = []
        for info in project.models().values():
            dice = (info.get("metrics") or {}).get("val_dice")
            n = info.get("n_annotations", info.get("n_train"))
            if isinstance(dice, (int, float)) and isinstance(n, int):
                points.append((n, float(dice)))
        return points

    # ------------------------------------------------------------------ run control
    def configure(self, method: str | None = None, device: str | None = None,
                  budget_s: int | None = None, steps: int | None = None,
                  image_size: int | None = None, fine_tune: bool | None = None) -> None:
        """Set the controls (what a user would type); None leaves one unchanged.

        Args:
            method: a method listed in the combo box.
            device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
            budget_s: wall-clock budget in seconds (0: steps only).
            steps: optimisation steps (0: budget only).
            image_size: training resolution.
            fine_tune: start from the latest model.
        """
        if method is not None:
            self._method.setCurrentText(method)
            self._on_method_picked()
        if device is not None:
            self._device.setCurrentText(device)
        if budget_s is not None:
            self._budget.setValue(int(budget_s))
        if steps is not None:
            self._steps.setValue(int(steps))
        if image_size is not None:
            self._image_size.setValue(int(image_size))
        if fine_tune is not None:
            self._continue.setChecked(bool(fine_tune))

    def settings(self, auto: bool = False) -> TrainConfig:
        """The configuration the Start button (or, with ``auto``, an automatic retrain: the
        retrain budget, fine-tuning the latest model) would use."""
        steps = None if auto else (self._steps.value() or None)
        budget = self._auto_budget.value() if auto else (self._budget.value() or None)
        first = ([self.state.case_id] if self.state.case_id else []) + [
            c for c in self.state.suggested[:PREDICT_FIRST_RANKED] if c != self.state.case_id]
        init_from = None
        project = self.state.project
        if (auto or self._continue.isChecked()) and project is not None:
            latest = project.latest_model()
            if latest is not None and latest[1].get("checkpoint"):
                init_from = latest[1]["checkpoint"]
        return TrainConfig(method=self._method.currentText(), device=self._device.currentText(),
                           image_size=self._image_size.value(), steps=steps, budget_s=budget,
                           predict=True, threads=trainer_threads(), predict_first=first,
                           init_from=init_from)

    def start(self, auto: bool = False) -> bool:
        """Start training in a background process; False if it could not start.

        Args:
            auto: an automatic retrain (its own budget, fine-tuning the latest model).
        """
        project = self.state.project
        if project is None or self.process is not None:
            return False
        if not self.available_methods():
            show_warning("No training method fits the labels yet: label some cases first")
            return False
        self.state.save_requested.emit()      # the annotation being painted joins this run
        self.state.reload_index()
        from training_backend.process import TrainerProcess

        cfg = self.settings(auto=auto)
        proc = TrainerProcess(project.path, cfg)
        try:
            proc.start()
        except Exception as exc:  # noqa: BLE001 - e.g. cannot spawn
            show_error(f"could not start the trainer: {exc}")
            return False
        self.process = proc
        self.events_seen = []
        self._last_dice = None
        self._folded_at = None
        self.run_curve.clear()
        self._loss_text = ""
        self._n_labelled = None
        self._model_id = None
        self.state.new_labels.clear()
        self.state.training = True
        self._activity = progress(total=1000, desc=f"Training {cfg.method}")
        self._bar.setValue(0)
        self._bar.setFormat("starting the trainer …")
        self._metrics.setText("")
        self._status.setText(f"{cfg.method} on {cfg.device} · started "
                             f"{time.strftime('%H:%M:%S')}")
        self._set_running(True)
        self._timer.start()
        return True

    def stop(self, force: bool = False) -> None:
        """Stop gracefully (checkpoint, then finish); a second call (or ``force``) kills."""
        proc = self.process
        if proc is None:
            return
        if force or self._cancel_sent:
            proc.kill()
            self._status.setText("trainer killed; the last checkpoint is kept")
            self._finish_run()
            return
        proc.cancel()
        self._cancel_sent = True
        self._stop_btn.setText("Kill")
        self._bar.setFormat("stopping after this step …")

    def _set_running(self, running: bool) -> None:
        self._start_btn.setEnabled(not running and bool(self.available_methods()))
        self._stop_btn.setEnabled(running)
        self._stop_btn.setText("Stop")
        self._cancel_sent = False
        for w in (self._method, self._device, self._budget, self._steps, self._image_size,
                  self._continue):
            w.setEnabled(not running)

    def _finish_run(self, wait: bool = False) -> None:
        """The run is over: release the process (in the background unless ``wait``)."""
        self._timer.stop()
        proc, self.process = self.process, None
        if proc is not None:
            if wait:
                _close_quietly(proc)
            else:
                self._reap(proc, time.monotonic() + REAP_TIMEOUT_S)
        if self._activity is not None:
            self._activity.close()
            self._activity = None
        self.state.training = False
        self._set_running(False)
        self._update_methods()
        self.state.reload_index()

    # ------------------------------------------------------------------ events
    def poll(self) -> None:
        """Drain the trainer's events (called by the timer every ``POLL_MS``)."""
        if self.process is None:
            return
        try:
            events = self.process.poll()
        except Exception as exc:  # noqa: BLE001 - broken queue
            events = [_failed(f"lost contact with the trainer: {exc}")]
        for event in events:
            self.handle_event(event)

    def handle_event(self, event: Any) -> None:
        """Map one trainer event onto the widgets and the workspace state."""
        from training_backend import events as ev

        self.events_seen.append(event)
        if isinstance(event, ev.Started):
            self._model_id = event.model_id
            what = (f"{event.total_steps} steps" if event.total_steps
                    else f"{event.budget_s:.0f} s budget" if event.budget_s else "")
            self._status.setText(f"{event.model_id} on {event.device}: {event.n_train} training "
                                 f"cases, {event.n_val} for validation, {what}")
        elif isinstance(event, ev.Progress):
            self._bar.setValue(int(round(1000 * max(0.0, min(1.0, event.fraction)))))
            total = f"/{event.total}" if event.total else ""
            self._bar.setFormat(f"step {event.step}{total} · {event.elapsed_s:.0f} s")
            if self._activity is not None:
                self._activity.n = self._bar.value()
                self._activity.refresh()
        elif isinstance(event, ev.Loss):
            parts = ", ".join(f"{k} {v:.3f}" for k, v in event.values.items() if k != "loss")
            loss = event.values.get("loss")
            text = f"loss {loss:.4f}" if isinstance(loss, (int, float)) else "loss"
            if isinstance(loss, (int, float)):
                self.run_curve.add_loss(event.step, loss)
            self._loss_text = text + (f" ({parts})" if parts else "")
            self._show_metrics()
        elif isinstance(event, ev.Validation):
            self._last_dice = event.dice
            self.run_curve.add_dice(event.step, event.dice)
            self._show_metrics()
        elif isinstance(event, ev.ValidationFolded):
            self._folded_at = event.step
            self.run_curve.mark_fold(event.step)
            self._show_metrics()
        elif isinstance(event, ev.RoundFinished):
            self._n_labelled = event.n_annotations
            if event.dice is not None:
                self.curve.add_point(event.n_annotations, event.dice)
        elif isinstance(event, ev.PredictionProgress):
            self._bar.setValue(int(round(1000 * event.done / max(1, event.total))))
            if event.done < event.total:
                eta = event.elapsed_s / event.done * (event.total - event.done)
                self._bar.setFormat(f"predicting {event.done}/{event.total} · about {eta:.0f} s left")
            else:
                self._bar.setFormat(f"predictions written for {event.total} cases")
            if self._activity is not None:
                self._activity.set_description(f"Predicting {event.done}/{event.total}")
                self._activity.n = self._bar.value()
                self._activity.refresh()
        elif isinstance(event, ev.PredictionsReady):
            if self.state.project is not None:
                self.state.project.refresh()
            self.state.outputs_changed.emit(tuple(event.case_ids))
        elif isinstance(event, ev.CheckpointSaved):
            self._status.setText(f"checkpoint at step {event.step}")
        elif isinstance(event, ev.Finished):
            self._bar.setValue(1000)
            self._bar.setFormat(f"finished: {event.reason} · step {event.step}")
            show_info(f"Training {event.model_id} finished ({event.reason}, step {event.step})")
            self._status.setText(f"model {event.model_id} ready")
            self._finish_run()
            if event.reason != "cancelled":
                self._maybe_auto_retrain()  # labels saved while it ran may already be enough
        elif isinstance(event, ev.Failed):
            message = event.message or "training failed"
            show_error(message if len(message) < 300 else message[:297] + "...")
            if event.traceback and not getattr(event, "user_error", False):
                logger.error("lesionseg trainer failed:\n%s", event.traceback)
            self._bar.setFormat("failed")
            self._status.setText(f"failed: {message.splitlines()[0]} — fix it and press Start "
                                 "to try again")
            self._finish_run()

    def status_text(self) -> str:
        """The panel's status and metrics lines, as the user reads them."""
        return " · ".join(t for t in (self._status.text(), self._metrics.text()) if t)

    def _show_metrics(self) -> None:
        text = self._loss_text
        if self._last_dice is not None:
            text += f" · validation Dice {self._last_dice:.3f}"
            if self._folded_at is not None:
                # the score stays the one measured before those cases were trained on
                text += f" (step {self._folded_at}; its cases are trained on from there)"
        self._metrics.setText(text.strip(" ·"))

    # ------------------------------------------------------------------ auto-retrain
    def _on_labels_saved(self, _cid: str) -> None:
        self._update_methods()
        self._maybe_auto_retrain()

    def _maybe_auto_retrain(self) -> None:
        if (self._auto.isChecked() and self.process is None and self.state.project is not None
                and len(self.state.new_labels) >= self._auto_n.value()):
            n = len(self.state.new_labels)
            if self.start(auto=True):
                show_info(f"Retraining: {n} newly labelled cases")

    def set_auto_retrain(self, enabled: bool, n: int, budget_s: int | None = None) -> None:
        """Retrain automatically after ``n`` newly labelled cases, for ``budget_s`` seconds."""
        self._auto_n.setValue(n)
        if budget_s is not None:
            self._auto_budget.setValue(int(budget_s))
        self._auto.setChecked(enabled)

    def _reap(self, proc, deadline: float) -> None:
        """Close a finished process once it has exited, without blocking the GUI thread (a
        child still alive after ``deadline`` is killed)."""
        if proc.is_alive() and time.monotonic() < deadline:
            QTimer.singleShot(REAP_INTERVAL_MS, lambda: self._reap(proc, deadline))
            return
        if proc.is_alive():
            proc.kill()
        _close_quietly(proc)

    def close_process(self) -> None:
        """End a running trainer gracefully and wait for it (cancel, checkpoint; killed after
        5 s) -- for closing the window."""
        if self.process is not None:
            self._status.setText("stopping the trainer …")
            self._finish_run(wait=True)


def _close_quietly(proc) -> None:
    try:
        proc.close()
    except Exception:  # noqa: BLE001 - already gone
        logger.debug("lesionseg: closing the trainer process failed", exc_info=True)


def _failed(message: str):
    from training_backend.events import Failed

    return Failed(message)
