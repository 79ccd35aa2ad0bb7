"""Atomic file writes: a file holds either its old or its new content, never a mix.

Every file the package writes (the project's JSON indexes, exported masks, checkpoints) goes
through here: the content is written to a temporary file in the same folder, flushed and
``fsync``-ed, moved into place with ``os.replace`` (atomic on POSIX within one file system), and
the folder is ``fsync``-ed so that the rename itself survives a power cut. A write that fails or
is interrupted leaves the previous file untouched and removes its temporary file.

Three entry points:

* :func:`atomic_write_bytes` / :func:`atomic_write_text` / :func:`atomic_write_json` for content
  held in memory;
* :func:`atomic_path`, a context manager yielding a temporary path for writers that need a path
  (``torch.save``, ``os.link``); the file is moved into place when the block ends without error.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator


#: This machine in temporary names: a project on shared storage is written from several
#: machines, and a pid says whether its writer is alive only on the machine that wrote it.
HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def writer_id() -> str:
    """``<pid>.<host tag>``: who writes a temporary file (read back by `writer_gone`)."""
    return f"{os.getpid()}.{HOST_TAG}"


def temporary_sibling(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """A unique hidden name beside ``path`` (same folder, so a rename is atomic).

    Args:
        path: the final path.
        tag: a word in the name (``tmp``, ``old``) that says what the file is.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{writer_id()}-{uuid.uuid4().hex[:8]}")


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a folder so that renames inside it are durable (ignored where unsupported).

    Args:
        path: the folder.
    """
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    """``fsync`` a file written by someone else (e.g. ``torch.save``).

    Args:
        path: the file.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The writer inside the block creates the temporary file (any way it likes); it is then
    ``fsync``-ed, renamed onto ``path``, and the folder is ``fsync``-ed. On an exception the
    temporary file is removed and ``path`` is left as it was.

    Args:
        path: the final file; its folder must exist.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically.

    Args:
        path: destination file; its folder must exist.
        data: the complete file content.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Args:
        path: destination file; its folder must exist.
        text: the complete file content.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as JSON (indented, UTF-8) to ``path`` atomically.

    Args:
        path: destination file; its folder must exist.
        data: anything ``json.dump`` accepts.
    """
    atomic_write_text(path, json.dumps(data, indent=1, ensure_ascii=False))


def writer_gone(name: str) -> bool:
    """True when a temporary name carries the pid of a process of this machine that no longer
    exists (a name written on another machine is never judged gone: its pid means nothing here).

    Names: ``.<file>.tmp-<writer>-<hex>`` / ``.<file>.old-<writer>-<hex>`` (`temporary_sibling`)
    and ``<writer>-<hex>`` (the project store's array folders under ``store.zarr/.tmp``), where
    ``<writer>`` is `writer_id` (``<pid>.<host tag>``; a bare ``<pid>`` is read as this machine's).

    Args:
        name: a file or folder name.
    """
    head = name
    for tag in (".tmp-", ".old-"):
        if tag in name:
            head = name.rsplit(tag, 1)[1]
            break
    pid, _, host = head.split("-", 1)[0].partition(".")
    if host and host != HOST_TAG:
        return False
    if not pid.isdigit() or "-" not in head or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (owned by another user)
        return False
    with contextlib.suppress(OSError, IndexError):  # a zombie (dead, not yet reaped) is gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return False


def remove_dead_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the hidden temporary files (and zarr folders) in ``folder`` that were left by
    writers that died (a killed export, say); those of running writers stay.

    Args:
        folder: the folder to tidy.

    Returns:
        What was removed.
    """
    import shutil

    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.name.startswith(".") and (".tmp-" in entry.name or ".old-" in entry.name) \
                and writer_gone(entry.name):
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed.append(entry)
    return removed

