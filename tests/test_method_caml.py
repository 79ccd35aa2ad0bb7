"""``caml``: the loss terms on hand-worked values, the memory bank, CMA, the two sub-models,
skipping the unlabelled passes, the uncertainty, and a resumed run."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import test_methods_contract as contract
from test_methods_contract import TINY, build, make_batch
from training_backend.errors import InputError
from training_backend.learning.methods import caml
from training_backend.learning.methods.caml import (
    CrossSampleAttention,
    correlation_ce,
    cross_sharpened_mse,
    project_frozen,
    ring_write,
    select_agreeing,
    sharpen,
)


def test_sharpen_hand_values():
    p = torch.tensor([0.6, 0.5, 0.2, 0.0, 1.0])
    # T = 0.1: S(0.6) = 0.6^10 / (0.6^10 + 0.4^10) = 1.5^10 / (1.5^10 + 1) = 57.665 / 58.665
    #          S(0.2) = 1 / (1 + 4^10) = 1 / 1048577; S(0.5) = 0.5; S(0) = 0; S(1) = 1
    expected = torch.tensor([57.6650390625 / 58.6650390625, 0.5, 1 / 1048577, 0.0, 1.0])
    assert torch.allclose(sharpen(p, 0.1), expected, rtol=1e-5, atol=1e-9)
    # T = 0.5: S(0.8) = 0.64 / (0.64 + 0.04) = 0.941176
    assert sharpen(torch.tensor(0.8), 0.5).item() == pytest.approx(0.64 / 0.68, rel=1e-6)


def test_cross_sharpened_mse_hand_values_and_detached_targets():
    # one pixel, two channels, T = 0.5 (1/T = 2)
    p_v = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1).requires_grad_()
    p_a = torch.tensor([0.8, 0.2]).view(1, 2, 1, 1).requires_grad_()
    # S(P_a) = (0.64/0.68, 0.04/0.68) = (0.941176, 0.058824); S(P_v) = (0.5, 0.5)
    # MSE(P_v, S(P_a)) = (0.441176^2 + 0.441176^2) / 2 = 0.194637
    # MSE(P_a, S(P_v)) = (0.3^2 + 0.3^2) / 2 = 0.09
    loss = cross_sharpened_mse(p_v, p_a, 0.5)
    assert loss.item() == pytest.approx(0.194637 + 0.09, rel=1e-5)
    loss.backward()
    # detached: P_a's gradient only from MSE(P_a, S(P_v)): 2 (P_a - 0.5) / 2 = (0.3, -0.3)
    assert torch.allclose(p_a.grad.flatten(), torch.tensor([0.3, -0.3]), atol=1e-6)
    p_a.grad = None
    cross_sharpened_mse(p_v, p_a, 0.5, detach=False).backward()  # the paper's: through S(P_a) too
    assert not torch.allclose(p_a.grad.flatten(), torch.tensor([0.3, -0.3]), atol=1e-3)


def test_correlation_ce_hand_values():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # row 0: q_v = (0, 0) -> C_v = (1/2, 1/2); q_a = (ln 3, 0) -> C_a = (3/4, 1/4)
    #        -(3/4 ln 1/2 + 1/4 ln 1/2) = ln 2 = 0.693147
    # row 1: q_v = q_a = (ln 3, 0): the entropy of (3/4, 1/4) = 0.562335
    q_v = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], requires_grad=True)
    q_a = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]], requires_grad=True)
    loss = correlation_ce(q_v, q_a, bank, tau=1.0)
    assert loss.item() == pytest.approx((math.log(2) + 0.562335) / 2, rel=1e-5)
    loss.backward()
    assert q_a.grad is None or torch.all(q_a.grad == 0)  # the auxiliary side is the target
    # row 0's gradient: (C_v - C_a) bank / tau / 2 rows = ((0.5 - 0.75) / 2, (0.5 - 0.25) / 2)
    assert torch.allclose(q_v.grad[0], torch.tensor([-0.125, 0.125]), atol=1e-6)
    # tau = 0.5 doubles the logits: row 1 both (9/10, 1/10), entropy 0.325083; row 0 C_a the same
    assert correlation_ce(q_v, q_a, bank, tau=0.5).item() == pytest.approx((math.log(2) + 0.325083) / 2, rel=1e-5)
    # normalised: the queries' scale no longer matters
    a = correlation_ce(q_v + 1, q_a, bank, 0.1, normalise=True)
    b = correlation_ce(10 * (q_v + 1), q_a, bank, 0.1, normalise=True)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_select_agreeing_top_k_per_class():
    lesion_v = torch.tensor([0.9, 0.8, 0.3, 0.6])  # argmax 1 1 0 1
    lesion_a = torch.tensor([0.7, 0.4, 0.2, 0.55])  # argmax 1 0 0 1: pixel 1 disagrees
    probs_v = torch.stack([1 - lesion_v, lesion_v]).view(1, 2, 1, 4)
    probs_a = torch.stack([1 - lesion_a, lesion_a]).view(1, 2, 1, 4)
    idx, labels = select_agreeing(probs_v, probs_a, k=1)
    assert idx.tolist() == [2, 0] and labels.tolist() == [0, 1]  # class 1: pixel 0 (0.9) beats 3 (0.6)
    idx, labels = select_agreeing(probs_v, probs_a, k=5)
    assert sorted(idx.tolist()) == [0, 2, 3] and labels.tolist() == [0, 1, 1]


def test_ring_write_newest_overwrite_oldest():
    bank = torch.zeros(4, 1)
    assert ring_write(bank, 0, 0, torch.tensor([[1.0], [2.0], [3.0]])) == (3, 3)
    assert bank.flatten().tolist() == [1, 2, 3, 0]
    assert ring_write(bank, 3, 3, torch.tensor([[4.0], [5.0]])) == (4, 1)  # 5 overwrites 1
    assert bank.flatten().tolist() == [5, 2, 3, 4]
    # six rows into four slots from slot 1: only the last four stay (12, 13, 14, 15 at 1, 2, 3, 0)
    assert ring_write(bank, 4, 1, torch.arange(10.0, 16.0)[:, None]) == (4, 1)
    assert bank.flatten().tolist() == [15, 12, 13, 14]


def test_update_bank_keeps_pixels_both_models_get_right():
    torch.manual_seed(0)
    m = build("caml", {}, 1, 1, 0)
    c = TINY.channels[0]
    feat_v, feat_a = torch.randn(1, c, 2, 2), torch.randn(1, c, 2, 2)
    target = torch.tensor([[[0, 1], [-1, 1]]])
    arg_v = torch.tensor([[0, 1], [1, 0]])  # right at (0,0), (0,1); (1,1) wrong
    arg_a = torch.tensor([[0, 1], [1, 1]])  # right at (0,0), (0,1), (1,1)

    def onehot(arg: torch.Tensor) -> torch.Tensor:  # (2, 2) classes -> (1, 2, 2, 2) probabilities
        return nn.functional.one_hot(arg, 2).permute(2, 0, 1)[None].float()

    stats = m.proj_v[1].running_mean.clone()
    m.train()
    m.update_bank(feat_v, feat_a, onehot(arg_v), onehot(arg_a), target)
    assert m.bank_filled.tolist() == [1, 1] and m.bank_next.tolist() == [1, 1]
    for cls, (y, x) in ((0, (0, 0)), (1, (0, 1))):
        expected = 0.5 * (project_frozen(m.proj_v, feat_v[:, :, y, x]) + project_frozen(m.proj_a, feat_a[:, :, y, x]))
        assert torch.allclose(m.bank[cls, 0], expected[0], atol=1e-6)
    assert torch.equal(m.proj_v[1].running_mean, stats) and m.proj_v.training  # eval-mode BN, mode restored
    assert m.bank_entries().shape == (2, 2 * c)
    m.start_new_run()
    assert m.bank_filled.sum() == 0 and m.bank_entries().shape == (0, 2 * c)


def test_cma_is_identity_in_eval_and_mixes_samples_in_training():
    torch.manual_seed(0)
    cma = CrossSampleAttention(8, heads=2, dropout=0.0)
    x = torch.randn(3, 8, 4, 4)
    cma.eval()
    assert cma(x) is x
    cma.train()
    y = cma(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    x2 = x.clone()
    x2[1] = torch.randn(8, 4, 4)  # change sample 1 only (not by a constant: layer norm removes it)
    y2 = cma(x2)
    assert not torch.allclose(y[0], y2[0], atol=1e-4)  # sample 0's output changes: the batch is mixed
    assert torch.allclose(cma.intra(x.flatten(2).transpose(1, 2))[0],
                          cma.intra(x2.flatten(2).transpose(1, 2))[0])  # the intra layer alone does not
    assert CrossSampleAttention(6, heads=4).intra.self_attn.num_heads == 3  # a divisor of the width


def test_two_sub_models_with_different_decoders():
    torch.manual_seed(0)
    m = build("caml", {}, 1, 1, 0)

    def kinds(net: nn.Module) -> set[type]:
        return {type(mod) for mod in net.modules()}

    assert nn.ConvTranspose2d in kinds(m.vanilla) and nn.ConvTranspose2d not in kinds(m.aux)
    assert CrossSampleAttention in kinds(m.aux) and CrossSampleAttention not in kinds(m.vanilla)
    shared = {id(p) for p in m.vanilla.parameters()} & {id(p) for p in m.aux.parameters()}
    assert not shared
    assert m.aux.encoder.cma_level == 3  # stride 8 (TINY's bottleneck)
    assert build("caml", {"cma_stride": 64}, 1, 1, 0).aux.encoder.cma_level == TINY.depth  # clamped
    with pytest.raises(InputError, match="cma_stride"):
        build("caml", {"cma_stride": 6}, 1, 1, 0)
    # the feature forward gives the plain forward's outputs (eval: deterministic)
    m.eval()
    x = torch.randn(2, 1, 37, 45)
    with torch.no_grad():
        for net in (m.vanilla, m.aux):
            out, feat = caml.forward_with_features(net, x)
            assert torch.allclose(out.seg_logits, net(x).seg_logits, atol=1e-5)
            assert feat.shape == (2, TINY.channels[0], 37, 45)


def test_unlabelled_passes_only_when_they_count(monkeypatch):
    torch.manual_seed(0)
    m = build("caml", {"rampup": 0.5, "skip_below": 0.05}, 1, 1, 0)
    sizes = []
    real = caml.forward_with_features
    monkeypatch.setattr(caml, "forward_with_features", lambda net, x: sizes.append(len(x)) or real(net, x))
    batch = make_batch(np.random.default_rng(0), 1, 1, 0)
    m.train()
    # r = exp(-5 (1 - 0.02/0.5)^2) = exp(-4.608) = 0.010 < 0.05: labelled images only, no L_c / L_o
    assert m.ramp(0.02) == pytest.approx(math.exp(-5 * 0.96 ** 2))
    parts = m.training_step(batch, 0, 0.02)
    assert sizes == [8, 8] and "cross" not in parts and "occ" not in parts
    assert int(m.bank_filled.sum()) > 0  # the bank fills from the labelled images meanwhile
    sizes.clear()
    parts = m.training_step(batch, 1, 0.5)  # r = 1: labelled + unlabelled through both models
    assert sizes == [12, 12] and {"cross", "occ"} <= set(parts)
    # the total: sup_weight (L_s,v + L_s,a) + consistency r L_c + occ_weight r L_o (r = 1)
    expected = 0.5 * (parts["supervised"] + parts["aux_supervised"]) + parts["cross"] + 0.05 * parts["occ"]
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    sizes.clear()
    batch.unlabelled = None  # no maskless image: L_c on the labelled images, no L_o
    parts = m.training_step(batch, 2, 0.9)
    assert sizes == [8, 8] and "cross" in parts and "occ" not in parts and parts["loss"].requires_grad


def test_uncertainty_is_the_sub_models_disagreement():
    torch.manual_seed(0)
    m = build("caml", {}, 3, 2, 3)
    x = torch.randn(2, 3, 37, 45)
    pred = m.predict(x, gate=False)
    assert pred.uncertainty.shape == (2, 37, 45)
    assert pred.uncertainty.min() >= 0 and pred.uncertainty.max() <= 1
    m.eval()
    with torch.no_grad():
        p_v = torch.softmax(m.vanilla(x).seg_logits, 1)
        p_a = torch.softmax(m.aux(x).seg_logits, 1)
    assert torch.allclose(pred.probs, p_v, atol=1e-6)  # predicts with the vanilla model
    assert torch.allclose(pred.uncertainty, 0.5 * (p_v - p_a).abs().sum(1), atol=1e-6)


def test_resumed_run_is_identical():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    m = build("caml", {}, 1, 1, 0)
    opt = torch.optim.Adam(m.trainable_parameters(), 1e-3)
    m.train()
    for step in range(3):
        loss = m.training_step(make_batch(rng, 1, 1, 0), step, 0.5)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert int(m.bank_filled.sum()) > 0
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    clone = build("caml", {}, 1, 1, 0)
    clone.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(clone.bank, m.bank) and torch.equal(clone.bank_next, m.bank_next)
    clone.train()
    batch = make_batch(rng, 1, 1, 0)
    losses = []
    for method in (m, clone):
        with torch.random.fork_rng():
            torch.manual_seed(7)
            losses.append(method.training_step(batch, 3, 0.5))
    assert set(losses[0]) == set(losses[1]) and "occ" in losses[0]
    assert all(torch.allclose(losses[0][k], losses[1][k], atol=1e-6) for k in losses[0])
    assert torch.equal(clone.bank, m.bank)


def test_paper_variant_passes_the_contract():
    """Gradients through the targets and cosine correlations: the same contract."""
    contract.test_method_contract("caml", {"detach_targets": False, "occ_normalise": True}, 1, 1, 0)


def test_options_that_would_divide_by_zero_are_refused():
    from training_backend.errors import InputError
    from training_backend.learning.methods import create_method

    for bad in ({"temperature": 0.0}, {"temperature": 0.005}, {"tau": 0.0}):
        with pytest.raises(InputError, match=next(iter(bad))):
            create_method("caml", in_channels=1, n_classes=1, n_image_classes=0, **bad)
