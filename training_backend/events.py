"""Events yielded by the training loop (`trainer.run_training`).

Small, frozen, picklable dataclasses: the trainer process puts them on a queue, the GUI maps
them onto its own state on the GUI thread, the CLI prints them. None holds a tensor.
`to_dict` / `from_dict` give their plain-JSON form, one line each of a run's
``runs/<model id>/events.jsonl`` (`runs`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Union


@dataclass(frozen=True)
class Started:
    """Training began (after the store snapshot and model set-up)."""

    model_id: str
    method: str
    device: str
    n_train: int               # cases trained on (any supervision, incl. unlabelled for SSL)
    n_val: int                 # fully annotated cases held out for validation Dice
    total_steps: int | None    # None in wall-clock budget mode
    budget_s: float | None     # None in step mode
    start_step: int = 0        # > 0 when resuming
    world_size: int = 1        # processes training the model (torchrun)


@dataclass(frozen=True)
class Progress:
    """Where the run is; ``fraction`` in [0, 1] (steps or elapsed budget)."""

    step: int
    total: int | None
    elapsed_s: float
    fraction: float


@dataclass(frozen=True)
class Loss:
    """Mean of each loss part since the previous `Loss` event."""

    step: int
    values: dict[str, float]


@dataclass(frozen=True)
class Validation:
    """Dice on the validation cases at training resolution (``None``: nothing to score)."""

    step: int
    dice: float | None
    per_class: dict[str, float | None]


@dataclass(frozen=True)
class ValidationFolded:
    """From ``step`` on, the ``n_cases`` validation cases are trained on too (the end of a run
    learns from every mask). No validation follows: the last `Validation` before this event was
    measured on cases the model had not been trained on, and stays the run's score."""

    step: int
    n_cases: int
    dice: float | None


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str


@dataclass(frozen=True)
class RoundFinished:
    """A round ended; the store is re-read before the next one."""

    round: int
    n_annotations: int   # cases with supervision the method uses (validation cases included)
    dice: float | None


@dataclass(frozen=True)
class PredictionsReady:
    """Outputs for these cases were written to the store by this model. After a round they come
    in parts, in the order the cases were predicted (`TrainConfig.predict_first` first), so a
    window can show the case on screen before the rest is done."""

    model_id: str
    case_ids: tuple[str, ...]


@dataclass(frozen=True)
class PredictionProgress:
    """Predicting the cases after a round: ``done`` of ``total`` written so far."""

    done: int
    total: int
    elapsed_s: float


@dataclass(frozen=True)
class PretrainedEncoder:
    """A fresh run found the project's self-supervised pretrained encoder
    (`TrainConfig.pretrained`): ``networks`` are the method's encoders that start from it (empty:
    not used, ``note`` says why)."""

    source: str                    # the encoder file
    networks: tuple[str, ...]      # e.g. ("net.encoder", "teacher.encoder")
    steps: int                     # pretraining steps behind it
    images: int                    # images it was pretrained on
    note: str = ""


@dataclass(frozen=True)
class InitFrom:
    """A fresh run fine-tunes another model (`TrainConfig.init_from`): ``kept`` of its weight
    tensors are loaded; ``anew`` are the method's weights that start from random values
    instead, because they depend on classes the model and the project do not share (empty:
    the same classes); ``note`` says it in one line."""

    source: str                    # the model's name (a starter, a model id) or file
    kept: int                      # weight tensors loaded from it
    anew: tuple[str, ...] = ()     # e.g. ("net.out.conv.conv.weight", ...)
    note: str = ""


@dataclass(frozen=True)
class Finished:
    """Last event of a successful run. ``reason``: "steps" | "budget" | "cancelled"."""

    model_id: str
    step: int
    reason: str
    checkpoint: str | None = None   # path of the final checkpoint


@dataclass(frozen=True)
class Failed:
    """Last event of a failed run. ``user_error``: the message is a one-line user error."""

    message: str
    traceback: str = ""
    user_error: bool = False


Event = Union[Started, Progress, Loss, Validation, ValidationFolded, CheckpointSaved, RoundFinished,
              PredictionsReady, PredictionProgress, PretrainedEncoder, InitFrom, Finished, Failed]

#: Events after which nothing more comes.
TERMINAL = (Finished, Failed)

#: Every event type by its class name (the ``"event"`` key of `to_dict`).
EVENT_TYPES: dict[str, type] = {cls.__name__: cls for cls in Event.__args__}


def to_dict(event: Event) -> dict[str, Any]:
    """Plain-JSON form of an event: ``{"event": <class name>, **fields}``.

    Args:
        event: any event of this module.
    """
    name = type(event).__name__
    if EVENT_TYPES.get(name) is not type(event):
        raise TypeError(f"not a training event: {event!r}")
    return {"event": name, **asdict(event)}


def from_dict(d: dict[str, Any]) -> Event:
    """The event `to_dict` gave (lists back to tuples where a field is a tuple).

    Args:
        d: a `to_dict` result, e.g. one line of a run's ``events.jsonl``.

    Raises:
        ValueError: unknown event name or fields.
    """
    cls = EVENT_TYPES.get(str(d.get("event")))
    if cls is None:
        raise ValueError(f"unknown event {d.get('event')!r}")
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    for name in ("case_ids", "networks", "anew"):
        if name in kwargs:
            kwargs[name] = tuple(kwargs[name])
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"bad {cls.__name__} event: {exc}") from None


__all__ = ["Started", "Progress", "Loss", "Validation", "ValidationFolded", "CheckpointSaved", "RoundFinished",
           "PredictionsReady", "PredictionProgress", "PretrainedEncoder", "InitFrom", "Finished", "Failed",
           "Event", "TERMINAL",
           "EVENT_TYPES", "to_dict", "from_dict"]
