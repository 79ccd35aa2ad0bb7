"""One trainer per project at a time: an exclusive ``flock`` on ``P/.train.lock``.

The lock is held by the training process for the whole run and is released when the run
ends or the process dies (the kernel drops ``flock`` locks of a dead process, so a killed run
can be resumed at once). A second run on the same project is refused with a `ProjectError`
naming the run that holds it.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import IO

from training_backend.errors import ProjectError


def acquire(project_path: str | os.PathLike, model_id: str) -> IO:
    """Take the project's training lock; returns the open lock file (keep it, then `release`).

    Args:
        project_path: the project folder.
        model_id: the run taking it (shown to a second run that is refused).

    Raises:
        ProjectError: another process is training on this project.
    """
    path = Path(project_path) / ".train.lock"
    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        try:
            holder = json.loads(fh.read() or "{}")
        except json.JSONDecodeError:
            holder = {}
        fh.close()
        raise ProjectError(f"{Path(project_path)}: already training (model "
                           f"{holder.get('model_id', '?')}, process {holder.get('pid', '?')}); "
                           f"wait for that run or stop it first") from None
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"model_id": model_id, "pid": os.getpid()}))
    fh.flush()
    return fh


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
