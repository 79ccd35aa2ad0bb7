"""One contract every registered method passes, plus method-specific checks.

Synthetic task: noisy 40 px images; lesion class 1 = bright square, class 2 = dark square.
Each batch mixes full masks, scribbles, image-label-only cases and unlabelled images.
"""
from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from training_backend.errors import InputError
from training_backend.learning.methods import (
    METHODS,
    Batch,
    Prediction,
    available_methods,
    create_method,
    gate_prediction,
)
from training_backend.learning.methods.cam import cam_pseudo_target, superpixel_mean
from training_backend.learning.models import ModelConfig, cam_to_maps

SIZE = 40
TINY = ModelConfig(base=8, depth=3, dropout=0.1)

# (method name, options) — every registered method, plus the cam variant with its own classifier
# and its snapshot as a plain copy at warmup (a separate classifier learns too little in the
# test's 30 steps for a weight average over the second half of warmup to localise)
VARIANTS = [(name, {}) for name in sorted(METHODS)] + [("cam", {"separate_classifier": True,
                                                                "snapshot_ema": 0.0}),
                                                       ("mean_teacher", {"cutmix": False, "confidence": 0}),
                                                       ("mean_teacher", {"paste_labelled": True})]
# (channels, K, n_image_classes): grey/K=1/no image classes and RGB/K=2/3 image classes
SETUPS = [(1, 1, 0), (3, 2, 3)]


def make_batch(rng: np.random.Generator, channels: int, k: int, n_img: int, b: int = 8, n_unlabelled: int = 4) -> Batch:
    """A batch of the synthetic task (3 full masks, 2 scribbles, rest image labels only)."""
    images, targets, presences, classes = [], [], [], []
    for i in range(b + n_unlabelled):
        img = rng.normal(0.0, 0.3, (SIZE, SIZE)).astype(np.float32)
        full = np.zeros((SIZE, SIZE), np.int64)
        present = np.zeros(k, np.float32)
        big = False
        for c in range(1, k + 1):
            if rng.random() < (0.6 if k == 1 else 0.5):
                s = int(rng.integers(7, 15))
                y, x = rng.integers(0, SIZE - s, 2)
                img[y : y + s, x : x + s] += 2.0 if c == 1 else -2.0
                full[y : y + s, x : x + s] = c
                present[c - 1] = 1
                big = big or s >= 11
        if i < 3:
            target = full
        elif i < 5:  # scribbles: a random 15% of the pixels
            target = np.where(rng.random((SIZE, SIZE)) < 0.15, full, -1)
        else:
            target = np.full((SIZE, SIZE), -1, np.int64)
        n_present = int(present.sum())
        cls = 0 if n_present == 0 else (min(n_present, 2) if k > 1 else (2 if big else 1))
        images.append(np.stack([img * (1.0 + 0.1 * j) for j in range(channels)]))
        targets.append(target)
        presences.append(present)
        classes.append(cls if n_img else -1)
    image = torch.as_tensor(np.stack(images))
    target = torch.as_tensor(np.stack(targets[:b]))
    has_mask = (target >= 0).flatten(1).any(1)
    return Batch(
        image=image[:b],
        target=target,
        has_mask=has_mask,
        full=torch.arange(b) < 3,
        image_class=torch.as_tensor(classes[:b]),
        presence=torch.as_tensor(np.stack(presences[:b])),
        unlabelled=image[b:],
    )


def build(name: str, options: dict, channels: int, k: int, n_img: int):
    return create_method(name, in_channels=channels, n_classes=k, n_image_classes=n_img, model=TINY, **options)


def probe_loss(method, batch: Batch) -> float:
    """Loss on a fixed batch at the end of training (progress=1), reproducible, no update."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(123)
        return float(method.training_step(batch, step=0, progress=1.0)["loss"])


def check_prediction(pred: Prediction, b: int, k: int, n_img: int, size: tuple[int, int]) -> None:
    h, w = size
    assert pred.probs.shape == (b, k + 1, h, w)
    assert torch.allclose(pred.probs.sum(1), torch.ones(b, h, w), atol=1e-4)
    assert pred.probs.min() >= 0 and pred.probs.max() <= 1 + 1e-6
    assert pred.cams.shape == (b, k, h, w)
    assert pred.cams.min() >= 0 and pred.cams.max() <= 1
    assert pred.presence.shape == (b, k) and pred.presence.min() >= 0 and pred.presence.max() <= 1
    if n_img == 0:
        assert pred.image_class is None
    else:
        assert pred.image_class.shape == (b, n_img)
        assert torch.allclose(pred.image_class.sum(1), torch.ones(b), atol=1e-4)
    assert pred.features.ndim == 2 and pred.features.shape[0] == b and torch.isfinite(pred.features).all()


@pytest.mark.parametrize("channels,k,n_img", SETUPS, ids=["grey-K1", "rgb-K2-img3"])
@pytest.mark.parametrize("name,options", VARIANTS, ids=[n + ("-sep" if o else "") for n, o in VARIANTS])
def test_method_contract(name, options, channels, k, n_img):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    method = build(name, options, channels, k, n_img)
    assert method.name == name and method.description
    params = list(method.trainable_parameters())
    assert params and all(p.requires_grad for p in params)
    probe = make_batch(np.random.default_rng(99), channels, k, n_img)

    # one step: finite scalar loss with gradients on the trainable parameters
    method.train()
    out = method.training_step(make_batch(rng, channels, k, n_img), step=0, progress=1.0)
    loss = out["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    loss.backward()
    with_grad = [p for p in params if p.grad is not None]
    assert all(torch.isfinite(p.grad).all() for p in with_grad)
    assert sum(p.numel() for p in with_grad) >= 0.8 * sum(p.numel() for p in params)
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0  # first encoder conv learns

    # training lowers the loss on a held-out batch of the same task
    torch.manual_seed(0)
    method = build(name, options, channels, k, n_img)
    before = probe_loss(method, probe)
    opt = torch.optim.Adam(method.trainable_parameters(), lr=3e-3)
    steps = 30
    for step in range(steps):
        method.train()
        loss = method.training_step(make_batch(rng, channels, k, n_img), step, step / steps)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step, (step + 1) / steps)
    after = probe_loss(method, probe)
    assert after < 0.8 * before, (before, after)

    # predict: shapes, ranges, any size, mode restored
    method.train()
    odd = torch.randn(2, channels, 37, 45)
    check_prediction(method.predict(odd), 2, k, n_img, (37, 45))
    assert method.training
    method.eval()
    pred = method.predict(probe.image)
    check_prediction(pred, len(probe), k, n_img, (SIZE, SIZE))
    assert not method.training

    # deterministic without dropout; MC dropout gives different samples
    again = method.predict(probe.image)
    assert torch.equal(pred.probs, again.probs) and torch.equal(pred.presence, again.presence)
    s1, s2 = method.predict(probe.image, dropout=True), method.predict(probe.image, dropout=True)
    flat1 = torch.cat([s1.probs.flatten(), s1.presence.flatten()])
    flat2 = torch.cat([s2.probs.flatten(), s2.presence.flatten()])
    assert not torch.allclose(flat1, flat2)

    # state_dict round trip through torch.save / torch.load(weights_only=True)
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    clone = build(name, options, channels, k, n_img)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    p2 = clone.predict(probe.image)
    assert torch.allclose(pred.probs, p2.probs, atol=1e-6) and torch.allclose(pred.cams, p2.cams, atol=1e-6)


def test_registry_and_options():
    assert set(METHODS) == {"supervised", "cam", "mean_teacher", "caml", "crii", "mcwss",
                            "dual_unet", "collaborative"}
    with pytest.raises(InputError, match="valid: cam, caml, collaborative, crii, dual_unet, mcwss, mean_teacher, supervised"):
        create_method("nope", in_channels=1, n_classes=1, n_image_classes=0)
    with pytest.raises(InputError, match="unknown option"):
        create_method("supervised", in_channels=1, n_classes=1, n_image_classes=0, bogus=1)
    m = create_method("cam", in_channels=1, n_classes=1, n_image_classes=0, model=TINY, cam_hi="0.7", superpixels="50")
    assert m.options["cam_hi"] == 0.7 and m.options["superpixels"] == 50
    # image labels only: the two methods that learn masks from them
    assert available_methods({"full": 0, "sparse": 0, "image_label": 5, "unlabelled": 9,
                              "maskless": 14}) == ["cam", "mcwss"]
    # scribbles only, every case annotated
    assert available_methods({"sparse": 2, "maskless": 0}) == ["mean_teacher", "supervised"]
    # scribbles and images without a mask: the semi-supervised methods too
    assert available_methods({"sparse": 2, "unlabelled": 5, "maskless": 5}) == [
        "caml", "crii", "mean_teacher", "supervised"]
    # masks and image labels (on maskless cases): everything
    assert available_methods({"full": 1, "image_label": 1}) == [
        "cam", "caml", "collaborative", "crii", "dual_unet", "mcwss", "mean_teacher", "supervised"]
    assert available_methods({"unlabelled": 100}) == []


def test_gate_prediction_moves_mass_to_background():
    probs = torch.softmax(torch.randn(2, 3, 5, 5), 1)
    pred = Prediction(probs, torch.zeros(2, 2, 5, 5), torch.tensor([[0.9, 0.2], [0.1, 0.6]]), None, torch.zeros(2, 4))
    gated = gate_prediction(pred, 0.5)
    assert torch.equal(gated.probs[0, 1], probs[0, 1]) and (gated.probs[0, 2] == 0).all()
    assert (gated.probs[1, 1] == 0).all() and torch.equal(gated.probs[1, 2], probs[1, 2])
    assert torch.allclose(gated.probs.sum(1), torch.ones(2, 5, 5))
    assert gate_prediction(pred, 0.0) is pred


def test_supervised_negative_images_become_background_and_gate():
    torch.manual_seed(0)
    m = build("supervised", {}, 1, 1, 0)
    b = make_batch(np.random.default_rng(1), 1, 1, 0)
    b.presence[5:] = 0  # image-label-only cases, all negative
    t = m.supervised_target(b)
    assert (t[5:] == 0).all() and torch.equal(t[:5], b.target[:5])
    assert int(m.presence_seen) == 0
    pred = m.predict(b.image)  # untrained presence head: no gating yet
    assert pred.probs[:, 1].sum() > 0
    m.training_step(b, 0, 0.0)
    assert int(m.presence_seen) == 8
    m.options["gate_threshold"] = 1.01  # every image below: all gated to background
    assert (m.predict(b.image).probs[:, 1] == 0).all()


def test_cam_pseudo_target_rules():
    cams = torch.zeros(4, 2, 4, 4)
    cams[:, 0, 0, 0] = 0.9  # class 1 peak
    cams[:, 1, 3, 3] = 0.8  # class 2 peak
    cams[:, 0, 1, 1] = 0.3  # uncertain band
    presence = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, -1.0], [1.0, -1.0]])
    t = cam_pseudo_target(cams, presence, hi=0.5, lo=0.2)
    assert t[0, 0, 0] == 1 and t[0, 3, 3] == 0 and t[0, 1, 1] == -1 and t[0, 2, 2] == 0
    assert (t[1] == 0).all()  # negative image: all background
    assert (t[2] == -1).all()  # nothing known: ignored
    assert t[3, 0, 0] == 1 and t[3, 3, 3] == -1 and t[3, 2, 2] == 0  # unknown class: its peak ignored


def test_superpixel_mean_is_piecewise_constant():
    img = torch.zeros(1, 1, 32, 32)
    img[..., 8:24, 8:24] = 1.0
    maps = torch.rand(1, 1, 32, 32)
    out = superpixel_mean(maps, img, 20)
    assert out.shape == maps.shape and out.unique().numel() < 40
    assert torch.allclose(out.mean(), maps.mean(), atol=0.05)


@pytest.mark.parametrize("name", ["mean_teacher", "crii"])
def test_ema_teacher_follows_the_student(name):
    """The methods with an EMA teacher (`base.ema_update`): frozen, checkpointed, d = 0.99 late,
    a copy at the first step."""
    torch.manual_seed(0)
    m = build(name, {}, 1, 1, 0)
    assert all(not p.requires_grad for p in m.teacher.parameters())
    assert any(k.startswith("teacher.") for k in m.state_dict())
    assert not any(p is q for p in m.trainable_parameters() for q in m.teacher.parameters())
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(1.0)
    w_s, w_t = next(m.net.parameters()).clone(), next(m.teacher.parameters()).clone()
    m.after_step(step=1000, progress=0.5)  # decay 0.99
    assert torch.allclose(next(m.teacher.parameters()), 0.99 * w_t + 0.01 * w_s, atol=1e-6)
    m.after_step(step=0, progress=0.0)  # first step: teacher = student
    assert torch.allclose(next(m.teacher.parameters()), w_s)


def test_segmentation_losses_per_image_dice_weighs_small_lesions():
    """Per-image Dice (the default) counts a missed small lesion as much as a found large one;
    batch Dice hardly notices it. Unlabelled pixels (-1) never count."""
    from training_backend.learning.losses import segmentation_losses

    target = torch.zeros(2, 32, 32, dtype=torch.long)
    target[0, 4:28, 4:28] = 1             # a large lesion, predicted exactly
    target[1, 10:12, 10:12] = 1           # a small lesion, missed
    logits = torch.full((2, 2, 32, 32), -10.0)
    logits[:, 0] = 10.0                   # background everywhere ...
    logits[0, 1, 4:28, 4:28], logits[0, 0, 4:28, 4:28] = 10.0, -10.0   # ... but the large lesion
    _, per_image = segmentation_losses(logits, target)
    _, batch = segmentation_losses(logits, target, per_image=False)
    assert per_image.item() == pytest.approx(0.5, abs=0.01)   # mean of 0 (found) and 1 (missed)
    assert batch.item() < 0.02
    ignored = target.clone()
    ignored[1] = -1                       # the second image unlabelled: only the found lesion
    _, only_found = segmentation_losses(logits, ignored)
    assert only_found.item() < 0.01


def test_cutmix_boxes_cover_the_asked_share():
    from training_backend.learning.methods.mean_teacher import cutmix_boxes

    torch.manual_seed(0)
    boxes = cutmix_boxes(64, (40, 30), (0.25, 0.5))
    assert boxes.shape == (64, 1, 40, 30) and set(boxes.unique().tolist()) <= {0.0, 1.0}
    share = boxes.mean((1, 2, 3))
    assert float(share.min()) > 0.1 and float(share.max()) < 0.65  # rounding and clamping aside
    # each is one axis-aligned box: its rows and columns with a 1 form a full rectangle
    for b in boxes[:, 0]:
        rows, cols = b.any(1).nonzero()[:, 0], b.any(0).nonzero()[:, 0]
        assert b.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)


def test_confident_ce_ignores_unsure_teacher_pixels():
    from training_backend.learning.methods.mean_teacher import confident_ce

    teacher = torch.zeros(1, 2, 2, 2)
    teacher[0, 1] = torch.tensor([[0.95, 0.6], [0.05, 0.4]])  # lesion sure, unsure, bg sure, unsure
    teacher[0, 0] = 1 - teacher[0, 1]
    student = torch.zeros(1, 2, 2, 2, requires_grad=True)  # 50/50 everywhere: CE log 2 per pixel
    loss = confident_ce(student, teacher, 0.9)
    assert loss.item() == pytest.approx(2 * np.log(2) / 4, rel=1e-5)  # 2 confident pixels of 4
    loss.backward()
    g = student.grad[0]
    assert torch.all(g[:, 0, 1] == 0) and torch.all(g[:, 1, 1] == 0)  # unsure pixels: no gradient
    assert g[1, 0, 0] < 0 and g[0, 1, 0] < 0  # pushed towards the teacher's class


def test_softmax_mse_ignores_invalid_pixels():
    from training_backend.learning.losses import softmax_mse

    student = torch.zeros(1, 2, 1, 2, requires_grad=True)   # 0.5 / 0.5 at both pixels
    teacher = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])  # class 0 sure at both
    valid = torch.tensor([[[True, False]]])
    loss = softmax_mse(student, teacher, valid)
    assert loss.item() == pytest.approx(2 * 0.25 / 4)       # one valid pixel's two squares, over all
    loss.backward()
    assert torch.all(student.grad[0, :, 0, 1] == 0) and student.grad[0, 0, 0, 0] < 0
    assert softmax_mse(student, teacher).item() == pytest.approx(0.25)


def test_paste_pairs_mix_annotations_and_teacher_both_ways():
    from training_backend.learning.methods.mean_teacher import paste_pairs

    box = torch.zeros(2, 1, 6, 6)
    box[:, :, :3, :3] = 1                                    # the top-left quarter
    unl, lab = torch.zeros(2, 1, 6, 6), torch.ones(2, 1, 6, 6)
    teacher = torch.zeros(2, 3, 6, 6)
    teacher[:, 2] = 1.0                                      # the teacher says class 2 everywhere
    target = torch.ones(2, 6, 6, dtype=torch.long)           # the annotation says class 1 ...
    target[:, 0, :] = -1                                     # ... except an unlabelled first row
    images, probs, valid = paste_pairs(unl, teacher, lab, target, box)
    inside = box[:, 0] > 0
    # pair 0: the labelled box pasted into the unlabelled image
    assert torch.equal(images[0, 0] > 0, inside[0])
    assert torch.equal(probs[0, 1] > 0, inside[0] & (target[0] >= 0))
    assert torch.equal(probs[0, 2] > 0, ~inside[0])
    # pair 1: the unlabelled box pasted into the labelled image
    assert torch.equal(images[1, 0] > 0, ~inside[1]) and torch.equal(probs[1, 2] > 0, inside[1])
    assert torch.allclose(probs.sum(1), torch.ones(2, 6, 6))
    # the annotation's unlabelled pixels are ignored where they were pasted, nowhere else
    assert not valid[0, 0, :3].any() and valid[0, 0, 3:].all() and valid[0, 1:].all()
    assert not valid[1, 0, 3:].any() and valid[1, 0, :3].all() and valid[1, 1:].all()


def test_mean_teacher_cutmix_targets_follow_the_box(monkeypatch):
    """With CutMix the student's pseudo-target is the teacher's prediction mixed by the same box:
    a student already equal to that mix has (near) zero consistency loss."""
    from training_backend.learning.methods import mean_teacher as mt

    torch.manual_seed(0)
    m = build("mean_teacher", {"noise": 0.0, "rampup": 0.0}, 1, 1, 0)
    u = torch.randn(3, 1, SIZE, SIZE)
    box = mt.cutmix_boxes(3, (SIZE, SIZE), (0.25, 0.5))
    seen = {}

    def fake_loss(student_logits, teacher_probs, valid=None):
        seen["target"] = teacher_probs
        return student_logits.sum() * 0

    m._consistency_loss = fake_loss
    monkeypatch.setattr(mt, "cutmix_boxes", lambda n, size, area, device=None: box)
    batch = make_batch(np.random.default_rng(0), 1, 1, 0)
    batch.unlabelled = u
    m.train()
    m.training_step(batch, 0, 0.5)
    m.teacher.eval()
    with torch.no_grad():
        t = torch.softmax(m.teacher(u).seg_logits, 1)
    expected = t * (1 - box) + torch.roll(t, 1, 0) * box
    assert torch.allclose(seen["target"], expected, atol=1e-5)


def test_mean_teacher_pays_for_unlabelled_images_only_when_they_count(monkeypatch):
    """No teacher pass while the ramped-up weight is below ``skip_below`` of its maximum, nor
    when the batch has no unlabelled image; a supervised step's losses then."""
    torch.manual_seed(0)
    m = build("mean_teacher", {"rampup": 0.5, "skip_below": 0.05}, 1, 1, 0)
    calls = []
    monkeypatch.setattr(m.teacher, "forward", lambda x: calls.append(len(x)) or m.net(x))
    batch = make_batch(np.random.default_rng(0), 1, 1, 0)
    m.train()
    # exp(-5 (1 - 0.02/0.5)^2) = exp(-4.608) = 0.0100 < 0.05: skipped
    assert m.consistency_weight(0.02) == pytest.approx(math.exp(-5 * 0.96 ** 2))
    parts = m.training_step(batch, 0, 0.02)
    assert calls == [] and "consistency" not in parts
    # exp(-5 (1 - 0.25/0.5)^2) = exp(-1.25) = 0.287: paid for
    assert m.consistency_weight(0.25) == pytest.approx(math.exp(-1.25))
    parts = m.training_step(batch, 1, 0.25)
    assert calls == [len(batch.unlabelled)] and "consistency" in parts
    batch.unlabelled = None  # a project without maskless images
    parts = m.training_step(batch, 2, 0.9)
    assert calls == [len(make_batch(np.random.default_rng(0), 1, 1, 0).unlabelled)]
    assert "consistency" not in parts and parts["loss"].requires_grad


def test_cam_snapshot_is_taken_at_warmup_and_makes_the_pseudo_masks():
    """Pseudo-masks come from the classifier frozen at warmup; the snapshot survives a reload."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    m = build("cam", {"warmup": 0.5}, 1, 1, 0)
    opt = torch.optim.AdamW(m.trainable_parameters(), 1e-2)
    b = make_batch(rng, 1, 1, 0)
    m.train()
    frozen = None
    for step in range(5):
        progress = step / 6
        loss = m.training_step(b, step, progress)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step(step, progress)
        if step == 2:  # the average starts as a copy, halfway through warmup
            assert int(m.snapshot_updates) == 1
            assert all(torch.equal(q, p) for q, p in zip(m.snapshot.parameters(), m.net.parameters()))
        if progress < 0.5:
            assert int(m.snapshot_step) == -1
        elif frozen is None:
            frozen = copy.deepcopy(m.snapshot.state_dict())
    assert int(m.snapshot_step) == 4  # the first step with a segmentation weight > 0
    assert all(torch.equal(v, m.snapshot.state_dict()[k]) for k, v in frozen.items())  # no longer moves
    assert not any(p.requires_grad for p in m.snapshot.parameters()) and not m.snapshot.training
    assert all(p is not q for p in m.trainable_parameters() for q in m.snapshot.parameters())
    live = dict(m.net.named_parameters())
    assert any(not torch.equal(q, live[n]) for n, q in m.snapshot.named_parameters())  # the net moved on
    with torch.no_grad():
        out = m.net(b.image)
        target = m.pseudo_target(out, b)
        m.eval()
        snap_cams = cam_to_maps(m.snapshot(b.image).cam_logits, (SIZE, SIZE), m.cam_stride)
    expected = cam_pseudo_target(snap_cams, b.presence, m.options["cam_hi"], m.options["cam_lo"])
    assert torch.equal(target, expected)
    # a resumed run (state dict into a fresh method) makes the same pseudo-masks
    fresh = build("cam", {"warmup": 0.5}, 1, 1, 0)
    fresh.load_state_dict(m.state_dict())
    fresh.train()
    with torch.no_grad():
        assert int(fresh.snapshot_step) == 4
        assert torch.equal(fresh.pseudo_target(out, b), expected)
    # a checkpoint from before the snapshot existed still loads, with no snapshot taken
    old = {k: v for k, v in m.state_dict().items() if not k.startswith("snapshot")}
    fresh.load_state_dict(old)
    assert int(fresh.snapshot_step) == -1
    # at snapshot_refresh (0.7) the snapshot becomes, once, a copy of the classifier as it is then
    m.train()
    before = {n: q.detach().clone() for n, q in m.net.named_parameters()}
    m.training_step(b, 5, 0.75)["loss"].backward()
    assert int(m.snapshot_refreshed) == 5
    assert all(torch.equal(q, before[n]) for n, q in m.snapshot.named_parameters())
    opt.step()
    m.training_step(b, 6, 0.9)
    assert int(m.snapshot_refreshed) == 5  # once
    assert all(torch.equal(q, before[n]) for n, q in m.snapshot.named_parameters())
    with pytest.raises(InputError, match="pseudo_source"):
        build("cam", {"pseudo_source": "nope"}, 1, 1, 0)
