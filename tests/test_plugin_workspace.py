"""The lesion workspace in a real (headless, Xvfb) napari viewer.

Style: set a widget's value or call its handler, then check layers and the project on disk.
Work that the workspace runs in threads is awaited with ``qtbot.waitUntil``.
"""
from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pytest
from napari.layers import Image, Labels
from napari.utils.key_bindings import coerce_keybinding
from qtpy.QtCore import Qt

from napari_lesionseg import _trainer_panel
from napari_lesionseg._layers import ANNOTATION, PREDICTION, UNCERTAINTY, cam_layer_name
from napari_lesionseg._tasks import running_tasks
from napari_lesionseg._widget import LesionWorkspace
from training_backend.active.acquisition import rank
from training_backend.project.sample import create_sample_project
from training_backend.project.store import BACKGROUND, Project

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def sample_template(tmp_path_factory):
    """The bundled sample with masks and labels hidden as reference: every case starts
    unlabelled, as in a fresh annotation project."""
    path = tmp_path_factory.mktemp("sample") / "idrid"
    create_sample_project(path, reference=True, hide_labels=True)
    return path


@pytest.fixture()
def sample_project(sample_template, tmp_path):
    path = tmp_path / "idrid"
    shutil.copytree(sample_template, path)
    return path


def show(ws, qtbot, cid):
    ws.go_to(cid)
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case == cid, timeout=10_000)
    return ws.viewer.layers[ANNOTATION]


def fake_outputs(project: Project, cid: str, entropy: float, seed: int = 0) -> str:
    """Model outputs written through the store API, as inference would write them."""
    rng = np.random.default_rng(seed)
    h, w = project.case(cid).shape
    k = len(project.classes)
    prob = rng.dirichlet(np.ones(k + 1), size=(h, w)).transpose(2, 0, 1).astype(np.float32)
    pred = prob.argmax(0).astype(np.uint8)  # (H, W)
    cam = rng.random((k, h, w), dtype=np.float32)
    unc = rng.random((h, w), dtype=np.float32)
    scores = {"presence": [0.9] * k, "entropy": entropy, "bald": entropy / 2,
              "lesion_frac": float((pred > 0).mean())}
    return project.write_outputs(cid, "test-model", pred, prob, cam, unc, scores,
                                 rng.random(16, dtype=np.float32))


def test_label_paint_switch_and_reopen(workspace, qtbot, sample_project):
    ws = workspace
    ws.open_project(sample_project)
    ann = ws.annotate_panel
    first, second = ws.project.case_ids()[:2]
    layer = show(ws, qtbot, first)
    assert isinstance(layer, Labels) and not layer.data.any()
    assert ws.viewer.layers.selection.active is layer

    ann.set_image_label("lesion")
    ann.set_presence("HE", True)
    ann.set_presence("SE", False)
    ann.set_kind("sparse")
    layer.data[10:20, 30:40] = 2            # HE scribble
    layer.data[100:104, :] = BACKGROUND      # painted background
    show(ws, qtbot, second)                  # the switch saves the first case

    reopened = Project.open(sample_project)
    rec = reopened.case(first)
    assert rec.image_label == "lesion"
    assert rec.presence == {"HE": True, "SE": False}
    mask, version = reopened.read_annotation(first)
    assert version.kind == "sparse" and version.version == 1 and version.source == "manual"
    assert (mask[10:20, 30:40] == 2).all() and (mask[100:104] == BACKGROUND).all()
    assert np.count_nonzero(mask) == 100 + 4 * mask.shape[1]
    assert reopened.read_annotation(second) is None  # opened, never painted: nothing saved

    # a second workspace session on the same folder shows what was saved
    ws.open_project(sample_project)
    layer = show(ws, qtbot, first)
    np.testing.assert_array_equal(layer.data, mask)
    assert ann.kind() == "sparse" and ann.image_label() == "lesion"
    assert ws.cases_panel.row_count() == len(reopened)


def test_autosave_after_paint_never_saves_unchanged_and_undo(workspace, qtbot, sample_project):
    ws = workspace
    ws.open_project(sample_project)
    ann = ws.annotate_panel
    cid = ws.project.case_ids()[0]
    layer = show(ws, qtbot, cid)
    ann.set_kind("full")
    ann.select_paint_class(3)
    assert layer.selected_label == 3
    layer.paint((50, 50), 3)                   # a brush stroke: emits the paint event
    qtbot.waitUntil(lambda: ws.project.case(cid).latest is not None, timeout=5_000)
    v1 = ws.project.case(cid).latest
    assert v1.kind == "full" and v1.version == 1
    assert ann.save_now() is None              # unchanged: no new version
    show(ws, qtbot, ws.project.case_ids()[1])  # nor on a case switch
    layer = show(ws, qtbot, cid)
    assert len(ws.project.case(cid).annotations) == 1

    layer.data[0:5, 0:5] = 1
    v2 = ann.save_now()
    assert v2 is not None and v2.version == 2 and v2.parent == 1
    ann.undo_save()                            # Project.revert_annotation: v1 again as v3
    mask1, _ = ws.project.read_annotation(cid, 1)
    latest_mask, v3 = ws.project.read_annotation(cid)
    assert v3.version == 3 and v3.source == "revert:2"
    np.testing.assert_array_equal(latest_mask, mask1)
    np.testing.assert_array_equal(ws.viewer.layers[ANNOTATION].data, mask1)


def test_model_layers_accept_and_edit_prediction(workspace, qtbot, sample_project):
    ws = workspace
    ws.open_project(sample_project)
    ann = ws.annotate_panel
    cid = ws.project.case_ids()[2]
    show(ws, qtbot, cid)
    assert PREDICTION not in ws.viewer.layers
    output_id = fake_outputs(ws.project, cid, entropy=0.5)
    ws.project.refresh()
    ws.state.outputs_changed.emit((cid,))     # what the trainer panel does on PredictionsReady
    qtbot.waitUntil(lambda: PREDICTION in ws.viewer.layers, timeout=5_000)
    layers = ws.viewer.layers
    outputs = ws.project.read_outputs(cid)
    np.testing.assert_array_equal(layers[PREDICTION].data, outputs.pred)
    for k, name in enumerate(ws.project.classes):
        cam = layers[cam_layer_name(name)]
        assert isinstance(cam, Image) and cam.colormap.name == "inferno"
        assert cam.blending == "additive" and cam.opacity == 0.5
        np.testing.assert_allclose(cam.data, outputs.cam[k].astype(np.float32))
    assert layers[UNCERTAINTY].colormap.name == "magma"
    assert layers.selection.active is layers[ANNOTATION]     # still painting, not on a new layer
    names = [lyr.name for lyr in layers]
    assert names.index("image") < names.index(cam_layer_name("MA")) < names.index(UNCERTAINTY) \
        < names.index(PREDICTION) < names.index(ANNOTATION)

    ann.show_model_layers(prediction=False, cam=True)
    assert not layers[PREDICTION].visible
    ann.select_paint_class(2)                  # the CAM shown follows the paint class
    assert layers[cam_layer_name("HE")].visible and not layers[cam_layer_name("MA")].visible

    version = ann.accept_prediction()
    assert version.kind == "full" and version.source == f"prediction:{output_id}"
    mask, _ = ws.project.read_annotation(cid)
    np.testing.assert_array_equal(mask, outputs.pred)

    other = ws.project.case_ids()[3]
    fake_outputs(ws.project, other, entropy=0.1, seed=1)
    ws.project.refresh()
    layer = show(ws, qtbot, other)
    ann.edit_prediction()
    layer.data[layer.data == 1] = 0            # the clinician removes the MA false positives
    show(ws, qtbot, cid)
    edited, v = ws.project.read_annotation(other)
    assert v.source.startswith("prediction:") and v.kind == "full"
    assert not (edited == 1).any()


def test_lesion_free_is_saved_as_an_empty_full_mask(workspace, qtbot, sample_project):
    """Accepting an empty prediction, or "Lesion-free" (Shift+F), saves an empty full mask on a case
    that had none; an untouched case with nothing painted still saves nothing."""
    ws = workspace
    ws.open_project(sample_project)
    ann = ws.annotate_panel
    first, second = ws.project.case_ids()[:2]
    h, w = ws.project.case(first).shape
    k = len(ws.project.classes)
    prob = np.zeros((k + 1, h, w), np.float32)
    prob[0] = 1.0                                  # the model sees no lesion at all
    output_id = ws.project.write_outputs(first, "test-model", np.zeros((h, w), np.uint8), prob,
                                         np.zeros((k, h, w), np.float32),
                                         np.zeros((h, w), np.float32), {"presence": [0.0] * k},
                                         np.zeros(16, np.float32))
    ws.project.refresh()
    show(ws, qtbot, first)
    qtbot.waitUntil(lambda: ann.shown_output_id == output_id, timeout=5_000)
    assert ann.save_now() is None                  # nothing painted: nothing to save
    ann.edit_prediction()                          # Shift+A copies it for editing only ...
    assert ann.save_now() is None                  # ... an empty copy is not a confirmation
    version = ann.accept_prediction()
    assert version is not None and version.kind == "full"
    mask, _ = ws.project.read_annotation(first)
    assert mask.shape == (h, w) and not mask.any()
    assert ws.project.case(first).status == "full"

    layer = show(ws, qtbot, second)               # no prediction here: the button (key F)
    layer.paint((5, 5), 1)                         # a stray stroke is replaced
    ann._free_btn.click()                          # noqa: SLF001 - the "Lesion-free (⇧F)" button
    mask, av = ws.project.read_annotation(second)
    assert av.kind == "full" and av.source == "manual:lesion-free" and not mask.any()
    assert ann.kind() == "full" and not np.asarray(layer.data).any()
    assert ann.mark_lesion_free() is None          # already saved as such: no new version
    assert [a.version for a in ws.project.case(second).annotations] == [av.version]


def test_next_case_follows_the_ranking_and_previous_goes_back(workspace, qtbot, sample_project):
    project = Project.open(sample_project)
    ids = project.case_ids()
    for i, cid in enumerate(ids):
        fake_outputs(project, cid, entropy=float((i * 7) % 10) / 10, seed=i)
    expected = [cid for cid, _s in rank(project, "entropy", k=len(ids))]
    ws = workspace
    ws.open_project(sample_project)
    cases = ws.cases_panel
    assert cases.row_count() == len(ids)
    assert ws.state.strategy == "tta_variance"   # the default: it saved the most masks
    cases.set_strategy("entropy")                      # the fake outputs score entropy
    visited = []
    for step in range(3):
        cases.next_case()
        qtbot.waitUntil(lambda: ws.state.case_id not in (visited[-1:] or [None]), timeout=5_000)
        visited.append(ws.state.case_id)
    assert visited == expected[:3]
    cases.previous_case()
    assert ws.state.case_id == expected[1]

    # another strategy reorders "next"; visited cases are skipped
    cases.set_strategy("bald")
    expected_bald = [c for c, _s in rank(project, "bald", k=len(ids)) if c != ws.state.case_id]
    before = ws.state.case_id
    cases.next_case()
    qtbot.waitUntil(lambda: ws.state.case_id != before, timeout=5_000)
    assert ws.state.case_id == expected_bald[0]
    bald = [c for c, _s in rank(project, "bald", k=len(ids))]
    assert [c for c, _s in cases.ranking] == bald
    top_row = next(r for r in range(len(ids)) if cases.cell_text(r, 0)
                   == project.case(bald[0]).name)
    assert cases.cell_text(top_row, 4) == "1"            # the Rank column


def test_case_table_filters_sorts_selects_and_updates_a_row_in_place(workspace, qtbot, tmp_path):
    path = tmp_path / "labelled"
    create_sample_project(path)              # 7 full masks, 3 image labels
    ws = workspace
    ws.open_project(path)
    cases, project = ws.cases_panel, ws.project
    names = sorted(project.case(c).name for c in project.case_ids())
    assert cases.row_count() == 10
    cases._filter.setCurrentText("full")     # noqa: SLF001 - the filter combo box
    assert cases.row_count() == 7
    assert {cases.cell_text(r, 1) for r in range(7)} == {"full"}
    cases._search.setText("NAR")             # noqa: SLF001 - and a name filter on top
    assert cases.row_count() == 0
    cases._filter.setCurrentText("all")      # noqa: SLF001
    assert sorted(cases.cell_text(r, 0) for r in range(cases.row_count())) == \
        [n for n in names if "NAR" in n]
    cases._search.setText("")                # noqa: SLF001

    cases.table.sortByColumn(0, Qt.SortOrder.DescendingOrder)  # a click on the Case header
    assert [cases.cell_text(r, 0) for r in range(10)] == names[::-1]

    cases.table.selectRow(3)                 # a click on a row opens its case
    target = project.find(names[::-1][3]).id
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case == target, timeout=10_000)
    ws.annotate_panel.set_image_label("no lesion")
    assert cases.cell_text(3, 0) == names[::-1][3]                  # the row stays in place
    assert cases.cell_text(3, 2).startswith("no lesion")            # with its new label
    assert cases.table.selectionModel().selectedRows()[0].row() == 3
    cases.table.sortByColumn(0, Qt.SortOrder.AscendingOrder)       # the selection follows it
    [selected] = cases.table.selectionModel().selectedRows()
    assert cases.cell_text(selected.row(), 0) == names[::-1][3] and selected.row() == 6


def test_keyboard_shortcuts(workspace, qtbot, sample_project):
    ws = workspace
    ws.open_project(sample_project)
    handler = ws.viewer.window._qt_viewer._key_map_handler  # noqa: SLF001 - what a key press calls
    handler.press_key("n")
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case is not None, timeout=5_000)
    first = ws.state.case_id
    layer = ws.viewer.layers[ANNOTATION]
    assert ws.viewer.layers.selection.active is layer
    handler.press_key("3")                     # digit on the annotation layer: paint class 3
    assert layer.selected_label == 3 and layer.mode == "paint"
    handler.press_key("0")
    assert layer.selected_label == BACKGROUND  # sparse mode: painted background
    handler.press_key("Alt-2")                 # image label 2 = "lesion"
    assert ws.project.case(first).image_label == "lesion"
    handler.press_key("Alt-0")
    assert ws.project.case(first).image_label is None
    handler.press_key("n")
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case not in (None, first), timeout=5_000)
    handler.press_key("Shift-N")
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case == first, timeout=5_000)
    assert ws.viewer.keymap[coerce_keybinding("a")].__doc__ == "accept prediction"
    layer = ws.viewer.layers[ANNOTATION]
    assert ws.viewer.layers.selection.active is layer
    handler.press_key("Shift-F")   # lesion-free with the labels layer active (F alone is its fill)
    latest = ws.project.case(first).latest
    assert latest.kind == "full" and latest.source == "manual:lesion-free"
    assert ws.viewer.keymap[coerce_keybinding("Shift-P")].__doc__ == "predict this case"


def test_export_writes_files(workspace, qtbot, sample_project, tmp_path):
    ws = workspace
    ws.open_project(sample_project)
    cid = ws.project.case_ids()[0]
    layer = show(ws, qtbot, cid)
    ws.annotate_panel.set_kind("full")
    layer.data[5:9, 5:9] = 1
    out = tmp_path / "masks"
    ws.export_panel.export(out_dir=str(out), fmt="png", source="annotation")  # saves first
    qtbot.waitUntil(lambda: ws.export_panel.last_report is not None, timeout=10_000)
    report = ws.export_panel.last_report
    assert [c for c, _p in report.exported] == [cid]
    from training_backend.project import io

    written = io.read_mask(report.exported[0][1], n_classes=4)
    assert (written[5:9, 5:9] == 1).all() and written.sum() == 16
    assert (out / "provenance.csv").is_file()

    panel = ws.export_panel                     # viewable masks: the values choice
    panel._format.value = "nifti"               # noqa: SLF001
    panel._values.value = "color"               # class colours: RGB, png/tiff only
    assert panel._format.value == "png"
    assert not panel._format.native.model().item(2).isEnabled()
    panel._values.value = "binary"              # 0/255
    panel.last_report = None
    panel._folder.value = tmp_path / "viewable"
    panel._export_btn.click()
    qtbot.waitUntil(lambda: panel.last_report is not None, timeout=10_000)
    viewable = io.read_image(panel.last_report.exported[0][1])
    assert set(np.unique(viewable).tolist()) == {0, 255} and (viewable[5:9, 5:9] == 255).all()
    meta = (tmp_path / "viewable" / "provenance.json").read_text(encoding="utf-8")
    assert '"values": "binary"' in meta


def test_create_project_and_import_folder(workspace, qtbot, tmp_path):
    from training_backend.project import io

    images = tmp_path / "scans"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        io.write_mask(images / f"scan ({i}).png", rng.integers(0, 255, (40, 48), dtype=np.uint8))
    ws = workspace
    project = ws.project_panel.create_project(tmp_path / "new", ["lesion", "cyst"], ["normal", "abnormal"])
    assert project is not None and ws.project is project
    ws.project_panel.import_folder(images)
    qtbot.waitUntil(lambda: len(ws.project) == 3, timeout=20_000)
    qtbot.waitUntil(lambda: ws.cases_panel.row_count() == 3, timeout=5_000)
    names = sorted(ws.cases_panel.cell_text(r, 0) for r in range(3))
    assert names == ["scan (0)", "scan (1)", "scan (2)"]
    ann = ws.annotate_panel
    assert [b.text() for b in ann.editor._paint_group.buttons()] == ["1 lesion", "2 cyst", "0 background"]  # noqa: SLF001


def test_method_follows_the_annotations_and_says_what_it_uses(workspace, qtbot,
                                                              tiny_project_factory):
    """Image labels only: `cam`; scribbles saved on a case: the combo moves to `supervised`
    and says what each method uses. A method the user picks stays while it can train."""
    project = tiny_project_factory(layout=("label", "label", "negative", "none"))
    ws = workspace
    ws.open_project(project.path)
    trainer = ws.trainer_panel
    # image labels only: the two methods that learn masks from them, cam recommended
    qtbot.waitUntil(lambda: trainer.available_methods() == ["cam", "mcwss"], timeout=10_000)
    assert trainer._method.value == "cam"                                 # noqa: SLF001
    assert trainer._method_note.text() == ("cam uses 3 image labels; "   # noqa: SLF001
                                           "not used: 1 unlabelled images")
    cid = project.case_ids()[0]
    layer = show(ws, qtbot, cid)
    layer.paint((10, 10), 1)                       # the clinician scribbles on a case
    ws.annotate_panel.save_now()
    qtbot.waitUntil(lambda: "supervised" in trainer.available_methods(), timeout=5_000)
    assert trainer._method.value == "supervised"                          # noqa: SLF001
    # a scribble, image labels and images without a mask: every method can train now
    assert trainer.available_methods() == ["supervised", "mean_teacher", "cam", "caml", "crii",
                                           "mcwss", "dual_unet", "collaborative"]
    note = trainer._method_note.text()                                    # noqa: SLF001
    assert note.startswith("supervised uses 1 scribbles, 3 image labels")
    assert "not used: 1 unlabelled images (mean_teacher or caml would use them)" in note

    trainer._method.value = "cam"                  # the user picks cam on purpose ...
    assert "not used: 1 scribbles" in trainer._method_note.text()        # noqa: SLF001
    assert "(supervised or mean_teacher would use them)" in trainer._method_note.text()
    layer = show(ws, qtbot, project.case_ids()[1])
    layer.paint((12, 12), 1)
    ws.annotate_panel.save_now()                   # ... and it stays cam after more scribbles
    qtbot.waitUntil(lambda: "2 scribbles" in trainer._method_note.text(), timeout=5_000)
    assert trainer._method.value == "cam"                                 # noqa: SLF001


def test_trainer_runs_in_a_process_and_shows_outputs(workspace, qtbot, tiny_project, monkeypatch):
    ws = workspace
    ws.open_project(tiny_project.path)
    trainer = ws.trainer_panel
    qtbot.waitUntil(lambda: "supervised" in trainer.available_methods(), timeout=10_000)
    assert "cam" in trainer.available_methods()   # image labels exist too
    cid = tiny_project.case_ids()[7]              # the unlabelled case
    show(ws, qtbot, cid)
    trainer.configure(method="supervised", steps=5, budget_s=0, image_size=32, device="cpu")
    assert trainer.start()
    assert ws.state.training and not trainer.start()   # one run at a time
    qtbot.waitUntil(lambda: trainer.process is None, timeout=90_000)
    kinds = [type(e).__name__ for e in trainer.events_seen]
    assert kinds[0] == "Started" and kinds[-1] == "Finished", kinds
    # the case on screen is predicted first and announced alone; progress for the rest
    ready = [e for e in trainer.events_seen if type(e).__name__ == "PredictionsReady"]
    assert ready[0].case_ids == (cid,)
    assert sorted(c for e in ready for c in e.case_ids) == sorted(tiny_project.case_ids())
    assert "PredictionProgress" in kinds
    assert trainer._bar.format().startswith("finished")       # noqa: SLF001
    qtbot.waitUntil(lambda: UNCERTAINTY in ws.viewer.layers, timeout=10_000)
    layers = ws.viewer.layers
    assert PREDICTION in layers and cam_layer_name("lesion") in layers
    assert layers[PREDICTION].data.shape == tiny_project.case(cid).shape
    assert not ws.state.training
    assert trainer._start_btn.isEnabled()   # noqa: SLF001 - ready for another run
    [round_end] = [e for e in trainer.events_seen if type(e).__name__ == "RoundFinished"]
    assert round_end.dice is not None        # 4 full masks: one is held out for validation
    assert trainer.curve.points[-1] == (round_end.n_annotations, pytest.approx(round_end.dice))
    assert not trainer.curve.grab().isNull()  # the label-efficiency plot paints
    # this run's plot: loss at every reported step, the validation Dice measured when the
    # validation case joined the training (step 4 of 5), and that step marked
    losses = [e for e in trainer.events_seen if type(e).__name__ == "Loss"]
    assert [s for s, _v in trainer.run_curve.loss] == [e.step for e in losses]
    [folded] = [e for e in trainer.events_seen if type(e).__name__ == "ValidationFolded"]
    assert trainer.run_curve.folded_at == folded.step == 4
    assert trainer.run_curve.dice == [(4, pytest.approx(folded.dice))]
    assert trainer.run_curve.caption().startswith("loss ")
    assert not trainer.run_curve.grab().isNull()

    # "Predict this case": the latest model predicts the case on screen (in a child process)
    other = tiny_project.case_ids()[8]
    show(ws, qtbot, other)
    before = ws.annotate_panel.shown_output_id
    ws.annotate_panel._predict_btn.click()        # noqa: SLF001
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_output_id not in (None, before),
                    timeout=60_000)
    assert ws.project.read_outputs(other).model_id == round_end_model(trainer)

    # a trainer process that dies is reported, and training can start again
    errors = []
    monkeypatch.setattr(_trainer_panel, "show_error", errors.append)
    assert trainer.start()
    os.kill(trainer.process.pid, signal.SIGKILL)
    qtbot.waitUntil(lambda: trainer.process is None, timeout=10_000)
    assert errors and "trainer process died" in errors[0]
    assert not ws.state.training and trainer._start_btn.isEnabled()  # noqa: SLF001
    assert trainer.start()
    trainer.stop(force=True)                      # Stop twice = kill
    assert trainer.process is None and not ws.state.training


def round_end_model(trainer) -> str:
    return [e for e in trainer.events_seen if type(e).__name__ == "Finished"][-1].model_id


def test_predict_this_case_without_a_model_says_so(workspace, qtbot, sample_project, monkeypatch,
                                                  tmp_path):
    ws = workspace
    ws.open_project(sample_project)
    infos = []
    monkeypatch.setattr("napari_lesionseg._annotate_panel.show_info", infos.append)
    monkeypatch.setattr("training_backend.learning.starters.STARTERS_DIR", tmp_path / "none")
    show(ws, qtbot, ws.project.case_ids()[0])
    assert ws.annotate_panel.predict_case() is False
    assert infos == ["No trained model yet — start a training first (no starter model is "
                     "installed)"]


def test_auto_retrain_after_n_new_labels(workspace, qtbot, sample_project, monkeypatch):
    ws = workspace
    ws.open_project(sample_project)
    started = []
    assert ws.trainer_panel.settings(auto=True).budget_s == _trainer_panel.AUTO_BUDGET_S
    monkeypatch.setattr(ws.trainer_panel, "start", lambda auto=False: started.append(auto) or True)
    ws.trainer_panel.set_auto_retrain(True, 2, budget_s=12)
    auto_cfg = ws.trainer_panel.settings(auto=True)
    assert auto_cfg.budget_s == 12 and auto_cfg.steps is None
    ids = ws.project.case_ids()
    show(ws, qtbot, ids[0])
    ws.annotate_panel.set_image_label("lesion")
    assert started == []
    show(ws, qtbot, ids[1])
    ws.annotate_panel.set_image_label("no lesion")
    assert started == [True]

    class Running:  # a trainer process that is busy, then done
        def is_alive(self):
            return False

        def close(self):
            pass

    from training_backend.events import Finished

    ws.state.new_labels.clear()  # what a real start does
    ws.trainer_panel.process = Running()
    for cid in ids[2:4]:  # enough new labels, but a run is going on: no second trainer
        show(ws, qtbot, cid)
        ws.annotate_panel.set_image_label("lesion")
    assert started == [True]
    ws.trainer_panel.handle_event(Finished("m", 10, "budget", "ckpt"))  # that run ends ...
    assert started == [True, True]  # ... and the labels saved meanwhile start the next one


def test_launch_docks_the_workspace_on_a_project(monkeypatch, qtbot, sample_project, tmp_path):
    import napari

    from napari_lesionseg._launch import DOCK_NAME, launch
    from training_backend.errors import ProjectError

    with pytest.raises(ProjectError, match="not a lesionseg project"):
        launch(project=tmp_path)              # checked before any window opens
    seen = {}

    def fake_run():                           # instead of blocking in the event loop
        viewer = napari.current_viewer()
        dock = viewer.window.dock_widgets[DOCK_NAME]
        seen["project"] = dock.project.path
        seen["cases"] = dock.cases_panel.row_count()
        dock.shutdown()
        viewer.close()

    monkeypatch.setattr(napari, "run", fake_run)
    assert launch(project=sample_project) == 0
    assert seen == {"project": sample_project, "cases": 10}


def test_opening_a_project_folder_in_napari_opens_the_workspace(make_napari_viewer, qtbot,
                                                                sample_project, tiny_project,
                                                                tmp_path, monkeypatch):
    from napari_lesionseg import _cases_panel

    infos = []
    monkeypatch.setattr(_cases_panel, "show_info", infos.append)
    viewer = make_napari_viewer()
    added = viewer.open(str(sample_project), plugin="napari-lesionseg")
    assert added == []                        # the reader adds no layer of its own ...
    [ws] = [w for w in viewer.window.dock_widgets.values() if isinstance(w, LesionWorkspace)]
    try:
        assert ws.project.path == sample_project  # ... it docks the workspace on the project
        qtbot.waitUntil(lambda: ws.annotate_panel.shown_case is not None, timeout=10_000)
        assert ANNOTATION in [layer.name for layer in viewer.layers]
        viewer.open(str(tiny_project.path / "project.json"), plugin="napari-lesionseg")
        assert [w for w in viewer.window.dock_widgets.values()
                if isinstance(w, LesionWorkspace)] == [ws]    # the same workspace switches
        assert ws.project.path == tiny_project.path
        qtbot.waitUntil(lambda: ws.annotate_panel.shown_case in tiny_project.case_ids(),
                        timeout=10_000)
        empty = Project.create(tmp_path / "empty", ["lesion"])   # opens, waiting for an import
        viewer.open(str(empty.path), plugin="napari-lesionseg")
        assert ws.project.path == empty.path and ws.cases_panel.row_count() == 0
        qtbot.wait(600)                       # past the ranking's debounce
        assert ws.annotate_panel.shown_case is None and infos == []
    finally:
        ws.shutdown()
        qtbot.waitUntil(lambda: running_tasks() == 0, timeout=10_000)


def test_buttons_open_dialogs_and_csv_import(workspace, qtbot, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QMessageBox

    from napari_lesionseg import _project_panel
    from napari_lesionseg._dialogs import CsvImportDialog
    from training_backend.project.importer import read_csv_table
    from training_backend.project.sample import sample_manifest_path

    ws = workspace
    panel = ws.project_panel
    monkeypatch.setattr(_project_panel.QFileDialog, "getExistingDirectory",
                        lambda *a, **k: str(tmp_path / "from_button"))
    monkeypatch.setattr(_project_panel.QMessageBox, "question",
                        lambda *a, **k: QMessageBox.StandardButton.Yes)
    panel._sample_btn.click()                  # noqa: SLF001 - the "Sample…" button
    assert ws.project is not None and len(ws.project) == 10
    # a project opened from the panel shows its first suggested case (no welcome screen)
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case is not None, timeout=10_000)
    sample_path = ws.project.path
    ws.go_to(ws.project.case_ids()[0])
    panel.set_project(None)
    assert ws.annotate_panel.shown_case is None
    monkeypatch.setattr(_project_panel.QFileDialog, "getExistingDirectory",
                        lambda *a, **k: str(sample_path))
    panel._open_btn.click()                    # noqa: SLF001 - the "Open…" button
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case is not None, timeout=10_000)
    assert ws.project.path == sample_path
    assert all(r.status == "unlabelled" and r.has_reference for r in ws.project.cases())

    # CSV import: the dialog guesses the mask columns by name and the label column by content
    project = ws.project_panel.create_project(tmp_path / "csv", ["MA", "HE", "EX", "SE"],
                                              ["no lesion", "lesion"])
    dialog = CsvImportDialog(project, read_csv_table(sample_manifest_path()))
    assert dialog.label.value == "dr"
    assert dialog.previews["label_col"].value == "lesion, no lesion (2 distinct)"
    assert dialog.check_line.value == "10 rows: 10 will be imported"
    dialog.label.value = "image_id"             # a wrong choice is flagged before importing
    assert dialog.check.n_skipped == 10
    assert dialog.previews["label_col"].value.startswith("IDRiD_")
    assert dialog.check_line.value.startswith("10 rows: 0 will be imported, 10 skipped (label ")
    dialog.label.value = "dr"
    kwargs = dialog.kwargs()
    assert kwargs["image_col"] == "image"
    assert kwargs["mask_cols"] == [(f"{c}_mask", c) for c in ("MA", "HE", "EX", "SE")]
    assert kwargs["label_col"] == "dr" and kwargs["reference"] is False
    panel.import_csv(sample_manifest_path(), **kwargs)
    qtbot.waitUntil(lambda: len(ws.project) == 10, timeout=30_000)
    qtbot.waitUntil(lambda: ws.cases_panel.row_count() == 10, timeout=5_000)
    statuses = {ws.project.case(c).status for c in ws.project.case_ids()}
    assert statuses == {"full", "image label"}


def test_unreadable_case_is_reported_and_nothing_stays_editable(workspace, qtbot, sample_project,
                                                               monkeypatch):
    """A case whose image cannot be read: an error notification and header, no editable layer
    (strokes could not be saved to any case), and the next case opens normally."""
    ids = Project.open(sample_project).case_ids()
    p = Project.open(sample_project, mode="r+")
    third = np.zeros(p.case(ids[2]).shape, np.uint8)
    third[:20, :20] = 2
    p.save_annotation(ids[2], third, "full", author="test")
    ws = workspace
    ws.open_project(sample_project)
    layer = show(ws, qtbot, ids[0])
    layer.paint((5, 5), 1)  # a stroke (in napari's undo history), saved on the switch
    errors = []
    monkeypatch.setattr("napari_lesionseg._annotate_panel.show_error", errors.append)
    read_image = Project.read_image

    def broken(self, cid):
        if cid == ids[1]:
            raise OSError("disk read failed")
        return read_image(self, cid)

    monkeypatch.setattr(Project, "read_image", broken)
    ws.go_to(ids[1])
    qtbot.waitUntil(lambda: bool(errors), timeout=10_000)
    assert "disk read failed" in errors[0]
    assert "Could not open" in ws.annotate_panel._header.text()
    assert ANNOTATION not in ws.viewer.layers and ws.annotate_panel.shown_case is None
    assert Project.open(sample_project).read_annotation(ids[0])[0][5, 5] == 1  # switch saved it
    layer = show(ws, qtbot, ids[2])
    assert layer.editable and ws.annotate_panel.shown_case == ids[2]
    layer.mode = "fill"  # the user's tool survives a case switch (the layer is frozen meanwhile)
    layer = show(ws, qtbot, ids[3])
    assert layer.editable and layer.mode == "fill"
    layer = show(ws, qtbot, ids[2])
    layer.undo()  # the first case's stroke must not be replayed onto this one
    np.testing.assert_array_equal(np.asarray(layer.data), third)
