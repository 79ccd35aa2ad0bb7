"""``collaborative``: its loss terms on hand-made inputs, its schedule and its mechanics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import test_methods_contract as contract
from test_methods_contract import SIZE, build, make_batch
from training_backend.errors import InputError
from training_backend.learning.methods.collaborative import (
    attention_pseudo_target,
    attention_to_maps,
    discriminator_loss,
    frozen,
    generator_adversarial_loss,
    grader_losses,
    refine_maps,
)

LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------- pure functions
def test_refine_maps_divides_by_the_peak_or_the_floor():
    p = torch.tensor([0.8, 0.4, 0.1, 0.0]).view(1, 1, 2, 2)
    a = torch.tensor([0.5, 1.0, 1.0, 1.0]).view(1, 1, 2, 2)
    # p·α = [0.4, 0.4, 0.1, 0]; peak 0.4 >= 0.25: divided by 0.4 -> [1, 1, 0.25, 0]
    r, peak = refine_maps(p, a, min_peak=0.25)
    assert torch.allclose(r.flatten(), torch.tensor([1.0, 1.0, 0.25, 0.0]))
    assert peak.item() == pytest.approx(0.4)
    # a weak map: p·α = [0.1, 0.1, 0.025, 0], peak 0.1 < 0.25: divided by 0.25 -> [0.4, 0.4, 0.1, 0]
    r, peak = refine_maps(p / 4, a, min_peak=0.25)
    assert torch.allclose(r.flatten(), torch.tensor([0.4, 0.4, 0.1, 0.0]))
    # without attention: p alone, peak 0.8 -> [1, 0.5, 0.125, 0]
    r, _ = refine_maps(p, None, min_peak=0.25)
    assert torch.allclose(r.flatten(), torch.tensor([1.0, 0.5, 0.125, 0.0]))


def test_attention_pseudo_target_rules():
    # 4 pixels per image: p = [0.9, 0.5, 0.04, 0.2], α = 1 -> peak 0.9, r = [1, 0.556, 0.044, 0.222]
    p = torch.tensor([0.9, 0.5, 0.04, 0.2]).view(1, 1, 2, 2).repeat(4, 1, 1, 1)
    a = torch.ones_like(p)
    presence = torch.tensor([[1.0], [0.0], [-1.0], [1.0]])
    p[3] = p[3] / 9  # peak 0.1 < min_peak 0.25: the present lesion is not found
    t = attention_pseudo_target(p, a, presence, hi=0.5, lo=0.1, min_peak=0.25)
    assert t[0].flatten().tolist() == [1, 1, 0, -1]  # r > 0.5 lesion, r < 0.1 background, between ignored
    assert (t[1] == 0).all()  # negative image: all background
    assert (t[2] == -1).all()  # nothing known: ignored
    assert (t[3] == -1).all()  # present but not found: the whole image ignored
    # the attention moves the lesion: α = [0.2, 1, 1, 1] -> p·α = [0.18, 0.5, 0.04, 0.2], peak 0.5,
    # r = [0.36, 1, 0.08, 0.4]
    a2 = torch.tensor([0.2, 1.0, 1.0, 1.0]).view(1, 1, 2, 2)
    t = attention_pseudo_target(p[:1], a2, presence[:1], hi=0.5, lo=0.1, min_peak=0.25)
    assert t[0].flatten().tolist() == [-1, 1, 0, -1]


def test_attention_pseudo_target_two_classes():
    # class 1 present, class 2 absent: class 2's map neither makes lesion nor blocks background
    p = torch.zeros(1, 2, 1, 3)
    p[0, 0] = torch.tensor([0.9, 0.05, 0.0])
    p[0, 1] = torch.tensor([0.0, 0.9, 0.9])
    t = attention_pseudo_target(p, None, torch.tensor([[1.0, 0.0]]), hi=0.5, lo=0.1, min_peak=0.25)
    assert t.flatten().tolist() == [1, 0, 0]
    # class 2 unknown: its strong pixels are ignored, never class 2
    t = attention_pseudo_target(p, None, torch.tensor([[1.0, -1.0]]), hi=0.5, lo=0.1, min_peak=0.25)
    assert t.flatten().tolist() == [1, -1, -1]


def test_discriminator_and_generator_losses():
    zeros = torch.zeros(2, 1, 2, 2)
    # logit 0: every BCE is log 2; ½ (log 2 + log 2) = log 2
    assert discriminator_loss(zeros, zeros).item() == pytest.approx(LOG2)
    # a sure, right D on reals (logit 20: BCE ~ 2e-9) and unsure on fakes: ½ log 2
    assert discriminator_loss(zeros + 20, zeros).item() == pytest.approx(0.5 * LOG2, rel=1e-6)
    # G: logit log 3 -> D(fake) = 0.75 -> -log 0.75
    assert generator_adversarial_loss(zeros + math.log(3)).item() == pytest.approx(-math.log(0.75))


def test_grader_losses_use_known_labels_only():
    logits = torch.zeros(3, 2)
    presence = torch.tensor([[1.0, -1.0], [0.0, -1.0], [-1.0, -1.0]])
    # presence: two known entries, each BCE(0 logit) = log 2; image class: 3 classes at logit 0,
    # two known rows, each CE = log 3
    parts = grader_losses(logits, torch.zeros(3, 3), presence, torch.tensor([2, -1, 0]))
    assert parts["grader_presence"].item() == pytest.approx(LOG2)
    assert parts["grader_image_class"].item() == pytest.approx(math.log(3))
    parts = grader_losses(logits, None, torch.full((3, 2), -1.0), torch.full((3,), -1))
    assert parts == {}


def test_attention_to_maps_upsamples_and_crops():
    alpha = torch.rand(2, 3, 3, 4)  # stride 4 over a padded 12 x 16 input
    maps = attention_to_maps(alpha, (10, 13), 4)
    assert maps.shape == (2, 3, 10, 13) and maps.min() >= 0 and maps.max() <= 1
    const = attention_to_maps(torch.full((1, 1, 2, 2), 0.3), (8, 8), 4)
    assert torch.allclose(const, torch.full_like(const, 0.3))  # not stretched to a maximum of 1


def test_frozen_blocks_parameter_gradients_only():
    lin = torch.nn.Linear(2, 1)
    x = torch.ones(1, 2, requires_grad=True)
    with frozen(lin):
        assert not any(p.requires_grad for p in lin.parameters())
        lin(x).sum().backward()
    assert all(p.requires_grad for p in lin.parameters()) and lin.weight.grad is None
    assert torch.equal(x.grad, lin.weight.detach())  # the input still gets its gradient


# ----------------------------------------------------------------------------- the method
def test_schedule_windows_and_ramp():
    m = build("collaborative", {"pretrain": 0.3, "cycles": 7, "segmenter_share": 0.5, "rampup": 0.2}, 1, 1, 0)
    # cycles of 0.1 after 0.3: (0.3, 0.35] segmenter, (0.35, 0.4] grader, ...
    assert [m.window(t) for t in (0.0, 0.29, 0.3, 0.32, 0.36, 0.41, 0.99, 1.0)] == [
        "pretrain", "pretrain", "grader", "segmenter", "grader", "segmenter", "grader", "grader"]
    assert m.ramp(0.2) == 0.0
    assert m.ramp(0.4) == pytest.approx(math.exp(-5 * 0.5 ** 2))  # half-way: exp(-1.25)
    assert m.ramp(0.9) == 1.0
    assert build("collaborative", {"pretrain": 1.0}, 1, 1, 0).window(1.0) == "pretrain"
    assert build("collaborative", {"segmenter_share": 0.0}, 1, 1, 0).window(0.9) == "grader"
    for bad in ({"cycles": 0}, {"pretrain": 1.5}, {"segmenter_share": -0.1}):
        with pytest.raises(InputError):
            build("collaborative", bad, 1, 1, 0)


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_segmenter_window_trains_g_and_d_but_not_the_grader():
    torch.manual_seed(0)
    m = build("collaborative", {"pretrain": 0.0, "rampup": 0.0}, 3, 2, 3)
    batch = make_batch(np.random.default_rng(0), 3, 2, 3)
    m.train()
    parts = m.training_step(batch, 5, 0.01)  # first cycle, segmenter window
    assert {"pseudo_fg", "adv_g", "adv_d"} <= set(parts) and "grader_presence" not in parts
    assert m.grader.training  # eval only for its pseudo-mask forward
    parts["loss"].backward()
    assert all(g is None for g in _grads(m.grader))
    assert all(g is not None for g in _grads(m.discriminator))
    assert all(p.requires_grad for p in m.discriminator.parameters())  # unfrozen again


def test_g_adversarial_term_gives_d_no_gradient():
    torch.manual_seed(0)
    m = build("collaborative", {}, 1, 1, 0)
    image = torch.randn(2, 1, SIZE, SIZE)
    logits = m.net(image).seg_logits
    lesion = torch.softmax(logits, 1)[:, 1:]
    m.g_adversarial(image, lesion).backward()
    assert all(g is None for g in _grads(m.discriminator))
    assert m.net.out.conv.conv.weight.grad.abs().sum() > 0  # it reaches G


def test_d_loss_gives_g_no_gradient():
    torch.manual_seed(0)
    m = build("collaborative", {}, 1, 1, 0)
    batch = make_batch(np.random.default_rng(0), 1, 1, 0)
    lesion = torch.softmax(m.net(batch.image).seg_logits, 1)[:, 1:]
    real, fake = m.real_rows(batch), m.fake_rows(batch)
    assert real.tolist()[:3] == [True] * 3 and not real[3:].any()  # the 3 full masks
    assert not fake[:5].any()  # masks and scribbles are never fakes
    m.d_loss(batch, lesion, real, fake).backward()
    assert all(g is None for g in _grads(m.net))
    assert all(g is not None for g in _grads(m.discriminator))


def test_grader_window_trains_the_grader_on_detached_maps():
    torch.manual_seed(0)
    m = build("collaborative", {}, 3, 2, 3)
    batch = make_batch(np.random.default_rng(0), 3, 2, 3)
    m.train()
    parts = m.training_step(batch, 0, 0.1)  # pretraining
    assert {"grader_presence", "grader_image_class"} <= set(parts) and "adv_d" not in parts
    # the grader's loss alone gives G no gradient
    out = m.net(batch.image)
    presence, image_logits, _ = m.grade(batch.image, out.seg_logits)
    sum(grader_losses(presence, image_logits, batch.presence, batch.image_class).values()).backward()
    assert all(g is None for g in _grads(m.net))
    assert all(g is not None for g in _grads(m.grader))


def test_pseudo_losses_follow_the_refined_target():
    torch.manual_seed(0)
    m = build("collaborative", {}, 1, 1, 0)
    batch = make_batch(np.random.default_rng(0), 1, 1, 0)
    m.train()
    fake = m.fake_rows(batch)
    image, presence = batch.image[fake], batch.presence[fake]
    logits = m.net(image).seg_logits
    parts = m.pseudo_losses(image, logits, presence)
    m.grader.eval()
    with torch.no_grad():
        lesion = torch.softmax(logits, 1)[:, 1:]
        alpha = attention_to_maps(m.grader(image, lesion)[2], (SIZE, SIZE), 4)
    o = m.options
    target = attention_pseudo_target(lesion, alpha, presence, o["pseudo_hi"], o["pseudo_lo"], o["pseudo_min_peak"])
    assert parts["pseudo_fg"].item() == pytest.approx((target > 0).float().mean().item())
    if (target >= 0).any():
        expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=-1)
        assert parts["pseudo_ce"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_prediction_comes_from_g_and_the_grader():
    torch.manual_seed(0)
    m = build("collaborative", {}, 3, 2, 3)
    m.eval()
    x = torch.randn(2, 3, 37, 45)
    pred = m.predict(x, gate=False)
    with torch.no_grad():
        g = m.net(x)
        presence, image_logits, alpha = m.grade(x, g.seg_logits)
    assert torch.allclose(pred.probs, torch.softmax(g.seg_logits, 1))
    assert torch.allclose(pred.presence, torch.sigmoid(g.presence_logits))  # gate_on=segmenter
    assert torch.allclose(pred.image_class, torch.softmax(image_logits, 1))
    assert torch.allclose(pred.cams, attention_to_maps(alpha, (37, 45), 4))
    assert alpha.shape == (2, 2, 10, 12)
    folded = m.inference_copy().predict(x, gate=False)  # the grader's batch norms folded too
    assert torch.allclose(folded.probs, pred.probs, atol=1e-5)
    assert torch.allclose(folded.presence, pred.presence, atol=1e-5)
    assert torch.allclose(folded.cams, pred.cams, atol=1e-5)
    m.options["gate_on"] = "grader"
    assert torch.allclose(m.predict(x, gate=False).presence, torch.sigmoid(presence), atol=1e-6)
    m.options["gate_on"] = "both"
    both = 0.5 * (torch.sigmoid(presence) + torch.sigmoid(g.presence_logits))
    assert torch.allclose(m.predict(x, gate=False).presence, both, atol=1e-5)
    with pytest.raises(InputError, match="gate_on"):
        build("collaborative", {"gate_on": "nobody"}, 3, 2, 3)
    with pytest.raises(InputError, match="pseudo_min_peak"):  # the refinement divides by it
        build("collaborative", {"pseudo_min_peak": 0.0}, 3, 2, 3)


@pytest.mark.parametrize("window", [0.1, 0.32, 0.39])
def test_any_batch_composition(window):
    """A batch of one, masks only, or image labels only: finite losses in every window."""
    torch.manual_seed(0)
    m = build("collaborative", {"rampup": 0.0}, 1, 1, 0)
    m.train()
    full = make_batch(np.random.default_rng(0), 1, 1, 0)
    for rows in ([0], [5], list(range(5)), list(range(5, 8))):
        b = make_batch(np.random.default_rng(0), 1, 1, 0)
        for name in ("image", "target", "has_mask", "full", "image_class", "presence"):
            setattr(b, name, getattr(full, name)[rows])
        b.unlabelled = None
        parts = m.training_step(b, 3, window)
        assert torch.isfinite(parts["loss"]) and parts["loss"].requires_grad


def test_contract_without_attention_and_adversary():
    """The ablation (self-training on G's own maps, no discriminator) passes the contract too."""
    contract.test_method_contract("collaborative", {"attention": False, "adversarial": False}, 3, 2, 3)
