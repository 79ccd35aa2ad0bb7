"""One trainer per project at a time: an exclusive ``flock`` on ``P/.train.lock``.

The lock is held by the training process for the whole run and is released when the run
ends or the process dies (the kernel drops ``flock`` locks of a dead process, so a killed run
can be resumed at once). A second run on the same project is refused with a `ProjectError`
naming the run that holds it (a model id, or what else holds it: "encoder pretraining").
`holder` tells, without taking it, whether someone holds the lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import IO

from training_backend.errors import ProjectError


#: The end of the message of a refused `acquire` (`is_busy_error` looks for it).
BUSY_TAIL = "; wait for that run or stop it first"


def acquire(project_path: str | os.PathLike, model_id: str, what: str | None = None) -> IO:
    """Take the project's training lock; returns the open lock file (keep it, then `release`).

    Args:
        project_path: the project folder.
        model_id: the run taking it (shown to a second run that is refused).
        what: what the holder is, when it is not a model's training (e.g. "encoder
            pretraining"): shown instead of the model id.

    Raises:
        ProjectError: another process is training on this project.
    """
    path = Path(project_path) / ".train.lock"
    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fh)
        fh.close()
        raise ProjectError(f"{Path(project_path)}: already training ({holder_text(holder)})"
                           f"{BUSY_TAIL}") from None
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"model_id": model_id, "pid": os.getpid(),
                         **({"what": what} if what else {})}))
    fh.flush()
    return fh


def _read_holder(fh: IO) -> dict:
    fh.seek(0)
    try:
        holder = json.loads(fh.read() or "{}")
    except json.JSONDecodeError:
        holder = {}
    return holder if isinstance(holder, dict) else {}


def holder_text(holder: dict) -> str:
    """``"model X, process N"`` or ``"encoder pretraining, process N"``: who holds the lock.

    Args:
        holder: what the holder wrote in the lock file (``model_id``, ``pid``, ``what``).
    """
    who = holder.get("what") or f"model {holder.get('model_id', '?')}"
    return f"{who}, process {holder.get('pid', '?')}"


def holder(project_path: str | os.PathLike) -> dict | None:
    """Who holds the project's training lock (``model_id``, ``pid``, ``what``); None when
    nobody does. The lock is probed, not kept.

    Args:
        project_path: the project folder.
    """
    path = Path(project_path) / ".train.lock"
    if not path.is_file():
        return None
    try:
        fh = open(path, "r", encoding="utf-8")
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fh)
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    return None


def is_busy_error(message: str) -> bool:
    """Whether an error message is `acquire`'s refusal (the project was busy).

    Args:
        message: e.g. a `events.Failed` message.
    """
    return BUSY_TAIL in (message or "")


def release(fh: IO | None) -> None:
    """Release a lock taken by `acquire` (None: nothing to do).

    Args:
        fh: the lock file `acquire` returned.
    """
    if fh is None:
        return
    with contextlib.suppress(OSError, ValueError):
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()
