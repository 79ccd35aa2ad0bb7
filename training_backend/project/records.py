"""What the project's JSON indexes hold, as frozen records (no pixel data, no I/O).

``CaseRecord`` (one case: image metadata, image-level labels, annotation history),
``AnnotationVersion`` (one saved mask), ``OutputRecord`` / ``Outputs`` (a model's latest outputs
of a case) and the constants of the on-disk format. The store (``store.py``) builds these from
``index.json`` and ``outputs.json``; everything else reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

FORMAT = "lesionseg-project"
FORMAT_VERSION = 1
ANNOTATION_KINDS = ("full", "sparse")
SPLITS = ("train", "holdout")
DEFAULT_COLORS = ("#ff3b30", "#34c759", "#007aff", "#ffcc00", "#af52de", "#ff9500", "#5ac8fa",
                  "#ff2d55", "#a2845e")
#: Outputs kept per case (the newest ones); older ones are removed after a newer one is listed.
KEEP_OUTPUTS = 2


def now_iso() -> str:
    """The current UTC time, ISO-8601 with milliseconds (the store's timestamps)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class AnnotationVersion:
    """One saved annotation mask (immutable once listed)."""

    version: int
    kind: str
    author: str
    time: str
    source: str
    parent: int | None
    key: str
    labelled_fraction: float

    @classmethod
    def from_dict(cls, d: dict) -> "AnnotationVersion":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class CaseRecord:
    """What the index knows about one case (no pixel data)."""

    id: str
    name: str
    source: str | None
    shape: tuple[int, int]
    channels: int
    dtype: str
    image_label: str | None = None
    presence: dict[str, bool] | None = None
    annotations: tuple[AnnotationVersion, ...] = ()
    has_reference: bool = False
    reference_label: str | None = None
    reference_presence: dict[str, bool] | None = None
    split: str = "train"
    label_history: tuple[dict, ...] = ()
    image_key: str = ""
    reference_key: str | None = None

    @property
    def latest(self) -> AnnotationVersion | None:
        return self.annotations[-1] if self.annotations else None

    @property
    def status(self) -> str:
        """``full`` | ``sparse`` | ``image label`` | ``unlabelled`` (the best supervision it has)."""
        if self.latest is not None:
            return self.latest.kind
        if self.image_label is not None or self.presence:
            return "image label"
        return "unlabelled"

    @classmethod
    def from_dict(cls, d: dict) -> "CaseRecord":
        return cls(
            id=d["id"], name=d["name"], source=d.get("source"),
            shape=tuple(d["shape"]), channels=int(d["channels"]), dtype=d["dtype"],
            image_label=d.get("image_label"), presence=d.get("presence"),
            annotations=tuple(AnnotationVersion.from_dict(a) for a in d.get("annotations", ())),
            has_reference=bool(d.get("reference_key")) or d.get("reference_label") is not None
            or bool(d.get("reference_presence")),
            reference_label=d.get("reference_label"),
            reference_presence=d.get("reference_presence"),
            split=d.get("split", "train"),
            label_history=tuple(d.get("label_history", ())),
            image_key=d["image_key"], reference_key=d.get("reference_key"),
        )


@dataclass(frozen=True)
class OutputRecord:
    """Metadata of the latest model outputs of a case (no arrays)."""

    case_id: str
    output_id: str
    model_id: str
    time: str
    key: str
    scores: dict
    has_features: bool
    older: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, cid: str, d: dict) -> "OutputRecord":
        return cls(case_id=cid, output_id=d["output_id"], model_id=d["model_id"],
                   time=d["time"], key=d["key"], scores=dict(d.get("scores", {})),
                   has_features=bool(d.get("has_features")), older=tuple(d.get("older", ())))


@dataclass
class Outputs:
    """Model outputs of one case, at the image's size."""

    case_id: str
    output_id: str
    model_id: str
    time: str
    pred: np.ndarray              # (H, W) uint8 class map
    prob: np.ndarray              # (K+1, H, W) float16
    cam: np.ndarray               # (K, H, W) float16 in [0, 1]
    uncertainty: np.ndarray       # (H, W) float16
    scores: dict = field(default_factory=dict)
    features: np.ndarray | None = None


def jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays inside dicts/lists to plain JSON types (non-finite -> None).

    Args:
        obj: a value to store in a JSON index.
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
