"""Inference: loading checkpoints safely, outputs at image size, scores, gating, cross-project."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training_backend.errors import InputError
from training_backend.events import Finished
from training_backend.learning.inference import (check_compatible, iter_predictions, load_model,
                                        predict_image, predict_project, resolve_checkpoint)
from training_backend.learning.methods.base import gate_evidence, gate_probs
from training_backend.learning.models import ModelConfig
from training_backend.project.store import Project
from training_backend.learning.trainer import TrainConfig, train

SCORE_KEYS = {"presence", "image_class", "lesion_frac", "entropy", "entropy_lesion", "bald", "tta_var",
              "cam_disagreement", "burden_disagreement", "uncertainty_mean",
              "segmentation_presence", "gate_evidence", "disagreement"}
PER_CLASS_KEYS = {"presence", "segmentation_presence", "gate_evidence"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(project, checkpoint path) of a tiny model trained once for this module."""
    from conftest import make_tiny_project

    project = make_tiny_project(tmp_path_factory.mktemp("inf") / "tiny")
    cfg = TrainConfig(steps=40, batch_size=4, image_size=32, lr=3e-3, threads=1, predict=False,
                      model=ModelConfig(base=8, depth=3), model_id="m", validate_every=1000)
    fin = train(project.path, cfg)
    assert isinstance(fin, Finished)
    return project, project.path / "models" / "m" / "latest.pt"


def test_load_model_uses_weights_only_and_restores_the_config(trained):
    project, ckpt = trained
    method, cfg = load_model(ckpt, "cpu")
    assert cfg.image_size == 32 and cfg.model.base == 8 and not method.training
    assert resolve_checkpoint(project, "m") == ckpt
    assert resolve_checkpoint(project, ckpt.parent) == ckpt
    with pytest.raises(InputError, match="no such checkpoint"):
        resolve_checkpoint(project, "nope")
    evil = ckpt.parent / "evil.pt"
    torch.save({"model": {}, "meta": {}, "x": np.dtype("float32")}, evil)  # not plain types
    with pytest.raises(InputError, match="evil.pt"):
        load_model(evil)


def test_predict_image_outputs_and_scores(trained):
    project, ckpt = trained
    method, cfg = load_model(ckpt)
    image = np.pad(project.read_image("c000001")[4:44], ((0, 0), (4, 4)), mode="edge")  # (40, 56)
    out = predict_image(method, image, 1, 32, mc_samples=3, image_classes=["normal", "abnormal"])
    assert out["pred"].shape == (40, 56) and out["pred"].dtype == np.uint8
    assert out["prob"].shape == (2, 40, 56) and out["prob"].dtype == np.float16
    np.testing.assert_allclose(out["prob"].astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert out["cam"].shape == (1, 40, 56) and 0 <= out["cam"].min() and out["cam"].max() <= 1
    assert out["uncertainty"].shape == (40, 56) and out["features"].dtype == np.float32
    scores = out["scores"]
    assert set(scores) == SCORE_KEYS and set(scores["image_class"]) == {"normal", "abnormal"}
    for key in SCORE_KEYS - PER_CLASS_KEYS - {"image_class"}:
        assert math.isfinite(scores[key]) and scores[key] >= 0, key
    for key in PER_CLASS_KEYS:
        assert len(scores[key]) == 1 and 0 <= scores[key][0] <= 1, key
    # the default gate reads the presence head alone
    assert scores["gate_evidence"] == pytest.approx(scores["presence"], abs=1e-6)
    assert scores["lesion_frac"] == pytest.approx(float((out["pred"] > 0).mean()))
    single = predict_image(method, image, 1, 32, mc_samples=1)
    assert single["scores"]["bald"] == 0.0 and single["scores"]["uncertainty_mean"] > 0
    assert scores["disagreement"] == 0.0  # a method without an uncertainty of its own
    window = predict_image(method, image, 1, 32, mc_samples=2, working_size=64)  # sliding window
    assert window["prob"].shape == (2, 40, 56) and set(window["scores"]) == SCORE_KEYS
    rgb = predict_image(method, np.stack([image] * 3, -1), 1, 32, mc_samples=1)  # RGB → grey model
    assert rgb["pred"].shape == (40, 56)


def test_a_methods_own_uncertainty_is_stored_and_scored(trained):
    """A method that predicts an uncertainty of its own (two sub-models disagreeing): the stored
    map is that one (flip-averaged, at the image's size), its mean the `disagreement` score, on
    the plain and the sliding-window path alike."""
    from dataclasses import replace

    project, ckpt = trained
    method, _ = load_model(ckpt)
    plain = method.prediction_from_output

    def with_own(out, size):  # left half 0.2, right half 0.6
        pred = plain(out, size)
        own = torch.full(pred.probs[:, 0].shape, 0.2)  # (B, H, W)
        own[..., size[1] // 2:] = 0.6
        return replace(pred, uncertainty=own)

    method.prediction_from_output = with_own
    image = project.read_image("c000001")[:32, :32]
    out = predict_image(method, image, 1, 32, mc_samples=2)
    # flip averaging: each column sees 0.2 and 0.6 once -> 0.4 everywhere
    np.testing.assert_allclose(out["uncertainty"].astype(np.float32), 0.4, atol=0.01)
    assert out["scores"]["disagreement"] == pytest.approx(0.4, abs=0.01)
    assert out["scores"]["uncertainty_mean"] == pytest.approx(0.4, abs=0.01)
    # sliding window (32 px windows on a 64 px working image): stitched window maps
    window = predict_image(method, image, 1, 32, mc_samples=2, working_size=64)
    unc = window["uncertainty"].astype(np.float32)
    assert unc.shape == (32, 32) and 0.19 <= unc.min() and unc.max() <= 0.61
    assert window["scores"]["disagreement"] == pytest.approx(0.4, abs=0.05)


def test_gate_probs_moves_absent_classes_to_background():
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])[..., None, None].expand(2, 3, 2, 2)
    presence = torch.tensor([[0.9, 0.2], [0.1, 0.8]])
    gated = gate_probs(probs, presence, 0.5)  # (2, 3, 2, 2)
    assert torch.allclose(gated.sum(1), torch.ones(2, 2, 2))
    assert gated[0, :, 0, 0].tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert gated[1, :, 0, 0].tolist() == pytest.approx([0.2, 0.0, 0.8])
    assert torch.equal(gate_probs(probs, presence, 0.0), probs)


def test_gate_evidence_combines_presence_and_segmentation():
    probs = torch.tensor([[[[0.64, 0.1]], [[0.36, 0.9]]],           # image 0: strongest 0.9
                          [[[0.99, 0.96]], [[0.01, 0.04]]]])        # image 1: strongest 0.04
    presence = torch.tensor([[0.4], [0.81]])
    assert torch.equal(gate_evidence(probs, presence, use_segmentation=False), presence)
    both = gate_evidence(probs, presence, use_segmentation=True)    # sqrt(presence * strongest)
    assert both[:, 0].tolist() == pytest.approx([0.6, 0.18])        # sqrt(.36), sqrt(.0324)
    # image 0 survives a 0.5 gate only with the segmenter's evidence, image 1 only without
    assert (both >= 0.5)[:, 0].tolist() == [True, False]
    assert (presence >= 0.5)[:, 0].tolist() == [False, True]


def test_prediction_is_gated_once_on_the_pooled_presence(trained):
    """A lesion-free call by the classifier empties the mask and fades the CAM."""
    method, _ = load_model(trained[1], "cpu")
    image = np.random.default_rng(1).integers(0, 255, (40, 56)).astype(np.uint8)
    method.options["gate_threshold"] = 1.01  # every class below: gated away
    torch.manual_seed(0)  # the same MC-dropout masks in both predictions
    gated = predict_image(method, image, 1, 32, mc_samples=2)
    method.options["gate_threshold"] = 0.0
    torch.manual_seed(0)
    open_ = predict_image(method, image, 1, 32, mc_samples=2)
    assert (gated["pred"] == 0).all() and gated["scores"]["lesion_frac"] == 0.0
    assert np.allclose(gated["prob"][0], 1.0, atol=1e-3)
    pres = open_["scores"]["presence"][0]
    assert float(gated["cam"].max()) <= pres + 1e-2  # CAM weighted by presence
    assert gated["scores"]["burden_disagreement"] == pytest.approx(
        open_["scores"]["burden_disagreement"], abs=1e-3)  # measured before gating


def test_model_predicts_another_project_with_the_same_classes(trained, tiny_project_factory):
    _, ckpt = trained
    other = tiny_project_factory("other", layout=("none", "none"), n_holdout=0, size=40, seed=3)
    done = predict_project(other, str(ckpt), mc_samples=2, device="cpu")
    assert done == other.case_ids()
    again = Project.open(other.path)
    out = again.read_outputs(done[0])
    assert out.model_id == "m" and out.pred.shape == (40, 40) and set(out.scores) == SCORE_KEYS
    progress = list(iter_predictions(again, str(ckpt), case_ids=[done[1]], mc_samples=1, device="cpu"))
    assert [(p.index, p.total, p.case_id) for p in progress] == [(1, 1, done[1])]

    two = tiny_project_factory("two", layout=("none",), n_holdout=0, classes=("MA", "HE"))
    with pytest.raises(InputError, match="lesion class"):
        predict_project(two, str(ckpt), device="cpu")
    meta = torch.load(ckpt, weights_only=True)["meta"]
    check_compatible(other, meta, ckpt)  # same single class: fine


@pytest.mark.parametrize("channels", [2, 3, 5, 9, 17])
def test_argmax_channels_matches_torch_max_and_breaks_ties_low(channels):
    """The packed-integer argmax picks what torch.max picks, ties (uniform maps) included."""
    from training_backend.learning.inference import _argmax_channels

    g = torch.Generator().manual_seed(channels)
    probs = torch.softmax(3 * torch.randn(1, channels, 24, 40, generator=g), 1)
    probs[..., :4, :] = 1.0 / channels  # uniform rows: every channel ties
    probs[..., 4, :] = 0.0
    probs[..., 4, ::3] = 0.5  # ties between channel 0 and others at value 0.5
    layouts = [probs[0], probs.contiguous(memory_format=torch.channels_last)[0]]
    for p in layouts:
        got = _argmax_channels(p)
        want = torch.max(p, 0).indices
        assert got.dtype == torch.uint8 and got.shape == (24, 40)
        if channels == 2:  # the comparison: a tie between two goes to the background, 0
            want = (p[1] > p[0]).to(torch.int64)
        assert torch.equal(got.long(), want), channels
