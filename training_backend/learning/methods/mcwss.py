"""``mcwss``: segmentation from image-level labels through multi-class, two-level CAMs with
mutual exclusion and co-attention (MCWSS: Kuang, Yan, Yu, "Weakly supervised learning for
multi-class medical image segmentation via feature decomposition", Comput. Biol. Med. 171,
2024; ideas from the paper and its public code, no code taken).

**CAM classes.** The CAMs are learnt for C "CAM classes" with image labels y (B, C) in
{1, 0, -1 unknown} (`cam_class_labels`):

* K >= 2 lesion classes (e.g. IDRiD's MA/HE/EX/SE presence): the K classes, y = presence.
* K == 1 and >= 2 image classes (BUSI: normal/benign/malignant) -- *ours*: sub-classes of the
  lesion given by the image class. An image of image class c with presence 1 is positive for
  sub-class c and negative for the others; presence 0 is negative for all; anything else is
  unknown. A sub-class never seen positive (BUSI's "normal") only learns background and is left
  out of the exclusion terms and of the lesion map ("active" classes: buffer of counts).
* K == 1 and no image classes: one CAM class; the exclusion terms and co-attention then have
  nothing to do (no second class; every shared pair would be labelled positive) and are off.
  The same holds whenever fewer than two CAM classes have been seen positive (e.g. image
  classes "no lesion"/"lesion"): both are skipped then.

The segmentation output stays K+1 channels; with sub-classes the lesion map is the maximum of
the active sub-classes' maps (in pseudo-masks: of those the image is not known negative for).

**Networks.** One `UNet` (its encoder shared by everything below, its presence and image-class
heads trained by `Method.supervised_losses`, which keeps gating working) plus:

* two-level CAM heads (paper): per CAM class a bias-free 1×1 convolution with 2 channels
  (background, foreground) on the stride-4 encoder level (level ``min(2, depth - 1)``) and one
  on the deepest level; global average pooling of a head gives 2-way classification logits.
  Each head's map is min-max normalised per image jointly over its 2 channels; the deep map is
  upsampled to the stride-4 grid and the two are multiplied: the CAM product M = (M⁰, M¹).
* co-attention (paper, C >= 2): images of the batch are paired when they share a known
  positive CAM class (*ours*: disjoint pairs, greedy over a random order, `share_pairs`). At
  both levels the affinity softmax(F₁ᵀ W F₂ / sqrt(c)) (W a learned c×c map; the 1/sqrt(c)
  temperature is *ours*) re-expresses image 1's positions by image 2's features and, with the
  same bilinear form seen from image 2, image 2's positions by image 1's. Heads of their own
  (another two-level CAM) on these co-attended features are supervised with y_both ("both
  images contain class c"). *Ours*, for speed (`co_attend`): the positions mixed are
  average-pooled to at most 16×16 (`KEY_GRID`; stride 8 at 128 px, the queries stay at
  stride 4), and as the heads are linear and bias-free they are applied before the mixing
  (the same result, 2C instead of c channels mixed).

**Losses** (per image and CAM class with a known label; means over those):

* CAM loss (paper): ``mean_px min(M⁰, M¹) + y·mean_px M⁰ + (1 − y)·mean_px M¹`` (`cam_loss`).
  The paper's class weights (2 and 1 for its two classes) are dropped: all classes weigh 1.
  *Ours* (``balance_cam``, default on): positive and negative images are weighted [p, 1 − p]
  like the classification. Unweighted, tissue found in every image goes to the more frequent
  label; on BUSI 83 % of the images hold a lesion, so it would all turn foreground.
* classification (paper): CE of the pooled logits at both levels (summed), class-weighted by
  [p, 1 − p] (p the share of positives, clamped to [0.05, 0.95]; `weighted_ce`). Original
  branch: p = the share among all labels seen in this run (buffers, (pos + 1)/(n + 2));
  co-attended branch: the share of y_both in the batch.
* mutual exclusion, L_excl = erasure + ``overlap_weight``·overlap:
  - erasure (paper): for each ordered pair (a, b) of active classes, class a is re-classified
    from its head maps with class b's foreground erased, ``GAP(maps_a ⊙ (1 − M¹_b.detach()))``
    at both levels (M¹_b area-averaged to each grid), weighted CE with y_a (`erasure_loss`).
    *Ours*: every ordered pair weighs 1 (the code has two classes, weighted 1 and 0.1), and
    the erased maps are the raw head maps at both levels.
  - overlap (*ours*: the released code subtracts a per-image vector from a per-pixel map): per
    image and unordered pair (a, b) of active classes, on images known positive for a or b,
    ``mean_px min(M¹_a, M¹_b) − overlap_reward·mean_px max(y_a M¹_a, y_b M¹_b)``, the union
    reward counting only the classes the image is positive for (`overlap_penalty`).
* L_branch = L_CAM + L_cls + ``excl_weight``·L_excl (0.2, the paper's code).
* alignment / cross-guidance (paper): ``−mean_px min(M¹_orig, M¹_coatt)`` over the
  (co-attended image, class) entries with y_both = 1 (`alignment_loss`; averaging over those
  entries only is ours).
* L_mcwss = L_branch(orig) + ``coatt_weight``·L_branch(coatt, y_both) + ``align_weight``·L_align
  (0.1 and 0.1, the paper's code); the method's loss is ``cam_weight``·L_mcwss + the presence and
  image-class losses + the segmentation loss on the pseudo-masks.

**Pseudo-masks → segmenter** (*ours*; the paper stops at thresholded CAMs and names a U-Net on
them as optional): as in ``cam`` (`CAMMethod`, whose snapshot machinery this class inherits):
for the first ``warmup`` of training only the classifier learns; over the second half of warmup
a snapshot follows the network as a weight average, frozen at warmup and re-copied once at
``snapshot_refresh``. From warmup on, each image's pseudo-mask comes from the snapshot's CAM
product foreground (lesion map as above), upsampled to the image, divided by its per-image
maximum (``cam_relative``; false: the raw product, as the paper's inference), and thresholded
with `cam.cam_pseudo_target` (lesion > ``cam_hi``, background < ``cam_lo``, between ignored;
images known lesion-free all background); the segmentation losses ramp up over 0.1.
``cam_hi`` 0.2 and ``cam_lo`` 0.05 are lower than ``cam``'s 0.5 and 0.2: the product of two
max-normalised maps is peakier than either, and at ``cam``'s thresholds the pseudo-masks were
small (BUSI, image labels only, 300 s, seed 0, holdout lesion Dice: 0.258 with 0.5 / 0.2,
0.358 with 0.3 / 0.2, 0.397 with 0.2 / 0.05).

``Prediction.cams`` is the live network's CAM-product foreground per lesion class (for
sub-classes the maximum over the active ones), bilinearly upsampled, *not* re-normalised: the
product's own values in [0, 1]. Probabilities come from the segmenter, gated as usual.

**Scaled down for a 2-core CPU:** the project's U-Net encoder (16…128 channels) instead of the
paper's VGG-like one (64…1024); the deep CAM level is the bottleneck (stride 16, the paper's
level 5) and the mid level stride 4 (its level 3); the pooled co-attention keys (above).
**Cost** of a training step (128 px, batch 8, one thread, measured against ``supervised`` on
full masks): the U-Net pass plus the heads and the co-attention (about 0.05 of a step for
3-4 pairs). During warmup the decoder gets no gradient: about 0.75× a ``supervised`` step
(``cam``: 0.6×); after warmup, with the snapshot's encoder pass for the pseudo-masks, about
1.45× (``cam``: 1.2×). About 1.2× ``cam`` throughout.
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
from training_backend.learning.methods.base import Batch, Method, Prediction, register
from training_backend.learning.methods.cam import CAMMethod, cam_pseudo_target, superpixel_mean
from training_backend.learning.models import ModelConfig, NetOutput, UNet, pad_to_multiple


# ------------------------------------------------------------------ labels and pairs
def n_cam_classes(n_classes: int, n_image_classes: int) -> tuple[int, bool]:
    """How many CAM classes a project has and whether they are sub-classes of one lesion class.

    Args:
        n_classes: K lesion classes.
        n_image_classes: image-level classes (0 = none).

    Returns:
        (C, subclasses): K lesion classes if K >= 2; the image classes as sub-classes if K == 1
        and there are at least 2; otherwise one class.
    """
    if n_classes >= 2:
        return n_classes, False
    if n_image_classes >= 2:
        return n_image_classes, True
    return 1, False


def cam_class_labels(presence: Tensor, image_class: Tensor, subclasses: int) -> Tensor:
    """Image labels of the CAM classes.

    Args:
        presence: (B, K) in {1, 0, -1 unknown}.
        image_class: (B,) int64, -1 unknown.
        subclasses: 0 (the CAM classes are the K lesion classes) or the number of image classes
            (K == 1; the CAM classes are sub-classes of the lesion given by the image class).

    Returns:
        (B, C) float in {1, 0, -1}: with sub-classes, an image of class c with presence 1 is
        positive for c and negative for the others, presence 0 is negative for all, the rest
        unknown.
    """
    if subclasses == 0:
        return presence
    p = presence[:, 0]  # (B,)
    onehot = F.one_hot(image_class.clamp_min(0), subclasses).to(presence.dtype)  # (B, C)
    y = torch.full_like(onehot, -1.0)
    y[p == 0] = 0.0
    named = (p == 1) & (image_class >= 0)  # (B,)
    y[named] = onehot[named]
    return y


def share_pairs(y: Tensor) -> tuple[Tensor, Tensor]:
    """Disjoint pairs of images sharing a known positive CAM class (greedy over a random order,
    from the global torch random stream).

    Args:
        y: (B, C) labels in {1, 0, -1}.

    Returns:
        (first, second): (P,) int64 indices on ``y``'s device, P <= B // 2 (0 when no two
        images share a positive class).
    """
    pos = (y == 1).float().cpu()
    shares = (pos @ pos.T) > 0  # (B, B)
    order = torch.randperm(len(y)).tolist()
    free = [True] * len(y)
    first, second = [], []
    for n, a in enumerate(order):
        if not free[a]:
            continue
        for b in order[n + 1:]:
            if free[b] and bool(shares[a, b]):
                first.append(a)
                second.append(b)
                free[a] = free[b] = False
                break
    as_index = lambda idx: torch.tensor(idx, dtype=torch.long, device=y.device)  # noqa: E731
    return as_index(first), as_index(second)


def both_labels(y1: Tensor, y2: Tensor) -> Tensor:
    """y_both: 1 where both images are positive, 0 where either is negative, else -1.

    Args:
        y1, y2: (P, C) labels in {1, 0, -1}.
    """
    unknown = torch.full_like(y1, -1.0)
    both = torch.where((y1 == 1) & (y2 == 1), torch.ones_like(y1), unknown)
    return torch.where((y1 == 0) | (y2 == 0), torch.zeros_like(y1), both)


def positive_share(y: Tensor) -> Tensor:
    """Share of positives among the known labels of each class (0.5 where none is known).

    Args:
        y: (B, C) labels in {1, 0, -1}.

    Returns:
        (C,) in [0, 1].
    """
    known = (y >= 0).sum(0)  # (C,)
    share = (y == 1).sum(0) / known.clamp_min(1)
    return torch.where(known > 0, share, torch.full_like(share, 0.5))


def lesion_maps(fg: Tensor, active: Tensor, subclasses: bool, y: Tensor | None = None) -> Tensor:
    """Lesion-class maps from CAM-class foreground maps.

    Args:
        fg: (B, C, h, w) foreground maps in [0, 1].
        active: (C,) bool, the classes that may contribute (sub-classes only).
        subclasses: whether the C classes are sub-classes of one lesion class.
        y: optional (B, C) labels: sub-classes an image is known negative for do not contribute.

    Returns:
        (B, K, h, w): ``fg`` itself (C == K), or (B, 1, h, w) the maximum over the
        contributing sub-classes (0 where none contributes).
    """
    if not subclasses:
        return fg
    allowed = active[None].expand(fg.shape[0], -1)  # (B, C)
    if y is not None:
        allowed = allowed & (y != 0)
    return (fg * allowed[..., None, None].to(fg.dtype)).amax(1, keepdim=True)


# ------------------------------------------------------------------ CAM maps
def minmax_normalise(maps: Tensor) -> Tensor:
    """Min-max normalisation per image and class, jointly over the 2 channels and all pixels.

    Args:
        maps: (B, C, 2, h, w) raw head maps.

    Returns:
        (B, C, 2, h, w) in [0, 1] (a constant map gives 0).
    """
    flat = maps.flatten(2)  # (B, C, 2*h*w)
    lo = flat.amin(2)[..., None, None, None]  # (B, C, 1, 1, 1)
    hi = flat.amax(2)[..., None, None, None]
    return (maps - lo) / (hi - lo).clamp_min(1e-6)


def cam_product(mid: Tensor, deep: Tensor, factor: int) -> Tensor:
    """The two-level CAM product: both levels min-max normalised, the deep one bilinearly
    upsampled by ``factor`` (cropped to the mid grid), multiplied.

    Args:
        mid: (B, C, 2, h, w) raw mid-level head maps.
        deep: (B, C, 2, h', w') raw deep-level head maps, h <= factor * h'.
        factor: stride ratio of the two levels.

    Returns:
        (B, C, 2, h, w) in [0, 1]: channel 0 background (M⁰), channel 1 foreground (M¹).
    """
    b, c, _, h, w = mid.shape
    d = minmax_normalise(deep)
    d = F.interpolate(d.flatten(1, 2), scale_factor=factor, mode="bilinear", align_corners=False)
    d = d[..., :h, :w].reshape(b, c, 2, h, w)
    return minmax_normalise(mid) * d


class CAMOutput(NamedTuple):
    """A two-level CAM branch's outputs for a set of images."""

    mid: Tensor  # (B, C, 2, h, w) raw head maps at the mid level
    deep: Tensor  # (B, C, 2, h', w') raw head maps at the deepest level
    logits: Tensor  # (2 levels, B, C, 2) pooled classification logits
    product: Tensor  # (B, C, 2, h, w) CAM product in [0, 1]

    @property
    def fg(self) -> Tensor:
        """(B, C, h, w) foreground of the CAM product (M¹)."""
        return self.product[:, :, 1]


def cam_output(mid: Tensor, deep: Tensor, factor: int) -> CAMOutput:
    """Pooled logits and CAM product of raw head maps.

    Args:
        mid: (B, C, 2, h, w) raw mid-level maps.
        deep: (B, C, 2, h', w') raw deep-level maps.
        factor: stride ratio of the levels.
    """
    logits = torch.stack([mid.mean((-2, -1)), deep.mean((-2, -1))])  # (2, B, C, 2)
    return CAMOutput(mid, deep, logits, cam_product(mid, deep, factor))


# ------------------------------------------------------------------ losses
def balanced_mean(values: Tensor, y: Tensor, pos_rate: Tensor) -> Tensor | None:
    """Mean of per-(image, class) values weighted by [p, 1 − p] (negatives weigh p, positives
    1 − p; p clamped to [0.05, 0.95]): a weighted mean per class, then the mean over the
    classes with a known label.

    Args:
        values: (B, C) values.
        y: (B, C) labels in {1, 0, -1 unknown}.
        pos_rate: (C,) share of positives p.

    Returns:
        The mean, or None when no label is known.
    """
    known = y >= 0  # (B, C)
    if not bool(known.any()):
        return None
    p = pos_rate.clamp(0.05, 0.95).to(values.dtype)[None].expand(y.shape)  # (B, C)
    w = torch.where(y == 1, 1 - p, p) * known  # (B, C)
    per_class = (w * values).sum(0) / w.sum(0).clamp_min(1e-12)  # (C,)
    return per_class[known.any(0)].mean()


def cam_loss(product: Tensor, y: Tensor, pos_rate: Tensor | None = None) -> Tensor | None:
    """MCWSS CAM loss: ``mean_px min(M⁰, M¹) + y·mean_px M⁰ + (1 − y)·mean_px M¹``.

    Args:
        product: (B, C, 2, h, w) CAM product.
        y: (B, C) labels in {1, 0, -1 unknown}.
        pos_rate: (C,) share of positives: positives and negatives weighted as in
            `balanced_mean`; None: all equal (the paper).

    Returns:
        Mean over the known (image, class) entries (per class, then over the classes), or
        None when none is known.
    """
    m0, m1 = product[:, :, 0], product[:, :, 1]  # (B, C, h, w)
    yk = y.clamp_min(0).to(product.dtype)  # (B, C)
    per = torch.minimum(m0, m1).mean((2, 3)) + yk * m0.mean((2, 3)) + (1 - yk) * m1.mean((2, 3))
    if pos_rate is None:
        pos_rate = torch.full(y.shape[1:], 0.5, device=y.device)
    return balanced_mean(per, y, pos_rate)


def weighted_ce(logits: Tensor, y: Tensor, pos_rate: Tensor) -> Tensor | None:
    """2-way cross-entropy weighted by [p, 1 − p] (`balanced_mean`), as in the paper's code.

    Args:
        logits: (B, C, 2) [background, foreground] logits.
        y: (B, C) labels in {1, 0, -1 unknown}.
        pos_rate: (C,) share of positives p.

    Returns:
        The loss, or None when no label is known.
    """
    target = y.clamp_min(0).long()  # (B, C)
    ce = F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1), reduction="none").view(y.shape)
    return balanced_mean(ce, y, pos_rate)


def classification_loss(cams: CAMOutput, y: Tensor, pos_rate: Tensor) -> Tensor | None:
    """`weighted_ce` of the pooled logits, summed over the two levels.

    Args:
        cams: a branch's outputs.
        y: (B, C) labels.
        pos_rate: (C,) share of positives.
    """
    parts = [weighted_ce(level, y, pos_rate) for level in cams.logits]
    return None if parts[0] is None else sum(parts)


def pair_mask(active: Tensor) -> Tensor:
    """(C, C) bool: ordered pairs (a, b) of different active classes."""
    eye = torch.eye(len(active), dtype=torch.bool, device=active.device)
    return active[:, None] & active[None, :] & ~eye


def erasure_loss(cams: CAMOutput, y: Tensor, pos_rate: Tensor, active: Tensor) -> Tensor | None:
    """Mutual-exclusion erasure: class a re-classified from its head maps with class b's
    foreground erased, ``GAP(maps_a ⊙ (1 − M¹_b.detach()))`` (the foreground resampled to each
    level by area averaging), weighted CE with y_a, summed over the two levels.

    Args:
        cams: a branch's outputs.
        y: (B, C) labels.
        pos_rate: (C,) share of positives.
        active: (C,) bool, classes taking part.

    Returns:
        Mean over the ordered pairs of different active classes, or None when there is none.
    """
    valid = pair_mask(active)  # (Ca, Cb)
    if not bool(valid.any()):
        return None
    b, c = y.shape
    ya = torch.where(valid[None], y[:, :, None], torch.full_like(y[:, :, None], -1.0))  # (B, Ca, Cb)
    rate = pos_rate[:, None].expand(c, c).reshape(-1)  # (Ca*Cb,)
    fg = cams.fg.detach()  # (B, C, h, w)
    total = None
    for maps in (cams.mid, cams.deep):  # (B, C, 2, h_l, w_l)
        keep = 1 - F.interpolate(fg, size=maps.shape[-2:], mode="area")  # (B, Cb, h_l, w_l)
        logits = (maps[:, :, None] * keep[:, None, :, None]).mean((-2, -1))  # (B, Ca, Cb, 2)
        part = weighted_ce(logits.reshape(b, c * c, 2), ya.reshape(b, c * c), rate)
        if part is not None:
            total = part if total is None else total + part
    return total


def overlap_penalty(fg: Tensor, y: Tensor, active: Tensor, reward: float = 0.1) -> Tensor | None:
    """Per-image overlap penalty between the foregrounds of two active classes:
    ``mean_px min(M¹_a, M¹_b) − reward·mean_px max(y_a M¹_a, y_b M¹_b)`` (y as 0/1 positives),
    on the images known positive for a or b.

    Args:
        fg: (B, C, h, w) foreground maps.
        y: (B, C) labels.
        active: (C,) bool.
        reward: weight of the union term.

    Returns:
        Mean over the (image, unordered pair) entries used, or None when there is none.
    """
    a, b = torch.triu_indices(len(active), len(active), offset=1, device=fg.device)  # (Q,)
    keep = active[a] & active[b]
    a, b = a[keep], b[keep]
    pos = y == 1  # (B, C)
    used = pos[:, a] | pos[:, b]  # (B, Q)
    if not bool(used.any()):
        return None
    fa, fb = fg[:, a], fg[:, b]  # (B, Q, h, w)
    overlap = torch.minimum(fa, fb).mean((2, 3))  # (B, Q)
    union = torch.maximum(fa * pos[:, a, None, None], fb * pos[:, b, None, None]).mean((2, 3))
    return (overlap - reward * union)[used].mean()


def alignment_loss(fg_orig: Tensor, fg_coatt: Tensor, y_both: Tensor) -> Tensor | None:
    """Cross-guidance: ``−mean_px min(M¹_orig, M¹_coatt)`` where y_both = 1.

    Args:
        fg_orig: (P, C, h, w) original foregrounds of the co-attended images.
        fg_coatt: (P, C, h, w) their co-attended foregrounds.
        y_both: (P, C) labels.

    Returns:
        Mean over the (image, class) entries with y_both = 1, or None when there is none.
    """
    pos = y_both == 1
    if not bool(pos.any()):
        return None
    return -torch.minimum(fg_orig, fg_coatt).mean((2, 3))[pos].mean()


def branch_losses(cams: CAMOutput, y: Tensor, pos_rate: Tensor, active: Tensor, excl_weight: float,
                  overlap_weight: float, overlap_reward: float, balance_cam: bool = True) -> dict[str, Tensor]:
    """L_branch = L_CAM + L_cls + excl_weight·(erasure + overlap_weight·overlap).

    Args:
        cams: a branch's outputs.
        y: (B, C) labels.
        pos_rate: (C,) share of positives.
        active: (C,) bool, classes taking part in the exclusion terms.
        excl_weight, overlap_weight, overlap_reward: see the module docstring.
        balance_cam: weigh the CAM loss's positives and negatives by ``pos_rate`` too.

    Returns:
        ``{"loss", "cam", "cls", "erasure", "overlap"}``, only the parts that exist (no "loss"
        when no label is known); parts carry the graph.
    """
    parts = {"cam": cam_loss(cams.product, y, pos_rate if balance_cam else None),
             "cls": classification_loss(cams, y, pos_rate)}
    if excl_weight > 0:
        parts["erasure"] = erasure_loss(cams, y, pos_rate, active)
        parts["overlap"] = overlap_penalty(cams.fg, y, active, overlap_reward)
    parts = {k: v for k, v in parts.items() if v is not None}
    weights = {"cam": 1.0, "cls": 1.0, "erasure": excl_weight, "overlap": excl_weight * overlap_weight}
    if parts:
        parts["loss"] = sum(weights[k] * v for k, v in parts.items())
    return parts


# ------------------------------------------------------------------ networks
def _cells(x: Tensor, size: tuple[int, int], stride: int) -> Tensor:
    """The cells of a stride-``stride`` map that cover an (H, W) input."""
    return x[..., : math.ceil(size[0] / stride), : math.ceil(size[1] / stride)]


def _two_channel(x: Tensor, n_cam: int) -> Tensor:
    """(B, 2C, h, w) → (B, C, 2, h, w)."""
    return x.reshape(x.shape[0], n_cam, 2, *x.shape[-2:])


class TwoLevelCAM(nn.Module):
    """Per CAM class a bias-free 1×1 convolution with 2 channels on each of the two levels."""

    def __init__(self, mid_channels: int, deep_channels: int, n_cam: int):
        super().__init__()
        self.n_cam = n_cam
        self.mid = nn.Conv2d(mid_channels, 2 * n_cam, 1, bias=False)
        self.deep = nn.Conv2d(deep_channels, 2 * n_cam, 1, bias=False)

    def forward(self, mid: Tensor, deep: Tensor) -> tuple[Tensor, Tensor]:
        """Raw maps (B, C, 2, h, w) and (B, C, 2, h', w') of mid (B, c, h, w) and deep features."""
        return _two_channel(self.mid(mid), self.n_cam), _two_channel(self.deep(deep), self.n_cam)


#: Co-attention keys (the other image's positions) are average-pooled to at most this grid.
KEY_GRID = 16


def co_attend(f1: Tensor, f2: Tensor, w: nn.Conv2d, head: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """One level of co-attention, through a bias-free linear head.

    Image 1's positions are re-expressed as mixtures of image 2's, with weights
    softmax(F₁ᵀ W F₂ / sqrt(c)) over image 2's positions, and image 2's as mixtures of image 1's
    (the same bilinear form, softmax over image 1's positions). The positions mixed (keys) are
    average-pooled to at most `KEY_GRID`² (stride 8 at 128 px; scaled down for the CPU). The
    head is linear, ``head(F A) = head(F) A``, so the head's maps are mixed, not the features.

    Args:
        f1, f2: (P, c, h, w) features of the paired images.
        w: the c→c map W (bias-free 1×1 convolution).
        head: the co-attended branch's head at this level (bias-free, c→2C).

    Returns:
        (P, 2C, h, w) head maps of image 1 re-expressed by image 2, and of image 2 by image 1.
    """
    p, c, h, wd = f1.shape
    grid = (min(h, KEY_GRID), min(wd, KEY_GRID))
    wf2 = w(f2)  # (P, c, h, w)
    keys1, keys2 = F.adaptive_avg_pool2d(f1, grid), F.adaptive_avg_pool2d(f2, grid)  # (P, c, g, g')
    scale = 1.0 / math.sqrt(c)
    a12 = torch.bmm(f1.flatten(2).transpose(1, 2), F.adaptive_avg_pool2d(wf2, grid).flatten(2))  # (P, N1, M)
    a21 = torch.bmm(wf2.flatten(2).transpose(1, 2), keys1.flatten(2))  # (P, N2, M): F₁ᵀ W F₂ seen from image 2
    z1 = torch.bmm(head(keys2).flatten(2), (a12 * scale).softmax(2).transpose(1, 2))  # (P, 2C, N1)
    z2 = torch.bmm(head(keys1).flatten(2), (a21 * scale).softmax(2).transpose(1, 2))  # (P, 2C, N2)
    return z1.view(p, -1, h, wd), z2.view(p, -1, h, wd)


class CoAttention(nn.Module):
    """Co-attention at both CAM levels (learned W per level) with CAM heads of its own."""

    def __init__(self, mid_channels: int, deep_channels: int, n_cam: int):
        super().__init__()
        self.w_mid = nn.Conv2d(mid_channels, mid_channels, 1, bias=False)
        self.w_deep = nn.Conv2d(deep_channels, deep_channels, 1, bias=False)
        self.cam = TwoLevelCAM(mid_channels, deep_channels, n_cam)

    def forward(self, mid: Tensor, deep: Tensor, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """Raw co-attended head maps of the images ``first`` (re-expressed by ``second``) then
        ``second`` (by ``first``).

        Args:
            mid, deep: (B, c, h, w) features of the batch at the two levels.
            first, second: (P,) paired image indices.

        Returns:
            (2P, C, 2, h, w) and (2P, C, 2, h', w').
        """
        maps = []
        for f, w, head in ((mid, self.w_mid, self.cam.mid), (deep, self.w_deep, self.cam.deep)):
            z1, z2 = co_attend(f[first], f[second], w, head)
            maps.append(_two_channel(torch.cat([z1, z2]), self.cam.n_cam))
        return maps[0], maps[1]


class MCWSSOutput(NamedTuple):
    """`MCWSSNet` outputs for a batch."""

    net: NetOutput  # the U-Net's outputs (its own cam_logits unused)
    cams: CAMOutput  # the original two-level CAM branch
    mid: Tensor  # (B, c, h, w) mid-level features (cells covering the input)
    deep: Tensor  # (B, c', h', w') deepest features


class MCWSSNet(nn.Module):
    """A `UNet` whose encoder also feeds the two-level CAM heads and the co-attention.

    Args:
        in_channels: image channels.
        n_classes: K lesion classes.
        n_image_classes: image classes (0 = none).
        cfg: architecture.
        n_cam: C CAM classes (co-attention only when C >= 2).
    """

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, cfg: ModelConfig, n_cam: int):
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(in_channels, n_classes, n_image_classes, cfg)
        self.mid_level = min(2, cfg.depth - 1)
        ch = cfg.channels
        self.cam = TwoLevelCAM(ch[self.mid_level], ch[-1], n_cam)
        self.coattention = CoAttention(ch[self.mid_level], ch[-1], n_cam) if n_cam >= 2 else None

    @property
    def mid_stride(self) -> int:
        return 2**self.mid_level

    @property
    def factor(self) -> int:
        """Stride ratio of the deep and the mid level."""
        return 2 ** (self.cfg.depth - self.mid_level)

    def _levels(self, feats: list[Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        return (_cells(feats[self.mid_level], size, self.mid_stride),
                _cells(feats[-1], size, 2**self.cfg.depth))

    def cam_forward(self, image: Tensor) -> CAMOutput:
        """The original CAM branch alone (encoder and heads, no decoder).

        Args:
            image: (B, C, H, W) normalised images.
        """
        size = tuple(image.shape[-2:])
        mid, deep = self._levels(self.unet.encoder(pad_to_multiple(image, self.cfg.multiple)), size)
        return cam_output(*self.cam(mid, deep), self.factor)

    def forward(self, image: Tensor) -> MCWSSOutput:
        u, size = self.unet, tuple(image.shape[-2:])
        feats = u.encoder(pad_to_multiple(image, self.cfg.multiple))  # level i: stride 2**i
        presence, cam, image_logits, pooled = u.heads(feats, size)
        y = feats[-1]
        for j, (up, drop) in enumerate(zip(u.decoder, u.decoder_dropout)):  # as UNet.forward
            y = drop(up(y, feats[-2 - j]))
        seg = u.out(y)[..., : size[0], : size[1]]  # (B, K+1, H, W)
        mid, deep = self._levels(feats, size)
        cams = cam_output(*self.cam(mid, deep), self.factor)
        return MCWSSOutput(NetOutput(seg, presence, cam, image_logits, pooled), cams, mid, deep)

    def co_attended(self, out: MCWSSOutput, first: Tensor, second: Tensor) -> CAMOutput:
        """The co-attended branch for the pairs (``first`` re-expressed by ``second``, then
        ``second`` by ``first``: 2P images).

        Args:
            out: this network's outputs for the batch.
            first, second: (P,) paired image indices.
        """
        return cam_output(*self.coattention(out.mid, out.deep, first, second), self.factor)


# ------------------------------------------------------------------ the method
@register
class MCWSSMethod(CAMMethod):
    """Multi-class two-level CAMs with mutual exclusion and co-attention → pseudo-masks → segmenter."""

    spec = METHOD_CATALOG["mcwss"]

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, model=None, **options):
        # CAMMethod.__init__ builds cam's networks: only the base initialiser runs here, and the
        # snapshot state CAMMethod's inherited methods use is set up below
        Method.__init__(self, in_channels, n_classes, n_image_classes, model, **options)
        self.n_cam, sub = n_cam_classes(self.n_classes, self.n_image_classes)
        self.subclasses = self.n_cam if sub else 0
        self.net = MCWSSNet(in_channels, n_classes, n_image_classes, self.model_config, self.n_cam)
        if self.options["pseudo_source"] not in ("snapshot", "live"):
            raise InputError("pseudo_source", f"must be 'snapshot' or 'live', got {self.options['pseudo_source']!r}")
        self.classifier = None  # CAMMethod: the CAMs come from ``self.net``
        self.snapshot: nn.Module | None = None
        if self.options["pseudo_source"] == "snapshot":
            self.snapshot = copy.deepcopy(self.net)
            self.snapshot.requires_grad_(False)
        self.register_buffer("snapshot_step", torch.full((), -1, dtype=torch.long))
        self.register_buffer("snapshot_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("snapshot_refreshed", torch.zeros((), dtype=torch.long))
        # labels seen in this run per CAM class: the class weights and the active classes
        self.register_buffer("cam_positives", torch.zeros(self.n_cam, dtype=torch.long))
        self.register_buffer("cam_labels", torch.zeros(self.n_cam, dtype=torch.long))

    @property
    def cam_stride(self) -> int:
        return self.net.mid_stride

    def start_new_run(self) -> None:
        """A fine-tuning run takes its own snapshot (`CAMMethod`) and counts its own labels."""
        super().start_new_run()
        self.cam_positives.zero_()
        self.cam_labels.zero_()

    # ------------------------------------------------------------ labels
    def cam_targets(self, batch: Batch) -> Tensor:
        """(B, C) CAM-class labels of a batch (`cam_class_labels`)."""
        return cam_class_labels(batch.presence, batch.image_class, self.subclasses)

    def pos_rate(self) -> Tensor:
        """(C,) share of positives among the labels seen, (pos + 1) / (n + 2)."""
        return (self.cam_positives.float() + 1) / (self.cam_labels.float() + 2)

    def active(self) -> Tensor:
        """(C,) bool: the classes seen positive (all of them before any label is seen)."""
        seen = self.cam_positives > 0
        return seen if bool(seen.any()) else torch.ones_like(seen)

    # ------------------------------------------------------------ prediction
    def _forward(self, image: Tensor) -> NetOutput:
        """The U-Net's outputs with ``cam_logits`` the lesion maps of the CAM product (B, K, h, w)."""
        out = self.net(image)
        return out.net._replace(cam_logits=lesion_maps(out.cams.fg, self.active(), self.subclasses > 0))

    def prediction_from_output(self, out: NetOutput, size: tuple[int, int]) -> Prediction:
        pred = super().prediction_from_output(out, size)
        return replace(pred, cams=self._to_image(out.cam_logits, size))  # the product's own values

    def _to_image(self, maps: Tensor, size: tuple[int, int]) -> Tensor:
        """(B, K, h, w) maps at the mid stride → (B, K, H, W) in [0, 1] (bilinear, cropped)."""
        up = F.interpolate(maps.contiguous(), scale_factor=self.cam_stride, mode="bilinear", align_corners=False)
        return up[..., : size[0], : size[1]].clamp(0.0, 1.0)

    # ------------------------------------------------------------ training
    def pseudo_target(self, out: MCWSSOutput, batch: Batch) -> Tensor:
        """Pseudo-masks from the (snapshot's, once frozen) CAM-product lesion maps.

        Args:
            out: this step's network outputs (their CAMs serve before the snapshot is frozen).
            batch: the batch.

        Returns:
            (B, S, S) int64 target (-1 ignore, 0 background, k class k).
        """
        size = tuple(batch.image.shape[-2:])
        fg = out.cams.fg.detach()
        if self.snapshot is not None and int(self.snapshot_step) >= 0:
            with torch.no_grad():
                fg = self.snapshot.cam_forward(batch.image).fg
        maps = self._to_image(lesion_maps(fg, self.active(), self.subclasses > 0, self.cam_targets(batch)), size)
        if self.options["cam_relative"]:
            maps = maps / maps.flatten(2).amax(2).clamp_min(1e-6)[..., None, None]  # (B, K, S, S)
        if self.options["superpixels"] > 0:
            maps = superpixel_mean(maps, batch.image, int(self.options["superpixels"]))
        return cam_pseudo_target(maps, batch.presence, float(self.options["cam_hi"]), float(self.options["cam_lo"]))

    def mcwss_losses(self, out: MCWSSOutput, y: Tensor) -> dict[str, Tensor]:
        """L_branch(orig) + coatt_weight·L_branch(coatt) + align_weight·L_align.

        Args:
            out: the network's outputs for the batch.
            y: (B, C) CAM-class labels.

        Returns:
            ``{"loss", ...parts}``, only the parts that exist (no "loss" when nothing is
            supervised); parts carry the graph.
        """
        o = self.options
        weights = (float(o["excl_weight"]), float(o["overlap_weight"]), float(o["overlap_reward"]),
                   bool(o["balance_cam"]))
        active = self.active()
        parts = branch_losses(out.cams, y, self.pos_rate().to(y.device), active, *weights)
        terms = [parts.pop("loss")] if "loss" in parts else []
        if (self.net.coattention is not None and int(active.sum()) >= 2
                and (o["coatt_weight"] > 0 or o["align_weight"] > 0)):
            co_parts = self._coattention_losses(out, y, active, weights)
            for name in ("coatt", "align"):
                if name in co_parts:
                    parts[name] = co_parts[name]
                    terms.append(float(o[f"{name}_weight"]) * co_parts[name])
        if terms:
            parts["loss"] = sum(terms)
        return parts

    def _coattention_losses(self, out: MCWSSOutput, y: Tensor, active: Tensor, weights: tuple) -> dict[str, Tensor]:
        """``{"coatt": L_branch(coatt, y_both), "align": L_align}``, the parts that exist (none
        when no two images share a positive class).

        Args:
            out: the network's outputs for the batch.
            y: (B, C) CAM-class labels.
            active: (C,) bool.
            weights: `branch_losses`'s weights.
        """
        first, second = share_pairs(y)
        if len(first) == 0:
            return {}
        co = self.net.co_attended(out, first, second)
        y_both = both_labels(y[first], y[second]).repeat(2, 1)  # (2P, C): first, then second
        parts = {"coatt": branch_losses(co, y_both, positive_share(y_both), active, *weights).get("loss"),
                 "align": alignment_loss(out.cams.fg[torch.cat([first, second])], co.fg, y_both)}
        return {k: v for k, v in parts.items() if v is not None}

    def _schedule_snapshot(self, step: int, progress: float, seg_weight: float) -> None:
        """Freeze the snapshot when the segmenter starts; re-copy it once at ``snapshot_refresh``
        (as `CAMMethod.training_step`)."""
        if seg_weight > 0 and int(self.snapshot_step) < 0:
            self.take_snapshot(step)
        refresh = float(self.options["snapshot_refresh"])
        if 0 < refresh <= progress and int(self.snapshot_step) >= 0 and int(self.snapshot_refreshed) == 0:
            self._copy_classifier()
            self.snapshot_refreshed.fill_(max(1, int(step)))

    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        learning = self.training and torch.is_grad_enabled()  # not a probe
        y = self.cam_targets(batch)  # (B, C)
        if learning:
            self.cam_positives += (y == 1).sum(0)
            self.cam_labels += (y >= 0).sum(0)
        w = self.seg_weight(progress)
        if self.snapshot is not None and learning:
            self._schedule_snapshot(step, progress, w)
        out = self.net(batch.image)
        target = self.pseudo_target(out, batch) if w > 0 else None
        losses = self.supervised_losses(out.net, batch, target=target, seg_weight=w)
        mc = self.mcwss_losses(out, y)
        if "loss" in mc:
            losses["loss"] = losses["loss"] + float(self.options["cam_weight"]) * mc.pop("loss")
        losses.update({f"mcwss_{k}": v.detach() for k, v in mc.items()})
        if target is not None:
            losses["pseudo_fg"] = (target > 0).float().mean()
        return losses
