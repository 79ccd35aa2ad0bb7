"""The window's evented training status and the magicgui training form.

The status is fed trainer events (no trainer runs: a fake process hands them over) and its
fields, then the widgets that subscribe to it, are checked; the form's defaults and help come
from `TrainConfig` and the method catalog, and what it holds becomes the run's `TrainConfig`.
"""
from __future__ import annotations

import pytest

from napari_lesionseg import _status as st
from napari_lesionseg._status import TrainingStatus
from napari_lesionseg._train_form import config_help
from training_backend import events as ev
from training_backend.config import WINDOW_BUDGET_S, METHOD_CATALOG, TrainConfig


def run_events(case_ids: tuple[str, ...] = ("c1", "c2")) -> list:
    """A short run as the trainer reports it: 10 steps, a fold at step 8, two predictions."""
    return [
        ev.Started("m1", "supervised", "cpu", n_train=6, n_val=1, total_steps=10, budget_s=None),
        ev.Progress(step=5, total=10, elapsed_s=4.0, fraction=0.5),
        ev.Loss(step=5, values={"loss": 0.8, "dice": 0.5}),
        ev.Validation(step=5, dice=0.4, per_class={"lesion": 0.4}),
        ev.Loss(step=8, values={"loss": 0.6, "dice": 0.4}),
        ev.Validation(step=8, dice=0.4, per_class={"lesion": 0.4}),  # same Dice, new point
        ev.ValidationFolded(step=8, n_cases=1, dice=0.4),
        ev.Progress(step=10, total=10, elapsed_s=8.0, fraction=1.0),
        ev.CheckpointSaved(step=10, path="ckpt"),
        ev.RoundFinished(round=0, n_annotations=7, dice=0.4),
        ev.PredictionProgress(done=1, total=2, elapsed_s=2.0),
        ev.PredictionsReady("m1", case_ids[:1]),
        ev.PredictionProgress(done=2, total=2, elapsed_s=4.0),
        ev.PredictionsReady("m1", case_ids[1:]),
        ev.Finished("m1", step=10, reason="steps", checkpoint="ckpt"),
    ]


def test_status_follows_a_run_and_emits_each_change():
    status = TrainingStatus()
    seen: dict[str, list] = {"state": [], "loss_curve": [], "ready": [], "rounds": []}
    status.events.state.connect(lambda new, _old: seen["state"].append(new))
    status.events.loss_curve.connect(lambda new, _old: seen["loss_curve"].append(new))
    status.predictions_ready.connect(lambda m, c: seen["ready"].append((m, c)))
    status.round_finished.connect(lambda n, d: seen["rounds"].append((n, d)))
    status.begin(message="starting")
    assert status.active and st.progress_text(status) == "starting the trainer …"
    events = run_events()
    for event in events[:2]:
        status.apply(event)
    assert (status.state, status.model_id, status.step, status.total) == (st.TRAINING, "m1", 5, 10)
    assert status.eta_s == pytest.approx(4.0)  # half done in 4 s
    assert st.progress_text(status) == "step 5/10 · 4 s · about 4 s left"
    assert st.progress_value(status) == 500
    assert status.message == "m1 on cpu: 6 training cases, 1 for validation, 10 steps"
    for event in events[2:8]:
        status.apply(event)
    assert status.loss == {"loss": 0.6, "dice": 0.4}
    assert status.loss_curve == ((5, 0.8), (8, 0.6)) and status.dice_curve == ((5, 0.4), (8, 0.4))
    assert status.folded_at == 8 and status.dice == 0.4
    assert st.metrics_text(status) == ("loss 0.6000 (dice 0.400) · validation Dice 0.400 "
                                       "(step 8; its cases are trained on from there)")
    for event in events[8:11]:
        status.apply(event)
    assert status.message == "checkpoint at step 10"
    assert status.state == st.PREDICTING
    assert st.progress_text(status) == "predicting 1/2 · about 2 s left"
    assert st.progress_value(status) == 500
    for event in events[11:]:
        status.apply(event)
    assert status.state == st.FINISHED and not status.active
    assert st.progress_text(status) == "finished: steps · step 10"
    assert status.message == "model m1 ready"
    assert seen["state"] == [st.STARTING, st.TRAINING, st.PREDICTING, st.FINISHED]
    assert len(seen["loss_curve"]) == 2
    assert seen["ready"] == [("m1", ("c1",)), ("m1", ("c2",))]
    assert seen["rounds"] == [(7, 0.4)]
    # a stop asked for stays on show until the run ends; a failure says what to do
    status.begin(following=True)
    status.state = st.STOPPING
    status.apply(ev.Progress(step=3, total=None, elapsed_s=3.0, fraction=0.1))
    assert st.progress_text(status) == "stop requested through the project …"
    status.apply(ev.Failed("CUDA out of memory\ntraceback ..."))
    assert status.state == st.FAILED and status.message.startswith("failed: CUDA out of memory — ")
    status.reset()
    assert status.state == st.IDLE and status.loss_curve == () and status.message


def test_update_sets_every_field_before_any_subscriber_runs():
    status = TrainingStatus()
    seen = []
    status.events.step.connect(lambda *_: seen.append((status.step, status.total)))
    status.update(step=3, total=9)
    assert seen == [(3, 9)]
    with pytest.raises(AttributeError, match="no field"):
        status.update(steps=3)


def test_a_batch_of_events_emits_each_changed_field_once_with_its_final_value():
    status = TrainingStatus()
    curves, steps, ready = [], [], []
    status.events.loss_curve.connect(lambda new, old: curves.append((len(new), len(old))))
    status.events.step.connect(lambda new, old: steps.append((new, old)))
    status.predictions_ready.connect(lambda m, c: ready.append(c))
    status.begin()
    with status.batch():
        status.apply(ev.Started("m", "supervised", "cpu", n_train=2, n_val=0, total_steps=900,
                                budget_s=None))
        for i in range(1, 301):  # a long run's history, replayed in one poll
            status.apply(ev.Loss(step=3 * i, values={"loss": 1.0 / i}))
            status.apply(ev.Progress(step=3 * i, total=900, elapsed_s=i, fraction=i / 300))
        status.apply(ev.PredictionsReady("m", ("c1",)))
        with status.batch():  # nested: the outer batch emits
            status.update(step=901)
            status.update(step=900)
        assert curves == [] and steps == []        # nothing emitted yet ...
        assert ready == [("c1",)]                  # ... except the per-event signals
    assert curves == [(300, 0)] and steps == [(900, 0)]  # once each, final against first value
    assert status.loss_curve[-1] == (900, pytest.approx(1 / 300))
    with status.batch():                           # a field set back to its value: no event
        status.update(step=5)
        status.update(step=900)
    assert steps == [(900, 0)]
    status.update(step=901)                        # outside a batch: emitted at once again
    assert steps[-1] == (901, 900)


# ----------------------------------------------------------------------------- in the window
class FakeProcess:
    """Stands in for `TrainerProcess`: hands over the events the test queues."""

    made: list[FakeProcess] = []

    def __init__(self, project_path, cfg):
        self.cfg, self.queue, self.cancelled = cfg, [], False
        FakeProcess.made.append(self)

    def start(self):
        pass

    def poll(self):
        out, self.queue = self.queue, []
        return out

    def cancel(self):
        self.cancelled = True

    def kill(self):
        pass

    def is_alive(self):
        return False

    def close(self):
        pass


@pytest.mark.gui
def test_trainer_panel_widgets_follow_the_status(make_napari_viewer, qtbot, tiny_project,
                                                 monkeypatch):
    from napari_lesionseg._tasks import running_tasks
    from napari_lesionseg._widget import LesionWorkspace

    monkeypatch.setattr("training_backend.jobs.process.TrainerProcess", FakeProcess)
    monkeypatch.setattr("napari_lesionseg._trainer_panel.show_info", lambda *_: None)
    FakeProcess.made.clear()
    viewer = make_napari_viewer()
    ws = LesionWorkspace(viewer)
    try:
        ws.open_project(tiny_project.path)
        trainer = ws.trainer_panel
        qtbot.waitUntil(lambda: "supervised" in trainer.available_methods(), timeout=10_000)

        # the form: TrainConfig's defaults and help, the method's options from the catalog
        defaults = TrainConfig()
        cfg = trainer.settings()
        assert (cfg.image_size, cfg.batch_size, cfg.lr, cfg.device, cfg.steps) == (
            defaults.image_size, defaults.batch_size, defaults.lr, defaults.device, None)
        assert cfg.budget_s == WINDOW_BUDGET_S and cfg.method_options == {}
        assert trainer.more_form.batch_size.tooltip == config_help()["batch_size"]
        trainer.more_form.lr.value = 3e-5           # a small rate survives the spin box
        assert trainer.settings().lr == pytest.approx(3e-5)
        trainer.more_form.lr.value = defaults.lr
        trainer.configure(method="cam")
        names = [w.name for w in trainer.options_form]
        assert names == list(METHOD_CATALOG["cam"].all_options())
        assert trainer.options_form[names[-1]].tooltip == \
            METHOD_CATALOG["cam"].all_options()[names[-1]].help
        with pytest.raises(KeyError, match="not one of"):
            trainer.configure(options={"ema_decay": 0.5})   # a mean_teacher option
        trainer.configure(method="supervised", steps=10, budget_s=0, batch_size=4,
                          options={"dice_weight": 2.0, "negative_background": False})
        assert [w.name for w in trainer.options_form] == list(
            METHOD_CATALOG["supervised"].all_options())
        with pytest.raises(ValueError, match="cannot train on these labels"):
            trainer.configure(method="no_such_method")

        outputs: list[tuple] = []
        ws.state.outputs_changed.connect(outputs.append)
        assert trainer.start()
        [proc] = FakeProcess.made
        assert (proc.cfg.method, proc.cfg.steps, proc.cfg.budget_s, proc.cfg.batch_size) == (
            "supervised", 10, None, 4)
        assert proc.cfg.method_options == {"dice_weight": 2.0, "negative_background": False}
        assert not trainer.form.enabled and trainer.status.state == st.STARTING
        assert trainer._bar.format() == "starting the trainer …"             # noqa: SLF001

        ids = tuple(tiny_project.case_ids()[:2])
        events = run_events(ids)
        proc.queue = events[:8]                 # trained, validation cases folded in
        trainer.poll()
        assert trainer.status.step == 10 and trainer.status.dice_curve == ((5, 0.4), (8, 0.4))
        assert trainer._bar.format() == "step 10/10 · 8 s · about 0 s left"  # noqa: SLF001
        assert trainer._bar.value() == 1000                                 # noqa: SLF001
        assert trainer.run_curve.loss == [(5, 0.8), (8, 0.6)]
        assert trainer.run_curve.dice == [(5, 0.4), (8, 0.4)] and trainer.run_curve.folded_at == 8
        assert trainer.status_text() == (
            "m1 on cpu: 6 training cases, 1 for validation, 10 steps · loss 0.6000 (dice 0.400) "
            "· validation Dice 0.400 (step 8; its cases are trained on from there)")
        assert trainer._activity is not None and trainer._activity.n == 1000  # noqa: SLF001

        proc.queue = events[8:12]               # a round ends, predictions begin
        trainer.poll()
        assert trainer._bar.format() == "predicting 1/2 · about 2 s left"     # noqa: SLF001
        assert trainer._activity.desc.startswith("Predicting 1/2")          # noqa: SLF001
        assert trainer.curve.points[-1] == (7, pytest.approx(0.4))
        assert outputs == [ids[:1]]             # the cases panel and the model layers reload

        proc.queue = events[12:]
        trainer.poll()
        assert outputs == [ids[:1], ids[1:]]
        assert trainer.process is None and not ws.state.training
        assert trainer._bar.format() == "finished: steps · step 10"           # noqa: SLF001
        assert trainer.status_text().startswith("model m1 ready · loss 0.6000")
        assert trainer.form.enabled and trainer._start_btn.isEnabled()      # noqa: SLF001

        # following a long run from its start: its history arrives in one poll, drawn once
        drawn = []
        real_set_run = trainer.run_curve.set_run
        monkeypatch.setattr(trainer.run_curve, "set_run",
                            lambda *a, **k: (drawn.append(1), real_set_run(*a, **k)))
        assert trainer.start()
        proc = FakeProcess.made[-1]
        proc.queue = [events[0], *[ev.Loss(step=i, values={"loss": 1.0 / i}) for i in range(1, 2001)]]
        drawn.clear()
        trainer.poll()
        assert len(trainer.run_curve.loss) == 2000 and len(drawn) == 1
        proc.queue = [ev.Finished("m1", step=2000, reason="cancelled", checkpoint="ckpt")]
        trainer.poll()
        assert trainer.process is None

        # another project: nothing of the run stays on screen
        ws.project_panel.set_project(None)
        assert trainer.status.state == st.IDLE and trainer._bar.format() == "idle"  # noqa: SLF001
        assert trainer.run_curve.loss == [] and trainer._metrics.text() == ""  # noqa: SLF001
    finally:
        ws.shutdown()
        qtbot.waitUntil(lambda: running_tasks() == 0, timeout=10_000)


@pytest.mark.gui
def test_dialog_forms_are_magicgui_with_help_from_the_signatures(qtbot, tmp_path):
    from napari_lesionseg._dialogs import NewProjectDialog, import_help

    dialog = NewProjectDialog()
    qtbot.addWidget(dialog)
    assert dialog.values() == ("", ["lesion"], [])      # the signature's defaults
    dialog.folder.value = tmp_path / "p"
    dialog.classes.value = "MA, HE ,"
    dialog.image_classes.value = "normal; abnormal"
    assert dialog.values() == (str(tmp_path / "p"), ["MA", "HE"], ["normal", "abnormal"])
    assert "pixel value" in dialog.classes.tooltip      # help from its docstring
    assert "column holding the image path" in import_help()["image_col"]
