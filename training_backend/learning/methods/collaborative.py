"""``collaborative``: a lesion segmenter and a lesion-attentive grader that teach each other.

After Zhou et al., CVPR 2019 ("Collaborative Learning of Semi-Supervised Segmentation and
Classification for Medical Images"). Two pools of data: a few cases with masks, many with an
image label only (BUSI: normal/benign/malignant; IDRiD-like projects: lesion present per class).

Networks
--------
* **G**, the lesion segmenter: a ``UNet`` (``build_unet``). Prediction uses its segmentation.
* **the grader** (`LesionAttentiveGrader`): a small CNN that takes the image and G's lesion maps
  (the detached softmax of G, one map per lesion class) and grades the image: image-class logits
  (when the project has image classes) and one presence logit per lesion class. Per lesion
  class k it builds an attention map α_k in [0, 1] from three things: G's map of k (its own
  grouped conv), the grader's low-level features f_low (stride 4) and a global context vector
  f_high (the unattended deep path, globally pooled, gating the fused features channel-wise).
  The attended features f_low ⊙ α_k go through the shared deep path; branch k's pooled features
  give presence_k, the concatenation of all branches (reduced by a linear layer) the image
  class. ``Prediction.cams`` are the α_k and ``Prediction.image_class`` the grader's output
  (so the image-class AUC is the grader's). ``Prediction.presence``, which gates empty
  predictions, is G's own presence head by default (``gate_on``: "grader" or "both" take the
  grader's, or the mean): on BUSI with 10 % of the masks the grader's presence removed lesions
  G had found (gated Dice 0.50 against 0.61 ungated, one 300 s run).
* **D**, a PatchGAN-like discriminator (`PatchDiscriminator`: three 4×4 stride-2 convolutions and
  a 3×3 one, no normalisation) on the image concatenated with K lesion maps.

Losses (one optimiser over all parameters; every term's gradient reaches only its network)
-----------------------------------------------------------------------------------------
* G, every step: ``Method.supervised_losses`` on G's outputs (partial CE + masked Dice on the
  masks, all-background targets for maskless negatives, presence BCE and image-class CE on G's
  own heads: G is at least the ``supervised`` U-Net).
* grader (pretraining and grader windows): ``BCE(presence_logits, presence)`` on the known
  presence entries + ``CE(image_logits, image_class)`` on the known classes, with G's maps
  detached (`grader_losses`).
* G, segmenter windows, on the image-labelled cases without a mask (negatives excluded: they
  have a full background target already):
  - pseudo-masks: ``w_p(t) · [CE(G, ŷ) + dice_weight · Dice(G, ŷ)]`` on the labelled pixels of
    ŷ = `attention_pseudo_target` (below), ``w_p(t) = pseudo_weight · ramp(t)``;
  - adversarial: ``w_a(t) · BCE(D(x ⊕ p_G), 1)`` (`generator_adversarial_loss`), D's parameters
    frozen for that forward, ``w_a(t) = adv_weight · ramp(t)``;
  ``ramp(t) = exp(-5 (1 - (t - pretrain) / rampup)^2)`` (0 before ``pretrain``).
* D, every step after ``pretrain``: ``½ BCE(D(x ⊕ y), 1) + ½ BCE(D(x ⊕ p_G.detach()), 0)``
  (`discriminator_loss`), y the one-hot full masks of the batch (real), p_G G's lesion
  probabilities on the image-labelled maskless cases (fake). Scribbled cases are neither.
  Only when the batch has both.

Pseudo-masks (`refine_maps`, `attention_pseudo_target`): r_k = p_k · α_k / max(peak_k,
``pseudo_min_peak``) with peak_k the image's maximum of p_k · α_k; then the thresholds of
``cam.cam_pseudo_target``: lesion k where r_k > ``pseudo_hi`` and k is labelled present,
background where every class not known absent has r < ``pseudo_lo``, ignored in between;
classes of unknown presence never become lesion. A class labelled present whose peak is below
``pseudo_min_peak`` (G and the grader do not find it) leaves the whole image unlabelled: the
label says a lesion is there and the maps do not say where, so a background label would be
wrong. ``attention=False`` uses r_k = p_k alone (self-training without the grader: an ablation).

Schedule (progress t, the fraction of the run)
----------------------------------------------
1. ``t < pretrain``: G learns from the masks only; the grader learns beside it from G's
   (detached) maps, which costs little and gives gating a trained grader from the start.
2. then ``cycles`` equal cycles, each a *segmenter window* (the first ``segmenter_share``) then
   a *grader window*. Segmenter window: G fine-tunes on pseudo-masks and the adversarial term
   (grader frozen: eval mode, no gradient). Grader window: the grader trains on G's detached
   maps. G keeps learning from the masks in both (its forward pass is paid for anyway).
   Why windows of the run and not alternate steps: during a segmenter window the function that
   makes the pseudo-masks stays fixed, so G fits a stable target instead of chasing a grader that
   moves every step (the loop the paper's alternation avoids); during a grader window the grader
   catches up with the new G. Windows measured in progress do not depend on the device's speed;
   each cycle ends with a grader window, so the grader that predicts was fitted to the final G.

Ours, not the paper's (its thresholds, weights, schedules and combination are not public):
the whole schedule and its defaults, pretraining the grader beside G, the refinement formula and
its thresholds, ignoring a present class's image when it is not found, the grader's shape
(stride-4 stem of two MONAI blocks, a two-block deep path, avg+max pooled lesion maps, a learned
per-class skip ``prior_scale · (2 m_k - 1)`` added to the attention logit so that α starts as a
soft copy of G's map), the real/fake pools of D, and the weights: ``pseudo_weight`` 0.5 and
``adv_weight`` 0.01 (the unofficial re-implementation's λ = 10 of segmentation against 1 of
adversarial is unverified; 0.01 follows Hung et al. 2018's semi-supervised adversarial
segmentation practice for a one-hot-vs-softmax discriminator). The grader's and D's losses have
weight 1: each only reaches its own parameters, and Adam is insensitive to their scale.

Scaled down for a 2-core CPU: the grader is base-width, runs at stride 4 and costs about a tenth
of G; D has three strided convolutions of base, 2·base, 4·base channels.

Cost of a step relative to ``supervised`` (G forward + backward on the batch; measured on one
CPU thread, 128 px, batch 8: the grader's forward + backward costs about 0.1 of G's, D's about
0.05): pretraining about 1.1× (the grader); grader window about 1.15× (the grader and D);
segmenter window about 1.1× (the grader's forward without gradient on the maskless cases, D on
reals and fakes, G's adversarial term through D). Prediction: G plus the grader, about 1.1×.
"""
from __future__ import annotations

from dataclasses import replace

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock
from torch import Tensor, nn

from training_backend.config import METHOD_CATALOG, ModelConfig
from training_backend.learning.contract import Prediction
from training_backend.errors import InputError
from training_backend.learning.losses import image_class_loss, presence_loss, segmentation_losses, sigmoid_rampup
from training_backend.learning.methods.base import Batch, Method, register
from training_backend.learning.methods.cam import cam_pseudo_target
from training_backend.learning.models import NetOutput, pad_to_multiple

_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


# ----------------------------------------------------------------------------- loss functions
def refine_maps(lesion_probs: Tensor, attention: Tensor | None, min_peak: float) -> tuple[Tensor, Tensor]:
    """G's lesion maps refined by the grader's attention: r_k = p_k · α_k / max(peak_k, min_peak).

    Args:
        lesion_probs: (B, K, H, W) G's lesion probabilities p_k.
        attention: (B, K, H, W) attention α_k in [0, 1], or ``None`` (r_k from p_k alone).
        min_peak: a map whose maximum is below this is divided by this instead (not stretched).

    Returns:
        the refined maps (B, K, H, W) in [0, 1] and each map's peak of p_k · α_k (B, K).
    """
    raw = lesion_probs if attention is None else lesion_probs * attention  # (B, K, H, W)
    peak = raw.flatten(2).amax(2)  # (B, K)
    return raw / peak.clamp_min(min_peak)[..., None, None], peak


def attention_pseudo_target(lesion_probs: Tensor, attention: Tensor | None, presence: Tensor,
                            hi: float, lo: float, min_peak: float) -> Tensor:
    """Pseudo-masks from refined lesion maps and image-level presence.

    Args:
        lesion_probs: (B, K, H, W) G's lesion probabilities.
        attention: (B, K, H, W) the grader's attention in [0, 1], or ``None``.
        presence: (B, K) in {1, 0, -1 unknown}.
        hi: refined value above which a pixel of a present class is that class.
        lo: refined value below which (for every class not known absent) a pixel is background.
        min_peak: see `refine_maps`; a present class whose peak is below it makes its image
            all -1.

    Returns:
        (B, H, W) int64: -1 ignore, 0 background, k lesion class k.
    """
    refined, peak = refine_maps(lesion_probs, attention, min_peak)
    target = cam_pseudo_target(refined, presence, hi, lo)  # (B, H, W)
    lost = ((presence == 1) & (peak < min_peak)).any(1)  # (B,) a present class not found
    return torch.where(lost[:, None, None], torch.full_like(target, -1), target)


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """D's loss: ½ BCE(real → 1) + ½ BCE(fake → 0), each averaged over its patches.

    Args:
        real_logits: (b_r, 1, h, w) D's logits on real (mask) inputs.
        fake_logits: (b_f, 1, h, w) D's logits on fake (G's maps, detached) inputs.
    """
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return 0.5 * (real + fake)


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """G's adversarial term: BCE(D(x ⊕ p_G) → 1), averaged over the patches.

    Args:
        fake_logits: (b_f, 1, h, w) D's logits on G's maps (with G's graph, D frozen).
    """
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def grader_losses(presence_logits: Tensor, image_logits: Tensor | None, presence: Tensor,
                  image_class: Tensor) -> dict[str, Tensor]:
    """The grader's losses: presence BCE and image-class CE on the known labels.

    Args:
        presence_logits: (B, K) the grader's presence logits.
        image_logits: (B, n_image_classes) its image-class logits, or ``None``.
        presence: (B, K) in {1, 0, -1 unknown}.
        image_class: (B,) int64, -1 unknown.

    Returns:
        ``{"grader_presence", "grader_image_class"}``: only the terms with a label.
    """
    parts = {"grader_presence": presence_loss(presence_logits, presence),
             "grader_image_class": image_class_loss(image_logits, image_class)}
    return {k: v for k, v in parts.items() if v is not None}


def attention_to_maps(attention: Tensor, size: tuple[int, int], stride: int) -> Tensor:
    """Attention at ``stride`` → image size: bilinear upsampling, crop, clamp to [0, 1].

    Args:
        attention: (B, K, h, w) in [0, 1] over the padded input.
        size: (H, W) of the input.
        stride: input pixels per attention cell.
    """
    maps = F.interpolate(attention.contiguous(), scale_factor=stride, mode="bilinear", align_corners=False)
    return maps[..., : size[0], : size[1]].clamp(0.0, 1.0)  # (B, K, H, W)


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Switch off ``requires_grad`` of ``module``'s parameters inside the block (restored after):
    gradients still flow through the module to its input, but not into its parameters.

    Args:
        module: e.g. the discriminator while G's adversarial term is computed.
    """
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------- networks
def _block(cfg: ModelConfig, c_in: int, c_out: int, stride: int) -> UnetBasicBlock:
    return UnetBasicBlock(2, c_in, c_out, kernel_size=3, stride=stride,
                          norm_name=(cfg.norm, {"affine": True}), act_name=_ACT)


class LesionAttentiveGrader(nn.Module):
    """Grades an image from the image and K lesion maps through K attention maps.

    Args:
        in_channels: image channels.
        n_classes: K lesion classes (K attention maps, K presence logits).
        n_image_classes: image-level classes (0 = no image-class head).
        cfg: architecture (width ``cfg.base``, norm, dropout).
    """

    #: input pixels per cell of f_low and of the attention maps
    STRIDE = 4
    #: channels of each lesion map's own features
    LESION_CH = 4
    #: initial weight of G's map in the attention logit (α starts near σ(±3): a soft copy)
    PRIOR_INIT = 3.0

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, cfg: ModelConfig):
        super().__init__()
        k, w, e = n_classes, cfg.base, self.LESION_CH
        self.k, self.width = k, w
        self.stem = nn.Sequential(_block(cfg, in_channels, w, 2), _block(cfg, w, w, 2))  # stride 4
        self.deep = nn.Sequential(_block(cfg, w, 2 * w, 2), _block(cfg, 2 * w, 4 * w, 2))  # stride 16
        act = nn.LeakyReLU(0.01, inplace=True)
        # per lesion class: its (avg, max)-pooled map -> e channels (groups = classes)
        self.lesion_conv = nn.Sequential(nn.Conv2d(2 * k, e * k, 3, padding=1, groups=k), act)
        # per lesion class: [f_low, its lesion features] -> w channels
        self.fuse = nn.Sequential(nn.Conv2d(k * (w + e), k * w, 3, padding=1, groups=k), act)
        self.context = nn.Linear(4 * w, k * w)  # f_high -> a channel gate per class
        self.attention_head = nn.Conv2d(k * w, k, 1, groups=k)
        self.prior_scale = nn.Parameter(torch.full((k,), self.PRIOR_INIT))
        self.dropout = nn.Dropout(cfg.dropout)
        self.presence_head = nn.Conv1d(k * 4 * w, k, 1, groups=k)  # branch k -> presence_k
        self.reduce = self.image_head = None  # all branches -> 4w -> image classes
        if n_image_classes > 0:
            self.reduce = nn.Sequential(nn.Linear(k * 4 * w, 4 * w), nn.LeakyReLU(0.01))
            self.image_head = nn.Linear(4 * w, n_image_classes)

    @property
    def multiple(self) -> int:
        """Input sizes are padded to a multiple of this (the deep path's stride)."""
        return 16

    def attention(self, f_low: Tensor, maps: Tensor, f_high: Tensor) -> Tensor:
        """The attention maps α_k.

        Args:
            f_low: (B, w, h, w') low-level features.
            maps: (B, K, Hp, Wp) padded lesion maps.
            f_high: (B, 4w) global context.

        Returns:
            (B, K, h, w') in [0, 1].
        """
        b, k, s = maps.shape[0], self.k, self.STRIDE
        avg, mx = F.avg_pool2d(maps, s), F.max_pool2d(maps, s)  # (B, K, h, w') each
        pooled = torch.stack([avg, mx], 2).flatten(1, 2)  # (B, 2K, h, w'): per class (avg, max)
        lesion = self.lesion_conv(pooled).unflatten(1, (k, self.LESION_CH))  # (B, K, e, h, w')
        low = f_low[:, None].expand(-1, k, -1, -1, -1)  # (B, K, w, h, w')
        fused = self.fuse(torch.cat([low, lesion], 2).flatten(1, 2))  # (B, K*w, h, w')
        gate = torch.sigmoid(self.context(f_high)).view(b, k * self.width, 1, 1)  # (B, K*w, 1, 1)
        logit = self.attention_head(fused * gate)  # (B, K, h, w')
        return torch.sigmoid(logit + self.prior_scale.view(1, k, 1, 1) * (2.0 * avg - 1.0))

    def forward(self, image: Tensor, maps: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """Grade images.

        Args:
            image: (B, C, H, W) normalised images.
            maps: (B, K, H, W) lesion probabilities (G's, detached).

        Returns:
            presence logits (B, K), image-class logits (B, n_image_classes) or ``None``, and the
            attention (B, K, ceil(H/4), ceil(W/4)).
        """
        size = tuple(image.shape[-2:])
        b, k = image.shape[0], self.k
        x = pad_to_multiple(image, self.multiple)
        maps = pad_to_multiple(maps, self.multiple)  # (B, K, Hp, Wp), the same padding
        f_low = self.stem(x)  # (B, w, Hp/4, Wp/4)
        f_high = self.deep(f_low).mean((2, 3))  # (B, 4w)
        alpha = self.attention(f_low, maps, f_high)  # (B, K, Hp/4, Wp/4)
        attended = (f_low[:, None] * alpha[:, :, None]).flatten(0, 1)  # (B*K, w, h, w')
        branch = self.dropout(self.deep(attended).mean((2, 3)).view(b, k * 4 * self.width))  # (B, K*4w)
        presence = self.presence_head(branch[..., None])[..., 0]  # (B, K)
        image_logits = None
        if self.image_head is not None:
            image_logits = self.image_head(self.dropout(self.reduce(branch)))  # (B, n_image_classes)
        s = self.STRIDE
        alpha = alpha[..., : math.ceil(size[0] / s), : math.ceil(size[1] / s)]
        return presence, image_logits, alpha


class PatchDiscriminator(nn.Module):
    """PatchGAN-like D: three 4×4 stride-2 convolutions (LeakyReLU 0.2) and a 3×3 one, one
    real/fake logit per patch (stride 8); no normalisation (real and fake batches stay apart).

    Args:
        in_channels: image channels + K lesion maps.
        width: channels of the first convolution (then 2×, 4×).
    """

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        w = width
        act = nn.LeakyReLU(0.2, inplace=True)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, w, 4, stride=2, padding=1), act,
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), act,
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), act,
            nn.Conv2d(4 * w, 1, 3, padding=1),
        )

    def forward(self, image: Tensor, maps: Tensor) -> Tensor:
        """Args: image (B, C, H, W), maps (B, K, H, W). Returns (B, 1, H/8, W/8) logits."""
        return self.net(torch.cat([image, maps], 1))


# ----------------------------------------------------------------------------- the method
@register
class Collaborative(Method):
    """Segmenter G + lesion-attentive grader + discriminator D, trained in alternating windows."""

    spec = METHOD_CATALOG["collaborative"]

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, model=None, **options):
        super().__init__(in_channels, n_classes, n_image_classes, model, **options)
        o = self.options
        if not 0.0 <= o["pretrain"] <= 1.0:
            raise InputError("pretrain", f"must be in [0, 1], got {o['pretrain']!r}")
        if o["cycles"] < 1:
            raise InputError("cycles", f"must be at least 1, got {o['cycles']!r}")
        if not 0.0 <= o["segmenter_share"] <= 1.0:
            raise InputError("segmenter_share", f"must be in [0, 1], got {o['segmenter_share']!r}")
        if not o["pseudo_min_peak"] > 0:
            raise InputError("pseudo_min_peak", f"must be > 0, got {o['pseudo_min_peak']!r}")
        if o["gate_on"] not in ("segmenter", "grader", "both"):
            raise InputError("gate_on", f"must be 'segmenter', 'grader' or 'both', got {o['gate_on']!r}")
        self.net = self.build_unet()  # G
        self.grader = LesionAttentiveGrader(in_channels, n_classes, n_image_classes, self.model_config)
        self.discriminator = PatchDiscriminator(in_channels + n_classes, self.model_config.base)

    @property
    def cam_stride(self) -> int:
        return self.grader.STRIDE

    # ------------------------------------------------------------------ schedule
    def window(self, progress: float) -> str:
        """Which phase this point of the run is in: "pretrain", "segmenter" or "grader".

        Cycles are half-open on the left, (start, end]: the end of the run (progress 1) is the
        end of the last grader window.

        Args:
            progress: fraction of the run done.
        """
        o = self.options
        start = float(o["pretrain"])
        if progress < start or start >= 1.0:
            return "pretrain"
        cycles = int(o["cycles"])
        pos = min((progress - start) / (1.0 - start) * cycles, float(cycles))  # in [0, cycles]
        within = pos - (math.ceil(pos) - 1)  # (0, 1]
        return "segmenter" if within <= float(o["segmenter_share"]) and pos > 0 else "grader"

    def ramp(self, progress: float) -> float:
        """Ramp of the pseudo-mask and adversarial weights: 0 before ``pretrain``, then a sigmoid
        ramp-up over ``rampup`` of the run.

        Args:
            progress: fraction of the run done.
        """
        o = self.options
        since = progress - float(o["pretrain"])
        if since < 0:
            return 0.0
        return sigmoid_rampup(since / o["rampup"]) if o["rampup"] > 0 else 1.0

    # ------------------------------------------------------------------ forward passes
    def grade(self, image: Tensor, seg_logits: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """The grader on G's detached lesion maps.

        Args:
            image: (B, C, H, W) images.
            seg_logits: (B, K+1, H, W) G's logits.
        """
        lesion = torch.softmax(seg_logits.detach(), 1)[:, 1:]  # (B, K, H, W)
        return self.grader(image, lesion)

    def predict_forward(self, image: Tensor) -> NetOutput:
        """G's segmentation, the grader's attention maps (CAMs) and image class; the presence
        that gates (``gate_on``): G's own presence head by default. On BUSI with 10 % of the
        masks the grader's presence (image AUC 0.83) removed lesions G had found (gated Dice
        0.50 against 0.61 ungated, one run), while G's head learns the same labels directly."""
        g = self.net(image)
        presence, image_logits, alpha = self.grade(image, g.seg_logits)
        gate_on = self.options["gate_on"]
        if gate_on == "segmenter":
            presence = g.presence_logits
        elif gate_on == "both":
            mean = 0.5 * (torch.sigmoid(presence) + torch.sigmoid(g.presence_logits))  # (B, K)
            presence = torch.logit(mean.clamp(1e-6, 1 - 1e-6))
        return NetOutput(g.seg_logits, presence, alpha, image_logits, g.features)

    def prediction_from_output(self, out: NetOutput, size: tuple[int, int]) -> Prediction:
        """As the base class, but the CAMs are the grader's attention maps as they are (in
        [0, 1] already; not stretched to a maximum of 1)."""
        pred = super().prediction_from_output(out, size)
        return replace(pred, cams=attention_to_maps(out.cam_logits, size, self.cam_stride))  # (B, K, H, W)

    # ------------------------------------------------------------------ pools
    def fake_rows(self, batch: Batch) -> Tensor:
        """(B,) bool: image-labelled cases without a mask, negatives excluded (they have a full
        background target): the pseudo-mask cases and D's fakes."""
        negative = (batch.presence == 0).all(1)
        return ~batch.has_mask & ~negative

    @staticmethod
    def real_rows(batch: Batch) -> Tensor:
        """(B,) bool: cases with a full mask, D's reals."""
        return batch.full & batch.has_mask

    # ------------------------------------------------------------------ loss terms
    def pseudo_losses(self, image: Tensor, seg_logits: Tensor, presence: Tensor) -> dict[str, Tensor]:
        """Pseudo-mask losses on maskless image-labelled cases (the grader frozen, in eval mode).

        Args:
            image: (b, C, S, S) the cases' images.
            seg_logits: (b, K+1, S, S) G's logits for them (with G's graph).
            presence: (b, K) their presence labels.

        Returns:
            ``{"pseudo_ce", "pseudo_dice", "pseudo_fg"}`` (those that exist); the terms carry
            the graph, weighting is the caller's.
        """
        o = self.options
        lesion = torch.softmax(seg_logits.detach(), 1)[:, 1:]  # (b, K, S, S)
        attention = None
        if o["attention"]:
            was = self.grader.training
            self.grader.eval()
            try:
                with torch.no_grad():
                    _, _, alpha = self.grader(image, lesion)  # (b, K, S/4, S/4)
            finally:
                self.grader.train(was)
            attention = attention_to_maps(alpha, tuple(image.shape[-2:]), self.cam_stride)
        target = attention_pseudo_target(lesion, attention, presence, float(o["pseudo_hi"]),
                                         float(o["pseudo_lo"]), float(o["pseudo_min_peak"]))
        parts: dict[str, Tensor] = {"pseudo_fg": (target > 0).float().mean()}
        seg = segmentation_losses(seg_logits, target, per_image=bool(o["dice_per_image"]))
        if seg is not None:
            parts["pseudo_ce"] = seg[0]
            if seg[1] is not None:
                parts["pseudo_dice"] = seg[1]
        return parts

    def d_loss(self, batch: Batch, lesion: Tensor, real: Tensor, fake: Tensor) -> Tensor:
        """D's loss on the batch's full masks (real) and G's detached maps (fake).

        Args:
            batch: the batch.
            lesion: (B, K, S, S) G's lesion probabilities.
            real, fake: (B,) bool row selections (both non-empty).
        """
        k1 = self.n_classes + 1
        onehot = F.one_hot(batch.target[real].clamp_min(0), k1).permute(0, 3, 1, 2)[:, 1:]  # (b_r, K, S, S)
        images = torch.cat([batch.image[real], batch.image[fake]], 0)
        maps = torch.cat([onehot.to(lesion.dtype), lesion[fake].detach()], 0)
        logits = self.discriminator(images, maps)  # (b_r + b_f, 1, h, w)
        n_real = int(real.sum())
        return discriminator_loss(logits[:n_real], logits[n_real:])

    def g_adversarial(self, image: Tensor, lesion: Tensor) -> Tensor:
        """G's adversarial term, with D's parameters frozen for this forward.

        Args:
            image: (b, C, S, S) maskless image-labelled cases.
            lesion: (b, K, S, S) G's lesion probabilities for them (with G's graph).
        """
        with frozen(self.discriminator):
            return generator_adversarial_loss(self.discriminator(image, lesion))

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        o = self.options
        window = self.window(progress)
        out = self.net(batch.image)  # G: seg (B, K+1, S, S), its own presence/image heads
        losses = self.supervised_losses(out, batch)  # G on the masks, every step
        total = losses["loss"]
        parts: dict[str, Tensor] = {}
        lesion = torch.softmax(out.seg_logits, 1)[:, 1:]  # (B, K, S, S), with G's graph
        fake = self.fake_rows(batch)
        if window in ("pretrain", "grader"):
            presence, image_logits, _ = self.grade(batch.image, out.seg_logits)
            g_parts = grader_losses(presence, image_logits, batch.presence, batch.image_class)
            for name, value in g_parts.items():
                total = total + value
                parts[name] = value
        elif bool(fake.any()):
            w = self.ramp(progress)
            p_parts = self.pseudo_losses(batch.image[fake], out.seg_logits[fake], batch.presence[fake])
            pseudo = [p_parts[n] * (o["dice_weight"] if n == "pseudo_dice" else 1.0)
                      for n in ("pseudo_ce", "pseudo_dice") if n in p_parts]
            if pseudo:
                total = total + o["pseudo_weight"] * w * torch.stack(pseudo).sum()
            parts.update(p_parts)
            if o["adversarial"]:
                adv = self.g_adversarial(batch.image[fake], lesion[fake])
                total = total + o["adv_weight"] * w * adv
                parts["adv_g"] = adv
        real = self.real_rows(batch)
        if o["adversarial"] and window != "pretrain" and bool(real.any()) and bool(fake.any()):
            d = self.d_loss(batch, lesion, real, fake)
            total = total + d
            parts["adv_d"] = d
        losses["loss"] = total
        losses.update({k: v.detach() for k, v in parts.items()})
        return losses
