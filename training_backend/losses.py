"""Loss functions shared by the methods (targets use -1 = ignore, 0 = background, k = class k).

Every function returns ``None`` when the batch holds no supervision of its kind, so a method
adds only the terms that exist (and logs only those).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from torch import Tensor

_dice = MaskedDiceLoss(include_background=False, softmax=True, batch=True, reduction="none")


def segmentation_losses(seg_logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor | None] | None:
    """Partial cross-entropy and masked soft Dice on the labelled pixels.

    For a full mask every pixel is labelled, so this is the usual Dice + CE; for a sparse mask
    (scribbles) only the painted pixels count. Dice is computed over the whole batch (MONAI
    ``MaskedDiceLoss(batch=True)``) for the lesion classes that occur among the labelled pixels;
    classes absent from them are pushed down by the cross-entropy alone.

    Args:
        seg_logits: (B, K+1, H, W) logits.
        target: (B, H, W) int64, -1 = ignore.

    Returns:
        ``(ce, dice)`` (``dice`` is ``None`` when no lesion pixel is labelled), or ``None`` when
        no pixel is labelled at all.
    """
    labelled = target >= 0  # (B, H, W)
    if not bool(labelled.any()):
        return None
    ce = F.cross_entropy(seg_logits, target, ignore_index=-1)
    rows = labelled.flatten(1).any(1)  # (B,) images with any labelled pixel
    logits, tgt, mask = seg_logits[rows], target[rows], labelled[rows]
    k1 = seg_logits.shape[1]
    onehot = F.one_hot(tgt.clamp_min(0), k1).permute(0, 3, 1, 2).to(logits.dtype)  # (b, K+1, H, W)
    present = onehot[:, 1:].mul(mask[:, None]).flatten(2).sum((0, 2)) > 0  # (K,)
    if not bool(present.any()):
        return ce, None
    per_class = _dice(logits, onehot, mask[:, None].to(logits.dtype)).reshape(-1)  # (K,)
    return ce, per_class[present].mean()


def presence_loss(presence_logits: Tensor, presence: Tensor) -> Tensor | None:
    """Binary cross-entropy on the known presence entries.

    Args:
        presence_logits: (B, K) logits.
        presence: (B, K) float in {1, 0, -1 = unknown}.
    """
    known = presence >= 0  # (B, K)
    if not bool(known.any()):
        return None
    return F.binary_cross_entropy_with_logits(presence_logits[known], presence[known].to(presence_logits.dtype))


def image_class_loss(image_logits: Tensor | None, image_class: Tensor) -> Tensor | None:
    """Cross-entropy on the known image classes.

    Args:
        image_logits: (B, n_image_classes) logits, or ``None`` when the model has no such head.
        image_class: (B,) int64, -1 = unknown.
    """
    if image_logits is None:
        return None
    known = image_class >= 0
    if not bool(known.any()):
        return None
    return F.cross_entropy(image_logits[known], image_class[known])


def softmax_mse(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """Mean squared difference between the student's softmax and the teacher's probabilities.

    Args:
        student_logits: (B, C, H, W) logits (gradient flows here).
        teacher_probs: (B, C, H, W) probabilities (treated as constant).
    """
    return F.mse_loss(torch.softmax(student_logits, dim=1), teacher_probs.detach())


def sigmoid_rampup(x: float) -> float:
    """``exp(-5 (1 - x)^2)`` for x clipped to [0, 1] (Laine & Aila; Tarvainen & Valpola).

    Args:
        x: fraction of the ramp-up done.
    """
    x = min(max(float(x), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - x) ** 2)
