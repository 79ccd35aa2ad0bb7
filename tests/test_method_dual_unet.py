"""``dual_unet`` (SKS): its loss terms by hand, the two stages, the fusion and freezing, resume."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from test_methods_contract import SIZE, make_batch
from test_methods_contract import test_method_contract as contract_checks
from training_backend.errors import InputError
from training_backend.learning.methods import create_method
from training_backend.learning.methods.dual_unet import FusedUNet, segmentation_loss, segmentation_rows
from training_backend.learning.models import ModelConfig, pad_to_multiple

#: no dropout, so that two forward passes agree exactly
EXACT = ModelConfig(base=8, depth=3, dropout=0.0)


def exact(options: dict | None = None, channels: int = 1, k: int = 1, n_img: int = 3):
    """A ``dual_unet`` without dropout, the same weights every time."""
    torch.manual_seed(0)
    return create_method("dual_unet", in_channels=channels, n_classes=k, n_image_classes=n_img,
                         model=EXACT, **(options or {}))


def grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def zero_heads(m) -> None:
    """Classifier heads and segmentation output at zero: every logit is 0."""
    with torch.no_grad():
        for p in list(m.classifier.heads.parameters()) + list(m.seg.out.parameters()):
            p.zero_()


# ------------------------------------------------------------------ loss terms by hand
def test_segmentation_loss_by_hand():
    logits = torch.zeros(1, 2, 2, 2)  # p = 0.5 for both channels everywhere
    target = torch.tensor([[[1, 0], [-1, 1]]])  # 3 labelled pixels (2 lesion), 1 ignored
    total, parts = segmentation_loss(logits, target, dice_weight=2.0)
    # CE: -log 0.5 = 0.6931 at each labelled pixel
    # Dice of the lesion channel over the labelled pixels: intersection 0.5 + 0.5 = 1,
    # sum p = 3 * 0.5 = 1.5, sum t = 2: 1 - 2*1 / (1.5 + 2) = 1 - 0.5714 = 0.4286
    # total: 0.6931 + 2 * 0.4286 = 1.5503
    assert parts["ce"].item() == pytest.approx(math.log(2), abs=1e-4)
    assert parts["dice"].item() == pytest.approx(1 - 2 / 3.5, abs=1e-4)
    assert total.item() == pytest.approx(math.log(2) + 2 * (1 - 2 / 3.5), abs=1e-4)
    # no lesion pixel labelled: CE alone; nothing labelled: None
    total, parts = segmentation_loss(logits, torch.tensor([[[0, 0], [-1, -1]]]), 2.0)
    assert set(parts) == {"ce"} and total.item() == pytest.approx(math.log(2), abs=1e-4)
    assert segmentation_loss(logits, torch.full((1, 2, 2), -1), 2.0) is None


def test_segmentation_rows():
    target = torch.full((4, 3, 3), -1)
    target[1, 0, 0] = 0  # one painted background pixel is a target
    target[3] = 1
    assert segmentation_rows(target).tolist() == [1, 3]
    assert segmentation_rows(torch.full((2, 3, 3), -1)).numel() == 0


def test_stage1_loss_is_the_classifier_loss_by_hand():
    m = exact()
    zero_heads(m)
    b = make_batch(np.random.default_rng(0), 1, 1, 3)  # every presence and image class known
    m.train()
    parts = m.training_step(b, 0, 0.05)
    # presence logits 0 (log-sum-exp pooling of a zero map: (log n - log n) / r = 0): BCE = log 2;
    # image logits 0 over 3 classes: CE = log 3; weights 0.5 and 0.5:
    # 0.5 * 0.6931 + 0.5 * 1.0986 = 0.8959
    assert parts["presence"].item() == pytest.approx(math.log(2), abs=1e-5)
    assert parts["image_class"].item() == pytest.approx(math.log(3), abs=1e-5)
    assert parts["loss"].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(3), abs=1e-5)
    assert "ce" not in parts and "dice" not in parts


def test_stage2_loss_is_segmentation_plus_weighted_classifier():
    m = exact({"classifier_weight": 2.0})
    zero_heads(m)
    b = make_batch(np.random.default_rng(0), 1, 1, 3)
    m.train()
    parts = m.training_step(b, 0, 0.5)
    rows = segmentation_rows(m.supervised_target(b))
    seg, _ = segmentation_loss(torch.zeros(len(rows), 2, SIZE, SIZE), m.supervised_target(b)[rows], 1.0)
    # seg logits 0: CE = log 2; classifier term 2 * (0.5 log 2 + 0.5 log 3) = 1.7918
    assert parts["ce"].item() == pytest.approx(math.log(2), abs=1e-5)
    expected = seg.item() + 2.0 * (0.5 * math.log(2) + 0.5 * math.log(3))
    assert parts["loss"].item() == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------ mechanics
def test_stage1_runs_and_trains_the_classifier_only():
    m = exact()
    calls = []
    m.seg.register_forward_hook(lambda mod, inp, out: calls.append(1))
    b = make_batch(np.random.default_rng(0), 1, 1, 3)
    m.train()
    m.training_step(b, 0, 0.09)["loss"].backward()  # stage1 = 0.1
    assert calls == []
    assert all(g is None for g in grads(m.seg))
    assert all(g is not None for g in grads(m.classifier))
    assert m.in_stage1(0.09) and not m.in_stage1(0.1)
    with pytest.raises(InputError, match="stage1"):
        exact({"stage1": 1.0})
    with pytest.raises(InputError, match="classifier_weight"):
        exact({"classifier_weight": -1.0})


def test_stage2_segments_only_the_cases_with_a_target():
    m = exact()
    sizes = []
    m.seg.register_forward_hook(lambda mod, inp, out: sizes.append(len(inp[0])))
    b = make_batch(np.random.default_rng(0), 1, 1, 3)
    b.presence[5:] = torch.tensor([[0.0], [1.0], [-1.0]])  # maskless: negative, positive, unknown
    m.train()
    m.training_step(b, 0, 0.5)
    assert sizes == [6]  # 3 full + 2 scribbled + the negative (all background) of 8
    b.target[:] = -1
    b.presence[:] = 1  # no target at all: the classifier learns, the loss is still a graph
    parts = m.training_step(b, 0, 0.5)
    assert sizes == [6] and parts["loss"].requires_grad and "ce" not in parts


def test_frozen_classifier_learns_only_from_its_own_loss():
    b = make_batch(np.random.default_rng(0), 1, 1, 3)
    m = exact()
    m.train()
    m.training_step(b, 0, 0.5)["loss"].backward()
    stage2 = grads(m.classifier)
    assert all(g is not None for g in grads(m.seg))
    m.zero_grad()
    out, _ = m._classify(pad_to_multiple(b.image, EXACT.multiple), (SIZE, SIZE))
    m.supervised_losses(out, b)["loss"].backward()
    own = grads(m.classifier)
    assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(stage2, own))

    # unfrozen: the segmentation loss reaches the classifier as well
    j = exact({"freeze_classifier": False})
    j.train()
    j.training_step(b, 0, 0.5)["loss"].backward()
    assert any(not torch.allclose(g, h, atol=1e-6) for g, h in zip(grads(j.classifier), own))


def test_fully_frozen_classifier_gets_no_gradient_and_keeps_its_statistics():
    m = exact({"classifier_weight": 0.0})
    b = make_batch(np.random.default_rng(0), 1, 1, 3)
    m.train()
    stats = {k: v.clone() for k, v in m.classifier.state_dict().items()}
    parts = m.training_step(b, 0, 0.5)
    parts["loss"].backward()
    assert all(g is None for g in grads(m.classifier)) and all(g is not None for g in grads(m.seg))
    assert all(torch.equal(v, m.classifier.state_dict()[k]) for k, v in stats.items())
    assert m.classifier.training and "presence" not in parts
    m.training_step(b, 0, 0.05)["loss"].backward()  # stage 1 still trains it
    assert all(g is not None for g in grads(m.classifier))


@pytest.mark.parametrize("fuse_down", [True, False])
def test_feature_share_skip_at_every_level(fuse_down):
    cfg = EXACT
    seg = FusedUNet(1, 1, cfg, fuse_down).eval()
    assert [(f.in_channels, f.out_channels) for f in seg.fuse] == [(2 * c, c) for c in cfg.channels]
    fused, blocks, inputs = [], [], []
    for f in seg.fuse:
        f.register_forward_hook(lambda mod, inp, out: fused.append(out))

    def record(mod, inp, out):
        inputs.append(inp[0])
        blocks.append(out)

    for lvl in seg.encoder.levels:
        lvl.register_forward_hook(record)
    x = torch.randn(2, 1, 32, 32)
    guide = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate(cfg.channels)]
    with torch.no_grad():
        seg(x, guide)
        # each fusion is W · (classifier ⊕ segmentation) + b
        for f, g, s, out in zip(seg.fuse, guide, blocks, fused):
            assert torch.allclose(out, f(torch.cat([g, s], 1)), atol=1e-6)
    # the next encoder level reads the fused feature (fuse_down) or the block's own output
    for i in range(1, len(inputs)):
        assert torch.equal(inputs[i], fused[i - 1] if fuse_down else blocks[i - 1])
    # the classifier's pyramid changes the segmentation, at every level
    with torch.no_grad():
        base = seg(x, guide)
        for i in range(len(guide)):
            other = [g if j != i else g + 1.0 for j, g in enumerate(guide)]
            assert not torch.allclose(seg(x, other), base)


def test_prediction_takes_segmentation_and_classification_from_their_branches():
    m = exact(channels=3, k=2, n_img=3)
    m.eval()
    x = torch.randn(2, 3, 37, 45)
    pred = m.predict(x, gate=False)
    padded = pad_to_multiple(x, EXACT.multiple)  # (2, 3, 40, 48)
    with torch.no_grad():
        c = m.classifier(x)
        feats = m.classifier.encoder(padded)
    assert torch.allclose(pred.presence, torch.sigmoid(c.presence_logits), atol=1e-6)
    assert torch.allclose(pred.image_class, torch.softmax(c.image_logits, 1), atol=1e-6)
    assert torch.allclose(pred.features, c.features, atol=1e-6)
    with torch.no_grad():
        seg = m.seg(padded, feats)[..., :37, :45]
    assert torch.allclose(pred.probs, torch.softmax(seg, 1), atol=1e-5)
    # the inference copy (batch norms folded) predicts the same
    folded = m.inference_copy().predict(x, gate=False)
    assert torch.allclose(folded.probs, pred.probs, atol=1e-4) and torch.allclose(folded.cams, pred.cams, atol=1e-4)


@pytest.mark.parametrize("progress", [0.1, 0.6])
def test_checkpoint_resumes_identically_in_either_stage(progress):
    rng = np.random.default_rng(0)
    m = exact()
    opt = torch.optim.AdamW(m.trainable_parameters(), 1e-3)
    m.train()
    for step in range(3):
        loss = m.training_step(make_batch(rng, 1, 1, 3), step, progress)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_step(step, progress)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = exact()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    fresh.train()
    m.zero_grad()
    b = make_batch(rng, 1, 1, 3)
    a, c = m.training_step(b, 3, progress), fresh.training_step(b, 3, progress)
    assert set(a) == set(c) and all(torch.equal(a[k], c[k]) for k in a)
    a["loss"].backward()
    c["loss"].backward()
    assert all((g is None and h is None) or torch.equal(g, h) for g, h in zip(grads(m), grads(fresh)))


@pytest.mark.parametrize("options", [{"freeze_classifier": False}, {"fuse_down": False}],
                         ids=["unfrozen", "skip-only"])
def test_option_variants_pass_the_contract(options):
    contract_checks("dual_unet", options, 3, 2, 3)
