"""``cam``: segmentation from image-level labels only (classifier → CAM → pseudo-mask → segmenter).

1. The presence head (a multi-scale CAM head: 1×1 convolutions on the two deepest encoder
   levels, log-sum-exp pooled) learns lesion presence from image labels with BCE; the
   image-class head learns the image classes. Negative images (presence all 0) push the CAM
   down everywhere, which suppresses activations on background structures that also occur in
   lesion-free images.
2. From ``warmup`` (fraction of training) on, every positive image's CAM (ReLU, upsampled,
   max-normalised to [0, 1]; optionally averaged within SLIC superpixels so that it follows
   image edges) becomes a pseudo-mask: lesion where CAM > ``cam_hi``, background where
   CAM < ``cam_lo``, the band between ignored. Negative images are all background. Images
   whose presence is unknown are ignored.
3. The segmentation branch learns from the pseudo-masks with partial CE + masked soft Dice; the
   ignored band is where its decoder (full-resolution skips) places the boundary.

By default classifier and segmenter share the U-Net encoder (one forward pass per step);
``separate_classifier=True`` uses an ``EncoderClassifier`` beside the U-Net instead.
``predict`` returns the segmenter's probabilities and the classifier's CAMs and presence
(gated as in every method).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from training_backend.methods.base import Batch, Method, Supervision, register
from training_backend.models import EncoderClassifier, NetOutput, cam_to_maps


def cam_pseudo_target(cams: Tensor, presence: Tensor, hi: float, lo: float) -> Tensor:
    """Pseudo segmentation target from CAMs and image-level presence.

    Args:
        cams: (B, K, H, W) maps in [0, 1].
        presence: (B, K) in {1, 0, -1 unknown}.
        hi: CAM above which a pixel of a present class is labelled that class.
        lo: CAM below which (for every class not known absent) a pixel is background.

    Returns:
        (B, H, W) int64 target: -1 ignore, 0 background, k class k. Images with no known
        presence entry are all -1; images with every class absent are all 0.
    """
    known = (presence >= 0).any(1)  # (B,)
    candidate = (presence != 0).to(cams.dtype)[..., None, None]  # (B, K, 1, 1) present or unknown
    score, cls = (cams * candidate).max(1)  # (B, H, W)
    target = torch.full_like(cls, -1)
    target[(score < lo) & known[:, None, None]] = 0
    present_at = torch.gather((presence == 1).long(), 1, cls.flatten(1)).view_as(cls).bool()  # (B, H, W)
    fg = (score > hi) & present_at
    target[fg] = cls[fg] + 1
    return target


def superpixel_mean(maps: Tensor, image: Tensor, n_segments: int) -> Tensor:
    """Average ``maps`` within SLIC-zero superpixels of ``image`` (CPU, per image).

    Args:
        maps: (B, K, H, W) maps.
        image: (B, C, H, W) images (any scale; each is min-max scaled for SLIC).
        n_segments: approximate number of superpixels per image.
    """
    from skimage.segmentation import slic

    out = torch.empty_like(maps)
    img = image.detach().float().cpu().numpy()
    for b in range(img.shape[0]):
        x = np.moveaxis(img[b], 0, -1)  # (H, W, C)
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-6)
        labels = slic(x, n_segments=n_segments, slic_zero=True, start_label=0, channel_axis=-1)  # (H, W)
        ids = torch.as_tensor(labels, device=maps.device).flatten()  # (H*W,)
        n = int(ids.max()) + 1
        flat = maps[b].flatten(1)  # (K, H*W)
        sums = torch.zeros(flat.shape[0], n, device=maps.device, dtype=maps.dtype).index_add_(1, ids, flat)
        counts = torch.bincount(ids, minlength=n).clamp_min(1).to(maps.dtype)
        out[b] = (sums / counts)[:, ids].view_as(maps[b])
    return out


@register
class CAMMethod(Method):
    """Weakly supervised segmentation from image-level labels through refined CAMs."""

    name = "cam"
    supervision = Supervision(full_masks=False, sparse_masks=False, image_labels=True, unlabelled=False, requires=("image_label",))
    description = "Image labels only: presence classifier -> multi-scale CAM -> thresholded pseudo-masks -> segmenter."
    default_options = {
        "warmup": 0.3,  # fraction of training before the segmenter starts
        "cam_hi": 0.5,  # CAM above: lesion
        "cam_lo": 0.2,  # CAM below: background
        "seg_weight": 1.0,  # weight of the pseudo-mask losses after the ramp
        "superpixels": 0,  # SLIC superpixels for CAM refinement (0 = off)
        "separate_classifier": False,  # EncoderClassifier beside the U-Net instead of a shared encoder
    }

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, model=None, **options):
        super().__init__(in_channels, n_classes, n_image_classes, model, **options)
        self.net = self.build_unet()
        self.classifier = None
        if self.options["separate_classifier"]:
            self.classifier = EncoderClassifier(in_channels, n_classes, n_image_classes, self.model_config)

    def _forward(self, image: Tensor) -> NetOutput:
        out = self.net(image)
        if self.classifier is None:
            return out
        c = self.classifier(image)
        return NetOutput(out.seg_logits, c.presence_logits, c.cam_logits, c.image_logits, c.features)

    def predict_forward(self, image: Tensor) -> NetOutput:
        return self._forward(image)

    def seg_weight(self, progress: float) -> float:
        """Weight of the segmentation losses: 0 before ``warmup``, linear ramp over 0.1, then ``seg_weight``.

        Args:
            progress: fraction of training done.
        """
        start = float(self.options["warmup"])
        if progress < start:
            return 0.0
        return float(self.options["seg_weight"]) * min((progress - start) / 0.1, 1.0)

    def pseudo_target(self, out: NetOutput, batch: Batch) -> Tensor:
        """Pseudo-masks for a batch from its (detached) CAMs and known presence.

        Args:
            out: network outputs for ``batch.image``.
            batch: the batch.
        """
        size = tuple(batch.image.shape[-2:])
        cams = cam_to_maps(out.cam_logits.detach(), size, self.cam_stride)  # (B, K, S, S)
        if self.options["superpixels"] > 0:
            cams = superpixel_mean(cams, batch.image, int(self.options["superpixels"]))
        return cam_pseudo_target(cams, batch.presence, float(self.options["cam_hi"]), float(self.options["cam_lo"]))

    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        out = self._forward(batch.image)
        w = self.seg_weight(progress)
        target = self.pseudo_target(out, batch) if w > 0 else None
        losses = self.supervised_losses(out, batch, target=target, seg_weight=w)
        if target is not None:
            losses["pseudo_fg"] = (target > 0).float().mean()
        return losses
