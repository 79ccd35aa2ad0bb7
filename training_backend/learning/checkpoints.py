"""Checkpoints and devices: where a model's files are, how they are written and read back.

``P/models/<model id>/step_000123.pt`` and ``latest.pt`` (a hard link to the newest step file),
``config.json`` beside. A checkpoint holds tensors and plain Python values only, so it loads
with ``torch.load(..., weights_only=True)``; it is written to a temporary file and moved into
place with ``os.replace`` (`training_backend.project.atomic`), so a process killed at any moment leaves
the previous one intact.

The trainer writes checkpoints, inference reads them; both import this module (and neither
imports the other).
"""
from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from training_backend.project.atomic import atomic_path
from training_backend.errors import InputError
from training_backend.learning.starters import starter_checkpoint, starters

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.project.store import Project

#: Version of the checkpoint layout.
CHECKPOINT_FORMAT = 1


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA if available, else MPS if available, else CPU; others are checked.

    Args:
        name: device name.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError("--device", f"unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", f"{name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError("--device", f"{name}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("--device", f"{name}: MPS is not available on this machine")
    return dev


def model_dir(project_path: str | os.PathLike, model_id: str) -> Path:
    return Path(project_path) / "models" / model_id


def new_model_id(project_path: Path, method: str) -> str:
    """``<method>-<yyyymmdd-hhmmss>``, with ``-2``, ``-3``... when that folder exists."""
    base = f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    mid, n = base, 1
    while model_dir(project_path, mid).exists():
        n += 1
        mid = f"{base}-{n}"
    return mid


def latest_model_with_checkpoint(project_path: Path) -> str | None:
    root = Path(project_path) / "models"
    found = [(p.stat().st_mtime, p.parent.name) for p in root.glob("*/latest.pt")] if root.is_dir() else []
    return max(found)[1] if found else None


def save_checkpoint(path: Path, payload: dict) -> None:
    """``torch.save`` to a temporary file, then ``os.replace`` (never a half-written file).

    Args:
        path: final file path.
        payload: tensors and plain Python values only.
    """
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def link_latest(step_file: Path) -> Path:
    """Point ``latest.pt`` at ``step_file`` atomically (hard link; copy where links fail)."""
    latest = step_file.with_name("latest.pt")
    with atomic_path(latest) as tmp:
        try:
            os.link(step_file, tmp)
        except OSError:
            shutil.copyfile(step_file, tmp)
    return latest


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``).

    Args:
        path: the ``.pt`` file.
        device: where tensors go.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad file for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(path, f"not a readable lesionseg checkpoint ({type(exc).__name__}"
                               f"{': ' + first if first else ''})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise InputError(path, "not a lesionseg checkpoint (no model/meta)")
    return ckpt


def resolve_checkpoint(project: Project | None, ref: str | os.PathLike) -> Path:
    """Find a checkpoint file from a path, a model folder or a model id of the project.

    Args:
        project: the project whose ``models/`` and registered models are searched (may be None).
        ref: ``.pt`` file, model folder (its ``latest.pt``), model id, or the name of a
            starter model shipped with the package (`training_backend.learning.starters`).
    """
    p = Path(ref)
    if p.is_file():
        return p
    if p.is_dir() and (p / "latest.pt").is_file():
        return p / "latest.pt"
    if project is not None:
        local = project.path / "models" / str(ref) / "latest.pt"
        if local.is_file():
            return local
        info = project.models().get(str(ref))
        if info and info.get("checkpoint") and Path(info["checkpoint"]).is_file():
            return Path(info["checkpoint"])
    # a starter model shipped with the package (after the project's own ids: a user's model
    # of that name wins); a starter whose model file is missing raises by name
    shipped = starter_checkpoint(str(ref))
    if shipped is not None:
        return shipped
    raise InputError(ref, "no such checkpoint file, model folder, model id or starter model"
                          f"{_starter_hint()}")


def _starter_hint() -> str:
    """`` (starter models: a, b)`` for an error message; empty when none is shipped or the
    cards cannot be read."""
    try:
        names = list(starters())
    except InputError:
        return ""
    return f" (starter models: {', '.join(names)})" if names else ""


def check_compatible(project: Project, meta: dict, path: str | os.PathLike) -> None:
    """Raise `InputError` when a model cannot predict this project's lesion classes.

    The number of lesion classes must match (and their names, when there are several); grey/RGB
    differences are converted automatically.

    Args:
        project: the target project.
        meta: the checkpoint's ``meta`` dict.
        path: checkpoint path (for the message).
    """
    classes = list(meta.get("classes") or [])
    if meta.get("starter"):  # a shipped starter: say which, and what it predicts
        if classes != project.classes:
            raise InputError(path, f"starter model {meta['starter']} predicts the lesion classes "
                                   f"{', '.join(classes)}; project {project.path.name} has "
                                   f"{', '.join(project.classes)}")
        return
    if int(meta["n_classes"]) != len(project.classes):
        raise InputError(path, f"model predicts {meta['n_classes']} lesion class(es) {classes}; "
                               f"project {project.path.name} has {len(project.classes)} {project.classes}")
    if len(project.classes) > 1 and classes and classes != project.classes:
        raise InputError(path, f"model classes {classes} differ from the project's {project.classes}")


__all__ = ["CHECKPOINT_FORMAT", "resolve_device", "model_dir", "new_model_id", "latest_model_with_checkpoint",
           "save_checkpoint", "link_latest", "load_checkpoint", "resolve_checkpoint",
           "check_compatible"]
