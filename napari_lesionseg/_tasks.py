"""Run slow work off the GUI thread, deliver results on it.

``run_task(fn, ...)`` runs ``fn`` (a function, or a generator that yields progress) in a napari
``thread_worker``; callbacks run on the GUI thread, where layers and widgets may be touched.
Workers never touch layers: they return plain data that the callbacks apply.

Setting the environment variable ``LESIONSEG_SYNC=1`` runs every task inline on the calling
thread (deterministic scripts and tests).
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
import subprocess
from typing import Any, Callable

from napari.utils.notifications import show_error

logger = logging.getLogger("napari_lesionseg")
_RUNNING: set[Any] = set()  # keep workers alive until they finish
_CHILDREN: set[subprocess.Popen] = set()  # child interpreters started by run_child


def sync_mode() -> bool:
    return os.environ.get("LESIONSEG_SYNC", "") not in ("", "0", "false", "no")


def error_message(exc: BaseException) -> str:
    """One line for the user: lesionseg errors already are; others get their type name."""
    from training_backend.errors import LesionsegError

    if isinstance(exc, LesionsegError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def report_error(exc: BaseException) -> None:
    show_error(error_message(exc))


def guarded(fn: Callable) -> Callable:
    """``fn`` for use as a Qt slot: an exception becomes an error notification (with the
    traceback logged) instead of escaping into Qt, which would abort the application."""
    @functools.wraps(fn)
    def slot(*args: Any) -> Any:
        try:
            return fn(*args)
        except RuntimeError as exc:
            if "has been deleted" in str(exc):  # a result arrived after its widget was closed
                logger.debug("lesionseg: dropped a late result: %s", exc)
                return None
            logger.exception("lesionseg: error in %s", getattr(fn, "__name__", fn))
            report_error(exc)
            return None
        except Exception as exc:  # noqa: BLE001 - reported to the user
            logger.exception("lesionseg: error in %s", getattr(fn, "__name__", fn))
            report_error(exc)
            return None
    return slot


def run_task(fn: Callable, *args: Any, on_done: Callable[[Any], None] | None = None,
             on_error: Callable[[BaseException], None] | None = None,
             on_yield: Callable[[Any], None] | None = None,
             on_finish: Callable[[], None] | None = None, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` in a worker thread.

    Args:
        fn: function (its return value goes to ``on_done``) or generator function (each yielded
            value goes to ``on_yield``, its return value to ``on_done``).
        on_done: called on the GUI thread with the result.
        on_error: called on the GUI thread with the exception (default: napari error message).
        on_yield: called on the GUI thread with each yielded value.
        on_finish: called on the GUI thread after success or failure.

    Returns:
        The napari worker, or ``None`` in synchronous mode.
    """
    on_error = guarded(on_error or report_error)
    on_done, on_yield, on_finish = (None if f is None else guarded(f)
                                    for f in (on_done, on_yield, on_finish))
    if sync_mode():
        try:
            result = fn(*args, **kwargs)
            if inspect.isgenerator(result):
                gen = result
                while True:
                    try:
                        item = next(gen)
                    except StopIteration as stop:
                        result = stop.value
                        break
                    if on_yield is not None:
                        on_yield(item)
        except Exception as exc:  # noqa: BLE001 - reported to the user
            on_error(exc)
        else:
            if on_done is not None:
                on_done(result)
        finally:
            if on_finish is not None:
                on_finish()
        return None

    from napari.qt.threading import create_worker

    worker = create_worker(fn, *args, _start_thread=False, _ignore_errors=True, **kwargs)
    if on_done is not None:
        worker.returned.connect(on_done)
    worker.errored.connect(on_error)
    if on_yield is not None and hasattr(worker, "yielded"):
        worker.yielded.connect(on_yield)
    _RUNNING.add(worker)

    def _finished() -> None:
        _RUNNING.discard(worker)
        if on_finish is not None:
            on_finish()

    worker.finished.connect(_finished)
    worker.start()
    return worker


def running_tasks() -> int:
    """How many workers are still running (tests wait for 0)."""
    return len(_RUNNING)


def progress_relay(callback: Callable[[int, int], None]) -> Callable[[int, int], None]:
    """A thread-safe ``on_progress(done, total)`` that runs ``callback`` on the GUI thread.

    Call this on the GUI thread; pass the returned function to the worker (e.g. as the
    ``on_progress`` argument of ``import_folder`` or ``export_masks``). Qt queues signals
    emitted from another thread to the receiver's thread.
    """
    if sync_mode():
        return callback
    from qtpy.QtCore import QObject, Signal

    class _Relay(QObject):
        progressed = Signal(int, int)

    relay = _Relay()
    relay.progressed.connect(callback)

    def emit(done: int, total: int) -> None:
        relay.progressed.emit(int(done), int(total))

    emit.relay = relay  # keep the QObject alive as long as the function
    return emit


def run_child(argv: list[str], pythonpath: str | None = None, timeout_s: float = 300.0) -> str:
    """Run a short-lived child process (from a worker thread) and return its stdout.

    ``shutdown_tasks`` terminates children still running, so no worker outlives the window.

    Args:
        argv: the command.
        pythonpath: folder prepended to ``PYTHONPATH`` (a source checkout of the package).
        timeout_s: seconds before the child is killed.

    Raises:
        RuntimeError: the child failed; the message is the last line of its stderr.
    """
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    _CHILDREN.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{argv[0]}: no answer within {timeout_s:.0f} s") from None
    finally:
        _CHILDREN.discard(proc)
    if proc.returncode != 0:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit code {proc.returncode}")
    return out


def shutdown_tasks(timeout_ms: int = 5000) -> bool:
    """Terminate child processes and wait for worker threads (the window is closing).

    Returns:
        True if every worker finished within ``timeout_ms``.
    """
    for proc in list(_CHILDREN):
        proc.terminate()
    from qtpy.QtCore import QThreadPool

    return bool(QThreadPool.globalInstance().waitForDone(timeout_ms))
