"""``cam``: segmentation from image-level labels only (classifier → CAM → pseudo-mask → segmenter).

1. The presence head (a multi-scale CAM head: 1×1 convolutions on the two deepest encoder
   levels, log-sum-exp pooled) learns lesion presence from image labels with BCE; the
   image-class head learns the image classes. Negative images (presence all 0) push the CAM
   down everywhere, which suppresses activations on background structures that also occur in
   lesion-free images.
2. Over the second half of warmup a *snapshot* of the classifier follows it as an exponential
   moving average of its weights (``snapshot_ema``, 0.995 per step; batch-norm statistics
   copied); at ``warmup`` (fraction of training) the snapshot is frozen (the
   ``pseudo_source="snapshot"`` default). From then on every positive image's pseudo-mask comes
   from the snapshot's CAM in eval mode (ReLU, upsampled, max-normalised to [0, 1]; optionally
   averaged within SLIC superpixels): lesion where CAM > ``cam_hi``, background where
   CAM < ``cam_lo``, the band between ignored. Negative images are all background. Images whose
   presence is unknown are ignored. At ``snapshot_refresh`` (0.7 of training) the snapshot is
   replaced, once, by a copy of the classifier as it is then: trained longer, at a lower
   learning rate, and on its own CAMs no longer pulled by the segmentation loss. The snapshot is
   part of the method's state, so a resumed run makes the same pseudo-masks; a fine-tuning run
   (``init_from``) takes its own.
3. The segmentation branch learns from the pseudo-masks with partial CE + masked soft Dice; the
   ignored band is where its decoder (full-resolution skips) places the boundary.

Why a snapshot: with pseudo-masks from the live network (``pseudo_source="live"``, the first
design) the segmentation loss and the CAM share the encoder, and each pulls the other: on BUSI
the CAM's highest point then fell inside the lesion in 29-46 % of the holdout lesion images,
against 68 % for a classifier trained without the segmentation loss, and the pseudo-masks
followed it off the lesion. The snapshot breaks that loop; the live presence head keeps
learning and gives the CAMs and presence shown to the user. Why an average: at the learning rate of mid-training the
classifier's localisation swings from step to step (a copy taken at 40 % of one BUSI run put the
CAM's highest point inside the lesion in 23 % of the training lesion images, the average in
another run in 36 %, a classifier trained to the end of its learning-rate schedule in 55 %).

By default classifier and segmenter share the U-Net encoder (one forward pass per step);
``separate_classifier=True`` uses an ``EncoderClassifier`` beside the U-Net instead.
``predict`` returns the segmenter's probabilities and the classifier's CAMs and presence
(gated as in every method).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from training_backend.errors import InputError
from training_backend.config import METHOD_CATALOG
from training_backend.learning.methods.base import Batch, Method, register
from training_backend.learning.models import EncoderClassifier, NetOutput, cam_to_maps, pad_to_multiple


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


def _cam_logits(module: nn.Module, image: Tensor) -> Tensor:
    """CAM logits of a ``UNet`` or an ``EncoderClassifier`` from their encoder and heads (both
    have them; a U-Net's decoder is not run).

    Args:
        module: ``UNet`` or ``EncoderClassifier``.
        image: (B, C, H, W) normalised images.
    """
    feats = module.encoder(pad_to_multiple(image, module.cfg.multiple))
    return module.heads(feats, tuple(image.shape[-2:]))[1]


@register
class CAMMethod(Method):
    """Weakly supervised segmentation from image-level labels through refined CAMs."""

    spec = METHOD_CATALOG["cam"]

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, model=None, **options):
        super().__init__(in_channels, n_classes, n_image_classes, model, **options)
        self.net = self.build_unet()
        if self.options["pseudo_source"] not in ("snapshot", "live"):
            raise InputError("pseudo_source", f"must be 'snapshot' or 'live', got {self.options['pseudo_source']!r}")
        self.classifier = None
        if self.options["separate_classifier"]:
            self.classifier = EncoderClassifier(in_channels, n_classes, n_image_classes, self.model_config)
        # the snapshot exists from the start (so that checkpoints taken before and after
        # warmup have the same keys); ``snapshot_step`` is -1 until it is frozen
        self.snapshot: nn.Module | None = None
        if self.options["pseudo_source"] == "snapshot":
            self.snapshot = copy.deepcopy(self._cam_module())
            self.snapshot.requires_grad_(False)
        self.register_buffer("snapshot_step", torch.full((), -1, dtype=torch.long))
        self.register_buffer("snapshot_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("snapshot_refreshed", torch.zeros((), dtype=torch.long))  # its step, 0 = not yet

    def _cam_module(self) -> nn.Module:
        """The network whose CAMs the method shows and learns from (classifier or shared U-Net)."""
        return self.classifier if self.classifier is not None else self.net

    def take_snapshot(self, step: int) -> None:
        """Freeze the snapshot as the source of the pseudo-masks (with ``snapshot_ema=0``: a copy
        of the current classifier; otherwise the weight average as it stands).

        Args:
            step: the global step, recorded in ``snapshot_step``.
        """
        if float(self.options["snapshot_ema"]) <= 0:
            self._copy_classifier()
        self.snapshot_step.fill_(int(step))

    @torch.no_grad()
    def _copy_classifier(self) -> None:
        """Copy the classifier's weights and statistics into the snapshot."""
        for dst, src in zip(self.snapshot.state_dict().values(), self._cam_module().state_dict().values()):
            dst.copy_(src)

    def start_new_run(self) -> None:
        """A fine-tuning run takes its own snapshot at its own warmup (from the classifier as it
        learns the new labels), not the frozen one of the run it starts from."""
        self.snapshot_step.fill_(-1)
        self.snapshot_updates.zero_()
        self.snapshot_refreshed.zero_()

    @torch.no_grad()
    def after_step(self, step: int, progress: float) -> None:
        """Move the snapshot towards the classifier until it is frozen (``snapshot_ema`` > 0).

        Args:
            step: global step just taken.
            progress: fraction of training done.
        """
        ema = float(self.options["snapshot_ema"])
        if (self.snapshot is None or ema <= 0 or int(self.snapshot_step) >= 0
                or progress < 0.5 * float(self.options["warmup"])):
            return
        # the first update copies; the average covers the second half of warmup at most
        decay = min(ema, 1.0 - 1.0 / (int(self.snapshot_updates) + 1))
        self.snapshot_updates += 1
        for dst, src in zip(self.snapshot.parameters(), self._cam_module().parameters()):
            dst.lerp_(src, 1.0 - decay)
        for dst, src in zip(self.snapshot.buffers(), self._cam_module().buffers()):
            dst.copy_(src)  # batch-norm statistics follow the classifier

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; a checkpoint from before the snapshot existed (no
        ``snapshot.*`` keys) loads with a snapshot not yet taken."""
        state_dict = dict(state_dict)
        state_dict.setdefault("snapshot_refreshed", torch.zeros((), dtype=torch.long))
        if "snapshot_step" not in state_dict:
            state_dict["snapshot_step"] = torch.full((), -1, dtype=torch.long)
            state_dict["snapshot_updates"] = torch.zeros((), dtype=torch.long)
            if self.snapshot is not None:
                state_dict.update({f"snapshot.{k}": v for k, v in self.snapshot.state_dict().items()})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> "CAMMethod":
        super().train(mode)
        if self.snapshot is not None:
            self.snapshot.eval()  # batch norms on their running statistics, dropout off
        return self

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
        cam_logits = out.cam_logits.detach()
        if self.snapshot is not None and int(self.snapshot_step) >= 0:
            with torch.no_grad():
                cam_logits = _cam_logits(self.snapshot, batch.image)
        cams = cam_to_maps(cam_logits, size, self.cam_stride)  # (B, K, S, S)
        if self.options["superpixels"] > 0:
            cams = superpixel_mean(cams, batch.image, int(self.options["superpixels"]))
        return cam_pseudo_target(cams, batch.presence, float(self.options["cam_hi"]), float(self.options["cam_lo"]))

    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        out = self._forward(batch.image)
        w = self.seg_weight(progress)
        if self.snapshot is not None and self.training and torch.is_grad_enabled():  # not a probe
            if w > 0 and int(self.snapshot_step) < 0:
                self.take_snapshot(step)
            refresh = float(self.options["snapshot_refresh"])
            if (0 < refresh <= progress and int(self.snapshot_step) >= 0
                    and int(self.snapshot_refreshed) == 0):
                self._copy_classifier()
                self.snapshot_refreshed.fill_(max(1, int(step)))
        target = self.pseudo_target(out, batch) if w > 0 else None
        losses = self.supervised_losses(out, batch, target=target, seg_weight=w)
        if target is not None:
            losses["pseudo_fg"] = (target > 0).float().mean()
        return losses
