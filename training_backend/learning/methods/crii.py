"""``crii``: coarse-refined consistency and ranked patch losses (after CRII-Net, Du et al. 2023).

Reconstructed from the abstract of Du, Zhang, Liu, Wang, "Coarse-Refined Consistency Learning
Using Pixel-Level Features for Semi-Supervised Medical Image Segmentation" (IEEE JBHI 27(8),
2023): no code and no full text are public, so every concrete choice below is ours.

**Network.** The shared ``UNet`` gives two predictions in one pass (`CoarseRefinedNet`):

* *coarse*: a 1×1 head on the decoder output at stride ``coarse_stride`` (4: 32 px for a 128 px
  image), its logits upsampled bilinearly to full resolution — a smooth, blob-level prediction;
* *refined*: the U-Net's own output head on the full-resolution decoder features ``y``, corrected
  by a light refinement module that sees ``y`` and the coarse softmax:
  ``refined = out(y) + conv1×1(LeakyReLU(conv1×1(y) + conv3×3(softmax(coarse))))``
  (``refine_width`` hidden channels; the last convolution zero-initialised, so training starts
  from the plain U-Net). The coarse prediction is a spatial prior the refinement can sharpen
  at the boundaries; ``y`` is already spatial context, so a 1×1 view of it suffices (a 3×3
  convolution over ``[y, softmax(coarse)]`` cost 5× more for one more full-resolution layer).

Two projection heads (1×1 conv, LeakyReLU, 1×1 conv to ``embed_dim``, L2-normalised; training
only) give the embeddings the ranked losses compare: pixel embeddings ``f_i`` of ``y`` inside
the sampled boundary patches (pixel level), and patch embeddings of the coarse level's decoder
features averaged over each patch (patch level: the deeper features carry the context a
low-contrast lesion needs). They are computed only where a loss needs them.

**Losses** (``n`` labelled images, ``U`` unlabelled ones; ``s(a, b)`` is cosine similarity):

* supervised (`Method.supervised_losses`, as every method): CE + Dice of the refined prediction,
  presence BCE, image-class CE; plus ``coarse_weight`` × (CE + Dice) of the coarse prediction.
* Intra-Patch Ranked Loss (`intra_patch_ranked_loss`, weight ``intra_weight``): the labelled
  images are cut into a ``patch_size`` grid (a random offset each step, a multiple of
  ``coarse_stride``; the same grid for both ranked losses); up to ``intra_patches``
  patches that straddle a boundary (≥ ``min_pixels`` labelled pixels of two classes) are drawn.
  In each patch every class c present has a prototype ``p_c = normalise(mean f_i over its pixels)``;
  each pixel i of class c and every other class c' present in the patch give
  ``max(0, m_intra - s(f_i, p_c) + s(f_i, p_c'))``; averaged over the pixels of each (patch,
  class) and then over the (patch, class) pairs, so lesion and background pixels weigh alike.
* Inter-Patch Ranked Loss (`inter_patch_ranked_loss`, weight ``inter_weight``): every grid patch
  with ≥ ``min_pixels`` labelled pixels gets a feature (the projection of its mean coarse-level
  decoder feature) and a label (lesion class c when c covers ≥ half of them, background when
  none is lesion, otherwise none). Per lesion class c, the global prototype ``g_c`` is the
  normalised mean of its patches' features (over the whole batch); for every pair (patch a of
  class c, patch b of another class), ``max(0, m_inter - s(a, g_c) + s(b, g_c))``; the loss is
  the mean of the hardest ``inter_hard`` share of the pairs (the least separable: low-contrast
  lesions and lesion-like background, including the background of negative "normal" images).
* coarse-refined consistency on ``batch.unlabelled`` (weight ``consistency`` × sigmoid ramp-up
  over ``rampup``): an EMA teacher (decay ``ema_decay``) predicts the clean images; its
  *stable targets* (`stable_pseudo_labels`) are the refined argmax at pixels where the refined
  probability is ≥ ``confidence`` and (``stable``) the teacher's coarse prediction agrees. The
  student sees the images CutMix-ed (the box of each filled from the previous image, as in
  ``mean_teacher``) plus noise; its refined and (× ``coarse_weight``) coarse predictions take
  CE towards the mixed targets (`pseudo_label_ce`, normalised by all pixels), and its coarse and
  refined softmaxes are pulled together (`coarse_refined_agreement`, squared difference,
  × ``agreement``). While the ramped weight is below ``skip_below`` of its maximum no unlabelled
  image is computed (a supervised step; the teacher still follows).

Total: ``L = L_sup + coarse_weight·L_coarse + intra_weight·L_intra + inter_weight·L_inter
+ w(t)·(L_cons,refined + coarse_weight·L_cons,coarse + agreement·L_agree)``.

``predict`` uses the teacher's refined prediction; ``Prediction.uncertainty`` is the teacher's
coarse-refined disagreement ``0.5·Σ_c |p_coarse,c - p_refined,c|`` (total variation, in [0, 1]).

**Why these choices.** *Stable targets*: a pixel where a stride-4 prediction and a
full-resolution one of the same (EMA-averaged) network agree is one that survives a change of
scale; where they disagree (lesion borders, faint lesions) a wrong pseudo-label is most likely,
so it is left out rather than trusted. *Both student heads* learn from the targets and are
pulled together, so the coarse head, whose agreement filters the targets, keeps up with the
refined one. *CutMix* (not plain noise): an EMA teacher without a strong perturbation gives
the student nothing to learn (mean_teacher's finding). *Pairs ranked against a global
prototype, hardest first*: with hundreds of easy background patches per batch the mean over all
pairs would be near zero; the hardest share is what low contrast means. *Prototypes per patch*
for Intra-PRL: a lesion's inside and its surroundings differ from image to image, so a pixel is
compared with the two sides of its own border. *The teacher predicts*: its weights are an
average over the last ~100 steps, smoother than the student's.

**The paper's / ours.**

====================================  ===========================================================
the paper's (abstract)                ours (not in the abstract)
====================================  ===========================================================
a coarse and a refined prediction     coarse = 1×1 head at decoder stride 4; refined = U-Net head
                                      plus a small correction that sees the coarse softmax
coarse-refined consistency gives      EMA teacher; targets kept where its refined prediction is
stable targets for unlabelled data    confident and its coarse one agrees; CutMix student; CE on
                                      both student heads + coarse↔refined squared difference;
                                      sigmoid ramp-up, ``skip_below``
Intra-PRL: pixel level, boundaries    boundary-straddling grid patches; per-patch class
                                      prototypes; margin ranking of own vs other prototype (cosine)
Inter-PRL: patch level, low contrast  projected patch means of the coarse-level features; a
                                      global lesion prototype per class; margin ranking of
                                      lesion vs other patches, the hardest pairs
labelled data only for both PRLs      also scribbles (labelled pixels only) and negative images
                                      (all background) — what this product has
—                                     every weight, margin, patch size, count, decay, threshold;
                                      deep supervision of the coarse head; presence/image heads
====================================  ===========================================================

Scaled for a 2-core CPU: the 2-D U-Net of the product (16-16-32-64-128 channels), an 8-channel
refinement, 16-d embeddings, 16 px patches at 128 px, at most 32 intra patches per step.

**Cost** (128 px, 8 labelled + 4 unlabelled, 1 CPU thread, timed on a loaded machine): a step
without unlabelled images is about 1.25× a ``supervised`` step (coarse head and loss, the
refinement at full resolution, the ranked losses about 0.1×); a step with them about 2.0×
(``mean_teacher``: 1.65×): a student pass over 12 images instead of 8 and a no-grad teacher
pass over 4. Prediction: one U-Net pass plus the coarse head and the refinement (a few %).
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training_backend.config import METHOD_CATALOG
from training_backend.errors import InputError
from training_backend.learning.losses import segmentation_losses, sigmoid_rampup
from training_backend.learning.methods.base import Batch, Method, ema_update, register
from training_backend.learning.methods.mean_teacher import cutmix_boxes
from training_backend.learning.contract import Prediction
from training_backend.learning.models import NetOutput, UNet, pad_to_multiple

_ACT_SLOPE = 0.01  # the U-Net's LeakyReLU slope


# ------------------------------------------------------------------------------- network
class CoarseRefinedOutput(NamedTuple):
    """What `CoarseRefinedNet` returns."""

    net: NetOutput  # seg_logits: the refined prediction (B, K+1, H, W); heads as the UNet's
    coarse_logits: Tensor  # (B, K+1, H, W) the coarse prediction, upsampled
    features: Tensor  # (B, ch0, H, W) the full-resolution decoder features
    coarse_features: Tensor  # (B, ch[L], ceil(H/s), ceil(W/s)) the coarse head's decoder level


def slice_output(out: CoarseRefinedOutput, start: int, stop: int | None) -> CoarseRefinedOutput:
    """The rows ``start:stop`` of every tensor of ``out``.

    Args:
        out: outputs for a batch.
        start, stop: row range.
    """
    net = NetOutput(*(None if v is None else v[start:stop] for v in out.net))
    return CoarseRefinedOutput(net, *(v[start:stop] for v in out[1:]))


class CoarseRefinedNet(nn.Module):
    """A ``UNet`` with a coarse head on a deep decoder level and a refinement stage.

    The forward pass walks the UNet's own modules (encoder, heads, decoder) to expose the decoder
    features; the UNet's parameters and its output head are used as they are.

    Args:
        unet: the U-Net.
        coarse_level: decoder level of the coarse head (stride ``2**coarse_level``, at most
            ``depth``: the bottleneck).
    """

    def __init__(self, unet: UNet, coarse_level: int, refine_width: int = 8):
        super().__init__()
        ch, k1 = unet.cfg.channels, unet.n_classes + 1
        self.unet, self.coarse_level = unet, int(coarse_level)
        self.coarse_head = nn.Conv2d(ch[self.coarse_level], k1, kernel_size=1)
        # refinement: hidden = LeakyReLU(1×1 conv of the fine features + 3×3 conv of the coarse
        # softmax), correction = 1×1 conv (a 3×3 conv of the features too would cost 5x more)
        self.refine_fine = nn.Conv2d(ch[0], refine_width, kernel_size=1)
        self.refine_prior = nn.Conv2d(k1, refine_width, kernel_size=3, padding=1, bias=False)
        self.refine_out = nn.Conv2d(refine_width, k1, kernel_size=1)
        nn.init.zeros_(self.refine_out.weight)  # starts as the plain U-Net
        nn.init.zeros_(self.refine_out.bias)

    @property
    def cam_stride(self) -> int:
        return self.unet.cam_stride

    def forward(self, x: Tensor) -> CoarseRefinedOutput:
        unet, cfg = self.unet, self.unet.cfg
        h, w = x.shape[-2:]
        feats = unet.encoder(pad_to_multiple(x, cfg.multiple))  # level i: (B, ch[i], Hp/2^i, Wp/2^i)
        presence, cam, image_logits, pooled = unet.heads(feats, (h, w))
        y = feats[-1]
        deep = y
        for j, (up, drop) in enumerate(zip(unet.decoder, unet.decoder_dropout)):
            y = drop(up(y, feats[-2 - j]))  # (B, ch[i], Hp/2^i, Wp/2^i), i = depth-1-j
            if cfg.depth - 1 - j == self.coarse_level:
                deep = y
        coarse = self.coarse_head(deep)  # (B, K+1, Hp/s, Wp/s)
        # channel-first: bilinear upsampling of a channels-last map is slow on CPU
        coarse = F.interpolate(coarse.contiguous(), size=y.shape[-2:], mode="bilinear",
                               align_corners=False)  # (B, K+1, Hp, Wp)
        prior = torch.softmax(coarse, 1).contiguous(memory_format=torch.channels_last)
        hidden = F.leaky_relu(self.refine_fine(y) + self.refine_prior(prior),
                              _ACT_SLOPE)  # (B, w, Hp, Wp)
        refined = unet.out(y) + self.refine_out(hidden)  # (B, K+1, Hp, Wp)
        refined = refined[..., :h, :w]
        net = NetOutput(refined, presence, cam, image_logits, pooled)
        s = 2 ** self.coarse_level
        deep = deep[..., : math.ceil(h / s), : math.ceil(w / s)]
        return CoarseRefinedOutput(net, coarse[..., :h, :w], y[..., :h, :w], deep)


# ------------------------------------------------------------------------------- patches
def grid_tiles(x: Tensor, patch: int, offset: tuple[int, int] = (0, 0)) -> Tensor:
    """A view of ``x`` as non-overlapping ``patch``×``patch`` tiles of a grid starting at
    ``offset`` (tiles past the border are dropped).

    Args:
        x: (n, C, H, W) maps.
        patch: tile side (at most min(H, W)).
        offset: (y, x) of the grid's first tile.

    Returns:
        (n, gh, gw, C, P, P), a view (no copy).
    """
    n, c, h, w = x.shape
    oy, ox = offset
    gh, gw = (h - oy) // patch, (w - ox) // patch
    x = x[:, :, oy:oy + gh * patch, ox:ox + gw * patch]  # (n, C, gh·P, gw·P)
    return x.unflatten(3, (gw, patch)).unflatten(2, (gh, patch)).permute(0, 2, 4, 1, 3, 5)


def grid_patches(x: Tensor, patch: int, offset: tuple[int, int] = (0, 0)) -> Tensor:
    """The tiles of `grid_tiles` as rows: image by image, row by row.

    Args:
        x: (n, C, H, W) maps (features or a target with C = 1).
        patch: tile side (at most min(H, W)).
        offset: (y, x) of the grid's first tile.

    Returns:
        (n·gh·gw, C, patch²).
    """
    tiles = grid_tiles(x, patch, offset)  # (n, gh, gw, C, P, P)
    return tiles.reshape(-1, x.shape[1], patch * patch)


def pick_tiles(x: Tensor, idx: Tensor, patch: int, offset: tuple[int, int] = (0, 0)) -> Tensor:
    """The tiles ``idx`` (rows of `grid_patches`) of ``x``, gathered without copying the rest.

    Args:
        x: (n, C, H, W) maps.
        idx: (M,) int64 row indices into ``grid_patches(x, patch, offset)``.
        patch: tile side.
        offset: (y, x) of the grid's first tile.

    Returns:
        (M, C, P, P).
    """
    tiles = grid_tiles(x, patch, offset)  # (n, gh, gw, C, P, P), a view
    gh, gw = tiles.shape[1:3]
    return tiles[idx // (gh * gw), (idx // gw) % gh, idx % gw]


def grid_means(x: Tensor, patch: int, offset: tuple[int, int] = (0, 0)) -> Tensor:
    """The mean of every tile of `grid_tiles`.

    Args:
        x: (n, C, H, W) maps.
        patch: tile side.
        offset: (y, x) of the grid's first tile.

    Returns:
        (n, gh, gw, C).
    """
    oy, ox = offset
    gh, gw = (x.shape[2] - oy) // patch, (x.shape[3] - ox) // patch
    x = x[:, :, oy:oy + gh * patch, ox:ox + gw * patch]
    return F.avg_pool2d(x, patch).permute(0, 2, 3, 1)


def class_counts(labels: Tensor, n_cls: int) -> tuple[Tensor, Tensor]:
    """One-hot of patch pixel labels (ignored pixels all 0) and the count per class.

    Args:
        labels: (N, P²) int64, -1 = unlabelled.
        n_cls: number of classes (K+1, background included).

    Returns:
        onehot (N, P², n_cls) float, counts (N, n_cls) float.
    """
    onehot = F.one_hot(labels.clamp_min(0), n_cls).float()  # (N, P², C)
    onehot = onehot * (labels >= 0)[..., None]
    return onehot, onehot.sum(1)


def straddling_patches(labels: Tensor, n_cls: int, min_pixels: int = 1) -> Tensor:
    """Which patches straddle a boundary: at least two classes with ``min_pixels`` labelled pixels.

    Args:
        labels: (N, P²) int64 patch pixel labels, -1 = unlabelled.
        n_cls: number of classes (K+1).
        min_pixels: labelled pixels a class needs to count as present.

    Returns:
        (N,) bool.
    """
    _, counts = class_counts(labels, n_cls)
    return (counts >= min_pixels).sum(1) >= 2


def patch_labels(labels: Tensor, n_cls: int, min_pixels: int = 1) -> Tensor:
    """A label per patch: lesion class c where c covers at least half of the labelled pixels,
    background where none is lesion, -1 otherwise or with fewer than ``min_pixels`` labelled.

    Args:
        labels: (N, P²) int64 patch pixel labels, -1 = unlabelled.
        n_cls: number of classes (K+1).
        min_pixels: labelled pixels a patch needs.

    Returns:
        (N,) int64.
    """
    _, counts = class_counts(labels, n_cls)  # (N, C)
    total = counts.sum(1)  # (N,)
    share, lesion = counts[:, 1:].max(1)  # (N,) the largest lesion class
    out = torch.full_like(total, -1, dtype=torch.long)
    out = torch.where(counts[:, 1:].sum(1) == 0, torch.zeros_like(out), out)
    out = torch.where(2 * share >= total, lesion + 1, out)
    return torch.where(total >= max(min_pixels, 1), out, torch.full_like(out, -1))


# -------------------------------------------------------------------------------- losses
def intra_patch_ranked_loss(emb: Tensor, labels: Tensor, n_cls: int, margin: float,
                            min_pixels: int = 1) -> Tensor | None:
    """Intra-Patch Ranked Loss: in each patch, every pixel's cosine similarity to its own
    class prototype must exceed that to every other class prototype of the patch by ``margin``.

    ``p_c = normalise(mean of f_i over the patch's pixels of class c)``; a pixel i of class c
    and another present class c' give ``max(0, margin - s(f_i, p_c) + s(f_i, p_c'))``
    (averaged over c'); the mean over the pixels of each (patch, class) pair, then over the
    pairs of patches with two classes or more.

    Args:
        emb: (N, D, P²) unit pixel embeddings of N patches.
        labels: (N, P²) int64 pixel labels, -1 = unlabelled (ignored).
        n_cls: number of classes (K+1).
        margin: ranking margin (cosine units).
        min_pixels: labelled pixels a class needs in a patch to take part.

    Returns:
        scalar, or None when no patch has two classes.
    """
    onehot, counts = class_counts(labels, n_cls)  # (N, P², C), (N, C)
    present = counts >= max(min_pixels, 1)  # (N, C)
    usable = present & (present.sum(1, keepdim=True) >= 2)  # (N, C)
    if not bool(usable.any()):
        return None
    proto = torch.einsum("ndp,npc->ncd", emb, onehot) / counts.clamp_min(1)[..., None]  # (N, C, D)
    proto = F.normalize(proto, dim=2)
    sims = torch.einsum("ndp,ncd->npc", emb, proto)  # (N, P², C)
    own = (sims * onehot).sum(2, keepdim=True)  # (N, P², 1)
    other = (present[:, None, :] & (onehot == 0)).to(sims.dtype)  # (N, P², C)
    per_pixel = (F.relu(margin - own + sims) * other).sum(2) / other.sum(2).clamp_min(1)  # (N, P²)
    per_class = torch.einsum("np,npc->nc", per_pixel, onehot) / counts.clamp_min(1)  # (N, C)
    return per_class[usable].mean()


def inter_patch_ranked_loss(feats: Tensor, labels: Tensor, margin: float,
                            hard: float = 1.0) -> Tensor | None:
    """Inter-Patch Ranked Loss: lesion patches must be more similar to their class's global
    prototype than any other patch is, by ``margin``; the hardest pairs count.

    Per lesion class c (labels ≥ 1): ``g_c = normalise(mean of the class-c patch features)``;
    every pair (a of class c, b of another class) gives ``max(0, margin - s(a, g_c) + s(b, g_c))``;
    the loss of a class is the mean of its largest ``ceil(hard · pairs)`` pair losses, the
    result the mean over the classes with pairs.

    Args:
        feats: (M, D) unit patch features.
        labels: (M,) int64 patch labels (0 background, c lesion class c).
        margin: ranking margin (cosine units).
        hard: share of the pairs kept, the least separable first (1: all).

    Returns:
        scalar, or None when no lesion class has both its own and other patches.
    """
    per_class = []
    for c in labels.unique().tolist():
        pos, neg = labels == c, labels != c
        if c < 1 or not bool(neg.any()):
            continue
        proto = F.normalize(feats[pos].mean(0), dim=0)  # (D,)
        sims = feats @ proto  # (M,)
        pairs = F.relu(margin - sims[pos][:, None] + sims[neg][None, :]).flatten()  # (P·N,)
        keep = max(1, math.ceil(hard * pairs.numel()))
        per_class.append(pairs.topk(min(keep, pairs.numel())).values.mean())
    return torch.stack(per_class).mean() if per_class else None


def stable_pseudo_labels(refined_probs: Tensor, coarse_probs: Tensor, confidence: float,
                         agree: bool = True) -> tuple[Tensor, Tensor]:
    """The teacher's stable targets: the refined argmax where the refined probability is at
    least ``confidence`` and (``agree``) the coarse argmax is the same class.

    Args:
        refined_probs: (B, C, H, W) the teacher's refined softmax.
        coarse_probs: (B, C, H, W) the teacher's coarse softmax.
        confidence: minimum refined probability (0: any).
        agree: require the coarse prediction to agree.

    Returns:
        labels (B, H, W) int64 and keep (B, H, W) bool.
    """
    conf, labels = refined_probs.max(1)  # (B, H, W)
    keep = conf >= confidence
    if agree:
        keep = keep & (coarse_probs.argmax(1) == labels)
    return labels, keep


def pseudo_label_ce(logits: Tensor, labels: Tensor, keep: Tensor) -> Tensor:
    """Cross-entropy towards ``labels`` at the kept pixels, normalised by all pixels (a teacher
    with few stable pixels weighs little).

    Args:
        logits: (B, C, H, W) student logits.
        labels: (B, H, W) int64 targets.
        keep: (B, H, W) bool pixels that count.
    """
    ce = F.cross_entropy(logits, labels, reduction="none")  # (B, H, W)
    return (ce * keep.to(ce.dtype)).mean()


def coarse_refined_agreement(coarse_logits: Tensor, refined_logits: Tensor) -> Tensor:
    """Mean squared difference of the coarse and refined softmaxes (gradients into both).

    Args:
        coarse_logits: (B, C, H, W).
        refined_logits: (B, C, H, W).
    """
    return F.mse_loss(torch.softmax(coarse_logits, 1), torch.softmax(refined_logits, 1))


def disagreement(coarse_probs: Tensor, refined_probs: Tensor) -> Tensor:
    """Total-variation distance of two predictions per pixel, ``0.5·Σ_c |p_c - q_c|`` in [0, 1].

    Args:
        coarse_probs, refined_probs: (B, C, H, W) probabilities.

    Returns:
        (B, H, W).
    """
    return (0.5 * (coarse_probs - refined_probs).abs().sum(1)).clamp(0.0, 1.0)


# -------------------------------------------------------------------------------- method
def projection_head(channels: int, dim: int) -> nn.Sequential:
    """1×1 conv, LeakyReLU, 1×1 conv to ``dim`` channels (normalised by the caller).

    Args:
        channels: input channels.
        dim: embedding channels.
    """
    return nn.Sequential(nn.Conv2d(channels, channels, 1), nn.LeakyReLU(_ACT_SLOPE),
                         nn.Conv2d(channels, dim, 1))


@register
class CRII(Method):
    """Coarse-refined U-Net: ranked patch losses on masks, coarse-refined consistency with an
    EMA teacher on images without a mask (module docstring)."""

    spec = METHOD_CATALOG["crii"]
    #: share of the image a CutMix box covers (min, max), as in mean_teacher
    CUTMIX_AREA = (0.25, 0.5)

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, model=None, **options):
        super().__init__(in_channels, n_classes, n_image_classes, model, **options)
        o, cfg = self.options, self.model_config
        stride = int(o["coarse_stride"])
        level = int(math.log2(stride)) if stride >= 2 else 0
        if 2 ** level != stride or not 1 <= level <= cfg.depth:
            raise InputError("method_options", f"coarse_stride must be a power of 2 from 2 to "
                             f"{2 ** cfg.depth} (the bottleneck), got {stride}")
        if min(o["patch_size"], o["embed_dim"], o["refine_width"]) < 2:
            raise InputError("method_options",
                             "patch_size, embed_dim and refine_width must be at least 2")
        if o["patch_size"] % stride:
            raise InputError("method_options", f"patch_size must be a multiple of coarse_stride "
                             f"({stride}), got {o['patch_size']}")
        self.net = CoarseRefinedNet(self.build_unet(), level, int(o["refine_width"]))
        self.stride = stride
        # pixel embeddings (Intra-PRL) of the full-resolution features, patch embeddings
        # (Inter-PRL) of the coarse level's
        self.proj = projection_head(cfg.channels[0], int(o["embed_dim"]))
        self.patch_proj = projection_head(cfg.channels[level], int(o["embed_dim"]))
        self.teacher = copy.deepcopy(self.net)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    @property
    def n_cls(self) -> int:
        return self.n_classes + 1

    # ------------------------------------------------------------------ prediction
    def predict_forward(self, image: Tensor) -> CoarseRefinedOutput:  # type: ignore[override]
        return self.teacher(image)

    def prediction_from_output(self, out: CoarseRefinedOutput,  # type: ignore[override]
                               size: tuple[int, int]) -> Prediction:
        pred = super().prediction_from_output(out.net, size)
        coarse = torch.softmax(out.coarse_logits.contiguous(), 1)  # (B, K+1, H, W)
        return replace(pred, uncertainty=disagreement(coarse, pred.probs))

    # ---------------------------------------------------------------------- losses
    def consistency_weight(self, progress: float) -> float:
        """The consistency weight at this point of training (sigmoid ramp-up to ``consistency``).

        Args:
            progress: fraction of training done.
        """
        o = self.options
        return o["consistency"] * sigmoid_rampup(progress / o["rampup"] if o["rampup"] > 0 else 1.0)

    def ranked_losses(self, out: CoarseRefinedOutput, target: Tensor) -> dict[str, Tensor]:
        """Intra- and inter-patch ranked losses of the labelled images.

        Both share one patch grid (``patch_size``, a random offset that is a multiple of the
        coarse stride, so a patch is a whole number of coarse cells).

        Args:
            out: the student's outputs for the labelled images.
            target: (n, S, S) int64 targets, -1 = unlabelled.

        Returns:
            ``{"intra": ..., "inter": ...}``, only the terms this batch supports.
        """
        o, s = self.options, self.stride
        size = max(s, min(int(o["patch_size"]), *target.shape[-2:]) // s * s)
        if (not bool((target >= 0).any()) or min(target.shape[-2:]) < size
                or (o["intra_weight"] <= 0 and o["inter_weight"] <= 0)):
            return {}
        offset = tuple(s * int(torch.randint(0, size // s, ())) if d >= 2 * size else 0
                       for d in target.shape[-2:])
        pt = grid_patches(target[:, None], size, offset)[:, 0]  # (N, P²), N = n·gh·gw
        losses: dict[str, Tensor] = {}
        if o["intra_weight"] > 0:
            loss = self._intra(out.features, pt, size, offset)
            if loss is not None:
                losses["intra"] = loss
        if o["inter_weight"] > 0:
            labels = patch_labels(pt, self.n_cls, o["min_pixels"])  # (N,)
            known = labels >= 0
            if bool(known.any()):
                gh, gw = ((d - off) // size for d, off in zip(target.shape[-2:], offset))
                cells = grid_means(out.coarse_features, size // s, (offset[0] // s, offset[1] // s))
                pooled = cells[:, :gh, :gw].reshape(len(pt), -1)[known]  # (M, ch[L])
                emb = F.normalize(self.patch_proj(pooled[:, :, None, None].contiguous()), dim=1)
                loss = inter_patch_ranked_loss(emb[:, :, 0, 0], labels[known], o["inter_margin"],
                                               o["inter_hard"])
                if loss is not None:
                    losses["inter"] = loss
        return losses

    def _intra(self, features: Tensor, pt: Tensor, size: int,
               offset: tuple[int, int]) -> Tensor | None:
        """Intra-PRL on up to ``intra_patches`` boundary patches drawn at random.

        Args:
            features: (n, ch0, S, S) full-resolution decoder features.
            pt: (N, P²) the grid's patch labels.
            size: patch side P.
            offset: the grid's offset.
        """
        o = self.options
        idx = straddling_patches(pt, self.n_cls, o["min_pixels"]).nonzero()[:, 0]  # (N_b,)
        if len(idx) == 0:
            return None
        if len(idx) > o["intra_patches"]:
            idx = idx[torch.randperm(len(idx), device=idx.device)[: o["intra_patches"]]]
        picked = pick_tiles(features, idx, size, offset)  # (N_b, ch0, P, P)
        picked = picked.contiguous(memory_format=torch.channels_last)  # the weights' format
        emb = F.normalize(self.proj(picked), dim=1).flatten(2)  # (N_b, D, P²)
        return intra_patch_ranked_loss(emb, pt[idx], self.n_cls, o["intra_margin"], o["min_pixels"])

    @torch.no_grad()
    def _student_inputs(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The teacher's stable targets for clean unlabelled images and the CutMix-ed student
        inputs with the targets mixed by the same boxes.

        Args:
            u: (U, C, S, S) unlabelled images.

        Returns:
            student images (U, C, S, S), labels (U, S, S), keep (U, S, S).
        """
        o = self.options
        was_training = self.teacher.training
        self.teacher.train(False)  # the teacher's clean prediction
        try:
            t = self.teacher(u)
        finally:
            self.teacher.train(was_training)
        labels, keep = stable_pseudo_labels(torch.softmax(t.net.seg_logits, 1),
                                            torch.softmax(t.coarse_logits, 1),
                                            o["confidence"], o["stable"])
        box = cutmix_boxes(len(u), tuple(u.shape[-2:]), self.CUTMIX_AREA, u.device)  # (U, 1, S, S)
        x_s = u * (1 - box) + torch.roll(u, 1, 0) * box + o["noise"] * torch.randn_like(u)
        inside = box[:, 0] > 0.5  # (U, S, S): from the previous image
        labels = torch.where(inside, torch.roll(labels, 1, 0), labels)
        keep = torch.where(inside, torch.roll(keep, 1, 0), keep)
        return x_s, labels, keep

    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        o = self.options
        n = len(batch)
        weight = self.consistency_weight(progress)
        u = batch.unlabelled
        use_u = (u is not None and len(u) > 0 and o["consistency"] > 0
                 and weight >= o["skip_below"] * o["consistency"])
        if use_u:
            x_s, labels, keep = self._student_inputs(u)
            out = self.net(torch.cat([batch.image, x_s], 0))
        else:
            out = self.net(batch.image)
        lab = slice_output(out, 0, n)
        target = self.supervised_target(batch)  # (n, S, S)
        losses = self.supervised_losses(lab.net, batch, target)
        total = losses["loss"]
        seg = segmentation_losses(lab.coarse_logits, target, per_image=bool(o["dice_per_image"]))
        if seg is not None and o["coarse_weight"] > 0:
            coarse = seg[0] if seg[1] is None else seg[0] + o["dice_weight"] * seg[1]
            total = total + o["coarse_weight"] * coarse
            losses["coarse"] = coarse.detach()
        for name, value in self.ranked_losses(lab, target).items():
            total = total + o[f"{name}_weight"] * value
            losses[name] = value.detach()
        if use_u:
            s = slice_output(out, n, None)
            consistency = (pseudo_label_ce(s.net.seg_logits, labels, keep)
                           + o["coarse_weight"] * pseudo_label_ce(s.coarse_logits, labels, keep))
            agree = coarse_refined_agreement(s.coarse_logits, s.net.seg_logits)
            total = total + weight * (consistency + o["agreement"] * agree)
            losses["consistency"] = consistency.detach()
            losses["agreement"] = agree.detach()
        losses["loss"] = total
        return losses

    def after_step(self, step: int, progress: float) -> None:
        ema_update(self.teacher, self.net, self.options["ema_decay"], step)
