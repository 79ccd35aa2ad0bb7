"""The trainer in a real spawned process: events, hard kill + resume, cancel, no GUI imports."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from training_backend.events import CheckpointSaved, Failed, Finished, Loss, Progress, Started
from training_backend.learning.models import ModelConfig
from training_backend.jobs.process import TrainerProcess
from training_backend.project.store import Project
from training_backend.learning.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
GUI_MODULES = {"napari", "qtpy", "magicgui", "PyQt6", "PyQt5", "PySide6", "PySide2", "vispy", "superqt"}


def config(**kw) -> TrainConfig:
    base = dict(steps=120, batch_size=2, image_size=32, model=ModelConfig(base=4, depth=2),
                threads=1, validate_every=10**6, predict=False, mc_samples=1,
                checkpoint_every_s=0.2, model_id="proc")
    base.update(kw)
    return TrainConfig(**base)


def wait_for(proc: TrainerProcess, pred, timeout: float = 120.0) -> list:
    """Poll until ``pred(events so far)`` or the final event; return the events."""
    events: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += proc.poll()
        if pred(events) or proc.done:
            return events
        time.sleep(0.05)
    raise AssertionError(f"timed out; events so far: {events[-5:]}")


def test_kill_hard_then_resume_finishes_at_the_requested_step(tiny_project):
    annotations = {c.id: [a.key for a in c.annotations] for c in tiny_project.cases()}
    with TrainerProcess(tiny_project.path, config()) as proc:
        proc.start()
        events = wait_for(proc, lambda ev: any(isinstance(e, CheckpointSaved) for e in ev)
                          and any(isinstance(e, Loss) for e in ev))
        assert isinstance(events[0], Started) and any(isinstance(e, Progress) for e in events)
        proc.kill()
        assert not proc.is_alive() and proc.exitcode == -9
        tail = proc.wait(timeout=10)
        assert isinstance(tail[-1], Failed) and "died (exit code -9)" in tail[-1].message
        assert proc.done and proc.poll() == []

    # the project is intact and the last checkpoint loads
    project = Project.open(tiny_project.path)
    assert {c.id: [a.key for a in c.annotations] for c in project.cases()} == annotations
    for cid in annotations:
        project.read_image(cid)
        if annotations[cid]:
            assert project.read_annotation(cid) is not None
    latest = tiny_project.path / "models" / "proc" / "latest.pt"
    saved_step = torch.load(latest, weights_only=True)["step"]
    assert saved_step >= 1

    assert saved_step < 120, "the run finished before it was killed; make it longer"
    target = 120
    with TrainerProcess(tiny_project.path, TrainConfig(model_id="proc", threads=1), resume=True) as proc:
        proc.start()
        events = proc.wait(timeout=120)
        assert isinstance(events[0], Started) and events[0].start_step == saved_step, events[:2]
        fin = events[-1]
        assert isinstance(fin, Finished), fin
        assert (fin.step, fin.reason) == (target, "steps")
    assert proc.exitcode == 0
    assert torch.load(latest, weights_only=True)["step"] == target
    Project.open(tiny_project.path).refresh()


def test_cancel_stops_gracefully_with_a_checkpoint(tiny_project):
    proc = TrainerProcess(tiny_project.path, config(model_id="c", checkpoint_every_s=60))
    proc.start()
    try:
        wait_for(proc, lambda ev: any(isinstance(e, Progress) for e in ev))
        proc.cancel()
        events = proc.wait(timeout=60)
    finally:
        proc.close()
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.reason == "cancelled", fin
    assert any(isinstance(e, CheckpointSaved) and e.step == fin.step for e in events)
    assert Path(fin.checkpoint).is_file() and proc.exitcode == 0
    project = Project.open(tiny_project.path)
    assert project.models()["c"]["status"] == "cancelled"


def test_child_failure_is_reported(tmp_path):
    with TrainerProcess(tmp_path / "missing", config()) as proc:
        proc.start()
        events = proc.wait(timeout=60)
    assert len(events) == 1 and isinstance(events[0], Failed) and events[0].user_error
    assert "missing" in events[0].message


def test_backend_imports_no_gui_toolkit():
    code = ("import sys; import training_backend.learning.trainer, training_backend.jobs.process, "
            "training_backend.learning.inference, training_backend.learning.data, training_backend.cli; "
            "training_backend.cli.build_parser(); "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(GUI_MODULES)!r}); "
            "assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_poll_before_start_and_after_close_is_empty(tiny_project):
    proc = TrainerProcess(tiny_project.path, config())
    assert proc.poll() == [] and not proc.is_alive() and proc.exitcode is None
    proc.close()
    assert proc.poll() == []


def test_process_module_is_light_for_the_gui():
    """The GUI imports `training_backend.jobs.process` (and events) without pulling in torch."""
    code = ("import sys; import training_backend.jobs.process, training_backend.events; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'monai', 'zarr'}); "
            "assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
