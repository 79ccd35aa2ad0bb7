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

_dice_batch = MaskedDiceLoss(include_background=False, softmax=True, batch=True, reduction="none")
_dice_image = MaskedDiceLoss(include_background=False, softmax=True, batch=False, reduction="none")


def segmentation_losses(seg_logits: Tensor, target: Tensor, per_image: bool = True
                        ) -> tuple[Tensor, Tensor | None] | None:
    """Partial cross-entropy and masked soft Dice on the labelled pixels.

    For a full mask every pixel is labelled, so this is the usual Dice + CE; for a sparse mask
    (scribbles) only the painted pixels count. Soft Dice (MONAI ``MaskedDiceLoss``) covers the
    lesion classes that occur among the labelled pixels; classes absent from them are pushed
    down by the cross-entropy alone. ``per_image`` (the default) averages the Dice of every
    (image, class) pair where the class occurs -- the quantity the per-case Dice metric
    measures, so small lesions weigh as much as large ones; otherwise one Dice over the batch.

    Args:
        seg_logits: (B, K+1, H, W) logits.
        target: (B, H, W) int64, -1 = ignore.
        per_image: per-image Dice (True) or batch Dice (False).

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
    present = onehot[:, 1:].mul(mask[:, None]).flatten(2).sum(2) > 0  # (b, K)
    if not bool(present.any()):
        return ce, None
    weights = mask[:, None].to(logits.dtype)  # (b, 1, H, W)
    if per_image:
        dice = _dice_image(logits, onehot, weights).reshape(present.shape)  # (b, K)
        return ce, dice[present].mean()
    dice = _dice_batch(logits, onehot, weights).reshape(-1)  # (K,)
    return ce, dice[present.any(0)].mean()


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


def softmax_mse(student_logits: Tensor, teacher_probs: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean squared difference between the student's softmax and the teacher's probabilities.

    Args:
        student_logits: (B, C, H, W) logits (gradient flows here).
        teacher_probs: (B, C, H, W) probabilities (treated as constant).
        valid: optional (B, H, W) bool; pixels outside it add 0 (the mean is still over all).
    """
    if valid is None:
        return F.mse_loss(torch.softmax(student_logits, dim=1), teacher_probs.detach())
    sq = (torch.softmax(student_logits, dim=1) - teacher_probs.detach()).pow(2)  # (B, C, H, W)
    return (sq * valid[:, None].to(sq.dtype)).mean()


def sigmoid_rampup(x: float) -> float:
    """``exp(-5 (1 - x)^2)`` for x clipped to [0, 1] (Laine & Aila; Tarvainen & Valpola).

    Args:
        x: fraction of the ramp-up done.
    """
    x = min(max(float(x), 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - x) ** 2)
