"""Starter models in the window: "Start from" in the trainer panel, "Predict with <starter>",
and "Predict this case" before the project has a model of its own.

A fake ``fundus-starter`` (the IDRiD lesion classes, RGB, trained 3 steps on a tiny synthetic
project at 48 px with 32 px crops) is installed in a temporary starters folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import make_tiny_project
from napari_lesionseg import _starter_control
from napari_lesionseg._layers import PREDICTION
from training_backend.learning import starters
from training_backend.project.store import Project

pytestmark = pytest.mark.gui

NAME = "fundus-starter"
FUNDUS = ["MA", "HE", "EX", "SE"]
CARD = {"description": "Fundus lesions (test model).", "data": "synthetic discs",
        "licence": "test only", "command": "pytest", "scores": {"dice": {"EX": 0.4}}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from training_backend.learning.trainer import TrainConfig, run_training

    root = tmp_path_factory.mktemp("starter_src")
    project = make_tiny_project(root / "fundus", classes=FUNDUS, size=48,
                                rgb_cases=tuple(range(10)))
    cfg = TrainConfig(steps=3, batch_size=2, image_size=48, crop_size=32, threads=1,
                      mc_samples=1, predict=False, model_id="src")
    last = list(run_training(project.path, cfg))[-1]
    assert type(last).__name__ == "Finished", last
    return Path(last.checkpoint)


@pytest.fixture()
def shipped(tmp_path, monkeypatch, trained) -> Path:
    root = tmp_path / "starters"
    monkeypatch.setattr(starters, "STARTERS_DIR", root)
    return starters.export_starter(trained, root / NAME, dict(CARD))


@pytest.fixture()
def sample(bundled_sample_template, tmp_path) -> Path:
    """The bundled IDRiD sample (the starter's classes), without any model."""
    path = tmp_path / "sample"
    shutil.copytree(bundled_sample_template, path)
    return path


def show(ws, qtbot, cid) -> None:
    ws.go_to(cid)
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case == cid, timeout=10_000)


def test_start_from_a_starter_that_fits_the_project(workspace, qtbot, shipped, sample,
                                                    tmp_path):
    ws = workspace
    ws.open_project(sample)
    trainer = ws.trainer_panel
    control = trainer.start_from
    assert control.starter_names() == [NAME]
    assert [control.combo.itemText(i) for i in range(control.combo.count())] == [
        "scratch", "latest model", f"{NAME} (starter model)"]
    assert trainer.settings().init_from is None and not control.predict_btn.isVisibleTo(trainer)

    trainer.configure(start_from=NAME)
    cfg = trainer.settings()
    assert cfg.init_from == NAME                          # resolved by name where it trains
    assert cfg.image_size == 48 and cfg.crop_size == 32   # the starter's own scale
    assert control.predict_btn.isVisibleTo(trainer)
    assert control.predict_btn.text() == f"Predict with {NAME}"
    assert control.note.text().startswith(f"fine-tunes {NAME} (MA, HE, EX, SE; holdout Dice")
    # an automatic retrain without a model of the project fine-tunes the starter too
    assert trainer.settings(auto=True).init_from == NAME

    trainer.configure(fine_tune=True)                     # the latest model: there is none yet
    assert trainer.settings().init_from is None
    assert "no model of this project yet" in control.note.text()
    trainer.configure(start_from="scratch")
    assert trainer.settings().init_from is None and not control.predict_btn.isVisibleTo(trainer)

    # a project of other lesion classes is not offered the starter, and the box says why
    other = make_tiny_project(tmp_path / "tiny")
    ws.open_project(other.path)
    assert control.starter_names() == []
    assert ("no starter model predicts the classes lesion (fundus-starter predicts MA, HE, EX, SE)"
            in control.combo.toolTip())
    with pytest.raises(ValueError, match="cannot start from 'fundus-starter'"):
        trainer.configure(start_from=NAME)


def test_predict_the_project_with_the_starter_case_on_screen_first(workspace, qtbot, shipped,
                                                                  sample, monkeypatch):
    calls = []
    real = _starter_control.run_child
    monkeypatch.setattr(_starter_control, "run_child",
                        lambda argv, **kw: calls.append(argv) or real(argv, **kw))
    ws = workspace
    ws.open_project(sample)
    project = Project.open(sample)
    cid = project.case_ids()[4]
    show(ws, qtbot, cid)
    trainer = ws.trainer_panel
    trainer.configure(start_from=NAME)
    assert trainer.start_from.predict_all()
    assert not trainer.start_from.predict_all()            # one at a time
    qtbot.waitUntil(lambda: not trainer.start_from.predicting, timeout=120_000)
    assert calls[0][calls[0].index("--cases") + 1] == cid   # the case on screen first
    predicted = [c for argv in calls for c in argv[argv.index("--cases") + 1].split(",")]
    assert sorted(predicted) == sorted(project.case_ids()) and len(predicted) == 10
    project.refresh()
    assert {project.read_outputs(c).model_id for c in project.case_ids()} == {NAME}
    qtbot.waitUntil(lambda: PREDICTION in ws.viewer.layers, timeout=10_000)
    assert ws.viewer.layers[PREDICTION].data.shape == project.case(cid).shape
    assert trainer.start_from.note.text() == f"10 cases predicted with {NAME}"


def test_predict_this_case_uses_a_fitting_starter_before_any_model(workspace, qtbot, shipped,
                                                                  sample):
    ws = workspace
    ws.open_project(sample)
    cid = ws.project.case_ids()[0]
    show(ws, qtbot, cid)
    assert ws.annotate_panel.predict_case()
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_output_id is not None, timeout=60_000)
    assert ws.project.read_outputs(cid).model_id == NAME
    assert ws.project.latest_model() is None               # predicting trains nothing


def test_the_window_refuses_a_starter_that_does_not_match_its_card(workspace, qtbot, shipped,
                                                                  sample, monkeypatch):
    """A half-installed starter (its model file is not the one its card hashes): both
    prediction paths say so in one line and start no child process."""
    from napari_lesionseg import _annotate_panel

    started, errors = [], []
    for module in (_annotate_panel, _starter_control):
        monkeypatch.setattr(module, "run_child", lambda argv, **kw: started.append(argv))
        monkeypatch.setattr(module, "show_error", errors.append)
    with open(shipped, "ab") as fh:
        fh.write(b"x")
    ws = workspace
    ws.open_project(sample)
    show(ws, qtbot, ws.project.case_ids()[0])
    assert not ws.annotate_panel.predict_case()
    ws.trainer_panel.configure(start_from=NAME)
    assert not ws.trainer_panel.start_from.predict_all()
    assert started == [] and len(errors) == 2
    for message in errors:
        assert "\n" not in message and message.startswith(str(shipped))
        assert f"starter model '{NAME}' does not match its card.json" in message


def test_predict_with_the_starter_waits_for_training_and_write_access(workspace, shipped, sample,
                                                                     monkeypatch):
    started, told = [], []
    monkeypatch.setattr(_starter_control, "run_task", lambda *a, **kw: started.append(a))
    monkeypatch.setattr(_starter_control, "show_info", told.append)
    ws = workspace
    ws.open_project(sample)
    control = ws.trainer_panel.start_from
    ws.trainer_panel.configure(start_from=NAME)
    assert control.predict_btn.isEnabled()
    ws.state.training = True                                     # a training runs
    assert not control.predict_btn.isEnabled()
    assert "a training runs" in control.predict_btn.toolTip()
    assert not control.predict_all() and started == []
    assert told[-1].startswith(f"Cannot predict with {NAME} now: a training runs")
    ws.state.training = False
    assert control.predict_btn.isEnabled() and "not now" not in control.predict_btn.toolTip()
    ws.set_project(Project.open(sample, mode="r"))                # open for looking only
    ws.trainer_panel.configure(start_from=NAME)
    assert not control.predict_btn.isEnabled()
    assert "read-only" in control.predict_btn.toolTip()
    assert not control.predict_all() and started == []


def test_no_idle_pretraining_when_training_starts_from_a_starter(workspace, shipped, sample,
                                                                 monkeypatch):
    from training_backend.jobs import process

    started = []
    monkeypatch.setattr(process, "PretrainProcess", lambda *a, **kw: started.append(a))
    ws = workspace
    ws.open_project(sample)
    trainer = ws.trainer_panel
    trainer.configure(start_from=NAME)
    trainer.pretrain.when_idle.setChecked(True)
    assert not trainer.pretrain.busy and started == []
    assert trainer.pretrain.line.text() == ("not pretraining when idle: training starts from "
                                            "another model (Start from), not from this encoder")


def test_the_status_line_says_what_a_fine_tune_of_other_classes_keeps():
    from napari_lesionseg._status import TrainingStatus
    from training_backend import events as ev

    note = (f"{NAME} has the lesion classes MA, HE, EX, SE, this project lesion: its class heads "
            "start anew (6 weight tensors); the other 115 are kept")
    shown = TrainingStatus()
    shown.apply(ev.Started("tuned", "supervised", "cpu", 8, 2, 10, None))
    shown.apply(ev.InitFrom(NAME, 115, ("net.out.conv.conv.weight",), note))
    assert shown.message == f"tuned on cpu: 8 training cases, 2 for validation, 10 steps · {note}"
    same = TrainingStatus()
    same.apply(ev.InitFrom(NAME, 121))                           # the same classes: where from
    assert same.message == f"starts from {NAME}"
