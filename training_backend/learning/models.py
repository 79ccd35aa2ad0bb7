"""Networks: a 2-D U-Net with a presence/CAM head and an image-class head, and the encoder alone.

Both networks share one encoder (MONAI ``UnetBasicBlock`` stages, stride-2 convolutions for
downsampling) and one set of classification heads:

* **presence / CAM head** — a 1×1 convolution on each of the deepest ``cam_levels`` encoder levels
  gives K class-activation logit maps; the maps are upsampled to the finest of those levels and
  averaged (multi-scale CAM). Log-sum-exp pooling of that map gives the K presence logits, so
  the CAM *is* the map the classifier decides from (``cam_to_maps`` turns it into [0, 1] maps).
* **image-class head** — global average pooling of the bottleneck → dropout → linear layer
  (absent when ``n_image_classes == 0``).

Inputs of any size are padded (replicate) to a multiple of ``2**depth`` inside ``forward`` and the
outputs are cropped back. Dropout (``nn.Dropout2d`` after the bottleneck and the deeper decoder
blocks, plus before the linear head) stays usable at predict time for MC sampling:
``enable_dropout(model)`` switches only the dropout layers to training mode.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import Tensor, nn

from training_backend.config import ModelConfig  # noqa: F401  (the architecture; re-exported)

#: Normalisation layers (MONAI names). Batch norm is the default: instance norm fixes each
#: channel's spatial mean per image, which leaves the globally pooled bottleneck features (the
#: presence / image-class heads and the diversity features) almost constant across images.
_NORMS = {"batch": ("batch", {"affine": True}), "instance": ("instance", {"affine": True})}
_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


class NetOutput(NamedTuple):
    """What the networks return (``seg_logits`` is ``None`` for ``EncoderClassifier``)."""

    seg_logits: Tensor | None  # (B, K+1, H, W)
    presence_logits: Tensor  # (B, K)
    cam_logits: Tensor  # (B, K, h, w), h = ceil(H / cam_stride)
    image_logits: Tensor | None  # (B, n_image_classes) or None
    features: Tensor  # (B, F) globally pooled bottleneck features


def enable_dropout(module: nn.Module) -> None:
    """Put only the dropout layers of ``module`` in training mode (MC dropout).

    Args:
        module: a network, normally already in eval mode.
    """
    for m in module.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
            m.train()


def pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """Pad (replicate) the bottom/right of ``x`` to a multiple of ``multiple``, at least 2×multiple.

    Args:
        x: (B, C, H, W) tensor.
        multiple: size multiple.
    """
    h, w = x.shape[-2:]
    ph = max(math.ceil(h / multiple) * multiple, 2 * multiple) - h
    pw = max(math.ceil(w / multiple) * multiple, 2 * multiple) - w
    if ph == 0 and pw == 0:
        return x
    if ph >= h or pw >= w:  # replicate works for any size; reflect would not
        return F.pad(x, (0, pw, 0, ph), mode="replicate")
    return F.pad(x, (0, pw, 0, ph), mode="reflect")


def cam_to_maps(cam_logits: Tensor, size: tuple[int, int], stride: int) -> Tensor:
    """Class activation maps in [0, 1] at image size.

    ReLU, bilinear upsampling by ``stride``, crop to ``size``, then per image and class division
    by the maximum (an all-non-positive map stays 0).

    Args:
        cam_logits: (B, K, h, w) CAM logits from ``NetOutput.cam_logits``.
        size: (H, W) of the network input.
        stride: ``ModelConfig.cam_stride``.
    """
    # channel-first: bilinear upsampling of a channels-last map is about 3x slower on CPU
    cam = F.relu(cam_logits.contiguous())  # (B, K, h, w)
    cam = F.interpolate(cam, scale_factor=stride, mode="bilinear", align_corners=False)
    cam = cam[..., : size[0], : size[1]]  # (B, K, H, W)
    peak = cam.flatten(2).amax(dim=2).clamp_min(1e-6)[..., None, None]  # (B, K, 1, 1)
    return cam.div_(peak)  # in [0, 1]: 0 <= v <= peak, and IEEE division is correctly rounded


@torch.no_grad()
def fold_batch_norm(module: nn.Module) -> int:
    """Fold every batch norm of the U-Net blocks into the convolution before it, in place.

    In eval mode ``norm(conv(x))`` uses the running statistics: it is the affine map
    ``conv'(x)`` with weight ``w * g / sqrt(var + eps)`` and bias ``(b - mean) * g / sqrt(var + eps) + beta``; the norm
    becomes an identity. The outputs are the same to float rounding, one pass over every
    activation fewer. Only for inference: a folded module can no longer train its norms. Weights
    keep their memory format.

    Args:
        module: a network or method (every MONAI ``UnetBasicBlock`` inside is folded).

    Returns:
        How many norms were folded.
    """
    folded = 0
    for block in module.modules():
        if not isinstance(block, UnetBasicBlock):
            continue
        for conv_name, norm_name in (("conv1", "norm1"), ("conv2", "norm2")):
            norm = getattr(block, norm_name, None)
            conv = getattr(getattr(block, conv_name, None), "conv", None)
            if not (isinstance(norm, nn.BatchNorm2d) and isinstance(conv, nn.Conv2d)
                    and norm.track_running_stats and norm.running_var is not None):
                continue
            scale = torch.rsqrt(norm.running_var + norm.eps)  # (C_out,)
            if norm.affine:
                scale = scale * norm.weight
            bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
            bias = (bias - norm.running_mean) * scale
            if norm.affine:
                bias = bias + norm.bias
            # an elementwise product keeps the weight's memory format (channels-last here)
            conv.weight = nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
            conv.bias = nn.Parameter(bias, requires_grad=False)
            setattr(block, norm_name, nn.Identity())
            folded += 1
    return folded


class Encoder(nn.Module):
    """U-Net encoder: level 0 at full resolution, level i at stride 2**i; returns every level."""

    def __init__(self, in_channels: int, cfg: ModelConfig):
        super().__init__()
        norm = _NORMS[cfg.norm]
        ch = cfg.channels
        self.levels = nn.ModuleList(
            [UnetBasicBlock(2, in_channels, ch[0], kernel_size=3, stride=1, norm_name=norm, act_name=_ACT)]
            + [
                UnetBasicBlock(2, ch[i - 1], ch[i], kernel_size=3, stride=2, norm_name=norm, act_name=_ACT)
                for i in range(1, cfg.depth + 1)
            ]
        )
        self.bottleneck_dropout = nn.Dropout2d(cfg.dropout)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)  # (B, ch[i], H/2^i, W/2^i)
            feats.append(x)
        feats[-1] = self.bottleneck_dropout(feats[-1])
        return feats


class ClassifierHeads(nn.Module):
    """Presence/CAM head (multi-scale 1×1 convolutions) and image-class head."""

    def __init__(self, n_classes: int, n_image_classes: int, cfg: ModelConfig):
        super().__init__()
        ch = cfg.channels
        self.cfg = cfg
        self.cam_convs = nn.ModuleList(
            [nn.Conv2d(ch[cfg.depth - j], n_classes, kernel_size=1) for j in range(cfg.cam_levels)]
        )
        self.image_head = None
        if n_image_classes > 0:
            self.image_head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(ch[-1], n_image_classes))

    def forward(self, feats: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        cfg = self.cfg
        finest = feats[cfg.depth - cfg.cam_levels + 1]
        maps = []
        for j, conv in enumerate(self.cam_convs):
            m = conv(feats[cfg.depth - j])  # (B, K, h_j, w_j)
            if m.shape[-2:] != finest.shape[-2:]:
                m = F.interpolate(m, size=finest.shape[-2:], mode="bilinear", align_corners=False)
            maps.append(m)
        cam = torch.stack(maps, 0).mean(0)  # (B, K, h, w) over the padded input
        s = cfg.cam_stride
        cam = cam[..., : math.ceil(size[0] / s), : math.ceil(size[1] / s)]  # cells covering the image
        flat = cam.flatten(2)  # (B, K, h*w)
        if cfg.pool_r > 0:
            r = float(cfg.pool_r)
            presence = (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r  # (B, K)
        else:
            presence = flat.mean(dim=2)
        pooled = feats[-1].mean(dim=(2, 3))  # (B, F)
        image_logits = self.image_head(pooled) if self.image_head is not None else None
        return presence, cam, image_logits, pooled


class UNet(nn.Module):
    """2-D U-Net with segmentation, presence/CAM and image-class heads.

    Args:
        in_channels: image channels (1 grey, 3 RGB).
        n_classes: K lesion classes; the segmentation head has K+1 outputs (0 = background).
        n_image_classes: image-level classes (0 = no image-class head).
        cfg: architecture (default ``ModelConfig()``).
    """

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int = 0, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg, self.n_classes, self.n_image_classes = cfg, n_classes, n_image_classes
        ch = cfg.channels
        norm = _NORMS[cfg.norm]
        self.encoder = Encoder(in_channels, cfg)
        self.heads = ClassifierHeads(n_classes, n_image_classes, cfg)
        # decoder[j] takes level depth-j up to level depth-j-1
        self.decoder = nn.ModuleList(
            [
                UnetUpBlock(2, ch[i + 1], ch[i], kernel_size=3, stride=1, upsample_kernel_size=2, norm_name=norm, act_name=_ACT)
                for i in reversed(range(cfg.depth))
            ]
        )
        # channel dropout after every decoder block except the full-resolution one
        self.decoder_dropout = nn.ModuleList(
            [nn.Dropout2d(cfg.dropout) if i > 0 else nn.Identity() for i in reversed(range(cfg.depth))]
        )
        self.out = UnetOutBlock(2, ch[0], n_classes + 1)

    @property
    def cam_stride(self) -> int:
        return self.cfg.cam_stride

    def forward(self, x: Tensor) -> NetOutput:
        size = tuple(x.shape[-2:])  # (H, W)
        feats = self.encoder(pad_to_multiple(x, self.cfg.multiple))  # level i: (B, ch[i], Hp/2^i, Wp/2^i)
        presence, cam, image_logits, pooled = self.heads(feats, size)
        y = feats[-1]
        for j, (up, drop) in enumerate(zip(self.decoder, self.decoder_dropout)):
            y = drop(up(y, feats[-2 - j]))  # (B, ch[i], Hp/2^i, Wp/2^i)
        seg = self.out(y)[..., : size[0], : size[1]]  # (B, K+1, H, W)
        return NetOutput(seg, presence, cam, image_logits, pooled)


class EncoderClassifier(nn.Module):
    """The U-Net encoder with the presence/CAM and image-class heads, without a decoder.

    Args:
        in_channels: image channels.
        n_classes: K lesion classes (K presence logits / CAMs).
        n_image_classes: image-level classes (0 = no image-class head).
        cfg: architecture (default ``ModelConfig()``).
    """

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int = 0, cfg: ModelConfig | None = None):
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg, self.n_classes, self.n_image_classes = cfg, n_classes, n_image_classes
        self.encoder = Encoder(in_channels, cfg)
        self.heads = ClassifierHeads(n_classes, n_image_classes, cfg)

    @property
    def cam_stride(self) -> int:
        return self.cfg.cam_stride

    def forward(self, x: Tensor) -> NetOutput:
        size = tuple(x.shape[-2:])
        feats = self.encoder(pad_to_multiple(x, self.cfg.multiple))
        presence, cam, image_logits, pooled = self.heads(feats, size)
        return NetOutput(None, presence, cam, image_logits, pooled)
