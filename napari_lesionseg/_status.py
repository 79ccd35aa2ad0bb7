"""The evented status of the training run the window shows (started here, elsewhere or followed).

The trainer panel maps each trainer event (`training_backend.events`) onto one
`TrainingStatus` with `TrainingStatus.apply`; nothing else in the window reads trainer events.
The widgets that show a run subscribe to the status' fields (``status.events.<field>``, or
``status.events`` for any change): the progress bar and the status lines, the run plot, napari's
activity dock, the learning curve (`TrainingStatus.round_finished`) and the panels that reload
outputs (`TrainingStatus.predictions_ready`). A test can feed events and read the fields
without any widget. Everything here lives on the GUI thread; no Qt, no torch.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, Iterator

from psygnal import Signal, evented

#: What the run is doing (`TrainingStatus.state`).
IDLE = "idle"              # no run shown yet (or another project was opened)
STARTING = "starting"      # started or launched, no `Started` event yet
TRAINING = "training"
PREDICTING = "predicting"  # writing predictions after a round
STOPPING = "stopping"      # a stop was asked for; the run checkpoints and ends
FINISHED = "finished"
FAILED = "failed"
STATES = (IDLE, STARTING, TRAINING, PREDICTING, STOPPING, FINISHED, FAILED)
#: States in which a run is going on.
ACTIVE = (STARTING, TRAINING, PREDICTING, STOPPING)


@evented
@dataclass
class TrainingStatus:
    """Where the shown run is; every field is an evented psygnal signal (``events.<name>``).

    Args:
        state: one of `STATES`.
        following: the run was started elsewhere (command line, server, another window); it is
            stopped through the project and never killed from here.
        model_id: the run's model (once known).
        step, total: the optimisation step and the run's step count (``None``: a time budget).
        elapsed_s: seconds the run (or its prediction pass) has taken.
        fraction: how far the training is, in [0, 1] (steps or elapsed budget).
        eta_s: estimated seconds left of the current phase (``None``: unknown yet).
        loss: the last reported loss parts (``"loss"`` is the total).
        dice: the last validation Dice (``None``: none yet).
        folded_at: the step from which the validation cases are trained on too.
        loss_curve, dice_curve: the run's ``(step, loss)`` and ``(step, Dice)`` points so far.
        predicted, to_predict: cases predicted so far and in all, while predicting.
        reason: why a finished run ended ("steps", "budget", "cancelled").
        waiting: what a launcher says before its run reports (submitted, queued, ...).
        message: the panel's status line (the run, the last checkpoint, the error, or what
            the project's labels can train when no run is going on).
    """

    state: str = IDLE
    following: bool = False
    model_id: str | None = None
    step: int = 0
    total: int | None = None
    elapsed_s: float = 0.0
    fraction: float = 0.0
    eta_s: float | None = None
    loss: dict = field(default_factory=dict)
    dice: float | None = None
    folded_at: int | None = None
    loss_curve: tuple = ()
    dice_curve: tuple = ()
    predicted: int = 0
    to_predict: int = 0
    reason: str | None = None
    waiting: str = ""
    message: str = ""

    #: ``(model_id, case_ids)``: outputs of these cases were written to the project.
    predictions_ready = Signal(str, tuple)
    #: ``(n_annotations, dice or None)``: a round ended (a point of the learning curve).
    round_finished = Signal(int, object)

    # ------------------------------------------------------------------ updates
    def update(self, **changes: Any) -> None:
        """Set several fields, then emit their events: every subscriber sees them all set.

        Args:
            changes: field names and new values (unknown names raise ``AttributeError``).
        """
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise AttributeError(f"TrainingStatus has no field(s) {', '.join(unknown)}")
        old = {k: getattr(self, k) for k in changes}
        with self.events.blocked():
            for k, v in changes.items():
                setattr(self, k, v)
        batch = getattr(self, "_batch_old", None)
        if batch is not None:  # inside `batch()`: each field's value before it, emitted at its end
            for k, v in old.items():
                batch.setdefault(k, v)
            return
        for k, v in changes.items():
            if _differs(v, old[k]):
                getattr(self.events, k).emit(v, old[k])

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Apply many events, then emit each changed field once with its final value.

        Following a long run from its start replays thousands of events in one poll; emitting
        every field change would redraw the curves once per event (quadratic in the run's
        length). The signals `predictions_ready` and `round_finished` still fire per event.
        """
        if getattr(self, "_batch_old", None) is not None:  # nested: the outer one emits
            yield
            return
        self._batch_old: dict[str, Any] | None = {}
        try:
            yield
        finally:
            old, self._batch_old = self._batch_old, None
            for k, v in old.items():
                new = getattr(self, k)
                if _differs(new, v):
                    getattr(self.events, k).emit(new, v)

    def begin(self, following: bool = False, waiting: str = "", message: str = "") -> None:
        """A new run: everything of the previous one is cleared.

        Args:
            following: a run started elsewhere.
            waiting: what shows until its first event.
            message: the first status line.
        """
        defaults = {f.name: getattr(TrainingStatus(), f.name) for f in fields(self)}
        self.update(**{**defaults, "state": STARTING, "following": following,
                       "waiting": waiting, "message": message})

    def reset(self) -> None:
        """No run shown (another project was opened); the status line stays."""
        defaults = {f.name: getattr(TrainingStatus(), f.name) for f in fields(self)}
        defaults.pop("message")
        self.update(**defaults)

    @property
    def active(self) -> bool:
        """A run is going on (started, training, predicting or stopping)."""
        return self.state in ACTIVE

    # ------------------------------------------------------------------ trainer events
    def apply(self, event: Any) -> None:
        """Map one trainer event (`training_backend.events`) onto the fields.

        Args:
            event: any training event; unknown objects are ignored.
        """
        handler = _HANDLERS.get(type(event).__name__)
        if handler is not None:
            handler(self, event)

    def _on_started(self, e) -> None:
        what = (f"{e.total_steps} steps" if e.total_steps
                else f"{e.budget_s:.0f} s budget" if e.budget_s else "")
        device = f"{e.world_size} × {e.device}" if e.world_size > 1 else e.device
        self.update(state=TRAINING if self.state != STOPPING else STOPPING,
                    model_id=e.model_id, total=e.total_steps, step=e.start_step, waiting="",
                    message=f"{e.model_id} on {device}: {e.n_train} training cases, "
                            f"{e.n_val} for validation, {what}")

    def _on_progress(self, e) -> None:
        fraction = max(0.0, min(1.0, float(e.fraction)))
        eta = (e.elapsed_s / fraction * (1.0 - fraction)) if fraction >= MIN_ETA_FRACTION else None
        self.update(state=self._running(TRAINING), step=e.step, total=e.total,
                    elapsed_s=e.elapsed_s, fraction=fraction, eta_s=eta)

    def _on_loss(self, e) -> None:
        changes: dict[str, Any] = {"loss": dict(e.values)}
        total = e.values.get("loss")
        if isinstance(total, (int, float)):
            changes["loss_curve"] = self.loss_curve + ((int(e.step), float(total)),)
        self.update(**changes)

    def _on_validation(self, e) -> None:
        changes: dict[str, Any] = {"dice": e.dice}
        if e.dice is not None:
            changes["dice_curve"] = self.dice_curve + ((int(e.step), float(e.dice)),)
        self.update(**changes)

    def _on_folded(self, e) -> None:
        self.update(folded_at=int(e.step))

    def _on_round(self, e) -> None:
        self.round_finished.emit(int(e.n_annotations), e.dice)

    def _on_prediction_progress(self, e) -> None:
        eta = (e.elapsed_s / e.done * (e.total - e.done)) if 0 < e.done < e.total else None
        self.update(state=self._running(PREDICTING), predicted=e.done, to_predict=e.total,
                    elapsed_s=e.elapsed_s, eta_s=eta)

    def _on_predictions(self, e) -> None:
        self.predictions_ready.emit(e.model_id, tuple(e.case_ids))

    def _on_checkpoint(self, e) -> None:
        self.update(message=f"checkpoint at step {e.step}")

    def _on_pretrained(self, e) -> None:
        if e.networks:
            what = (f"starts from the encoder pretrained on {e.images} images "
                    f"({e.steps} steps): {', '.join(e.networks)}")
        else:
            what = f"pretrained encoder {e.note}"
        self.update(message=f"{self.message} · {what}" if self.message else what)

    def _on_init_from(self, e) -> None:
        what = e.note or f"starts from {e.source}"
        self.update(message=f"{self.message} · {what}" if self.message else what)

    def _on_finished(self, e) -> None:
        self.update(state=FINISHED, model_id=e.model_id, step=e.step, reason=e.reason,
                    fraction=1.0, eta_s=None, message=f"model {e.model_id} ready")

    def _on_failed(self, e) -> None:
        message = e.message or "training failed"
        self.update(state=FAILED, eta_s=None,
                    message=f"failed: {message.splitlines()[0]} — fix it and press Start to "
                            "try again")

    def _running(self, state: str) -> str:
        """``state``, unless a stop was asked for (the run says so until it ends)."""
        return STOPPING if self.state == STOPPING else state


#: An ETA is shown once this fraction of the run is done (earlier ones jump about).
MIN_ETA_FRACTION = 0.02

_HANDLERS = {
    "Started": TrainingStatus._on_started,
    "Progress": TrainingStatus._on_progress,
    "Loss": TrainingStatus._on_loss,
    "Validation": TrainingStatus._on_validation,
    "ValidationFolded": TrainingStatus._on_folded,
    "RoundFinished": TrainingStatus._on_round,
    "PredictionProgress": TrainingStatus._on_prediction_progress,
    "PredictionsReady": TrainingStatus._on_predictions,
    "CheckpointSaved": TrainingStatus._on_checkpoint,
    "PretrainedEncoder": TrainingStatus._on_pretrained,
    "InitFrom": TrainingStatus._on_init_from,
    "Finished": TrainingStatus._on_finished,
    "Failed": TrainingStatus._on_failed,
}


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # noqa: BLE001 - values without a plain comparison
        return a is not b


# ----------------------------------------------------------------------------- texts
def progress_text(status: TrainingStatus) -> str:
    """The progress bar's text for ``status`` (its state, step, time left or the end)."""
    s = status
    if s.state == IDLE:
        return "idle"
    if s.state == FINISHED:
        return f"finished: {s.reason} · step {s.step}"
    if s.state == FAILED:
        return "failed"
    if s.state == STOPPING:
        return ("stop requested through the project …" if s.following
                else "stopping after this step …")
    if s.state == STARTING:
        return s.waiting or ("following …" if s.following else "starting the trainer …")
    if s.state == PREDICTING:
        if s.predicted < s.to_predict:
            left = f" · about {s.eta_s:.0f} s left" if s.eta_s is not None else ""
            return f"predicting {s.predicted}/{s.to_predict}{left}"
        return f"predictions written for {s.to_predict} cases"
    total = f"/{s.total}" if s.total else ""
    left = f" · about {s.eta_s:.0f} s left" if s.eta_s is not None else ""
    return f"step {s.step}{total} · {s.elapsed_s:.0f} s{left}"


def progress_value(status: TrainingStatus, scale: int = 1000) -> int:
    """The progress bar's value in ``[0, scale]``: the training fraction, or the share of the
    cases predicted while predicting."""
    if status.state == PREDICTING and status.to_predict:
        share = status.predicted / max(1, status.to_predict)
    else:
        share = status.fraction
    return int(round(scale * max(0.0, min(1.0, share))))


def metrics_text(status: TrainingStatus) -> str:
    """The loss line: total loss, its parts, and the validation Dice."""
    values = status.loss
    total = values.get("loss")
    parts = ", ".join(f"{k} {v:.3f}" for k, v in values.items() if k != "loss")
    text = ""
    if values:
        text = f"loss {total:.4f}" if isinstance(total, (int, float)) else "loss"
        text += f" ({parts})" if parts else ""
    if status.dice is not None:
        text += f" · validation Dice {status.dice:.3f}"
        if status.folded_at is not None:
            # the score stays the one measured before those cases were trained on
            text += f" (step {status.folded_at}; its cases are trained on from there)"
    return text.strip(" ·")


def activity_text(status: TrainingStatus, what: str) -> str:
    """The activity dock's description.

    Args:
        status: the run's status.
        what: the run's description ("Training supervised", "Following m").
    """
    if status.state == PREDICTING:
        return f"Predicting {status.predicted}/{status.to_predict}"
    return what


__all__ = ["TrainingStatus", "STATES", "ACTIVE", "IDLE", "STARTING", "TRAINING", "PREDICTING",
           "STOPPING", "FINISHED", "FAILED", "progress_text", "progress_value", "metrics_text",
           "activity_text"]
