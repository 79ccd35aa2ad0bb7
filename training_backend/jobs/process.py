"""The trainer in its own process.

`TrainerProcess` runs `trainer.run_training` in a child started with the ``spawn`` method (a fresh
interpreter: no inherited Qt/GL state, no forked threads) and forwards its events through a
``multiprocessing`` queue. The GUI calls `poll` from a timer; nothing blocks. `PretrainProcess`
does the same for the encoder's self-supervised pretraining (`pretrain.run_pretraining`).

* `cancel` sets an event the loop polls every step: the step finishes, a checkpoint is written and
  the last event is ``Finished(reason="cancelled")``;
* `kill` ends the child at once (SIGKILL); the last checkpoint stays valid and a run can be
  continued with ``resume=True``;
* a child that dies without a final event (killed, out of memory, segfault) shows up in `poll` as
  ``Failed("trainer process died (exit code N)")``;
* the child stops by itself (gracefully, with a checkpoint) when its parent process disappears.

The child imports only ``training_backend`` (never napari/Qt): the parent's ``__main__`` module is
hidden from ``spawn`` while the child starts, so e.g. a napari launcher script is not re-imported.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator

from training_backend.events import TERMINAL, Event, Failed


def _job(kind: str, project_path: str, config: dict, resume: bool, cancel) -> Iterator[Event]:
    """The event stream of a job: ``"train"`` (`trainer.run_training`) or ``"pretrain"``
    (`pretrain.run_pretraining`)."""
    if kind == "pretrain":
        from training_backend.config import PretrainConfig
        from training_backend.learning.pretrain import run_pretraining

        return run_pretraining(project_path, PretrainConfig.from_dict(config), resume=resume,
                               cancel=cancel)
    from training_backend.learning.trainer import TrainConfig, run_training

    return run_training(project_path, TrainConfig.from_dict(config), resume=resume, cancel=cancel)


def _child_main(project_path: str, config: dict, resume: bool, events, cancel_event,
                parent_pid: int, kind: str = "train") -> None:
    """Entry point of the spawned child: run the job, put every event on the queue."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is the parent's business
    try:
        from training_backend.learning.runtime import keep_freed_memory

        keep_freed_memory()

        def cancelled() -> bool:
            return cancel_event.is_set() or os.getppid() != parent_pid

        for event in _job(kind, project_path, config, resume, cancelled):
            events.put(event)
    except BaseException as exc:  # noqa: BLE001 - the parent must hear about anything
        from training_backend.errors import LesionsegError

        events.put(Failed(f"{type(exc).__name__}: {exc}" if not isinstance(exc, LesionsegError)
                          else str(exc), traceback.format_exc(),
                          user_error=isinstance(exc, LesionsegError)))
    finally:
        events.close()
        events.join_thread()  # flush the feeder thread before the interpreter exits


@contextlib.contextmanager
def _hide_main_module() -> Iterator[None]:
    """Keep ``spawn`` from re-importing the parent's ``__main__`` in the child.

    ``multiprocessing`` re-runs the parent's main script (as ``__mp_main__``) in a spawned child
    when it has a ``__file__`` or ``__spec__``; for a napari launcher that would import Qt. The
    child's target lives in this module, so the main module is not needed there.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved = {a: getattr(main, a) for a in ("__file__", "__spec__") if hasattr(main, a)}
    try:
        main.__spec__ = None
        if "__file__" in saved:
            del main.__file__
        yield
    finally:
        for attr, value in saved.items():
            setattr(main, attr, value)


class TrainerProcess:
    """A training run in a spawned child process.

    Args:
        project_path: the project folder.
        config: a `trainer.TrainConfig` (or its ``to_dict()`` form).
        resume: continue ``config.model_id`` from its last checkpoint.
    """

    #: What the child runs (`_job`).
    kind = "train"

    def __init__(self, project_path: str | os.PathLike, config, resume: bool = False):
        self.project_path = str(Path(project_path))
        self.config = config
        self.resume = bool(resume)
        self._ctx = mp.get_context("spawn")
        self._queue = None
        self._cancel = None
        self._process = None
        self._terminal: Event | None = None
        self._closed_exitcode: int | None = None

    # ---- life cycle
    def start(self) -> None:
        """Start the child (returns at once; events arrive through `poll`)."""
        if self._process is not None:
            raise RuntimeError("trainer process already started")
        config_dict = self.config.to_dict() if hasattr(self.config, "to_dict") else dict(self.config)
        self._queue = self._ctx.Queue()
        self._cancel = self._ctx.Event()
        self._process = self._ctx.Process(
            target=_child_main, name="lesionseg-trainer", daemon=True,
            args=(self.project_path, config_dict, self.resume, self._queue,
                  self._cancel, os.getpid(), self.kind))
        with _hide_main_module():
            self._process.start()
        # The child holds its own copy of the queue's write end now. Closing ours means that a
        # child killed in the middle of writing a message gives EOF here, never a reader blocked
        # on the rest of that message.
        writer = getattr(self._queue, "_writer", None)
        if writer is not None:
            writer.close()

    def cancel(self) -> None:
        """Ask the run to stop after the current step (checkpoint, then ``Finished("cancelled")``)."""
        if self._cancel is not None:
            self._cancel.set()

    def kill(self, timeout: float = 5.0) -> None:
        """End the child at once (SIGKILL) and reap it.

        Args:
            timeout: seconds to wait for the child to be gone.
        """
        p = self._process
        if p is None or p.exitcode is not None:
            return
        p.kill()  # SIGKILL
        p.join(timeout)
        if p.is_alive():  # pragma: no cover - SIGKILL cannot be ignored
            raise RuntimeError(f"trainer process {p.pid} did not die")

    def is_alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self._closed_exitcode if self._process is None else self._process.exitcode

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def done(self) -> bool:
        """True once the final event (`Finished` / `Failed`) was polled."""
        return self._terminal is not None

    @property
    def result(self) -> Event | None:
        """The final event, once polled."""
        return self._terminal

    # ---- events
    def _drain(self) -> list[Event]:
        out: list[Event] = []
        if self._queue is None:
            return out
        while True:
            try:
                event = self._queue.get_nowait()
            except queue_mod.Empty:
                return out
            except (EOFError, OSError):  # the child died mid-way; nothing more to read
                return out
            out.append(event)
            if isinstance(event, TERMINAL):
                self._terminal = event

    def poll(self) -> list[Event]:
        """Events that arrived since the last call (never blocks).

        When the child has exited without a final event, the last returned event is
        ``Failed("trainer process died (exit code N)")``.
        """
        events = self._drain()
        p = self._process
        if p is not None and not p.is_alive():  # is_alive() reaps an exited child: no zombie
            if self._terminal is None:
                events += self._drain()  # what the child flushed just before exiting
            if self._terminal is None:
                failed = Failed(f"trainer process died (exit code {p.exitcode})")
                self._terminal = failed
                events.append(failed)
        return events

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> list[Event]:
        """Collect events until the final one (or ``timeout`` seconds).

        Args:
            timeout: seconds (None: no limit).
            interval: polling interval.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        events: list[Event] = []
        while self._terminal is None:
            events += self.poll()
            if self._terminal is not None or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(interval)
        return events

    def close(self, timeout: float = 5.0) -> None:
        """Release the queue and the process handle (kills a child that is still running).

        Args:
            timeout: seconds to wait for the child to end.
        """
        if self._process is not None:
            if self._process.is_alive():
                self.cancel()
                self._process.join(timeout)
            if self._process.is_alive():
                self.kill()
            self._process.join(timeout)
            self._closed_exitcode = self._process.exitcode
            with contextlib.suppress(ValueError):
                self._process.close()
            self._process = None
        if self._queue is not None:
            self._queue.close()
            self._queue.cancel_join_thread()
            self._queue = None

    def __enter__(self) -> "TrainerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PretrainProcess(TrainerProcess):
    """A pretraining of the project's encoder (`pretrain.run_pretraining`) in a spawned child,
    with `TrainerProcess`'s interface: `cancel` stops it with a checkpoint, ``resume=True``
    continues it later.

    Args:
        project_path: the project folder.
        config: a `config.PretrainConfig` (or its ``to_dict()`` form).
        resume: continue the project's pretraining.
    """

    kind = "pretrain"
