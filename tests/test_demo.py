"""The README demo (`examples/demo.py`) ends on a case with lesions: the one whose prediction
overlaps them best, with the prediction, annotation and CAM layers shown; its training
fine-tunes a starter model when one fits the sample's classes.

No training here: model outputs are written through the store API, as inference writes them.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from training_backend.project.sample import create_sample_project

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("lesionseg_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture()
def project(bundled_sample_template, tmp_path):
    """The bundled sample: 7 fundus cases with full masks, 3 lesion-free ones without."""
    from training_backend.project.store import Project

    path = tmp_path / "sample"
    shutil.copytree(bundled_sample_template, path)
    return Project.open(path)


def write_prediction(project, cid: str, pred: np.ndarray) -> str:
    """Outputs whose prediction is ``pred`` (the other maps flat)."""
    h, w = pred.shape
    k = len(project.classes)
    prob = np.zeros((k + 1, h, w), np.float32)
    prob[0] = 1.0
    cam = np.zeros((k, h, w), np.float32)
    cam[:, pred > 0] = 1.0
    return project.write_outputs(cid, "test-model", pred.astype(np.uint8), prob, cam,
                                 np.zeros((h, w), np.float32), {"presence": [0.5] * k})


def lesion_cases(project) -> dict[str, np.ndarray]:
    found = {}
    for cid in project.case_ids():
        ann = project.read_annotation(cid)
        if ann is not None and np.any(ann[0] > 0):
            found[cid] = ann[0]
    return found


def test_pick_prefers_the_best_overlap_over_the_biggest_lesion(project, demo):
    masks = lesion_cases(project)
    assert len(masks) == 7
    sizes = {cid: int((m > 0).sum()) for cid, m in masks.items()}
    small, big = min(sizes, key=sizes.get), max(sizes, key=sizes.get)
    write_prediction(project, small, masks[small])          # exact: Dice 1
    half = masks[big].copy()
    half[: half.shape[0] // 2] = 0
    write_prediction(project, big, half)                     # part of the lesions
    for cid in set(project.case_ids()) - {small, big}:       # the rest: nothing predicted
        write_prediction(project, cid, np.zeros(project.case(cid).shape, np.uint8))

    pick = demo.pick_lesion_case(project)

    assert pick.case_id == small
    assert pick.dice == pytest.approx(1.0)
    assert pick.lesion_px == pick.predicted_px == sizes[small]
    assert pick.source == "annotation" and pick.n_lesion_cases == 7
    top = int(np.bincount(masks[small][masks[small] > 0]).argmax())
    assert pick.top_class == top
    assert "Dice 1.00" in pick.reason() and project.case(small).name in pick.reason()


def test_pick_counts_only_pixels_of_the_right_class(project, demo):
    masks = lesion_cases(project)
    cid = next(iter(masks))
    wrong = np.where(masks[cid] > 0, 1 + masks[cid] % 4, 0).astype(np.uint8)  # every class off
    write_prediction(project, cid, wrong)

    pick = demo.pick_lesion_case(project)

    assert pick.dice == 0.0
    sizes = {c: int((m > 0).sum()) for c, m in masks.items()}
    assert pick.case_id == max(sizes, key=sizes.get)  # no overlap anywhere: the biggest lesions
    assert "no prediction overlaps a lesion yet" in pick.reason()


def test_the_cam_shown_is_of_the_class_predicted_best(project, demo):
    masks = lesion_cases(project)
    cid = "c000003"                                   # EX has the most pixels, MA the fewest
    counts = np.bincount(masks[cid].ravel(), minlength=5)
    assert counts[1:].argmax() + 1 == 3 and counts[1] < counts[3]
    write_prediction(project, cid, np.where(masks[cid] == 1, 1, 0).astype(np.uint8))

    pick = demo.pick_lesion_case(project)

    assert pick.case_id == cid and pick.top_class == 1  # MA: the only class predicted right


def test_pick_reads_the_hidden_reference_and_skips_lesion_free_cases(tmp_path, demo):
    project = create_sample_project(tmp_path / "ref", reference=True, hide_labels=True)
    refs = {cid: project.read_reference(cid) for cid in project.case_ids()}
    with_lesions = {cid for cid, r in refs.items() if r is not None and np.any(r > 0)}
    assert 0 < len(with_lesions) < len(refs)

    pick = demo.pick_lesion_case(project)

    assert pick.source == "reference" and pick.case_id in with_lesions
    assert pick.n_lesion_cases == len(with_lesions)


def test_pick_is_none_without_lesions(tmp_path, demo, tiny_project_factory):
    project = tiny_project_factory(layout=("negative", "negative"), n_holdout=0)
    assert demo.pick_lesion_case(project) is None


@pytest.mark.gui
def test_demo_ends_on_the_picked_case_with_its_layers(make_napari_viewer, qtbot, project, demo):
    from napari_lesionseg._layers import ANNOTATION, PREDICTION, cam_layer_name
    from napari_lesionseg._tasks import running_tasks
    from napari_lesionseg._widget import LesionWorkspace

    masks = lesion_cases(project)
    for cid in project.case_ids():
        pred = masks.get(cid, np.zeros(project.case(cid).shape, np.uint8))
        write_prediction(project, cid, pred if cid == sorted(masks)[2] else np.zeros_like(pred))
    chosen = sorted(masks)[2]
    viewer = make_napari_viewer()
    ws = LesionWorkspace(viewer)
    viewer.window.add_dock_widget(ws, name="Lesion workspace")
    ws.set_project(project)
    ws.go_to(project.case_ids()[-1])  # a lesion-free case is on screen
    ann = ws.annotate_panel
    qtbot.waitUntil(lambda: ann.shown_case == project.case_ids()[-1], timeout=10_000)

    def wait_until(condition, timeout: float) -> bool:
        try:
            qtbot.waitUntil(condition, timeout=int(timeout * 1000))
        except Exception:  # noqa: BLE001 - the demo's helper returns False on a timeout
            return condition()
        return True

    demo._show_lesion_case(ws, wait_until)

    assert ann.shown_case == chosen
    pred_layer = viewer.layers[PREDICTION]
    assert pred_layer.visible and np.array_equal(pred_layer.data, masks[chosen])
    assert viewer.layers[ANNOTATION].visible
    assert pred_layer.contour == 0 and viewer.layers[ANNOTATION].contour == 1  # fill vs outline
    assert np.array_equal(viewer.layers[ANNOTATION].data, masks[chosen])
    top = int(np.bincount(masks[chosen][masks[chosen] > 0]).argmax())
    cams = {name: viewer.layers[cam_layer_name(name)].visible for name in project.classes}
    assert [n for n, shown in cams.items() if shown] == [project.classes[top - 1]]
    ws.shutdown()
    qtbot.waitUntil(lambda: running_tasks() == 0, timeout=10_000)


def install_fake_starter(root: Path, classes: list[str]) -> None:
    """A starter folder the window offers (a card and a model file; nothing loads it here)."""
    folder = root / "fundus-starter"
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"weights")
    card = {"name": "fundus-starter", "classes": classes, "channels": 3, "image_size": 64,
            "crop_size": 32, "method": "supervised", "scores": {"dice": {"EX": 0.5}}}
    (folder / "card.json").write_text(json.dumps(card))


@pytest.mark.gui
@pytest.mark.parametrize("installed", ["fitting", "other classes", "none"])
def test_demo_fine_tunes_a_starter_when_one_fits(make_napari_viewer, qtbot, project, demo,
                                                 tmp_path, monkeypatch, installed):
    """The demo's training starts from fundus-starter on the bundled sample, and says so; with
    no fitting starter installed it trains from scratch and says why."""
    from napari_lesionseg._widget import LesionWorkspace
    from training_backend.learning import starters

    root = tmp_path / "starters"
    if installed != "none":
        install_fake_starter(root, ["MA", "HE", "EX", "SE"] if installed == "fitting" else ["x"])
    monkeypatch.setattr(starters, "STARTERS_DIR", root)
    viewer = make_napari_viewer()
    ws = LesionWorkspace(viewer)
    ws.set_project(project)

    line = demo.choose_start(ws.trainer_panel)

    cfg = ws.trainer_panel.settings()
    if installed == "fitting":
        assert cfg.init_from == "fundus-starter" and cfg.image_size == 64 and cfg.crop_size == 32
        assert line.startswith("fine-tuning the starter model fundus-starter (lesion classes "
                               "MA, HE, EX, SE, as this project's; holdout Dice EX 0.50) at "
                               "64 px, crops of 32 px")
    else:
        assert cfg.init_from is None
        why = ("no starter model is installed" if installed == "none" else
               "no starter model predicts the classes MA, HE, EX, SE (fundus-starter predicts x)")
        assert line == f"training from scratch: {why}"
    ws.shutdown()
