"""The project folder's files: the JSON indexes, the lock, and arrays placed atomically.

`ProjectFiles` owns what makes the store safe to share between the window and the trainer
process:

* ``index.json`` (cases) and ``outputs.json`` (model outputs, models) are rewritten atomically
  (`training_backend.project.atomic`) under an exclusive ``fcntl`` lock on ``P/.lock``, after re-reading
  them, so two writers never lose each other's updates and a reader never sees half an index;
* arrays are written to ``store.zarr/.tmp/<uuid>`` and renamed to their final key (POSIX
  ``rename`` is atomic); only keys listed in an index are ever read;
* `ProjectFiles.batch` groups many index changes (an import) into a few writes.

`training_backend.project.store.Project` is the public face; this module has no notion of cases.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from zarr.storage import LocalStore

from training_backend.project.atomic import atomic_write_json, fsync_dir, writer_gone, writer_id
from training_backend.errors import ProjectError
from training_backend.project.records import FORMAT_VERSION

_TMP_MAX_AGE_S = 3600.0


def read_json(path: Path) -> dict:
    """Read a JSON object file of the project; a corrupt one raises `ProjectError` naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ProjectError(f"{path}: corrupt JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise ProjectError(f"{path}: corrupt file (not UTF-8 JSON)") from None
    if not isinstance(data, dict):
        raise ProjectError(f"{path}: corrupt file (a JSON {type(data).__name__}, not an object)")
    return data


#: Keys of each index and the type of their values (checked whenever an index is read).
_INDEX_SHAPES = {"index": {"cases": dict, "order": list}, "outputs": {"models": dict, "cases": dict}}


def _check_index(attr: str, data: dict, path: Path) -> dict:
    for key, kind in _INDEX_SHAPES[attr].items():
        if not isinstance(data.get(key), kind):
            raise ProjectError(f"{path}: corrupt index ({key!r} missing or not a "
                               f"{'list' if kind is list else 'mapping'})")
    if attr == "index" and any(cid not in data["cases"] for cid in data["order"]):
        raise ProjectError(f"{path}: corrupt index (a listed case has no record)")
    return data


def write_array(folder: Path, data: np.ndarray, chunks: tuple[int, ...] | None = None) -> None:
    """Write ``data`` as a standalone zarr v3 array in a new folder (fsynced).

    Args:
        folder: the new array folder (normally under ``ProjectFiles.tmp_folder()``).
        data: the array.
        chunks: chunk shape (default: 512-pixel tiles; one chunk per map of a (C, H, W) stack).
    """
    if chunks is None:
        chunks = tuple(min(s, 512) if i < 2 else s for i, s in enumerate(data.shape))
        if data.ndim == 3 and data.shape[0] <= 16 and data.shape[-1] > 16:  # (C, H, W) maps
            chunks = (1,) + tuple(min(s, 512) for s in data.shape[1:])
    arr = zarr.create_array(store=LocalStore(str(folder)), shape=data.shape, dtype=data.dtype,
                            chunks=chunks, fill_value=0, overwrite=True)
    arr[...] = data
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)


def _stamp(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ProjectFiles:
    """The JSON indexes of one project folder, their lock, and the zarr store's arrays.

    Args:
        path: the project folder.
        mode: ``"r+"`` (read/write) or ``"r"`` (read-only).
    """

    def __init__(self, path: Path, mode: str):
        self.path = Path(path)
        self.mode = mode
        self.index: dict = {"version": FORMAT_VERSION, "cases": {}, "order": []}
        self.outputs: dict = {"version": FORMAT_VERSION, "models": {}, "cases": {}}
        self._stamps: dict[str, tuple | None] = {"index": None, "outputs": None}
        self._lock_fh = None
        self._batch_flush: float | None = None
        self._batch_every = 2.0
        self._held = 0
        self.refresh()

    @property
    def zarr_path(self) -> Path:
        return self.path / "store.zarr"

    # ---- locking
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive project lock (``fcntl.flock``), reentrant within this object."""
        if self._lock_fh is not None:
            yield
            return
        fh = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            self._lock_fh = fh
            yield
        finally:
            self._lock_fh = None
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    def require_writable(self) -> None:
        if self.mode != "r+":
            raise ProjectError(f"{self.path}: project was opened read-only")

    # ---- the indexes
    def refresh(self) -> bool:
        """Re-read the indexes if another process changed them. Returns True if anything changed."""
        changed = False
        for attr in ("index", "outputs"):
            p = self.path / f"{attr}.json"
            stamp = _stamp(p)
            if stamp is not None and stamp != self._stamps[attr]:
                setattr(self, attr, _check_index(attr, read_json(p), p))
                self._stamps[attr] = stamp
                changed = True
        return changed

    def forget_stamps(self) -> None:
        """Re-read both indexes at the next `refresh` (after a write that failed half-way, the
        copy in memory may hold a change that never reached the disk)."""
        self._stamps = {"index": None, "outputs": None}

    def _write(self, attr: str) -> None:
        p = self.path / f"{attr}.json"
        atomic_write_json(p, getattr(self, attr))
        self._stamps[attr] = _stamp(p)

    @contextlib.contextmanager
    def batch(self, flush_every_s: float = 2.0) -> Iterator[None]:
        """Group many index changes into few writes (see `training_backend.project.store.Project.batch`).

        Args:
            flush_every_s: the longest time between two index writes.
        """
        self.require_writable()
        if self._batch_flush is not None:
            yield
            return
        self._batch_flush = time.monotonic()
        self._batch_every = flush_every_s
        try:
            with self.locked():
                self.refresh()
                try:
                    yield
                finally:
                    self._write("index")
        finally:
            self._batch_flush = None

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Inside `batch`: the changes made in this block reach ``index.json`` in one write
        (e.g. a case and its imported mask: a kill never leaves one without the other)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        self._maybe_flush_batch()

    def _maybe_flush_batch(self) -> None:
        if self._batch_flush is None or self._held or \
                time.monotonic() - self._batch_flush < self._batch_every:
            return
        self._write("index")
        fh = self._lock_fh
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)  # let other writers in, then take it back
        time.sleep(0.01)
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        self.refresh()
        self._batch_flush = time.monotonic()

    @contextlib.contextmanager
    def mutate_index(self) -> Iterator[dict]:
        """Lock, reload, yield the index dict, write it back atomically (inside `batch`: later)."""
        self.require_writable()
        if self._batch_flush is not None:  # inside batch(): lock held, flush later
            yield self.index
            self._maybe_flush_batch()
            return
        with self.locked():
            self.refresh()
            yield self.index
            self._write("index")

    @contextlib.contextmanager
    def mutate_outputs(self) -> Iterator[dict]:
        """Lock, reload, yield the outputs dict, write it back atomically."""
        self.require_writable()
        with self.locked():
            self.refresh()
            yield self.outputs
            self._write("outputs")

    # ---- arrays
    def tmp_folder(self) -> Path:
        """A fresh path under ``store.zarr/.tmp`` for an array (or group) being written."""
        tmp = self.zarr_path / ".tmp"
        tmp.mkdir(exist_ok=True)
        return tmp / f"{writer_id()}-{uuid.uuid4().hex}"  # tells when its writer died

    def clean_stale_tmp(self) -> None:
        """Remove temporary files of writers that died (their pid is gone) or are older than an
        hour: array folders under ``store.zarr/.tmp`` and JSON indexes being replaced."""
        tmp = self.zarr_path / ".tmp"
        entries = list(tmp.iterdir()) if tmp.is_dir() else []
        entries += [p for p in self.path.glob(".*.json.tmp-*") if p.is_file()]
        cutoff = time.time() - _TMP_MAX_AGE_S
        for entry in entries:
            with contextlib.suppress(OSError):
                if writer_gone(entry.name) or entry.lstat().st_mtime < cutoff:
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink()

    def place(self, tmp: Path, key: str) -> None:
        """Atomically move a finished temporary array folder to its key."""
        final = self.zarr_path / key
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)
        fsync_dir(final.parent)

    def discard(self, key: str) -> None:
        """Move the array at ``key`` (not listed any more) to the temporary folder."""
        path = self.zarr_path / key
        if path.exists():
            with contextlib.suppress(OSError):
                shutil.move(str(path), str(self.tmp_folder()))

    def open_array(self, key: str) -> zarr.Array:
        """A listed array, read-only and lazy; a missing or corrupt one raises `ProjectError`."""
        try:
            return zarr.open_array(store=LocalStore(str(self.zarr_path / key), read_only=True),
                                   mode="r")
        except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            what = "missing" if isinstance(exc, FileNotFoundError) else "corrupt"
            raise ProjectError(f"{self.zarr_path / key}: array listed in the index is {what} "
                               f"({type(exc).__name__})") from None
