"""``mcwss``: every loss term on hand-worked inputs, the CAM-class mapping, the pairing, the
co-attention and the method's mechanics (class counts, snapshot pseudo-masks, CAMs shown)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_methods_contract import build, make_batch
from test_methods_contract import test_method_contract as contract_checks  # not collected twice
from training_backend.learning.methods.cam import cam_pseudo_target
from training_backend.learning.methods.mcwss import (
    CAMOutput,
    alignment_loss,
    both_labels,
    cam_class_labels,
    cam_loss,
    cam_product,
    co_attend,
    erasure_loss,
    lesion_maps,
    minmax_normalise,
    n_cam_classes,
    overlap_penalty,
    positive_share,
    share_pairs,
    weighted_ce,
)

LN2 = math.log(2.0)


# ------------------------------------------------------------------ labels and pairs
def test_cam_classes_are_lesion_classes_or_image_subclasses():
    assert n_cam_classes(4, 0) == (4, False) and n_cam_classes(2, 3) == (2, False)
    assert n_cam_classes(1, 3) == (3, True)
    assert n_cam_classes(1, 0) == (1, False) and n_cam_classes(1, 1) == (1, False)
    presence = torch.tensor([[1.0], [0.0], [1.0], [-1.0], [1.0]])
    image_class = torch.tensor([1, 0, -1, 2, 2])
    y = cam_class_labels(presence, image_class, 3)
    assert y.tolist() == [[0, 1, 0],      # benign: its sub-class only
                          [0, 0, 0],      # normal (presence 0): negative for all
                          [-1, -1, -1],   # a lesion of unknown image class
                          [-1, -1, -1],   # presence unknown
                          [0, 0, 1]]      # malignant
    two = torch.tensor([[1.0, -1.0], [0.0, 1.0]])
    assert torch.equal(cam_class_labels(two, torch.tensor([1, 2]), 0), two)  # K >= 2: presence


def test_share_pairs_are_disjoint_and_share_a_positive():
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [0.0, 0.0], [0.0, 1.0]])
    for seed in range(5):
        torch.manual_seed(seed)
        first, second = share_pairs(y)
        assert sorted(sorted(p) for p in zip(first.tolist(), second.tolist())) == [[0, 2], [1, 4]]
    assert len(share_pairs(torch.zeros(4, 2))[0]) == 0  # nothing positive
    assert len(share_pairs(torch.ones(1, 2))[0]) == 0  # a batch of one
    assert both_labels(torch.tensor([[1.0, 1.0, 0.0, -1.0]]),
                       torch.tensor([[1.0, -1.0, -1.0, -1.0]])).tolist() == [[1, -1, 0, -1]]
    # class 0: 2 positives of 3 known; class 1: none known -> 0.5
    assert torch.allclose(positive_share(torch.tensor([[1.0, -1.0], [0.0, -1.0], [1.0, -1.0]])),
                          torch.tensor([2 / 3, 0.5]))


def test_lesion_maps_union_of_active_subclasses():
    fg = torch.tensor([[[[0.1, 0.2]], [[0.5, 0.3]], [[0.4, 0.9]]]])  # (1, 3, 1, 2)
    active = torch.tensor([False, True, True])
    assert torch.equal(lesion_maps(fg, active, True), fg[:, 1:].amax(1, keepdim=True))  # (.5, .9)
    # known negative for class 2: class 1 alone
    assert torch.equal(lesion_maps(fg, active, True, torch.tensor([[0.0, 1.0, 0.0]])), fg[:, 1:2])
    assert torch.equal(lesion_maps(fg, active, False), fg)  # lesion classes: unchanged


# ------------------------------------------------------------------ CAM maps
def test_minmax_normalise_and_cam_product():
    maps = torch.tensor([[[[[3.0, 1.0]], [[-1.0, 1.0]]]]])  # (1, 1, 2, 1, 2), min -1, max 3
    # (x + 1) / 4 jointly over both channels
    assert minmax_normalise(maps).tolist() == [[[[[1.0, 0.5]], [[0.0, 0.5]]]]]
    mid = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 8.0]]).view(1, 1, 2, 2, 2)
    deep = torch.tensor([-2.0, 5.0]).view(1, 1, 2, 1, 1)  # normalised: background 0, foreground 1
    prod = cam_product(mid, deep, 2)  # the deep map upsampled 1x1 -> 2x2 stays constant
    assert torch.allclose(prod[0, 0, 0], torch.zeros(2, 2))
    assert torch.allclose(prod[0, 0, 1], torch.tensor([[0.5, 0.625], [0.75, 1.0]]))  # mid / 8


# ------------------------------------------------------------------ losses
def test_cam_loss_by_hand():
    m0, m1 = torch.tensor([0.2, 0.8]), torch.tensor([0.6, 0.1])
    product = torch.stack([m0, m1]).view(1, 1, 2, 1, 2).repeat(3, 1, 1, 1, 1)  # (3, 1, 2, 1, 2)
    y = torch.tensor([[1.0], [0.0], [-1.0]])
    # mean min = (0.2 + 0.1) / 2 = 0.15; y=1: + mean M0 0.5 = 0.65; y=0: + mean M1 0.35 = 0.5
    assert cam_loss(product, y).item() == pytest.approx((0.65 + 0.5) / 2)
    # balanced with p = 0.25: positives weigh 0.75, negatives 0.25: 0.75*0.65 + 0.25*0.5
    assert cam_loss(product, y, torch.tensor([0.25])).item() == pytest.approx(0.6125)
    assert cam_loss(product, torch.full((3, 1), -1.0)) is None


def test_weighted_ce_by_hand():
    logits = torch.tensor([[[0.0, 0.0]], [[0.0, math.log(3.0)]], [[5.0, -5.0]]])  # (3, 1, 2)
    y = torch.tensor([[1.0], [0.0], [-1.0]])
    # CE: ln 2 (positive), ln 4 (negative); p = 0.25: positives weigh 0.75, negatives 0.25
    # (0.75 ln2 + 0.25 * 2 ln2) / (0.75 + 0.25) = 1.25 ln 2
    assert weighted_ce(logits, y, torch.tensor([0.25])).item() == pytest.approx(1.25 * LN2)
    # p = 0 is clamped to 0.05: (0.95 ln2 + 0.05 * 2 ln2) / 1 = 1.05 ln 2
    assert weighted_ce(logits, y, torch.tensor([0.0])).item() == pytest.approx(1.05 * LN2)
    # a second class without labels does not count
    two = torch.cat([logits, logits], 1)
    y2 = torch.cat([y, torch.full((3, 1), -1.0)], 1)
    assert weighted_ce(two, y2, torch.tensor([0.25, 0.5])).item() == pytest.approx(1.25 * LN2)
    assert weighted_ce(logits, torch.full((3, 1), -1.0), torch.tensor([0.5])) is None


def _cams(mid: torch.Tensor, deep: torch.Tensor, fg: torch.Tensor) -> CAMOutput:
    """A CAMOutput with a chosen foreground (background 1 - fg), for the pure losses."""
    product = torch.stack([1 - fg, fg], 2)
    return CAMOutput(mid, deep, torch.stack([mid.mean((-2, -1)), deep.mean((-2, -1))]), product)


def test_erasure_loss_by_hand():
    # one image, two classes, 1x2 mid grid, 1x1 deep grid; y = (1, 0), equal class weights
    mid = torch.zeros(1, 2, 2, 1, 2)
    mid[0, 0, 1] = torch.tensor([[2.0, 4.0]])   # class 0 foreground logits
    mid[0, 1, 1] = torch.tensor([[6.0, 0.0]])   # class 1 foreground logits
    deep = torch.zeros(1, 2, 2, 1, 1)
    deep[0, 0, 1], deep[0, 1, 1] = 1.0, 3.0
    fg = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # class 0 left, class 1 right
    cams = _cams(mid, deep, fg)
    y, rate = torch.tensor([[1.0, 0.0]]), torch.tensor([0.5, 0.5])
    # (a=0, b=1): mid keeps the left pixel: logits (0, mean(2, 0)) = (0, 1), y=1: ln(1 + e^-1)
    #             deep keeps 1 - 0.5: logits (0, 0.5): ln(1 + e^-0.5)
    # (a=1, b=0): mid keeps the right pixel: logits (0, mean(0, 0)) = (0, 0), y=0: ln 2
    #             deep: logits (0, 1.5), y=0: ln(1 + e^1.5)
    mid_part = (math.log1p(math.exp(-1)) + LN2) / 2
    deep_part = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))) / 2
    loss = erasure_loss(cams, y, rate, torch.tensor([True, True]))
    assert loss.item() == pytest.approx(mid_part + deep_part, rel=1e-5)
    assert erasure_loss(cams, y, rate, torch.tensor([True, False])) is None  # no pair
    # the foreground used for erasing is detached
    mid.requires_grad_(True)
    fg.requires_grad_(True)
    erasure_loss(_cams(mid, deep, fg), y, rate, torch.tensor([True, True])).backward()
    assert fg.grad is None and mid.grad.abs().sum() > 0


def test_overlap_penalty_by_hand():
    fg = torch.tensor([[[[1.0, 0.5]], [[0.2, 0.5]], [[0.9, 0.9]]],      # y = (1, 0, .)
                       [[[0.3, 0.3]], [[0.3, 0.3]], [[0.0, 0.0]]],      # y = (0, 0, .): unused
                       [[[1.0, 0.0]], [[0.0, 1.0]], [[0.0, 0.0]]]])     # y = (1, 1, .)
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    active = torch.tensor([True, True, False])  # class 2 never positive: left out
    # image 0: mean min(fg0, fg1) = (0.2 + 0.5) / 2 = 0.35; union of positives = fg0, mean 0.75
    #          0.35 - 0.1 * 0.75 = 0.275
    # image 2: min 0; union max = (1, 1), mean 1: -0.1
    assert overlap_penalty(fg, y, active, 0.1).item() == pytest.approx((0.275 - 0.1) / 2)
    assert overlap_penalty(fg, torch.zeros(3, 3), active) is None


def test_alignment_loss_by_hand():
    orig = torch.tensor([[[[0.2, 0.9]]], [[[1.0, 1.0]]]])  # (2, 1, 1, 2)
    co = torch.tensor([[[[0.5, 0.3]]], [[[0.0, 0.0]]]])
    # only the first has y_both = 1: -mean min = -(0.2 + 0.3) / 2
    assert alignment_loss(orig, co, torch.tensor([[1.0], [0.0]])).item() == pytest.approx(-0.25)
    assert alignment_loss(orig, co, torch.tensor([[0.0], [-1.0]])) is None


# ------------------------------------------------------------------ co-attention
def test_co_attend_equals_the_head_on_coattended_features():
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 4, 20, 18), torch.randn(2, 4, 20, 18)  # keys pooled to 16x16
    w = torch.nn.Conv2d(4, 4, 1, bias=False)
    head = torch.nn.Conv2d(4, 6, 1, bias=False)
    z1, z2 = co_attend(f1, f2, w, head)
    assert z1.shape == z2.shape == (2, 6, 20, 18)
    k1, k2 = F.adaptive_avg_pool2d(f1, (16, 16)).flatten(2), F.adaptive_avg_pool2d(f2, (16, 16)).flatten(2)
    wmat = w.weight[:, :, 0, 0]  # (c, c)
    # A = softmax(F1^T W F2 / 2) over image 2's (pooled) positions; features mixed, then the head
    a12 = torch.softmax(f1.flatten(2).transpose(1, 2) @ wmat @ k2 / 2, 2)  # (P, N1, M)
    feats1 = (k2 @ a12.transpose(1, 2)).view(2, 4, 20, 18)
    assert torch.allclose(z1, head(feats1), atol=1e-5)
    a21 = torch.softmax(k1.transpose(1, 2) @ wmat @ f2.flatten(2) / 2, 1)  # same form, over image 1
    feats2 = (k1 @ a21).view(2, 4, 20, 18)
    assert torch.allclose(z2, head(feats2), atol=1e-5)


# ------------------------------------------------------------------ the method
def _busi_batch(seed: int = 0):
    """The contract batch with BUSI-like labels: K=1, image classes normal/benign/malignant."""
    b = make_batch(np.random.default_rng(seed), 1, 1, 3)
    b.image_class = torch.where(b.presence[:, 0] > 0, b.image_class, torch.zeros_like(b.image_class))
    return b


def test_busi_subclasses_step_counts_and_parts():
    torch.manual_seed(0)
    m = build("mcwss", {}, 1, 1, 3)
    assert m.n_cam == 3 and m.subclasses == 3 and m.cam_stride == 4 and m.net.coattention is not None
    b = _busi_batch()
    b.image_class[:2] = torch.tensor([1, 2])
    b.presence[:2] = 1.0
    y = m.cam_targets(b)
    m.train()
    with torch.no_grad():  # a probe: counts nothing
        m.training_step(b, 0, 0.1)
    assert int(m.cam_labels.sum()) == 0 and bool(m.active().all())
    parts = m.training_step(b, 0, 0.1)
    assert torch.equal(m.cam_positives, (y == 1).sum(0)) and torch.equal(m.cam_labels, (y >= 0).sum(0))
    assert m.active().tolist() == [False, True, True]  # "normal" is never positive
    assert {"mcwss_cam", "mcwss_cls", "mcwss_erasure", "mcwss_overlap", "mcwss_coatt", "mcwss_align"} <= set(parts)
    assert "ce" not in parts and "pseudo_fg" not in parts  # warmup: no segmentation yet
    parts["loss"].backward()
    assert m.net.coattention.w_mid.weight.grad.abs().sum() > 0
    # no co-attention when asked
    off = build("mcwss", {"coatt_weight": 0.0, "align_weight": 0.0}, 1, 1, 3)
    off.train()
    assert not {"mcwss_coatt", "mcwss_align"} & set(off.training_step(b, 0, 0.1))


def test_one_cam_class_has_no_exclusion_or_coattention():
    torch.manual_seed(0)
    m = build("mcwss", {}, 1, 1, 0)
    assert m.n_cam == 1 and m.subclasses == 0 and m.net.coattention is None
    m.train()
    parts = m.training_step(make_batch(np.random.default_rng(0), 1, 1, 0), 0, 0.1)
    assert "mcwss_cam" in parts and not {"mcwss_erasure", "mcwss_overlap", "mcwss_coatt"} & set(parts)
    assert torch.isfinite(parts["loss"])


def test_pseudo_masks_come_from_the_snapshot_product():
    torch.manual_seed(0)
    m = build("mcwss", {"warmup": 0.5}, 1, 1, 3)
    b = _busi_batch(1)
    opt = torch.optim.AdamW(m.trainable_parameters(), 1e-2)
    m.train()
    for step in range(4):
        progress = step / 8  # the snapshot follows from 0.25 on
        loss = m.training_step(b, step, progress)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step(step, progress)
    parts = m.training_step(b, 4, 0.55)  # warmup over: snapshot frozen, pseudo-masks on
    assert int(m.snapshot_step) == 4 and "pseudo_fg" in parts and "ce" in parts
    with torch.no_grad():
        out = m.net(b.image)
        target = m.pseudo_target(out, b)
        fg = m.snapshot.cam_forward(b.image).fg  # (B, 3, h, w)
    y = m.cam_targets(b)
    allowed = m.active()[None] & (y != 0)
    lesion = (fg * allowed[..., None, None]).amax(1, keepdim=True)  # (B, 1, h, w)
    up = F.interpolate(lesion, scale_factor=4, mode="bilinear", align_corners=False).clamp(0, 1)
    up = up / up.flatten(2).amax(2).clamp_min(1e-6)[..., None, None]
    expected = cam_pseudo_target(up, b.presence, m.options["cam_hi"], m.options["cam_lo"])
    assert torch.equal(target, expected)
    negative = b.presence[:, 0] == 0
    assert (target[negative] == 0).all() and (target[~negative] == 1).any()


def test_prediction_cams_are_the_product_foreground():
    torch.manual_seed(0)
    m = build("mcwss", {}, 3, 2, 3)  # K = 2 lesion classes: the CAM classes
    assert m.n_cam == 2 and m.subclasses == 0
    x = torch.randn(2, 3, 37, 45)
    pred = m.predict(x)
    m.eval()
    with torch.no_grad():
        fg = m.net(x).cams.fg  # (2, 2, 10, 12): cells of stride 4 covering 37x45
    assert fg.shape == (2, 2, 10, 12)
    up = F.interpolate(fg, scale_factor=4, mode="bilinear", align_corners=False)[..., :37, :45]
    assert torch.allclose(pred.cams, up.clamp(0, 1), atol=1e-6)  # not re-normalised


def test_contract_with_live_cams_and_raw_thresholds():
    contract_checks("mcwss", {"pseudo_source": "live", "cam_relative": False}, 3, 2, 3)


def test_coattention_needs_two_classes_seen_positive_and_a_new_run_recounts():
    torch.manual_seed(0)
    m = build("mcwss", {}, 1, 1, 2)  # image classes "no lesion" / "lesion": one active sub-class
    b = make_batch(np.random.default_rng(0), 1, 1, 0)
    b.image_class = b.presence[:, 0].long()  # 0 = no lesion, 1 = lesion
    m.train()
    parts = m.training_step(b, 0, 0.1)
    assert m.net.coattention is not None and m.active().tolist() == [False, True]
    assert not {"mcwss_coatt", "mcwss_align", "mcwss_erasure", "mcwss_overlap"} & set(parts)
    m.start_new_run()
    assert int(m.cam_labels.sum()) == 0 and int(m.snapshot_step) == -1
