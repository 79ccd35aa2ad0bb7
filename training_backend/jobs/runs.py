"""Training runs followed through the project folder: ``P/runs/<model id>/``.

A run started anywhere (the window, the CLI on a GPU server, a SLURM job) leaves three files
beside the project's data, so whoever can read the project can follow it and stop it:

* ``events.jsonl`` — the trainer's events (`events.to_dict`), one JSON line each, appended and
  flushed as they happen by the one process that writes them (rank 0). Every attempt (a start,
  a resume) begins with a header line ``{"run": {...}}``. A reader keeps only complete lines,
  so a line being written (or torn by a killed writer) is never read half.
* ``heartbeat.json`` — rewritten atomically every `HEARTBEAT_S` seconds by a thread of the
  trainer (host, pid, processes, step, a beat counter). A run is *running* while its heartbeat
  is fresh; the trainer removes it after its last event, so a heartbeat that stops changing
  means the trainer died. `list_runs` judges freshness by the writer's clock (`STALE_S`);
  a `RunFollower` judges by its own clock how long the beat counter has not moved, so clocks
  out of step between machines do not matter there.
* ``stop.json`` — a stop request (`request_stop`). The trainer looks for it at most every
  `STOP_POLL_S` seconds and stops as the Stop button does (checkpoint, model registered); it
  removes the request when it has acted on it.
* ``focus.json`` — the cases on screen in a window that shows the run (`request_focus`): when
  the trainer predicts after a round it takes them first, before the cases it was started with,
  and a case put here while it predicts jumps the queue. Removed when the run ends.

This module imports neither torch nor Qt: the window uses it directly.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from training_backend import events as ev
from training_backend.project.store import atomic_write_json, now_iso

logger = logging.getLogger(__name__)

#: Folder of the run records inside a project.
RUNS_DIR = "runs"
EVENTS_FILE = "events.jsonl"
HEARTBEAT_FILE = "heartbeat.json"
STOP_FILE = "stop.json"
FOCUS_FILE = "focus.json"
#: Seconds between two heartbeats.
HEARTBEAT_S = 2.0
#: A heartbeat older than this (seconds) belongs to a trainer that is gone.
STALE_S = 30.0
#: Most seconds between two looks for a stop request.
STOP_POLL_S = 1.0


def run_dir(project_path: str | os.PathLike, model_id: str) -> Path:
    """``P/runs/<model id>``."""
    return Path(project_path) / RUNS_DIR / model_id


def new_model_id(project_path: str | os.PathLike, method: str) -> str:
    """``<method>-<yyyymmdd-hhmmss>``, with ``-2``, ``-3``... when a model or a run of that
    name exists.

    Args:
        project_path: the project folder.
        method: the method's name.
    """
    base = f"{method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    mid, n = base, 1
    while (Path(project_path) / "models" / mid).exists() or run_dir(project_path, mid).exists():
        n += 1
        mid = f"{base}-{n}"
    return mid


def request_stop(project_path: str | os.PathLike, model_id: str, by: str = "") -> Path:
    """Ask the trainer of ``model_id`` to stop (it checkpoints and registers its model).

    Args:
        project_path: the project folder.
        model_id: the run.
        by: who asks (recorded in the request).
    """
    folder = run_dir(project_path, model_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STOP_FILE
    atomic_write_json(path, {"time": now_iso(), "host": socket.gethostname(), "by": by})
    return path


def request_focus(project_path: str | os.PathLike, model_id: str,
                  case_ids: list[str] | tuple[str, ...]) -> Path:
    """Ask the trainer of ``model_id`` to predict ``case_ids`` first (the case on screen),
    replacing an earlier request.

    Args:
        project_path: the project folder.
        model_id: the run.
        case_ids: the cases, most urgent first.
    """
    folder = run_dir(project_path, model_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FOCUS_FILE
    atomic_write_json(path, {"case_ids": [str(c) for c in case_ids], "time": now_iso()})
    return path


def read_focus(folder: str | os.PathLike) -> list[str]:
    """The cases `request_focus` asked for in a run folder ([] without a readable request).

    Args:
        folder: ``P/runs/<model id>``.
    """
    try:
        data = json.loads((Path(folder) / FOCUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    ids = data.get("case_ids") if isinstance(data, dict) else None
    return [str(c) for c in ids] if isinstance(ids, list) else []


def record_failure(project_path: str | os.PathLike, model_id: str | None, event: ev.Event,
                   world_size: int = 1) -> bool:
    """Record a run that failed before its `RunWriter` started (refused by the training lock,
    a model that already exists, bad settings): an attempt header and the ``Failed`` event, so
    that whoever follows ``model_id`` (a run started by a launcher that returned at once, such
    as ``sbatch``) learns why instead of waiting for the run to start.

    Nothing is written without a model id, outside a project, or while that model's run is
    alive (its heartbeat exists: its own log must not get a stranger's last event).

    Returns:
        True if the failure was recorded.
    """
    folder = run_dir(project_path, model_id or "")
    if not model_id or not (Path(project_path) / "project.json").is_file() \
            or (folder / HEARTBEAT_FILE).exists():
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / EVENTS_FILE
        lead = b"\n" if path.is_file() and path.stat().st_size and not _ends_with_newline(path) else b""
        info = {"model_id": model_id, "host": socket.gethostname(), "pid": os.getpid(),
                "world_size": int(world_size), "resume": None, "started": now_iso()}
        lines = [{"run": info, "time": time.time()}, {**ev.to_dict(event), "time": time.time()}]
        with open(path, "ab") as fh:
            fh.write(lead + b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8")
                                     for r in lines))
    except OSError as exc:
        logger.warning("lesionseg: failure of run %s not recorded: %s", model_id, exc)
        return False
    return True


# ----------------------------------------------------------------------------- writing
class RunWriter:
    """The trainer's side (rank 0): events, heartbeat, stop requests of one run.

    Args:
        project_path: the project folder.
        model_id: the run's model id.
        world_size: processes training the model.
        resume: this attempt continues a checkpoint.
    """

    def __init__(self, project_path: str | os.PathLike, model_id: str, world_size: int = 1,
                 resume: bool = False):
        self.folder = run_dir(project_path, model_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model_id = model_id
        self.step = 0
        self._beat = 0
        self._next_stop_look = 0.0
        self._stop_seen = False
        self._focus_key: tuple | None = None
        self._focus: list[str] = []
        self._info = {"model_id": model_id, "host": socket.gethostname(), "pid": os.getpid(),
                      "world_size": int(world_size), "resume": bool(resume), "started": now_iso()}
        path = self.folder / EVENTS_FILE
        self._fh = open(path, "ab")
        if self._fh.tell() and not _ends_with_newline(path):
            self._fh.write(b"\n")  # a line torn by a killed writer stays a line of its own
        self._append({"run": self._info, "time": time.time()})
        self._beat_now()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat_loop, name="lesionseg-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _append(self, record: dict) -> None:
        self._fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._fh.flush()

    def write(self, event: ev.Event) -> None:
        """Append one event (flushed; fsynced when it is the last one)."""
        if isinstance(event, (ev.Progress, ev.Loss, ev.Validation, ev.CheckpointSaved)):
            self.step = max(self.step, int(event.step))
        self._append({**ev.to_dict(event), "time": time.time()})
        if isinstance(event, ev.TERMINAL):
            with contextlib.suppress(OSError):
                os.fsync(self._fh.fileno())

    def _beat_now(self) -> None:
        self._beat += 1
        atomic_write_json(self.folder / HEARTBEAT_FILE,
                          {**self._info, "beat": self._beat, "step": self.step,
                           "updated": time.time()})

    def _beat_loop(self) -> None:
        while not self._done.wait(HEARTBEAT_S):
            try:
                self._beat_now()
            except OSError as exc:  # a full or unreachable disk must not end the training
                logger.warning("lesionseg: heartbeat of %s not written: %s", self.model_id, exc)

    def stop_requested(self) -> bool:
        """True once ``stop.json`` exists (looked for at most every `STOP_POLL_S` seconds)."""
        now = time.monotonic()
        if not self._stop_seen and now >= self._next_stop_look:
            self._next_stop_look = now + STOP_POLL_S
            self._stop_seen = (self.folder / STOP_FILE).exists()
        return self._stop_seen

    def focus(self) -> list[str]:
        """The cases a window asked to have predicted first (`request_focus`); the file is
        read again only when it changed (each request is a new file: `atomic_write_json`)."""
        try:
            st = (self.folder / FOCUS_FILE).stat()
            key: tuple | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            key = None
        if key != self._focus_key:
            self._focus_key = key
            self._focus = read_focus(self.folder) if key else []
        return list(self._focus)

    def close(self) -> None:
        """Stop the heartbeat and remove it (the run is over); consume an acted-on stop request
        and the focus request."""
        if self._fh.closed:
            return
        self._done.set()
        self._thread.join(timeout=2 * HEARTBEAT_S)
        self._fh.close()
        (self.folder / HEARTBEAT_FILE).unlink(missing_ok=True)
        (self.folder / FOCUS_FILE).unlink(missing_ok=True)
        if self._stop_seen:
            (self.folder / STOP_FILE).unlink(missing_ok=True)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


# ----------------------------------------------------------------------------- reading
def read_records(path: str | os.PathLike, offset: int = 0) -> tuple[list[dict], int]:
    """Complete JSON lines of ``path`` from byte ``offset`` on, and the offset after the last one.

    A last line without its newline (being written, or torn) is left for the next call; a line
    that is not JSON is skipped. The file is opened afresh each call, which on NFS also
    revalidates what the client has cached (close-to-open consistency).

    Args:
        path: an ``events.jsonl``.
        offset: where the previous call stopped.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            logger.debug("lesionseg: unreadable line in %s skipped", path)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records, offset + end


def last_attempt_offset(path: str | os.PathLike) -> int:
    """Byte offset of the newest attempt's header line in an ``events.jsonl`` (0 if none)."""
    start, offset = 0, 0
    try:
        with open(path, "rb") as fh:
            for line in fh:
                if line.endswith(b"\n") and line.startswith(b'{"run"'):
                    start = offset
                offset += len(line)
    except FileNotFoundError:
        return 0
    return start


def read_events(path: str | os.PathLike) -> list[ev.Event]:
    """Every event of the newest attempt in an ``events.jsonl``."""
    records, _ = read_records(path, last_attempt_offset(path))
    return [e for e in (_event(r) for r in records) if e is not None]


def _event(record: dict) -> ev.Event | None:
    if "event" not in record:
        return None
    try:
        return ev.from_dict(record)
    except ValueError as exc:
        logger.debug("lesionseg: %s", exc)
        return None


def read_heartbeat(project_path: str | os.PathLike, model_id: str) -> dict | None:
    """The run's last heartbeat (None: none, or unreadable this moment)."""
    path = run_dir(project_path, model_id) / HEARTBEAT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class RunInfo:
    """A run of a project as its files describe it.

    Args:
        model_id: the run's model.
        state: ``"running"`` (fresh heartbeat), ``"stale"`` (heartbeat stopped: the trainer
            died), ``"finished"``, ``"failed"`` or ``"unknown"`` (no heartbeat, no last event).
        host, pid: where rank 0 runs (or ran).
        world_size: processes.
        step: the last step reported.
        age_s: seconds since the last heartbeat by the writer's clock (None without one).
        stop_requested: a stop request is waiting.
    """

    model_id: str
    state: str
    host: str = ""
    pid: int | None = None
    world_size: int = 1
    step: int = 0
    age_s: float | None = None
    stop_requested: bool = False


def run_info(project_path: str | os.PathLike, model_id: str, stale_s: float = STALE_S) -> RunInfo:
    """What the files of one run say about it.

    Args:
        project_path: the project folder.
        model_id: the run.
        stale_s: a heartbeat older than this (by the writer's clock) is stale.
    """
    folder = run_dir(project_path, model_id)
    beat = read_heartbeat(project_path, model_id)
    stop = (folder / STOP_FILE).exists()
    if beat is not None:
        age = max(0.0, time.time() - float(beat.get("updated", 0.0)))
        return RunInfo(model_id, "running" if age < stale_s else "stale", str(beat.get("host", "")),
                       beat.get("pid"), int(beat.get("world_size", 1)), int(beat.get("step", 0)),
                       age, stop)
    events = read_events(folder / EVENTS_FILE)
    last = events[-1] if events else None
    state = ("finished" if isinstance(last, ev.Finished) else "failed" if isinstance(last, ev.Failed)
             else "unknown")
    step = next((int(e.step) for e in reversed(events) if hasattr(e, "step")), 0)
    return RunInfo(model_id, state, step=step, stop_requested=stop)


def list_runs(project_path: str | os.PathLike, running_only: bool = True,
              stale_s: float = STALE_S) -> list[RunInfo]:
    """The project's runs, newest first (``running_only``: those with a fresh heartbeat).

    Args:
        project_path: the project folder.
        running_only: leave out runs that ended or died.
        stale_s: see `run_info`.
    """
    root = Path(project_path) / RUNS_DIR
    if not root.is_dir():
        return []
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=_mtime, reverse=True)
    out = []
    for folder in folders:
        if running_only and not (folder / HEARTBEAT_FILE).exists():
            continue
        info = run_info(project_path, folder.name, stale_s)
        if not running_only or info.state == "running":
            out.append(info)
    return out


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ----------------------------------------------------------------------------- following
class RunFollower:
    """Follow a run through its files, with the interface of `process.TrainerProcess`
    (``poll``, ``cancel``, ``kill``, ``done``, ``result``, ``wait``, ``close``), so the
    window shows a run started elsewhere as it shows its own.

    ``cancel`` writes a stop request; ``kill`` and ``close`` only stop following (the run
    goes on where it runs). When the heartbeat has not moved for ``stale_s`` seconds of this
    machine's clock, or vanished without a last event, `poll` ends with ``Failed``.

    Args:
        project_path: the project folder.
        model_id: the run.
        from_start: ``"attempt"`` replays the newest attempt from its start (attaching to a
            run in progress); ``"end"`` reads only what is written from now on (a run this
            window has just launched, whose earlier attempts are history).
        stale_s: see above.
        by: who asks for a stop (recorded in the request).
    """

    remote = True

    def __init__(self, project_path: str | os.PathLike, model_id: str, from_start: str = "attempt",
                 stale_s: float = STALE_S, by: str = ""):
        self.project_path = Path(project_path)
        self.model_id = model_id
        self.folder = run_dir(project_path, model_id)
        self.path = self.folder / EVENTS_FILE
        self.stale_s = float(stale_s)
        self.by = by
        if from_start == "attempt":
            self._offset = last_attempt_offset(self.path)
        elif from_start == "end":
            self._offset = self.path.stat().st_size if self.path.exists() else 0
        else:
            raise ValueError(f"from_start must be 'attempt' or 'end', got {from_start!r}")
        self._terminal: ev.Event | None = None
        self._beat: Any = None
        self._beat_seen_at: float | None = None
        self._had_beat = False
        self._detached = False
        self.stop_sent = False
        self.header: dict | None = None

    @property
    def done(self) -> bool:
        return self._terminal is not None

    @property
    def result(self) -> ev.Event | None:
        return self._terminal

    @property
    def started(self) -> bool:
        """The run has written its first line (an attempt header) since following began."""
        return self.header is not None

    def is_alive(self) -> bool:
        return not self._detached and self._terminal is None

    def _read(self) -> list[ev.Event]:
        records, self._offset = read_records(self.path, self._offset)
        out: list[ev.Event] = []
        for rec in records:
            if "run" in rec:
                self.header = rec["run"]
                continue
            event = _event(rec)
            if event is None or self._terminal is not None:
                continue
            out.append(event)
            if isinstance(event, ev.TERMINAL):
                self._terminal = event
        return out

    def poll(self) -> list[ev.Event]:
        """Events written since the last call (never blocks)."""
        if self._detached or self._terminal is not None:
            return []
        events = self._read()
        if self._terminal is None:
            dead = self._dead()
            if dead:
                events += self._read()  # the last event may have landed meanwhile
                if self._terminal is None:
                    self._terminal = ev.Failed(dead)
                    events.append(self._terminal)
        return events

    def _dead(self) -> str | None:
        """Why the run counts as gone (None: alive, or not started yet)."""
        beat = read_heartbeat(self.project_path, self.model_id)
        now = time.monotonic()
        if beat is None:
            if self._had_beat and not (self.folder / HEARTBEAT_FILE).exists():
                return f"run {self.model_id} ended without a last event (its trainer was killed?)"
            return None
        self._had_beat = True
        key = (beat.get("pid"), beat.get("beat"))
        if key != self._beat:
            self._beat, self._beat_seen_at = key, now
            return None
        if now - (self._beat_seen_at or now) > self.stale_s:
            return (f"run {self.model_id} stopped reporting: no heartbeat from "
                    f"{beat.get('host', '?')} (pid {beat.get('pid', '?')}) for "
                    f"{now - self._beat_seen_at:.0f} s; its trainer died or the project is "
                    "unreachable from there")
        return None

    def wait(self, timeout: float | None = None, interval: float = 0.2) -> list[ev.Event]:
        """Collect events until the last one (or ``timeout`` seconds)."""
        return wait_for_events(self, timeout, interval)

    def cancel(self) -> None:
        """Ask the run to stop (through the project). Nothing is written once the run has
        ended: a request left behind would stop a later resume of the model at its first step."""
        self.poll()
        if self._terminal is not None:
            return
        request_stop(self.project_path, self.model_id, self.by)
        self.stop_sent = True

    def kill(self, timeout: float = 0.0) -> None:
        """Stop following (a run elsewhere cannot be killed from here)."""
        self._detached = True

    def close(self, timeout: float = 0.0) -> None:
        """Stop following; the run goes on."""
        self._detached = True


__all__ = ["RUNS_DIR", "HEARTBEAT_S", "STALE_S", "STOP_POLL_S", "run_dir", "new_model_id",
           "request_stop", "request_focus", "read_focus", "record_failure", "RunWriter", "read_records", "last_attempt_offset", "read_events",
           "read_heartbeat", "RunInfo", "run_info", "list_runs", "RunFollower"]


def wait_for_events(run, timeout: float | None = None, interval: float = 0.2) -> list[ev.Event]:
    """Poll a followed run (anything with ``is_alive`` and ``poll``) until it ends.

    Args:
        run: a `RunFollower` or a `launchers.LaunchedRun`.
        timeout: seconds (None: no limit).
        interval: polling interval.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    out: list[ev.Event] = []
    while run.is_alive():
        out += run.poll()
        if not run.is_alive() or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(interval)
    return out
