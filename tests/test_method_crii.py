"""``crii``: every loss term on hand-worked inputs, the patch sampling, and the method's mechanics
(coarse/refined network, stable targets under CutMix, skipped unlabelled passes, EMA teacher,
uncertainty)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_methods_contract import SIZE, build, make_batch
from test_methods_contract import test_method_contract as check_contract
from training_backend.errors import InputError
from training_backend.learning.methods import crii
from training_backend.learning.methods.crii import (
    coarse_refined_agreement,
    disagreement,
    grid_means,
    grid_patches,
    inter_patch_ranked_loss,
    intra_patch_ranked_loss,
    patch_labels,
    pick_tiles,
    pseudo_label_ce,
    stable_pseudo_labels,
    straddling_patches,
)

R2 = 1 / math.sqrt(2)


# --------------------------------------------------------------------------- ranked losses
def test_intra_patch_ranked_loss_by_hand():
    # patch 0: lesion pixels a=(1,0), b=(0,1); background c=d=(0,1); one unlabelled pixel.
    #   p_lesion = normalise((0.5, 0.5)) = (1/√2, 1/√2); p_background = (0, 1)
    #   a: own 1/√2, other 0 -> max(0, 0.5 - 0.7071 + 0) = 0
    #   b: own 1/√2, other 1 -> 0.5 - 0.7071 + 1 = 0.7929        lesion mean 0.39645
    #   c, d: own 1, other 1/√2 -> 0.5 - 1 + 0.7071 = 0.2071     background mean 0.20711
    #   patch 0: (0.39645 + 0.20711) / 2 = 0.30178
    # patch 1: background only -> no pair, ignored
    emb = torch.tensor([[[1.0, 0.0, 0.0, 0.0, 0.6],
                         [0.0, 1.0, 1.0, 1.0, 0.8]],
                        [[1.0, 0.0, 1.0, 0.0, 0.0],
                         [0.0, 1.0, 0.0, 1.0, 1.0]]], requires_grad=True)  # (N=2, D=2, 5)
    labels = torch.tensor([[1, 1, 0, 0, -1], [0, 0, 0, 0, 0]])
    loss = intra_patch_ranked_loss(emb, labels, n_cls=2, margin=0.5)
    expected = ((1.5 - R2) / 2 + (R2 - 0.5)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.30178, abs=1e-5)
    loss.backward()
    assert torch.all(emb.grad[:, :, 4] == 0) and torch.all(emb.grad[1] == 0)  # ignored pixel, patch
    # a class needs min_pixels in the patch: 2 lesion pixels < 3 -> no usable patch
    assert intra_patch_ranked_loss(emb, labels, n_cls=2, margin=0.5, min_pixels=3) is None
    # well separated features: nothing to rank
    sep = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]])
    assert intra_patch_ranked_loss(sep, labels[:1, :4], 2, 0.5).item() == 0.0


def test_intra_patch_ranked_loss_three_classes():
    # one pixel per class: pixel 0 (class 0) = (1,0,0), pixels 1 and 2 (classes 1, 2) both
    # (0,1,0), so p0 = (1,0,0), p1 = p2 = (0,1,0). Pixel 0: own 1, others 0, 0 -> 0.
    # Pixel 1: own 1, vs p0: max(0, 0.5 - 1 + 0) = 0, vs p2: 0.5 - 1 + 1 = 0.5 -> mean 0.25;
    # pixel 2 likewise 0.25. Per (patch, class): 0, 0.25, 0.25 -> mean 1/6.
    emb = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])  # (1, 3, 3)
    labels = torch.tensor([[0, 1, 2]])
    assert intra_patch_ranked_loss(emb, labels, 3, 0.5).item() == pytest.approx(1 / 6)


def test_inter_patch_ranked_loss_by_hand():
    # lesion patches (1,0), (0.6,0.8); background (0,1), (0.8,0.6)
    # g = normalise((0.8, 0.4)) = (0.894427, 0.447214)
    # s(lesion) = 0.894427 for both; s((0,1)) = 0.447214; s((0.8,0.6)) = 0.983870
    # pairs: 0.5 - 0.894427 + 0.447214 = 0.052786 (twice), 0.5 - 0.894427 + 0.983870 = 0.589443
    feats = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    labels = torch.tensor([1, 1, 0, 0])
    all_pairs = inter_patch_ranked_loss(feats, labels, 0.5, hard=1.0)
    assert all_pairs.item() == pytest.approx((0.052786 + 0.589443) / 2, abs=1e-5)
    # the hardest half (2 of 4 pairs) and the hardest quarter (1 pair): the lesion-like background
    assert inter_patch_ranked_loss(feats, labels, 0.5, hard=0.5).item() == pytest.approx(0.589443, abs=1e-5)
    assert inter_patch_ranked_loss(feats, labels, 0.5, hard=0.25).item() == pytest.approx(0.589443, abs=1e-5)
    # no lesion patch, or no other patch: nothing to rank
    assert inter_patch_ranked_loss(feats, torch.zeros(4, dtype=torch.long), 0.5) is None
    assert inter_patch_ranked_loss(feats, torch.ones(4, dtype=torch.long), 0.5) is None
    # two lesion classes, each against all other patches with its own prototype:
    # class 1: g = (1,0); negatives (0,1), (0.8,0.6), (0.6,0.8) have s = 0, 0.8, 0.6 ->
    #   pairs max(0, 0.5 - 1 + s) = 0, 0.3, 0.1 -> mean 0.13333
    # class 2: g = (0,1); negatives (1,0), (0.8,0.6), (0.6,0.8) have s = 0, 0.6, 0.8 ->
    #   pairs 0, 0.1, 0.3 -> mean 0.13333; the mean over the classes: 0.13333
    feats2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    labels2 = torch.tensor([1, 2, 0, 0])
    assert inter_patch_ranked_loss(feats2, labels2, 0.5).item() == pytest.approx(0.4 / 3, abs=1e-6)


# --------------------------------------------------------------------------- consistency
def test_stable_targets_and_their_ce_by_hand():
    refined = torch.zeros(1, 2, 2, 2)
    refined[0, 1] = torch.tensor([[0.95, 0.6], [0.02, 0.97]])
    refined[0, 0] = 1 - refined[0, 1]
    coarse = torch.zeros(1, 2, 2, 2)
    coarse[0, 1] = torch.tensor([[0.8, 0.9], [0.3, 0.4]])
    coarse[0, 0] = 1 - coarse[0, 1]
    # (0,0) sure lesion, coarse agrees: kept; (0,1) unsure: dropped; (1,0) sure background,
    # coarse agrees: kept; (1,1) sure lesion but the coarse head says background: dropped
    labels, keep = stable_pseudo_labels(refined, coarse, 0.9)
    assert labels.tolist() == [[[1, 1], [0, 1]]]
    assert keep.tolist() == [[[True, False], [True, False]]]
    _, keep_any = stable_pseudo_labels(refined, coarse, 0.9, agree=False)
    assert keep_any.tolist() == [[[True, False], [True, True]]]
    # a 50/50 student: CE log 2 at the 2 kept pixels of 4
    student = torch.zeros(1, 2, 2, 2, requires_grad=True)
    loss = pseudo_label_ce(student, labels, keep)
    assert loss.item() == pytest.approx(2 * math.log(2) / 4)
    loss.backward()
    assert torch.all(student.grad[0, :, :, 1] == 0)  # dropped pixels: no gradient
    assert student.grad[0, 1, 0, 0] < 0 and student.grad[0, 0, 1, 0] < 0


def test_coarse_refined_agreement_and_disagreement_by_hand():
    # coarse logits (0, 0) -> (0.5, 0.5); refined logits (0, ln 3) -> (0.25, 0.75)
    coarse = torch.zeros(2, 2, 3, 3, requires_grad=True)
    refined = torch.zeros(2, 2, 3, 3)
    refined[:, 1] = math.log(3)
    refined.requires_grad_(True)
    # squared differences 0.25² per channel, mean over channels and pixels: 0.0625
    agree = coarse_refined_agreement(coarse, refined)
    assert agree.item() == pytest.approx(0.0625)
    agree.backward()
    assert coarse.grad.abs().sum() > 0 and refined.grad.abs().sum() > 0  # both pulled
    # total variation: 0.5 · (0.25 + 0.25) = 0.25 per pixel
    u = disagreement(torch.softmax(coarse, 1), torch.softmax(refined, 1))
    assert u.shape == (2, 3, 3) and torch.allclose(u, torch.full_like(u, 0.25))
    one_hot = F.one_hot(torch.tensor([[0, 1]]), 2).permute(0, 2, 1).float()[..., None]  # (1, 2, 2, 1)
    assert disagreement(one_hot, one_hot.flip(1)).tolist() == [[[1.0], [1.0]]]  # opposite: 1


# --------------------------------------------------------------------------- patch sampling
def _square_target() -> torch.Tensor:
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1  # a 4×4 lesion in the middle
    return target


def test_patch_grid_straddles_the_boundary():
    target = _square_target()
    # grid at (0, 0), 4 px: four tiles, each with a 2×2 corner of the lesion: all straddle
    pt = grid_patches(target[:, None], 4)[:, 0]  # (4, 16)
    assert pt.shape == (4, 16)
    assert straddling_patches(pt, 2).tolist() == [True] * 4
    assert (pt == 1).sum(1).tolist() == [4, 4, 4, 4]
    # 4 lesion pixels per tile are fewer than min_pixels = 5: none counts
    assert not straddling_patches(pt, 2, min_pixels=5).any()
    # grid at (2, 2): one tile, exactly the lesion: inside, not across, the boundary
    inner = grid_patches(target[:, None], 4, (2, 2))[:, 0]
    assert inner.shape == (1, 16) and (inner == 1).all() and not straddling_patches(inner, 2).any()
    assert patch_labels(inner, 2).tolist() == [1]
    # scribbles: only painted pixels count. A lesion dot at (2, 2) and background at (0, 0)
    # lie in the first tile; the others hold one class or nothing
    sparse = torch.full((1, 8, 8), -1)
    sparse[0, 2, 2], sparse[0, 0, 0], sparse[0, 7, 7], sparse[0, 1, 6] = 1, 0, 0, 1
    ps = grid_patches(sparse[:, None], 4)[:, 0]
    assert straddling_patches(ps, 2).tolist() == [True, False, False, False]


def test_patch_labels_rules():
    labels = torch.tensor([[1, 1, 0, -1],     # 2 of 3 labelled are lesion: lesion
                           [1, 0, 0, 0],      # a quarter lesion: neither
                           [0, 0, -1, -1],    # background only
                           [-1, -1, -1, 1],   # one labelled pixel < min_pixels 2: none
                           [2, 2, 1, 0]])     # class 2 covers half: class 2
    assert patch_labels(labels, 3, min_pixels=2).tolist() == [1, -1, 0, -1, 2]


def test_pick_tiles_and_grid_means_match_the_grid():
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    rows = grid_patches(x, 4, (2, 1))  # (2·2·2, 3, 16)
    idx = torch.tensor([0, 3, 5, 7])
    assert torch.equal(pick_tiles(x, idx, 4, (2, 1)).flatten(2), rows[idx])
    means = grid_means(x, 4, (2, 1))  # (2, 2, 2, 3)
    assert torch.allclose(means.reshape(-1, 3), rows.mean(2), atol=1e-6)


def test_method_samples_only_boundary_patches(monkeypatch):
    torch.manual_seed(0)
    m = build("crii", {"intra_patches": 3, "patch_size": 8}, 1, 1, 0)
    seen = {}

    def spy(emb, labels, n_cls, margin, min_pixels=1):
        seen["emb"], seen["labels"] = emb, labels
        return emb.sum() * 0

    monkeypatch.setattr(crii, "intra_patch_ranked_loss", spy)
    target = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    target[0, 10:30, 12:25] = 1
    target[1] = -1  # an image-label-only case: no patch
    out = m.net(torch.randn(2, 1, SIZE, SIZE))
    parts = m.ranked_losses(out, target)
    assert set(parts) == {"intra", "inter"}
    assert seen["emb"].shape == (3, m.options["embed_dim"], 64)  # the cap: 3 of the straddling
    assert torch.allclose(seen["emb"].norm(dim=1), torch.ones(3, 64), atol=1e-5)
    for patch in seen["labels"]:
        assert (patch == 1).sum() >= 4 and (patch == 0).sum() >= 4  # both sides of the border


# --------------------------------------------------------------------------- the method
def test_network_coarse_and_refined_outputs():
    torch.manual_seed(0)
    m = build("crii", {}, 3, 2, 3)
    m.eval()
    x = torch.randn(2, 3, 37, 45)
    with torch.no_grad():
        out = m.net(x)
        plain = m.net.unet(x)
    assert out.net.seg_logits.shape == out.coarse_logits.shape == (2, 3, 37, 45)
    assert out.features.shape == (2, 8, 37, 45) and out.coarse_features.shape == (2, 16, 10, 12)
    # the refinement's last convolution starts at zero: the refined head is the plain U-Net's
    assert torch.allclose(out.net.seg_logits, plain.seg_logits, atol=1e-5)
    with pytest.raises(InputError, match="coarse_stride"):
        build("crii", {"coarse_stride": 3}, 1, 1, 0)
    with pytest.raises(InputError, match="coarse_stride"):
        build("crii", {"coarse_stride": 16}, 1, 1, 0)  # deeper than TINY's depth 3
    with pytest.raises(InputError, match="multiple"):
        build("crii", {"patch_size": 10}, 1, 1, 0)


def test_predict_uncertainty_is_the_teachers_disagreement():
    torch.manual_seed(0)
    m = build("crii", {}, 1, 1, 0)
    with torch.no_grad():
        for p in m.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a teacher of its own, with a non-zero refinement
    x = torch.randn(3, 1, 37, 45)
    pred = m.predict(x, gate=False)
    assert pred.uncertainty.shape == (3, 37, 45)
    assert pred.uncertainty.min() >= 0 and pred.uncertainty.max() <= 1
    m.eval()
    with torch.no_grad():
        t = m.teacher(x)
    assert torch.allclose(pred.probs, torch.softmax(t.net.seg_logits, 1), atol=1e-6)
    expected = 0.5 * (torch.softmax(t.coarse_logits, 1) - pred.probs).abs().sum(1)
    assert torch.allclose(pred.uncertainty, expected, atol=1e-6)
    # the inference copy (batch norms folded) gives the same maps
    frozen = m.inference_copy()
    p2 = frozen.predict(x, gate=False)
    assert torch.allclose(pred.probs, p2.probs, atol=1e-5)
    assert torch.allclose(pred.uncertainty, p2.uncertainty, atol=1e-5)


def test_student_targets_follow_the_cutmix_box(monkeypatch):
    torch.manual_seed(0)
    m = build("crii", {"noise": 0.0, "confidence": 0.0, "stable": False}, 1, 1, 0)
    u = torch.randn(3, 1, SIZE, SIZE)
    box = torch.zeros(3, 1, SIZE, SIZE)
    box[:, :, :20, :20] = 1
    monkeypatch.setattr(crii, "cutmix_boxes", lambda n, size, area, device=None: box)
    m.train()
    x_s, labels, keep = m._student_inputs(u)
    assert m.teacher.training  # the teacher's mode is restored after its clean pass
    with torch.no_grad():
        own = m.teacher.eval()(u).net.seg_logits.argmax(1)  # (3, S, S) the teacher's clean labels
    prev = torch.roll(own, 1, 0)
    assert torch.equal(x_s, u * (1 - box) + torch.roll(u, 1, 0) * box)
    assert torch.equal(labels[:, :20, :20], prev[:, :20, :20])
    assert torch.equal(labels[:, 20:], own[:, 20:]) and keep.all()


def test_unlabelled_images_are_paid_for_only_when_they_count(monkeypatch):
    torch.manual_seed(0)
    m = build("crii", {"rampup": 0.5, "skip_below": 0.05}, 1, 1, 0)
    calls = []
    real = m.teacher.forward
    monkeypatch.setattr(m.teacher, "forward", lambda x: calls.append(len(x)) or real(x))
    batch = make_batch(np.random.default_rng(0), 1, 1, 0)
    m.train()
    # exp(-5 (1 - 0.02/0.5)^2) = 0.0100 < 0.05: a supervised step with the ranked losses
    parts = m.training_step(batch, 0, 0.02)
    assert calls == [] and "consistency" not in parts
    assert {"ce", "dice", "coarse", "intra", "inter"} <= set(parts)
    # exp(-5 (1 - 0.25/0.5)^2) = 0.287: the teacher predicts the 4 unlabelled images
    parts = m.training_step(batch, 1, 0.25)
    assert calls == [4] and {"consistency", "agreement"} <= set(parts)
    batch.unlabelled = None  # a batch without maskless images
    parts = m.training_step(batch, 2, 0.9)
    assert calls == [4] and "consistency" not in parts and parts["loss"].requires_grad


def test_contract_with_other_options():
    # the coarse head on the bottleneck (stride 8 of TINY), no agreement filter, all pairs
    check_contract("crii", {"coarse_stride": 8, "patch_size": 8, "stable": False,
                                  "inter_hard": 1.0}, 3, 2, 3)
