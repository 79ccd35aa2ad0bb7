"""Label semantics: what stored masks and image-level labels mean for training.

The conventions (see ``docs/architecture.md``): a ``full`` mask holds 0 = background and k =
lesion class k; a ``sparse`` mask holds 0 = unlabelled, k = class k and ``BACKGROUND`` (255) =
background painted explicitly; a training target holds ``IGNORE`` (-1), 0 or k. Everything here
is pure (arrays and records in, values out): the store and the data layer both call it, so the
window, the trainer and ``lesionseg info`` agree on what a case teaches.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from training_backend.errors import InputError
from training_backend.project.records import CaseRecord

#: Value of explicitly painted background in a ``sparse`` mask (0 there means "unlabelled").
BACKGROUND = 255
#: Value of ignored pixels in a training target.
IGNORE = -1
#: Image classes that mean "no lesion of any class" unless the project says otherwise.
DEFAULT_NEGATIVE_NAMES = ("normal", "healthy", "negative", "none", "no_dr", "no dr", "no lesion",
                          "no_lesion", "lesion-free", "absent", "0")
#: The kinds of supervision counted by `count_supervision` (what ``Supervision.met_by`` reads).
COUNT_KINDS = ("full", "sparse", "image_label", "unlabelled", "maskless")


def mask_to_target(mask: np.ndarray, kind: str) -> np.ndarray:
    """Convert a stored mask into a training target (int64; -1 ignore, 0 bg, k class k).

    Args:
        mask: (H, W) uint8 mask as stored.
        kind: ``"full"`` or ``"sparse"``.
    """
    target = mask.astype(np.int64)
    if kind == "sparse":
        target[mask == 0] = IGNORE
        target[mask == BACKGROUND] = 0
    elif kind == "full":
        target[mask == BACKGROUND] = 0
    else:
        raise ValueError(f"unknown annotation kind {kind!r}")
    return target


def check_mask(mask: np.ndarray, shape: tuple[int, int], n_classes: int, kind: str,
               what: str) -> np.ndarray:
    """Validate a mask before it is stored; returns it as uint8.

    Args:
        mask: (H, W) integer (or integral float/bool) class map.
        shape: the image's (H, W).
        n_classes: number of lesion classes K (values 0..K and ``BACKGROUND`` are allowed).
        kind: ``"full"`` (``BACKGROUND`` becomes 0) or ``"sparse"``.
        what: the name used in error messages (case name and id).

    Raises:
        InputError: wrong dimensions or size, non-integer values, values that are no class.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(what, f"mask must be 2-D (H, W), got shape {mask.shape}")
    if tuple(mask.shape) != tuple(shape):
        raise InputError(what, f"mask size {mask.shape[1]}x{mask.shape[0]} does not match the "
                               f"image size {shape[1]}x{shape[0]}")
    if not np.issubdtype(mask.dtype, np.integer) and mask.dtype != bool:
        if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
            raise InputError(what, "mask holds non-integer values")
    values = np.unique(mask)
    allowed = set(range(n_classes + 1)) | {BACKGROUND}
    bad = [int(v) for v in values if int(v) not in allowed]
    if bad:
        raise InputError(what, f"mask values {bad[:5]} are not classes 0..{n_classes}"
                               f" (or {BACKGROUND} = painted background)")
    out = mask.astype(np.uint8)
    if kind == "full":
        out[out == BACKGROUND] = 0
    return out


def mask_kind(record: CaseRecord) -> str | None:
    """The kind of the mask a case trains with: ``full``, ``sparse``, or None (no mask, or
    a latest mask with no labelled pixel, which teaches nothing).

    Args:
        record: the case.
    """
    latest = record.latest
    return None if latest is None or latest.labelled_fraction <= 0 else latest.kind


def has_image_label(record: CaseRecord) -> bool:
    """Whether the case has an image label or per-class presence."""
    return record.image_label is not None or bool(record.presence)


def count_supervision(records: Iterable[CaseRecord]) -> dict[str, int]:
    """How many of ``records`` have each kind of supervision (the one count the window, the
    trainer and ``lesionseg info`` share).

    ``full`` / ``sparse``: cases whose latest mask has labelled pixels; ``image_label``: cases
    with an image label or presence; ``maskless``: cases without such a mask, whatever image
    label they have; ``unlabelled``: cases with neither.

    Args:
        records: the cases to count (the caller leaves out holdout or validation cases).
    """
    counts = dict.fromkeys(COUNT_KINDS, 0)
    for rec in records:
        kind = mask_kind(rec)
        labelled = has_image_label(rec)
        if kind is None:
            counts["maskless"] += 1
            counts["unlabelled"] += not labelled
        else:
            counts[kind] += 1
        counts["image_label"] += labelled
    return counts


def presence_from(record: CaseRecord, mask: np.ndarray | None, classes: list[str],
                  negative_classes: Iterable[str]) -> list[int]:
    """Per lesion class: 1 present, 0 absent, -1 unknown, from what the user gave.

    Combines, in this order (later wins): the latest mask (a full mask gives 1/0 per class, a
    sparse one 1 where painted), a negative image label (all 0), a positive image label (1 when
    there is one class), and explicit per-class presence.

    Args:
        record: the case.
        mask: its latest mask (None when it has none).
        classes: the project's lesion classes.
        negative_classes: image classes that mean "no lesion".
    """
    k = len(classes)
    target = [-1] * k
    if mask is not None and record.latest is not None:
        present = set(int(v) for v in np.unique(mask))
        absent = 0 if record.latest.kind == "full" else -1
        target = [1 if i + 1 in present else absent for i in range(k)]
    if record.image_label is not None and record.image_label in set(negative_classes):
        target = [0] * k
    elif record.image_label is not None and k == 1 and target[0] == -1:
        target = [1]
    for i, c in enumerate(classes):
        if record.presence and c in record.presence:
            target[i] = int(bool(record.presence[c]))
    return target
