"""The trainer panel's pretraining row in a real (headless, Xvfb) napari viewer: pretrain when
idle, stopped (with a checkpoint) by Start, the training starting from its encoder, resumed
when idle again; "Pretrain now" and its Stop. What the row decides before it starts one (never
replacing a pretraining of other settings when idle, not pretraining what no training would
use, waiting for a busy project) is tested with a stand-in for the pretraining process."""
from __future__ import annotations

import json
import os

import pytest
from qtpy.QtWidgets import QMessageBox

from napari_lesionseg import _pretrain_control
from napari_lesionseg._status import TrainingStatus
from training_backend.jobs.pretrain_record import read_meta

pytestmark = pytest.mark.gui


def kinds(events) -> list[str]:
    return [type(e).__name__ for e in events]


def test_pretrain_when_idle_stops_for_a_training_and_resumes(workspace, qtbot, tiny_project,
                                                             monkeypatch):
    monkeypatch.setattr(_pretrain_control, "IDLE_DELAY_MS", 0)
    ws = workspace
    ws.open_project(tiny_project.path)
    trainer = ws.trainer_panel
    pre = trainer.pretrain
    qtbot.waitUntil(lambda: "supervised" in trainer.available_methods(), timeout=10_000)
    trainer.configure(method="supervised", steps=2, budget_s=0, image_size=32, device="cpu")
    assert not pre.when_idle.isChecked() and not pre.busy        # off by default
    assert "no pretrained encoder yet" in pre.line.text()
    assert "masked image modelling" in pre.when_idle.toolTip()

    pre.when_idle.setChecked(True)                                # nothing trains: it starts
    assert pre.busy and pre.now_btn.text() == "Stop pretraining"
    qtbot.waitUntil(lambda: pre.status.step >= 2, timeout=60_000)
    assert "pretraining the encoder: step" in pre.line.text()
    first = pre.process

    assert trainer.start()                                        # Start stops it first
    assert trainer.process is None and "stopping the pretraining" in trainer.status.message
    qtbot.waitUntil(lambda: trainer.process is not None, timeout=30_000)
    assert not pre.busy and not first.is_alive()
    assert kinds(pre.events_seen)[-1] == "Finished" and pre.events_seen[-1].reason == "cancelled"
    stopped_at = pre.events_seen[-1].step
    meta = read_meta(tiny_project.path)
    assert meta["step"] == stopped_at and not meta["done"] and meta["image_size"] == 32

    assert not pre.now_btn.isEnabled()                           # nothing to start meanwhile
    qtbot.waitUntil(lambda: trainer.process is None, timeout=90_000)
    assert pre.now_btn.isEnabled()
    [used] = [e for e in trainer.events_seen if type(e).__name__ == "PretrainedEncoder"]
    assert used.networks == ("net.encoder",) and used.steps == stopped_at
    shown = TrainingStatus()
    shown.apply(used)                                             # what the status line says
    assert shown.message.startswith("starts from the encoder pretrained on 8 images")

    # idle again: the pretraining resumes where it stopped; unchecking stops it
    qtbot.waitUntil(lambda: pre.busy and kinds(pre.events_seen)[:1] == ["Started"],
                    timeout=30_000)
    assert pre.events_seen[0].start_step == stopped_at
    pre.when_idle.setChecked(False)
    qtbot.waitUntil(lambda: not pre.busy, timeout=30_000)
    assert pre.events_seen[-1].reason == "cancelled"
    assert "paused; it resumes when idle" in pre.line.text()


def test_pretrain_now_and_its_stop(workspace, qtbot, tiny_project):
    ws = workspace
    ws.open_project(tiny_project.path)
    trainer = ws.trainer_panel
    pre = trainer.pretrain
    trainer.configure(image_size=32, device="cpu")
    trainer.more_form.pretrained.value = "none"
    assert trainer.settings().pretrained == "none"                # the form's setting
    pre.minutes.setValue(1)
    pre.now_btn.click()
    assert pre.busy and not pre.when_idle.isChecked()
    qtbot.waitUntil(lambda: pre.status.step >= 1, timeout=60_000)
    pre.now_btn.click()                                           # "Stop pretraining"
    qtbot.waitUntil(lambda: not pre.busy, timeout=30_000)
    assert pre.events_seen[-1].reason == "cancelled"
    assert read_meta(tiny_project.path)["step"] == pre.events_seen[-1].step
    assert pre.now_btn.text() == "Pretrain now"


# ----------------------------------------------------------------------------- what it decides
class FakeProcess:
    """Stands for `jobs.process.PretrainProcess`: records what it was asked to run."""

    started: list["FakeProcess"] = []

    def __init__(self, project_path, config, resume=False):
        self.project_path, self.config, self.resume = project_path, config, resume
        self.cancelled = False

    def start(self) -> None:
        FakeProcess.started.append(self)

    def poll(self) -> list:
        return []

    def cancel(self) -> None:
        self.cancelled = True

    def is_alive(self) -> bool:
        return False

    def kill(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture()
def fake_process(monkeypatch):
    from training_backend.jobs import process

    FakeProcess.started = []
    monkeypatch.setattr(process, "PretrainProcess", FakeProcess)
    return FakeProcess


def write_pretraining(project_path, pre, image_size: int, step: int = 7) -> dict[str, bytes]:
    """A pretraining record as `lesionseg pretrain` leaves it (the row reads only its meta);
    returns the files' bytes."""
    from training_backend.jobs.pretrain_record import pretrained_dir

    cfg = pre.config()
    meta = {"image_size": image_size, "channels": 1, "model": cfg.model.to_dict(),
            "config": {**cfg.to_dict(), "image_size": image_size}, "images": 8, "samples": 28,
            "step": step, "elapsed_s": 3.0, "loss": 0.5, "done": False}
    folder = pretrained_dir(project_path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps(meta))
    for name in ("state.pt", "encoder.pt"):
        (folder / name).write_bytes(f"{name} of {image_size} px".encode())
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def files(project_path) -> dict[str, bytes]:
    from training_backend.jobs.pretrain_record import pretrained_dir

    return {p.name: p.read_bytes() for p in pretrained_dir(project_path).iterdir()}


def test_idle_never_replaces_a_pretraining_of_another_size_now_asks(workspace, tiny_project,
                                                                     fake_process, monkeypatch):
    ws = workspace
    ws.open_project(tiny_project.path)
    trainer, pre = ws.trainer_panel, ws.trainer_panel.pretrain
    saved = write_pretraining(tiny_project.path, pre, image_size=32)
    trainer.configure(image_size=48)
    pre.when_idle.setChecked(True)
    assert not pre.busy and fake_process.started == []           # the idle path does nothing
    assert pre.line.text() == ("pretrained at 32 px, this panel trains at 48 px: Pretrain now "
                               "replaces it")
    assert files(tiny_project.path) == saved
    asked: list[str] = []

    def answer(reply):
        def question(_parent, _title, text, *_args):
            asked.append(text)
            return reply
        return question

    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.StandardButton.No))
    pre.now_btn.click()                                           # asked; "No" keeps it
    assert len(asked) == 1 and "pretrained at 32 px, this panel trains at 48 px" in asked[0]
    assert "(7 steps)" in asked[0] and not pre.busy and files(tiny_project.path) == saved
    monkeypatch.setattr(QMessageBox, "question", answer(QMessageBox.StandardButton.Yes))
    pre.now_btn.click()                                           # "Yes": it starts over
    assert len(asked) == 2 and pre.busy
    [run] = fake_process.started
    assert run.resume is False and run.config.image_size == 48
    pre.stop()
    pre.handle_event(__import__("training_backend.events", fromlist=["Finished"]).Finished(
        "_pretrained", 0, "cancelled", None))
    assert not pre.busy
    # the panel back at the pretraining's size: the idle path resumes it without asking
    trainer.configure(image_size=32)
    assert pre.maybe_start() and len(asked) == 2
    assert fake_process.started[-1].resume is True
    assert fake_process.started[-1].config.image_size == 32


def test_no_idle_pretraining_that_no_training_would_use(workspace, tiny_project, fake_process):
    ws = workspace
    ws.open_project(tiny_project.path)
    trainer, pre = ws.trainer_panel, ws.trainer_panel.pretrain
    trainer.more_form.pretrained.value = "none"
    pre.when_idle.setChecked(True)
    assert not pre.busy and fake_process.started == []
    assert pre.line.text() == ("not pretraining when idle: training does not use a pretrained "
                               "encoder (setting 'pretrained' = none)")
    assert pre._idle_timer.isActive()                              # looked at again later
    trainer.more_form.pretrained.value = "auto"
    assert pre.maybe_start() and [r.resume for r in fake_process.started] == [False]


def test_idle_pretraining_waits_for_a_busy_project(workspace, tiny_project, fake_process):
    from training_backend import events as ev
    from training_backend.jobs import trainlock

    ws = workspace
    ws.open_project(tiny_project.path)
    pre = ws.trainer_panel.pretrain
    lock = trainlock.acquire(tiny_project.path, "supervised-cli")  # `lesionseg train` elsewhere
    try:
        pre.when_idle.setChecked(True)
        assert not pre.busy and fake_process.started == []
        assert pre.line.text() == (f"waiting: the project is busy (model supervised-cli, "
                                   f"process {os.getpid()})")
        assert pre._idle_timer.isActive() and not pre._failed       # tried again when idle
    finally:
        trainlock.release(lock)
    assert pre.maybe_start() and pre.busy
    # a training that took the project between the look and the child's start: not a failure
    busy = f"{tiny_project.path}: already training (model x, process 1){trainlock.BUSY_TAIL}"
    pre.handle_event(ev.Failed(busy, user_error=True))
    assert not pre.busy and not pre._failed and pre._idle_timer.isActive()
    assert pre.line.text().startswith("waiting: the project is busy")
    assert pre.maybe_start()
    pre.handle_event(ev.Failed("no image to pretrain on", user_error=True))
    assert pre._failed and pre.line.text() == "pretraining failed: no image to pretrain on"
    assert not pre.maybe_start()                                  # a real failure: not retried


def test_a_training_queued_on_the_old_project_does_not_start_on_the_next(workspace, qtbot,
                                                                        tiny_project_factory,
                                                                        fake_process):
    ws = workspace
    first, second = tiny_project_factory("first"), tiny_project_factory("second")
    ws.open_project(first.path)
    trainer, pre = ws.trainer_panel, ws.trainer_panel.pretrain
    qtbot.waitUntil(lambda: "supervised" in trainer.available_methods(), timeout=10_000)
    assert pre.start(now=True) and pre.busy
    assert trainer.start()                                        # queued behind the pretraining
    assert trainer.process is None and fake_process.started[0].cancelled
    ws.open_project(second.path)                                  # the pretraining is dropped
    assert not pre.busy and trainer.process is None               # and so is the queued Start
    assert pre._after == []
