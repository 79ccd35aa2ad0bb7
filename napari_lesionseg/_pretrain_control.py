"""The trainer panel's pretraining row: "Pretrain when idle", "Pretrain now" and its progress.

The encoder's self-supervised pretraining (`training_backend.learning.pretrain`) runs in a
child process of its own (``training_backend.jobs.process.PretrainProcess``, the machinery of
training), polled by a QTimer on the GUI thread; its progress shows in the row's status line and
in napari's activity dock. It holds the project's training lock, so a training waits for it:
`PretrainControl.stop` with a ``then`` callback stops it (it checkpoints) and runs the callback
once its process has exited — the trainer panel starts the training from there. With "when
idle" checked it resumes `IDLE_DELAY_MS` after a training ends, until its budget is spent.

The idle pretraining never replaces the project's pretraining: when the saved one was made
with other settings (another image size, say, after a starter model set 512 px) it does
nothing and the row says so; "Pretrain now" asks before it starts over. It does not run when
the panel's training would not use it (Start from a starter or the latest model, or
``pretrained`` = none), and while another process holds the project's training lock (a
``lesionseg train`` in a terminal) it waits and tries again. Torch-free, like the whole window.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from napari.utils import progress
from napari.utils.notifications import show_error
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (QCheckBox, QHBoxLayout, QLabel, QMessageBox, QPushButton, QSpinBox,
                            QVBoxLayout, QWidget)

from training_backend.config import PretrainConfig, TrainConfig
from training_backend.jobs.pretrain_record import (ENCODER_FILE, STATE_FILE, describe, mismatch,
                                                   pretrained_dir, read_meta, target_reached)

from napari_lesionseg import _status as st
from napari_lesionseg._tasks import guarded, logger

if TYPE_CHECKING:  # pragma: no cover
    from napari_lesionseg._state import WorkspaceState

POLL_MS = 250
#: Milliseconds without a training before the idle pretraining (re)starts.
IDLE_DELAY_MS = 5000
#: Default minutes of pretraining (over every pause and resume).
DEFAULT_MINUTES = 10
REAP_INTERVAL_MS = 200
REAP_TIMEOUT_S = 30.0
IDLE_TIP = (
    "When no training runs, pretrain the network's encoder on this project's images without "
    "any label (masked image modelling: hide patches, learn to fill them in; the holdout cases "
    "are never read). It runs in the trainer's background process with the trainer's settings "
    "(device, image size; all CPU cores but one), so it competes with nothing but the computer's "
    "other work: a training you start stops it at once (it keeps its checkpoint) and it "
    "resumes when the training is over, until the minutes set here are spent. Later trainings "
    "of the same image size start from this encoder (setting 'pretrained' = auto). Costs CPU "
    "time and a few MB in the project's models/_pretrained folder.")


def _busy_line(holder: str, retry: bool) -> str:
    """The status line when another run holds the project's training lock.

    Args:
        holder: who holds it (`trainlock.holder_text`).
        retry: the idle pretraining tries again later.
    """
    if retry:
        return f"waiting: the project is busy ({holder})"
    return f"not started: the project is busy ({holder}); try again when it is free"


@dataclass(frozen=True)
class Plan:
    """The next pretraining the row would start.

    Args:
        config: its settings.
        resume: it continues the project's pretraining.
        replaces: why the project's pretraining cannot be continued with these settings, so
            that this one would replace it ("" when nothing is replaced).
    """

    config: PretrainConfig
    resume: bool
    replaces: str = ""


class PretrainControl(QWidget):
    """A row with "Pretrain when idle", its budget, "Pretrain now" / "Stop", and a status line.

    Args:
        state: the workspace state (the project).
        settings: the trainer panel's settings (image size, network, device, threads).
        idle: whether no training runs (nor is being followed).
    """

    def __init__(self, state: WorkspaceState, settings: Callable[[], TrainConfig],
                 idle: Callable[[], bool], parent=None):
        super().__init__(parent)
        self.state = state
        self._settings = settings
        self._idle = idle
        self.process = None                  # the running PretrainProcess
        self.status = st.TrainingStatus()    # the pretraining's own (not the run on show)
        self.events_seen: list[Any] = []     # every event of the current pretraining (tests)
        self._after: list[Callable[[], Any]] = []  # run once the process has exited
        self._failed = False                 # the idle pretraining failed: not retried
        self._asked_now = False              # the running pretraining was asked for ("now")
        self._activity: progress | None = None
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(guarded(self.poll))
        self._idle_timer = QTimer(self)
        self._idle_timer.setSingleShot(True)
        self._idle_timer.timeout.connect(guarded(self.maybe_start))
        self._build()
        state.training_changed.connect(self._on_training)

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        self.when_idle = QCheckBox("pretrain when idle")
        self.when_idle.setToolTip(IDLE_TIP)
        self.when_idle.toggled.connect(guarded(self._on_toggled))
        self.minutes = QSpinBox()
        self.minutes.setRange(1, 24 * 60)
        self.minutes.setValue(DEFAULT_MINUTES)
        self.minutes.setSuffix(" min")
        self.minutes.setToolTip("Minutes of pretraining in all, over every pause")
        self.now_btn = QPushButton("Pretrain now")
        self.now_btn.setToolTip(IDLE_TIP)
        toggle = guarded(self.toggle)
        self.now_btn.clicked.connect(lambda *_: toggle())
        row.addWidget(self.when_idle)
        row.addWidget(self.minutes)
        row.addWidget(self.now_btn, 1)
        lay.addLayout(row)
        self.line = QLabel("")
        self.line.setWordWrap(True)
        self.line.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        lay.addWidget(self.line)
        self.status.events.connect(self._show)

    # ------------------------------------------------------------------ what shows
    def _show(self, *_args) -> None:
        s = self.status
        if s.active:
            text = "pretraining the encoder: " + st.progress_text(s)
            if s.loss.get("loss") is not None:
                text += f" · reconstruction loss {s.loss['loss']:.3f}"
            self.line.setText(text)
            if self._activity is not None:
                self._activity.set_description(f"Pretraining the encoder ({st.progress_text(s)})")
                self._activity.n = st.progress_value(s)
                self._activity.refresh()
        else:
            self.line.setText(s.message)
        self.now_btn.setText("Stop pretraining" if self.process is not None else "Pretrain now")

    def _show_record(self) -> None:
        """The status line without a pretraining: what the project holds."""
        project = self.state.project
        self.status.update(state=st.IDLE, message="" if project is None
                           else describe(read_meta(project.path)))
        self._show()

    # ------------------------------------------------------------------ settings
    @property
    def busy(self) -> bool:
        """A pretraining process is running (it holds the project's training lock)."""
        return self.process is not None

    def config(self) -> PretrainConfig:
        """The pretraining the row would run: the trainer panel's image size, network, device
        and threads, for the minutes set."""
        cfg = self._settings()
        return PretrainConfig(model=cfg.model, image_size=cfg.image_size, device=cfg.device,
                              threads=cfg.threads, budget_s=60.0 * self.minutes.value())

    def _plan(self, extend: bool) -> Plan | None:
        """The next pretraining; None when its budget is spent (unless ``extend``: one more
        budget on top)."""
        project = self.state.project
        cfg = self.config()
        folder = pretrained_dir(project.path)
        meta = read_meta(project.path)
        if meta is None:
            replaces = ("its record (meta.json) is unreadable"
                        if (folder / ENCODER_FILE).is_file() else "")
        else:
            replaces = mismatch(meta, cfg.image_size, cfg.model, ours="this panel")
            if not replaces and not (folder / STATE_FILE).is_file():
                replaces = f"its {STATE_FILE} (what a resume needs) is missing"
        resumable = meta is not None and not replaces
        if resumable and target_reached(meta, cfg):
            if not extend:
                return None
            cfg = PretrainConfig.from_dict({**cfg.to_dict(),
                                            "budget_s": float(meta["elapsed_s"]) + cfg.budget_s})
        return Plan(cfg, resumable, replaces)

    def idle_block(self) -> str:
        """Why the idle pretraining does not run for the panel's settings ("" when it may):
        the training would not use it."""
        cfg = self._settings()
        if cfg.init_from:
            return "training starts from another model (Start from), not from this encoder"
        choice = cfg.pretrained.strip()
        if choice == "none":
            return "training does not use a pretrained encoder (setting 'pretrained' = none)"
        if choice != "auto":
            return f"training starts from the encoder {choice} (setting 'pretrained')"
        return ""

    def _say(self, text: str) -> None:
        """The status line without a pretraining running."""
        self.status.update(state=st.IDLE, message=text)
        self._show()

    def _retry_when_idle(self) -> None:
        """Try the idle pretraining again later (what blocked it may change)."""
        if self.when_idle.isChecked() and self.state.project is not None:
            self._idle_timer.start(IDLE_DELAY_MS)

    def _confirm_replace(self, why: str) -> bool:
        """Ask before a pretraining replaces the project's (made with other settings)."""
        meta = read_meta(self.state.project.path)
        steps = f" ({meta.get('step', 0)} steps)" if meta else ""
        answer = QMessageBox.question(
            self, "Replace the pretrained encoder?",
            f"The project's pretrained encoder{steps} cannot be continued: {why}.\n\n"
            "Pretraining now starts over with this panel's settings and replaces it. "
            "Replace it?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def _busy_with(self) -> str:
        """Who holds the project's training lock ("" when nobody does)."""
        from training_backend.jobs import trainlock

        holder = trainlock.holder(self.state.project.path)
        return "" if holder is None else trainlock.holder_text(holder)

    # ------------------------------------------------------------------ control
    def toggle(self) -> bool:
        """"Pretrain now" (one more budget when it is spent) or, while it runs, stop it."""
        if self.process is not None:
            return self.stop()
        return self.start(now=True)

    def start(self, now: bool = False) -> bool:
        """Start (or resume) the pretraining in a background process.

        Args:
            now: asked for by the user ("Pretrain now"): also when the budget is spent (one
                more budget) or a failure stopped the idle pretraining.

        Returns:
            Whether a pretraining started.
        """
        project = self.state.project
        if (project is None or self.process is not None or project.mode != "r+"
                or not self._idle() or (self._failed and not now)):
            return False
        why = "" if now else self.idle_block()
        if why:
            self._say(f"not pretraining when idle: {why}")
            self._retry_when_idle()
            return False
        plan = self._plan(extend=now)
        if plan is None:
            self._show_record()
            return False
        if plan.replaces and not now:  # the idle pretraining never replaces one
            self._say(f"{plan.replaces}: Pretrain now replaces it")
            self._retry_when_idle()
            return False
        busy = self._busy_with()
        if busy:  # e.g. `lesionseg train` in a terminal: the idle one tries again later
            self._say(_busy_line(busy, retry=not now))
            if not now:
                self._retry_when_idle()
            return False
        if plan.replaces and not self._confirm_replace(plan.replaces):
            return False
        cfg, resume = plan.config, plan.resume
        from training_backend.jobs.process import PretrainProcess

        proc = PretrainProcess(project.path, cfg, resume=resume)
        try:
            proc.start()
        except Exception as exc:  # noqa: BLE001 - e.g. cannot spawn
            show_error(f"could not start the pretraining: {exc}")
            return False
        self.process = proc
        self._failed = False
        self._asked_now = now
        self.events_seen = []
        self.status.begin(waiting="starting the pretraining …",
                          message=f"pretraining started {time.strftime('%H:%M:%S')}")
        self._activity = progress(total=1000, desc="Pretraining the encoder")
        self._timer.start()
        self._show()
        return True

    def stop(self, then: Callable[[], Any] | None = None) -> bool:
        """Stop the pretraining gracefully (it checkpoints and can resume); ``then`` runs once
        its process has exited (at once when none runs).

        Args:
            then: e.g. start a training (the project's training lock is free by then).

        Returns:
            True (a pretraining was stopped, or ``then`` ran).
        """
        if then is not None:
            self._after.append(then)
        if self.process is None:
            self._run_after()
            return True
        self.process.cancel()
        self.status.update(state=st.STOPPING)
        return True

    def maybe_start(self) -> bool:
        """Start the idle pretraining when it is wanted and nothing trains."""
        if self.when_idle.isChecked():
            return self.start()
        return False

    def training_ended(self) -> None:
        """A training ended: the idle pretraining resumes after `IDLE_DELAY_MS` without one."""
        if self.when_idle.isChecked():
            self._idle_timer.start(IDLE_DELAY_MS)

    def _on_training(self, running: bool) -> None:
        """No "Pretrain now" while a training runs (it holds the project)."""
        self.now_btn.setEnabled(not running or self.process is not None)

    def _on_toggled(self, checked: bool) -> None:
        if checked:
            self._failed = False
            self.maybe_start()
        elif self.process is not None:
            self.stop()

    def set_project(self, project) -> None:
        """Another project: its pretraining stops (in the background), the row shows the new
        project's pretrained encoder, and the idle pretraining may start there."""
        self._idle_timer.stop()
        self._after.clear()  # first: what waited for the old project's pretraining is dropped
        if self.process is not None:
            self.process.cancel()
            self._release()
        self._failed = False
        self._show_record()
        if project is not None:
            self._idle_timer.start(IDLE_DELAY_MS)

    # ------------------------------------------------------------------ events
    def poll(self) -> None:
        """Drain the pretraining's events (the timer calls it every `POLL_MS`)."""
        proc = self.process
        if proc is None:
            return
        try:
            events = proc.poll()
        except Exception as exc:  # noqa: BLE001 - a broken queue
            from training_backend.events import Failed

            events = [Failed(f"lost contact with the pretraining: {exc}")]
        for event in events:
            self.handle_event(event)

    def handle_event(self, event: Any) -> None:
        """One pretraining event onto the row; the last one ends it."""
        from training_backend import events as ev

        self.events_seen.append(event)
        self.status.apply(event)
        if isinstance(event, ev.Finished):
            self._release()
            what = describe(read_meta(self.state.project.path)) if self.state.project else ""
            paused = " (paused; it resumes when idle)" if event.reason == "cancelled" else ""
            self.status.update(message=f"{what}{paused}")
        elif isinstance(event, ev.Failed):
            from training_backend.jobs import trainlock

            message = (event.message or "pretraining failed").splitlines()[0]
            busy = trainlock.is_busy_error(message)  # a training took the project first
            self._failed = not busy
            self._release()
            if busy:
                holder = self._busy_with() if self.state.project is not None else ""
                text = _busy_line(holder or "a training took it first", retry=not self._asked_now)
            else:
                text = f"pretraining failed: {message}"
            self.status.update(message=text)
            if busy and not self._asked_now:
                self._retry_when_idle()
            if event.traceback and not event.user_error:
                logger.error("lesionseg pretraining failed:\n%s", event.traceback)
        self._show()

    def _release(self) -> None:
        """The pretraining is over: stop polling, close the process once it has exited, then
        run what waited for it."""
        self._timer.stop()
        proc, self.process = self.process, None
        if self._activity is not None:
            self._activity.close()
            self._activity = None
        if proc is not None:
            self._reap(proc, time.monotonic() + REAP_TIMEOUT_S)

    def _reap(self, proc, deadline: float) -> None:
        if proc.is_alive() and time.monotonic() < deadline:
            QTimer.singleShot(REAP_INTERVAL_MS, lambda: self._reap(proc, deadline))
            return
        if proc.is_alive():
            proc.kill()
        try:
            proc.close()
        except Exception:  # noqa: BLE001 - already gone
            logger.debug("lesionseg: closing the pretraining process failed", exc_info=True)
        self._run_after()

    def _run_after(self) -> None:
        todo, self._after = self._after, []
        for fn in todo:
            fn()

    def close_process(self) -> None:
        """Stop the pretraining and wait for it (a checkpoint; killed after 5 s): the window
        is closing."""
        self._idle_timer.stop()
        self._after.clear()
        proc, self.process = self.process, None
        self._timer.stop()
        if self._activity is not None:
            self._activity.close()
            self._activity = None
        if proc is not None:
            try:
                proc.close()
            except Exception:  # noqa: BLE001 - already gone
                logger.debug("lesionseg: closing the pretraining process failed", exc_info=True)
