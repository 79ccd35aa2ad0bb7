"""The case on screen is predicted first after a round, even one opened after Start: the window
writes ``P/runs/<model>/focus.json`` (`runs.request_focus`), the trainer reads it when it
predicts, and a case named there while it predicts jumps the queue."""
from __future__ import annotations

import json

import pytest

from training_backend.events import Finished, PredictionsReady, Started
from training_backend.jobs import runs
from training_backend.learning.inference import iter_predictions
from training_backend.learning.models import ModelConfig
from training_backend.learning.trainer import TrainConfig, run_training, train

TINY = dict(batch_size=2, image_size=32, model=ModelConfig(base=8, depth=3), threads=1,
            validate_every=1000, mc_samples=2)


def test_focus_request_is_read_when_it_changes_and_removed_with_the_run(tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    folder = runs.run_dir(project, "m")
    assert runs.read_focus(folder) == []
    writer = runs.RunWriter(project, "m")
    try:
        assert writer.focus() == []
        runs.request_focus(project, "m", ["c2", "c1"])
        assert runs.read_focus(folder) == ["c2", "c1"] and writer.focus() == ["c2", "c1"]
        runs.request_focus(project, "m", ["c5"])  # at once: a new file, seen at once
        assert writer.focus() == ["c5"]
        (folder / runs.FOCUS_FILE).write_text("{not json", encoding="utf-8")
        assert runs.read_focus(folder) == [] and writer.focus() == []
        (folder / runs.FOCUS_FILE).write_text(json.dumps({"case_ids": "c1"}), encoding="utf-8")
        assert runs.read_focus(folder) == []
        runs.request_focus(project, "m", ["c3"])
        assert writer.focus() == ["c3"]
    finally:
        writer.close()
    assert not (folder / runs.FOCUS_FILE).exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(project, checkpoint) of a tiny model trained for a few steps."""
    from conftest import make_tiny_project

    project = make_tiny_project(tmp_path_factory.mktemp("focus") / "tiny")
    fin = train(project.path, TrainConfig(steps=2, predict=False, model_id="m", **TINY))
    assert isinstance(fin, Finished)
    return project, project.path / "models" / "m" / "latest.pt"


def test_a_case_named_while_predicting_jumps_the_queue(checkpoint):
    project, ckpt = checkpoint
    ids = project.case_ids()
    asked = {"n": 0}

    def first() -> list[str]:  # the user opens the last case once two are done
        asked["n"] += 1
        return [ids[-1], "unknown"] if asked["n"] > 2 else []

    items = list(iter_predictions(project, ckpt, ids, device="cpu", first=first))

    order = [it.case_id for it in items]
    assert order == ids[:2] + [ids[-1]] + ids[2:-1]
    assert [it.index for it in items] == list(range(1, len(ids) + 1))
    assert {it.total for it in items} == {len(ids)}
    for it in items:  # each written once, under the id reported
        assert project.output_record(it.case_id).output_id == it.output_id


def test_the_run_predicts_the_case_on_screen_first_and_announces_it_alone(checkpoint):
    project, _ = checkpoint
    ids = project.case_ids()
    runs.request_focus(project.path, "m2", [ids[6]])   # opened in the window after Start
    cfg = TrainConfig(steps=2, predict=True, model_id="m2", predict_first=[ids[1]], **TINY)

    events = list(run_training(project.path, cfg))

    assert isinstance(events[0], Started) and isinstance(events[-1], Finished), events[-1]
    ready = [e for e in events if isinstance(e, PredictionsReady)]
    order = [c for e in ready for c in e.case_ids]
    assert ready[0].case_ids == (ids[6],) and order[1] == ids[1]
    assert sorted(order) == sorted(ids)
    assert not (runs.run_dir(project.path, "m2") / runs.FOCUS_FILE).exists()


@pytest.mark.gui
def test_the_window_sends_the_case_on_screen_to_the_run(make_napari_viewer, qtbot,
                                                        tiny_project, monkeypatch):
    from napari_lesionseg import _trainer_panel
    from napari_lesionseg._tasks import running_tasks
    from napari_lesionseg._widget import LesionWorkspace

    viewer = make_napari_viewer()
    ws = LesionWorkspace(viewer)
    ws.set_project(tiny_project)
    trainer, ids = ws.trainer_panel, tiny_project.case_ids()
    folder = runs.run_dir(tiny_project.path, "m")
    ws.go_to(ids[0])                                  # no run on show: nothing written
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case == ids[0], timeout=10_000)
    assert not folder.exists()

    trainer.process = object()                        # a run on show, before its Started
    trainer.status.model_id = None
    ws.go_to(ids[3])
    assert not folder.exists()                        # its model id is not known yet
    trainer.handle_event(Started("m", "supervised", "cpu", 8, 1, None, 10.0))
    assert runs.read_focus(folder) == [ids[3]]        # sent as soon as the run is known
    ws.go_to(ids[5])
    assert runs.read_focus(folder) == [ids[5]]
    def refused(*_args):
        raise PermissionError(13, "read-only project")

    monkeypatch.setattr(_trainer_panel, "request_focus", refused)
    ws.go_to(ids[6])                                  # no error escapes; the old request stays
    assert runs.read_focus(folder) == [ids[5]]
    trainer.process = None
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case is not None, timeout=10_000)
    ws.shutdown()
    qtbot.waitUntil(lambda: running_tasks() == 0, timeout=10_000)
