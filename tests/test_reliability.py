"""Nothing saved is lost: killed writers, concurrent handles, a full disk, a read-only folder.

The kill harness (``benchmarks/reliability_kill.py``) runs here with 20 trials (all kinds: saves,
labels, undo, checkpoints, predictions, import, export, trainer, saver + trainer); the full
figures (200 trials) are in the README.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from training_backend.project import store_index
from training_backend.errors import ConflictError, ProjectError, ReadOnlyError
from training_backend.jobs.process import TrainerProcess
from training_backend.project.store import Project

ROOT = Path(__file__).resolve().parents[1]


def test_kill_harness_20_trials_find_nothing_lost():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reliability_kill.py"),
                          "--trials", "20", "--seed", "0", "--json"], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode in (0, 1), out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert sum(result["trials"].values()) == 20
    assert len(result["trials"]) == 9  # every kind ran
    assert sum(result["killed"].values()) >= 12, result  # most trials really were killed
    assert sum(result["failures"].values()) == 0, result["examples"]


def _project(tmp_path, n=2, size=24) -> Project:
    p = Project.create(tmp_path / "p", ["lesion"], ["normal", "abnormal"])
    for i in range(n):
        p.add_case(np.full((size, size), i * 10, np.uint8), f"case {i}")
    return p


def _mask(tag: int, size=24) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[: tag % size + 1] = 1
    return m


def test_reader_snapshot_while_saving_sees_only_whole_versions(tmp_path):
    """The trainer's snapshot reads annotations while the window saves new versions."""
    writer = _project(tmp_path)
    cid = writer.case_ids()[0]
    stop = threading.Event()
    seen: list[str] = []

    def read() -> None:
        reader = Project.open(writer.path, mode="r")
        while not stop.is_set():
            reader.refresh()
            got = reader.read_annotation(cid)
            if got is not None:
                mask, av = got
                tag = int(av.source.split(":")[1])
                seen.append("ok" if np.array_equal(mask, _mask(tag)) else f"torn v{av.version}")

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for tag in range(25):
            writer.save_annotation(cid, _mask(tag), "full", source=f"test:{tag}")
    finally:
        stop.set()
        thread.join()
    assert seen and set(seen) == {"ok"}
    assert len(Project.open(writer.path).case(cid).annotations) == 25


def test_two_windows_a_stale_view_never_replaces_newer_work(tmp_path):
    a = _project(tmp_path)
    b = Project.open(a.path)  # a second window on the same project
    cid = a.case_ids()[0]
    v1 = a.save_annotation(cid, _mask(1), "full")
    b.refresh()
    v2 = b.save_annotation(cid, _mask(2), "full", parent=v1.version, check_latest=True)
    # window A still shows v1: its autosave is refused, nothing is written
    with pytest.raises(ConflictError, match="v2 was saved meanwhile"):
        a.save_annotation(cid, _mask(3), "full", parent=v1.version, check_latest=True)
    fresh = Project.open(a.path)
    assert [av.version for av in fresh.case(cid).annotations] == [1, 2]
    np.testing.assert_array_equal(fresh.read_annotation(cid)[0], _mask(2))
    # an explicit save goes on top; both versions stay
    v3 = a.save_annotation(cid, _mask(3), "full", parent=v1.version)
    assert (v3.version, v3.parent) == (3, 1)
    np.testing.assert_array_equal(Project.open(a.path).read_annotation(cid, v2.version)[0], _mask(2))


def test_cli_import_while_a_window_holds_the_project(tmp_path):
    from training_backend.project import io
    from training_backend.cli import main

    window = _project(tmp_path)
    cid = window.case_ids()[0]
    folder = tmp_path / "more"
    folder.mkdir()
    for i in range(6):
        io.write_mask(folder / f"img {i}.png", np.full((16, 16), i, np.uint8))
    saved = []

    def paint() -> None:
        for tag in range(10):
            saved.append(window.save_annotation(cid, _mask(tag), "full").version)

    thread = threading.Thread(target=paint)
    thread.start()
    assert main(["import", str(folder), "--project", str(window.path), "--quiet"]) == 0
    thread.join()
    window.refresh()
    assert len(window) == 8 and saved == list(range(1, 11))
    assert [av.version for av in window.case(cid).annotations] == saved


def _tiny_trainer_config(**kw):
    from training_backend.learning.models import ModelConfig
    from training_backend.learning.trainer import TrainConfig

    base = dict(steps=100000, batch_size=2, image_size=16, model=ModelConfig(base=4, depth=2),
                threads=1, validate_every=10 ** 6, predict=False, mc_samples=1)
    base.update(kw)
    return TrainConfig(**base)


def test_a_second_trainer_on_a_busy_project_is_refused(tiny_project):
    from training_backend.events import Failed, Started

    with TrainerProcess(tiny_project.path, _tiny_trainer_config(model_id="first")) as first:
        first.start()
        deadline = time.monotonic() + 120
        events: list = []
        while not any(isinstance(e, Started) for e in events) and time.monotonic() < deadline:
            events += first.poll()
            time.sleep(0.05)
        assert any(isinstance(e, Started) for e in events), events
        with TrainerProcess(tiny_project.path, _tiny_trainer_config(model_id="second")) as second:
            second.start()
            tail = second.wait(timeout=120)
        assert isinstance(tail[-1], Failed) and tail[-1].user_error, tail[-1]
        assert "already training" in tail[-1].message and "first" in tail[-1].message
        # the refusal is in the project too, for whoever follows "second" (a launched run)
        from training_backend.jobs import runs

        recorded = runs.read_events(runs.run_dir(tiny_project.path, "second") / runs.EVENTS_FILE)
        assert [type(e) for e in recorded] == [Failed] and "already training" in recorded[0].message
        assert runs.run_info(tiny_project.path, "second").state == "failed"
        assert not runs.record_failure(tiny_project.path, "first", tail[-1])  # live: untouched
        assert first.is_alive()
        first.cancel()
        first.wait(timeout=120)


def test_a_full_disk_during_a_save_loses_nothing_and_says_so(tmp_path, monkeypatch):
    p = _project(tmp_path)
    cid = p.case_ids()[0]
    p.save_annotation(cid, _mask(1), "full")
    before = (p.path / "index.json").read_text()
    real = store_index.write_array

    def full(folder, data, chunks=None):  # half an array, then the disk is full
        real(folder, data, chunks)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("training_backend.project.store.write_array", full)
    with pytest.raises(ProjectError, match="No space left on device; nothing was changed"):
        p.save_annotation(cid, _mask(2), "full")
    monkeypatch.undo()

    def full_index(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_index, "atomic_write_json", full_index)
    with pytest.raises(ProjectError, match="No space left on device"):
        p.save_annotation(cid, _mask(3), "full")
    monkeypatch.undo()
    assert (p.path / "index.json").read_text() == before
    assert [av.version for av in p.case(cid).annotations] == [1]  # memory matches the disk
    fresh = Project.open(p.path)
    np.testing.assert_array_equal(fresh.read_annotation(cid)[0], _mask(1))
    assert not list((p.path / "store.zarr" / ".tmp").iterdir())
    assert p.save_annotation(cid, _mask(4), "full").version == 2  # space again: saves work


def test_read_only_folder_opens_for_looking(tmp_path, monkeypatch):
    p = _project(tmp_path)
    p.save_annotation(p.case_ids()[0], _mask(1), "full")
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw:
                        False if mode == os.W_OK and str(p.path) in str(path) else real(path, mode))
    with pytest.raises(ReadOnlyError, match="read-only"):
        Project.open(p.path)
    ro = Project.open(p.path, mode="r")
    assert ro.read_annotation(ro.case_ids()[0]) is not None
    with pytest.raises(ProjectError, match="read-only"):
        ro.save_annotation(ro.case_ids()[0], _mask(2), "full")


def test_next_open_removes_temporaries_of_dead_writers_only(tmp_path):
    p = _project(tmp_path)
    tmp = p.path / "store.zarr" / ".tmp"
    tmp.mkdir(exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp / f"{dead.pid}-deadbeef").mkdir()
    (tmp / f"{os.getpid()}-alive").mkdir()
    (p.path / f".index.json.tmp-{dead.pid}-0a1b2c3d").write_text("{")
    Project.open(p.path)
    assert sorted(e.name for e in tmp.iterdir()) == [f"{os.getpid()}-alive"]
    assert not list(p.path.glob(".*.tmp-*"))


def test_next_open_leaves_temporaries_written_on_another_machine(tmp_path):
    """On shared storage a pid means nothing on another machine: a trainer's temporaries
    written elsewhere stay (only their age removes them)."""
    from training_backend.project.atomic import HOST_TAG, temporary_sibling, writer_gone

    p = _project(tmp_path)
    tmp = p.path / "store.zarr" / ".tmp"
    tmp.mkdir(exist_ok=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    other = "0" * 8 if HOST_TAG != "0" * 8 else "1" * 8
    (tmp / f"{dead.pid}.{other}-deadbeef").mkdir()
    (tmp / f"{dead.pid}.{HOST_TAG}-deadbeef").mkdir()
    (p.path / f".index.json.tmp-{dead.pid}.{other}-0a1b2c3d").write_text("{")
    Project.open(p.path)
    assert sorted(e.name for e in tmp.iterdir()) == [f"{dead.pid}.{other}-deadbeef"]
    assert [e.name for e in p.path.glob(".*.tmp-*")] == [f".index.json.tmp-{dead.pid}.{other}-0a1b2c3d"]
    assert not writer_gone(temporary_sibling(p.path / "index.json").name)  # this process: alive
