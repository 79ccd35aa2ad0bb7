"""The shared training loop and the data snapshot, in-process on the tiny project."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training_backend.learning.data import (Preprocessor, build_training_set, project_channels, resize_target,
                                   select_validation)
from training_backend.errors import InputError
from training_backend.events import (CheckpointSaved, PredictionProgress, ValidationFolded, Failed, Finished, Loss, PredictionsReady,
                                     Progress, RoundFinished, Started, Validation)
from training_backend.learning.methods import METHODS
from training_backend.learning.models import ModelConfig
from training_backend.project.store import BACKGROUND, Project
from training_backend.learning.trainer import TrainConfig, lr_factor, run_training, train

TINY_MODEL = ModelConfig(base=4, depth=2, cam_levels=2)


def tiny_config(**kw) -> TrainConfig:
    base = dict(steps=6, batch_size=2, image_size=32, model=TINY_MODEL, threads=1,
                validate_every=3, mc_samples=2, predict=False)
    base.update(kw)
    return TrainConfig(**base)


def collect(project_path, config, **kw) -> list:
    """All events of a run; a Failed event can only be the last one."""
    events = list(run_training(project_path, config, **kw))
    assert not any(isinstance(e, Failed) for e in events[:-1])
    return events


# ----------------------------------------------------------------------------- config
def test_train_config_json_roundtrip_and_checks():
    cfg = TrainConfig(method="mean_teacher", method_options={"ema": 0.9}, steps=10,
                      model=ModelConfig(base=8), init_from="x.pt", model_id="m1")
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.model, ModelConfig)
    assert TrainConfig.from_dict({**cfg.to_dict(), "from_the_future": 1}) == cfg
    assert TrainConfig().budget == 300.0 and TrainConfig(steps=5).budget is None
    for bad in ({"steps": 0}, {"lr": -1.0}, {"batch_size": 0}, {"rounds": 0},
                {"model_id": "a/b"}, {"image_size": 8}, {"crop_size": 8},
                {"image_size": 64, "crop_size": 96}, {"crop_size": 40.5}):
        with pytest.raises(InputError):
            TrainConfig(**bad)


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0, 0.0, 10) == pytest.approx(0.1)
    assert lr_factor(9, 0.1, 10) > lr_factor(0, 0.0, 10)
    assert lr_factor(100, 0.5, 10) > lr_factor(100, 0.9, 10) > lr_factor(100, 1.0, 10) == pytest.approx(0.05)


# ----------------------------------------------------------------------------- data
def test_training_set_snapshot_groups(tiny_project):
    ts = build_training_set(tiny_project, 32, METHODS["supervised"].supervision)
    ids = set(ts.case_ids)
    assert not ids & {"c000009", "c000010"}  # holdout never read
    assert ts.val.numel() == 1 and ts.full[ts.val].all()  # 1 of the 4 full cases validates
    val_id = ts.case_ids[int(ts.val[0])]
    assert val_id in {"c000001", "c000002", "c000003", "c000004"}
    assert select_validation(["c000001", "c000002", "c000003", "c000004"]) == [val_id]
    many = [f"c{i:06d}" for i in range(1, 401)]
    assert len(select_validation(many)) == 20  # capped: the other full masks train
    assert len(select_validation(many[:100])) == 15 and select_validation(many[:3]) == []
    assert ts.unlabelled.numel() == 0  # supervised does not use unlabelled images
    assert ts.labelled.numel() == 6 and ts.n_val == 1
    assert ts.images.shape == (7, 1, 32, 32) and ts.targets.shape == (7, 32, 32)
    assert ts.label_probs.sum() == pytest.approx(1.0)
    assert ts.counts == {"full": 3, "sparse": 1, "image_label": 5, "unlabelled": 1, "maskless": 3}
    # negative image: presence 0, image class 0 (normal); sparse case: some pixels ignored
    neg = ts.case_ids.index("c000007")
    assert ts.presence[neg].tolist() == [0.0] and int(ts.image_class[neg]) == 0
    sp = ts.case_ids.index("c000005")
    assert ts.has_mask[sp] and not ts.full[sp] and (ts.targets[sp] == -1).any()
    assert set(ts.targets[sp].unique().tolist()) == {-1, 0, 1}

    mt = build_training_set(tiny_project, 32, METHODS["mean_teacher"].supervision)
    # every maskless case is unlabelled for segmentation, image label or not (c000006/7 have
    # one, which still trains the presence and class heads as labelled cases)
    assert [mt.case_ids[int(i)] for i in mt.unlabelled] == ["c000006", "c000007", "c000008"]
    assert {"c000006", "c000007"} <= {mt.case_ids[int(i)] for i in mt.labelled}
    assert mt.counts["unlabelled"] == 1
    assert mt.n_train == 7  # the 7 non-validation training cases, each counted once
    batch = mt.sample(3, torch.Generator().manual_seed(0), unlabelled_size=2)
    assert batch.image.shape == (3, 1, 32, 32) and batch.unlabelled.shape == (2, 1, 32, 32)
    assert batch.target.dtype == torch.int64 and batch.presence.shape == (3, 1)

    cam = build_training_set(tiny_project, 32, METHODS["cam"].supervision)
    assert cam.presence[cam.labelled].ne(-1).all()  # only cases with image-level information


def test_resize_target_keeps_scribbles_and_majority():
    t = np.full((64, 64), -1, np.int64)
    t[10, 5:60] = 1  # a one-pixel scribble
    t[40:44, 40:44] = 0
    small = resize_target(t, 16)
    assert (small == 1).sum() >= 10 and (small == 0).sum() >= 1 and (small == -1).sum() > 200
    full = np.zeros((64, 64), np.int64)
    full[:32] = 1
    assert (resize_target(full, 16)[:8] == 1).all() and (resize_target(full, 16)[8:] == 0).all()


def test_augmentation_flips_image_and_target_together():
    from training_backend.learning.data import augment_batch

    target = torch.zeros(64, 8, 8, dtype=torch.int64)
    target[:, 1:3, 0:2] = 1  # a corner blob, flips move it to other corners
    image = (target.float() * 4.0)[:, None].repeat(1, 2, 1, 1)  # (64, 2, 8, 8)
    aug, tgt = augment_batch(image, target, torch.Generator().manual_seed(1), affine=False)
    assert ((aug > 2.0) == (tgt == 1)[:, None]).all()
    assert len({tuple(t.nonzero()[0].tolist()) for t in tgt}) == 4  # all four flip combinations
    assert not torch.equal(aug, image)


def test_affine_augmentation_moves_image_and_target_together():
    from training_backend.learning.data import random_affine

    target = torch.full((16, 32, 32), -1, dtype=torch.int64)  # unlabelled ...
    target[:, 4:28, 4:28] = 0  # ... around a labelled background square ...
    target[:, 8:16, 10:20] = 1  # ... holding an off-centre lesion
    image = (target.float() + 1.0)[:, None]  # (16, 1, 32, 32): 0 unlabelled, 1 bg, 2 lesion
    aug, tgt = random_affine(image, target, torch.Generator().manual_seed(0))
    assert set(tgt.unique().tolist()) <= {-1, 0, 1}  # nearest: no new label values
    agree = (aug[:, 0].round() - 1 == tgt.float()).float().mean()
    assert agree > 0.97  # the same geometry (bilinear vs nearest differ only on edges)
    moved = (tgt != target).flatten(1).any(1)
    assert moved.all()  # every image got its own transform
    assert len({tuple((t == 1).nonzero().float().mean(0).round().tolist()) for t in tgt}) > 8


def _crop_batch_input():
    """Four 32² cases: a full mask with class 1 in the top-left corner and class 2 in the
    bottom-right one; a sparse mask with one class-1 stroke; a lesion-free image; a full mask."""
    from training_backend.learning.contract import Batch

    target = torch.zeros(4, 32, 32, dtype=torch.int64)
    target[0, 0:2, 0:2] = 1
    target[0, 30:32, 30:32] = 2
    target[1] = -1
    target[1, 2, 2:6] = 1  # a stroke of class 1, the rest unlabelled
    target[3, 10:12, 10:12] = 1
    image = target.float()[:, None].clone()  # the image shows its target, so crops can be compared
    presence = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.0, 0.0], [1.0, 0.0]])
    return Batch(image=image, target=target, has_mask=torch.tensor([True, True, False, True]),
                 full=torch.tensor([True, False, False, True]),
                 image_class=torch.tensor([2, 1, 0, 1]), presence=presence,
                 unlabelled=torch.zeros(3, 1, 32, 32))


def test_crops_follow_what_they_show():
    from training_backend.learning.data import crop_batch

    seen_both = set()
    for seed in range(40):
        b = crop_batch(_crop_batch_input(), 8, torch.Generator().manual_seed(seed))
        assert b.image.shape == (4, 1, 8, 8) and b.target.shape == (4, 8, 8)
        assert b.unlabelled.shape == (3, 1, 8, 8)
        assert torch.equal(b.image[:, 0], b.target.float())  # image and target cut alike
        assert (b.image_class == -1).all()  # a crop need not show what the image was graded by
        # full masks: presence is exactly what the crop shows
        for i in (0, 3):
            shown = [bool((b.target[i] == k).any()) for k in (1, 2)]
            assert b.presence[i].tolist() == [float(v) for v in shown]
        seen_both.add(tuple(b.presence[0].tolist()))
        # sparse mask: the stroke keeps "present", otherwise unknown; unknown stays unknown
        stroke = bool((b.target[1] == 1).any())
        assert b.presence[1].tolist() == [1.0 if stroke else -1.0, -1.0]
        assert bool(b.has_mask[1]) == bool((b.target[1] >= 0).any())
        assert b.presence[2].tolist() == [0.0, 0.0]  # a lesion-free image stays lesion-free
    # the two lesions lie in opposite corners: a crop shows one or the other, never both
    assert seen_both == {(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)}


def test_half_the_crops_of_a_lesion_case_hold_a_lesion():
    from training_backend.learning.data import CROP_LESION_SHARE, crop_batch

    hits = 0
    n = 400
    for seed in range(n // 4):
        b = crop_batch(_crop_batch_input(), 8, torch.Generator().manual_seed(1000 + seed))
        hits += int((b.target[3] == 1).any())  # a 2×2 lesion: a uniform 8² crop shows it
    # lesion-centred crops always show it; a uniform crop does when its corner (25 positions
    # per axis) lies in 4..10 on both axes (rows/cols 10-11 inside): (7/25)² ≈ 0.08
    uniform = (7 / 25) ** 2
    expected = CROP_LESION_SHARE + (1 - CROP_LESION_SHARE) * uniform
    assert abs(hits / (n // 4) - expected) < 0.12


def test_training_on_crops_runs_and_predicts_whole_images(tiny_project):
    events = collect(tiny_project.path, tiny_config(steps=4, image_size=32, crop_size=16,
                                                   predict=True, model_id="crops"))
    assert isinstance(events[-1], Finished) and events[-1].step == 4
    ready = [e for e in events if isinstance(e, PredictionsReady)]
    assert ready
    project = Project.open(tiny_project.path)
    case = next(iter(project.cases()))
    out = project.read_outputs(case.id)
    assert out.model_id == "crops" and out.pred.shape == project.read_image(case.id).shape[:2]


def test_mixed_grey_and_rgb_follow_the_majority(tiny_project_factory):
    project = tiny_project_factory(rgb_cases=[0, 5])
    assert project.case("c000001").channels == 3 and project_channels(project) == 1
    ts = build_training_set(project, 32)
    assert ts.images.shape[1] == 1 and torch.isfinite(ts.images).all()
    mostly_rgb = tiny_project_factory("rgb", rgb_cases=range(7))
    assert project_channels(mostly_rgb) == 3
    pre = Preprocessor(32, 3)
    assert pre.image(mostly_rgb, mostly_rgb.case("c000008")).shape == (3, 32, 32)  # grey → RGB


def test_snapshot_reads_only_listed_annotation_versions(tiny_project):
    pre = Preprocessor(32, 1)
    rec = tiny_project.case("c000001")  # snapshot record (version 1)
    mask, _ = tiny_project.read_annotation("c000001")
    other = Project.open(tiny_project.path)
    other.save_annotation("c000001", np.zeros_like(mask), "full")  # another process saves v2
    t1, _ = pre.target(tiny_project, rec)
    assert (t1 == 1).any()  # still version 1: the record says so
    tiny_project.refresh()
    t2, pres = pre.target(tiny_project, tiny_project.case("c000001"))
    assert not (t2 == 1).any() and pres == [0]


# ----------------------------------------------------------------------------- the loop
def test_tiny_training_events_checkpoint_and_predictions(tiny_project):
    cfg = tiny_config(steps=6, predict=True, checkpoint_every_s=1e-3,
                      predict_first=["c000009", "nope", "c000002"])
    events = collect(tiny_project.path, cfg)
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished), events[-1]
    start, fin = events[0], events[-1]
    assert (start.n_train, start.n_val, start.total_steps) == (6, 1, 6)
    assert fin.reason == "steps" and fin.step == 6 and fin.model_id == start.model_id
    progress = [e for e in events if isinstance(e, Progress)]
    steps = [p.step for p in progress]
    assert steps == sorted(set(steps)) and steps[-1] == 6 and progress[-1].fraction == 1.0
    losses = [e for e in events if isinstance(e, Loss)]
    assert losses and all(np.isfinite(v) for e in losses for v in e.values.values())
    assert "loss" in losses[-1].values
    vals = [e for e in events if isinstance(e, Validation)]
    # validated every 3 steps until the validation case joins the training for the last 25 %
    # (from step 5 of 6); that last score is the run's, measured before it was trained on
    assert [v.step for v in vals] == [3, 5] and set(vals[-1].per_class) == {"lesion"}
    folded = [e for e in events if isinstance(e, ValidationFolded)]
    assert [(f.step, f.n_cases, f.dice) for f in folded] == [(5, 1, vals[-1].dice)]
    assert events.index(vals[-1]) < events.index(folded[0])
    ckpts = [e for e in events if isinstance(e, CheckpointSaved)]
    assert len(ckpts) >= 2 and ckpts[-1].step == 6
    assert sum(isinstance(e, RoundFinished) for e in events) == 1
    # predictions: the asked-for cases first (an unknown id is ignored), the first one announced
    # alone at once, every case exactly once, with progress after each announcement
    ready = [e for e in events if isinstance(e, PredictionsReady)]
    order = [c for e in ready for c in e.case_ids]
    assert ready[0].case_ids == ("c000009",) and order[:2] == ["c000009", "c000002"]
    assert sorted(order) == sorted(tiny_project.case_ids())
    progress_p = [e for e in events if isinstance(e, PredictionProgress)]
    assert len(progress_p) == len(ready) and progress_p[0].done == 1
    assert (progress_p[-1].done, progress_p[-1].total) == (10, 10)
    assert events.index(ready[0]) < events.index(progress_p[0])

    mdir = tiny_project.path / "models" / start.model_id
    ckpt = torch.load(mdir / "latest.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["meta"]["in_channels"] == 1 and ckpt["meta"]["classes"] == ["lesion"]
    assert set(ckpt) >= {"model", "optimizer", "rng", "elapsed_s", "meta"}
    assert json.loads((mdir / "config.json").read_text())["steps"] == 6
    assert len(list(mdir.glob("step_*.pt"))) <= 3

    tiny_project.refresh()
    info = tiny_project.models()[start.model_id]
    assert info["step"] == 6 and info["method"] == "supervised" and info["status"] == "finished"
    assert info["n_val"] == 1 and info["metrics"]["val_step"] == 5 and info["metrics"]["val_folded"]
    assert info["metrics"]["val_dice"] == vals[-1].dice
    assert ckpt["folded"] and ckpt["validation"]["step"] == 5
    out = tiny_project.read_outputs("c000009")
    assert out.model_id == start.model_id and out.pred.shape == (48, 48) and out.prob.shape == (2, 48, 48)
    assert out.cam.shape == (1, 48, 48) and out.uncertainty.shape == (48, 48) and out.features.ndim == 1
    assert set(out.scores) >= {"presence", "image_class", "lesion_frac", "entropy", "entropy_lesion",
                               "bald", "tta_var", "cam_disagreement", "burden_disagreement",
                               "uncertainty_mean"}
    # annotations untouched by training
    assert [a.version for a in tiny_project.case("c000001").annotations] == [1]


def test_without_folding_validation_runs_to_the_end(tiny_project):
    events = collect(tiny_project.path, tiny_config(steps=6, predict=False, fold_validation=0.0))
    assert [e.step for e in events if isinstance(e, Validation)] == [3, 6]
    assert not any(isinstance(e, ValidationFolded) for e in events)


def test_rounds_after_the_fold_report_no_stale_dice(tiny_project):
    """rounds=4 over 8 steps, the validation cases join at step 6 (the last boundary): rounds
    1-3 end with a Dice measured in them; round 4 ends with None, not the Dice of round 3."""
    events = collect(tiny_project.path, tiny_config(steps=8, rounds=4, predict=False,
                                                    validate_every=100))
    rounds = [e for e in events if isinstance(e, RoundFinished)]
    assert [r.round for r in rounds] == [1, 2, 3, 4]
    assert all(r.dice is not None for r in rounds[:3]) and rounds[3].dice is None
    assert [e.step for e in events if isinstance(e, ValidationFolded)] == [6]


def test_folded_training_set_trains_on_the_validation_cases(tiny_project):
    held = build_training_set(tiny_project, 32, seed=0)
    folded = build_training_set(tiny_project, 32, seed=0, validation=False)
    val_ids = {held.case_ids[i] for i in held.val.tolist()}
    assert val_ids and folded.n_val == 0
    trained = {folded.case_ids[i] for i in folded.labelled.tolist()}
    assert val_ids <= trained
    assert folded.labelled.numel() == held.labelled.numel() + len(val_ids)


def _weights(project, model_id):
    return torch.load(project.path / "models" / model_id / "latest.pt", weights_only=True)["model"]


@pytest.mark.parametrize("method", ["supervised", "mean_teacher", "caml", "crii", "dual_unet",
                                    "collaborative", "mcwss", "cam"])
def test_cancel_then_resume_matches_an_uninterrupted_run(tiny_project, method):
    """Every method: a run stopped after 3 of 8 steps and resumed ends with the weights (and
    buffers: teachers, snapshots, memory banks) of a run that was never stopped."""
    polls = []

    def cancel():  # polled once before every step: True at the 4th poll = after 3 steps
        polls.append(1)
        return len(polls) > 3

    events = collect(tiny_project.path, tiny_config(steps=8, model_id="a", method=method),
                     cancel=cancel)
    assert isinstance(events[-1], Finished) and events[-1].reason == "cancelled"
    stopped_at = events[-1].step
    assert stopped_at == 3 and not any(isinstance(e, PredictionsReady) for e in events)
    tiny_project.refresh()
    assert tiny_project.models()["a"]["status"] == "cancelled"

    resumed = collect(tiny_project.path, TrainConfig(model_id="a", threads=1), resume=True)
    assert resumed[0].start_step == stopped_at and resumed[0].total_steps == 8
    assert isinstance(resumed[-1], Finished) and (resumed[-1].step, resumed[-1].reason) == (8, "steps")

    straight = collect(tiny_project.path, tiny_config(steps=8, model_id="b", method=method))
    assert isinstance(straight[-1], Finished)
    wa, wb = _weights(tiny_project, "a"), _weights(tiny_project, "b")
    for key in wb:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-6, msg=key)


def test_rounds_pick_up_new_annotations(tiny_project):
    other = Project.open(tiny_project.path)  # "the GUI"
    rounds = []
    for e in run_training(tiny_project.path, tiny_config(steps=6, rounds=2, validate_every=100)):
        if isinstance(e, RoundFinished):
            rounds.append(e)
            if e.round == 1:  # a clinician scribbles on an unlabelled case while training runs
                ref = other.read_reference("c000008")
                scribble = np.where(ref > 0, ref, 0).astype(np.uint8)
                scribble[:3] = np.where(ref[:3] == 0, BACKGROUND, scribble[:3])
                other.save_annotation("c000008", scribble, "sparse")
        assert not isinstance(e, Failed), e.traceback
    assert [r.round for r in rounds] == [1, 2]
    # 6 training cases + 1 validation case, then the new scribble
    assert rounds[0].n_annotations == 7 and rounds[1].n_annotations == 8


def test_budget_mode_and_fine_tuning(tiny_project):
    events = collect(tiny_project.path, tiny_config(steps=None, budget_s=0.5, model_id="budget"))
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.reason == "budget" and fin.step >= 1
    assert events[0].budget_s == 0.5 and events[0].total_steps is None
    tuned = collect(tiny_project.path, tiny_config(steps=2, init_from="budget", model_id="tuned"))
    assert isinstance(tuned[-1], Finished) and tuned[-1].step == 2


def test_user_errors_end_with_one_failed_event(tiny_project_factory, tiny_project):
    labels_only = tiny_project_factory("labels", layout=("label", "negative", "label"))
    events = collect(labels_only.path, tiny_config())
    assert len(events) == 1 and isinstance(events[0], Failed) and events[0].user_error
    assert "supervised" in events[0].message and "full masks" in events[0].message
    cam = collect(labels_only.path, tiny_config(method="cam", steps=4, model_id="cam"))
    assert isinstance(cam[-1], Finished)
    # fine-tuning a cam model takes a new snapshot of the classifier at its own warmup
    tuned = collect(labels_only.path, tiny_config(method="cam", steps=4, model_id="cam2", init_from="cam"))
    assert isinstance(tuned[-1], Finished)
    first, second = (torch.load(labels_only.path / "models" / m / "latest.pt", weights_only=True)["model"]
                     for m in ("cam", "cam2"))
    assert int(first["snapshot_step"]) >= 0 and int(second["snapshot_step"]) >= 0
    key = next(k for k in first if k.startswith("snapshot.") and k.endswith("weight"))
    assert not torch.equal(first[key], second[key])

    bad = collect(tiny_project.path, tiny_config(method="nope"))
    assert isinstance(bad[-1], Failed) and "nope" in bad[-1].message and "supervised" in bad[-1].message
    assert isinstance(collect(tiny_project.path, tiny_config(model_id="x", steps=1))[-1], Finished)
    again = collect(tiny_project.path, tiny_config(model_id="x", steps=1))
    assert isinstance(again[-1], Failed) and "--resume" in again[-1].message
    nothing = collect(tiny_project.path, TrainConfig(model_id="missing"), resume=True)
    assert isinstance(nothing[-1], Failed) and nothing[-1].user_error
    with pytest.raises(Exception, match="no checkpoint"):
        train(tiny_project.path, TrainConfig(model_id="missing"), resume=True)


def test_sparse_background_scribbles_become_background_targets(tiny_project):
    rec = tiny_project.case("c000005")
    mask, av = tiny_project.read_annotation(rec.id)
    assert av.kind == "sparse" and (mask == BACKGROUND).any()
    tgt, _ = Preprocessor(48, 1).target(tiny_project, rec)
    assert ((tgt == 0) == torch.from_numpy(mask == BACKGROUND)).all()
