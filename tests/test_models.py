"""Networks: shapes on odd sizes, CAM maps, features, config round trip, MC dropout."""
from __future__ import annotations

import pytest
import torch

from training_backend.errors import InputError
from training_backend.learning.models import EncoderClassifier, ModelConfig, UNet, cam_to_maps, enable_dropout

TINY = ModelConfig(base=8, depth=3)


@pytest.mark.parametrize("size", [(37, 45), (16, 16), (64, 48), (9, 70)])
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_unet_any_size(size, norm):
    torch.manual_seed(0)
    cfg = ModelConfig(base=8, depth=3, norm=norm)
    net = UNet(3, 2, 3, cfg).eval()
    out = net(torch.randn(2, 3, *size))
    h, w = size
    s = cfg.cam_stride
    assert out.seg_logits.shape == (2, 3, h, w)
    assert out.presence_logits.shape == (2, 2)
    assert out.cam_logits.shape == (2, 2, -(-h // s), -(-w // s))
    assert out.image_logits.shape == (2, 3)
    assert out.features.shape == (2, cfg.channels[-1])
    assert all(torch.isfinite(t).all() for t in out if t is not None)


def test_training_mode_backward_on_small_odd_input():
    net = UNet(1, 1, 0, TINY).train()
    out = net(torch.randn(2, 1, 13, 21))
    assert out.image_logits is None
    (out.seg_logits.mean() + out.presence_logits.mean()).backward()
    assert net.encoder.levels[0].conv1.conv.weight.grad is not None


def test_cam_maps_range_and_peak():
    torch.manual_seed(0)
    net = UNet(1, 2, 0, TINY).eval()
    x = torch.randn(3, 1, 50, 38)
    out = net(x)
    cams = cam_to_maps(out.cam_logits, (50, 38), net.cam_stride)
    assert cams.shape == (3, 2, 50, 38)
    assert cams.min() >= 0 and cams.max() <= 1
    peaks = cams.flatten(2).amax(2)
    assert torch.all(((peaks - 1).abs() < 1e-5) | (peaks == 0))  # each map is max-normalised (or all 0)
    # a hand-made logit map: positive cell -> 1 at that place, negatives -> 0
    logits = torch.full((1, 1, 4, 4), -1.0)
    logits[0, 0, 1, 2] = 3.0
    m = cam_to_maps(logits, (16, 16), 4)
    assert m[0, 0, 6, 10] == pytest.approx(1.0) and m[0, 0, 15, 0] == 0


def test_presence_is_pooled_cam():
    cfg = ModelConfig(base=8, depth=3, pool_r=0.0)  # plain average pooling
    net = UNet(1, 2, 0, cfg).eval()
    out = net(torch.randn(2, 1, 32, 32))
    assert torch.allclose(out.presence_logits, out.cam_logits.mean((2, 3)), atol=1e-5)
    cfg = ModelConfig(base=8, depth=3, pool_r=4.0)  # log-sum-exp lies between mean and max
    out = UNet(1, 2, 0, cfg).eval()(torch.randn(2, 1, 32, 32))
    flat = out.cam_logits.flatten(2)
    assert torch.all(out.presence_logits >= flat.mean(2) - 1e-5) and torch.all(out.presence_logits <= flat.amax(2) + 1e-5)


def test_encoder_classifier_matches_unet_heads():
    torch.manual_seed(0)
    unet = UNet(1, 1, 3, TINY).eval()
    enc = EncoderClassifier(1, 1, 3, TINY).eval()
    missing = enc.load_state_dict(unet.state_dict(), strict=False)
    assert not missing.missing_keys  # same encoder + heads
    x = torch.randn(2, 1, 40, 40)
    a, b = unet(x), enc(x)
    assert b.seg_logits is None
    for name in ("presence_logits", "cam_logits", "image_logits", "features"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-5)
    assert sum(p.numel() for p in enc.parameters()) < sum(p.numel() for p in unet.parameters())


def test_mc_dropout_only_with_enable_dropout():
    torch.manual_seed(0)
    net = UNet(1, 1, 2, ModelConfig(base=8, depth=3, dropout=0.3)).eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x).seg_logits, net(x).seg_logits)
        enable_dropout(net)
        assert not torch.allclose(net(x).seg_logits, net(x).seg_logits)
    assert not net.encoder.levels[0].norm1.training  # normalisation stays in eval mode


def test_config_round_trip_and_validation():
    cfg = ModelConfig(base=12, depth=3, dropout=0.2, norm="instance", cam_levels=1, pool_r=0.0)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict({}) == ModelConfig() and ModelConfig.from_dict(None) == ModelConfig()
    assert ModelConfig().channels == [16, 16, 32, 64, 128]
    assert ModelConfig(base=64, depth=5).channels[-1] == 512  # capped
    with pytest.raises(InputError, match="unknown setting"):
        ModelConfig.from_dict({"width": 3})
    for bad in ({"norm": "group"}, {"depth": 0}, {"dropout": 1.0}, {"base": 0}, {"cam_levels": 9}):
        with pytest.raises(InputError):
            ModelConfig(**bad)


def test_create_method_uses_channels_last_with_the_same_outputs():
    from training_backend.learning.methods import create_method

    torch.manual_seed(0)
    m = create_method("supervised", in_channels=1, n_classes=1, n_image_classes=0, model=TINY).eval()
    w = m.net.encoder.levels[1].conv1.conv.weight  # (out, in > 1, 3, 3)
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    plain = UNet(1, 1, 0, TINY).eval()
    plain.load_state_dict(m.net.state_dict())  # copies into torch's default format
    x = torch.randn(2, 1, 40, 24)
    with torch.no_grad():
        assert torch.allclose(m.net(x).seg_logits, plain(x).seg_logits, atol=1e-5)


def test_keep_freed_memory_is_idempotent():
    import sys

    from training_backend.learning.runtime import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() == first
    if sys.platform.startswith("linux"):
        import platform

        assert first == (platform.libc_ver()[0] == "glibc")


@pytest.mark.parametrize("method_name", ["supervised", "cam", "mean_teacher"])
def test_inference_copy_folds_batch_norm_same_outputs(method_name):
    from training_backend.learning.methods import create_method

    torch.manual_seed(0)
    method = create_method(method_name, in_channels=3, n_classes=2, n_image_classes=3, model=TINY).eval()
    for m in method.modules():  # running statistics far from the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.3, 3)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    frozen = method.inference_copy()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    # the method itself is untouched: it may go on training
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in method.modules())
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())
    x = torch.randn(2, 3, 37, 45)
    a, b = method.predict(x), frozen.predict(x)
    assert torch.allclose(a.probs, b.probs, atol=1e-5)
    assert torch.allclose(a.cams, b.cams, atol=1e-4)
    assert torch.allclose(a.presence, b.presence, atol=1e-5)


def test_fold_batch_norm_leaves_instance_norm():
    from training_backend.learning.models import fold_batch_norm

    net = UNet(1, 1, 0, ModelConfig(base=8, depth=3, norm="instance")).eval()
    assert fold_batch_norm(net) == 0
    assert fold_batch_norm(UNet(1, 1, 0, TINY).eval()) == 2 * (TINY.depth + 1 + TINY.depth)
