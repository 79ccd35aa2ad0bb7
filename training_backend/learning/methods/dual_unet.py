"""``dual_unet``: SKS, a classifier trained on image labels guides a U-Net trained on the masks.

After "Skip and Skip: Segmenting Medical Images with Prompts" (Chen, Yang, Lei, Zhang; arXiv
2406.14958). No code of the paper is public; what is known of it is its abstract and summaries
(``/work/shared/METHODS.md``, section 2). Two branches, trained in two stages by progress:

* **Stage 1** (progress < ``stage1``): only the *classification branch* (the paper's
  "coarse-grained feature guidance branch") learns, from the image labels of every case in the
  batch: presence BCE + image-class CE (``Method.supervised_losses`` with no segmentation).
  A step is the classifier's forward and backward only.
* **Stage 2**: the *segmentation branch*, a U-Net of its own, learns from the masks (full or
  sparse) with CE + soft Dice, guided by the classifier's feature pyramid:

  - **Feature Share Skip (FSS)** at every encoder level λ = 0 … depth:
    ``f_fuse^λ = W_λ · (f_cls^λ ⊕ f_seg^λ) + b_λ``, a 1×1 convolution from 2C_λ to C_λ
    channels, where ``f_seg^λ`` is the segmentation encoder's level-λ block output. With
    ``fuse_down`` (default) the fused feature is also what the next segmentation encoder
    level reads, so the classifier's knowledge flows down the encoder as well as across;
    without it the segmentation encoder runs on its own features and the fusion only feeds the
    skip.
  - **Resolution Compensation Skip (RCS)**: the fused features are the decoder's long skips
    (the deepest one is where the decoder starts), so the decoder recovers the full
    resolution from features that carry the classifier's evidence.
  - The paper's third skip ("Connection's Artful Leap") is not defined in any public source:
    it is not implemented.

Losses (weights are the common options):

* classifier: ``L_cls = presence_weight · BCE(presence_logits, presence) + image_class_weight ·
  CE(image_logits, image_class)``, over the known labels of every case in the batch;
* segmentation: ``L_seg = CE(seg_logits, y) + dice_weight · (1 - softDice(seg_logits, y))``
  over the labelled pixels (``segmentation_loss``); maskless negative cases (presence all 0,
  e.g. "normal") have an all-background target (``negative_background``);
* stage 1: ``L = L_cls``; stage 2: ``L = L_seg + classifier_weight · L_cls``.

**Freezing the classifier in stage 2** (``freeze_classifier``, default True): the
segmentation loss does not reach the classifier; its features enter the segmentation branch
detached. Why: the image labels cover every case, the masks about a tenth of them (the product
case); segmentation gradients from the few masked images would bend the classifier's features
towards those images, which is what the classifier is there to prevent, and (as ``cam``
measured on BUSI) a segmentation loss on a shared encoder pulls the CAM off the lesions. The
segmentation branch has an encoder of its own to adapt. The classifier keeps learning the image
labels in stage 2 with its own loss (``classifier_weight``, default 1), detached from the
segmentation, so its features, presence (gating) and CAMs keep improving while the learning rate
falls; it costs the classifier's backward, which the frozen alternative would save. Two other
settings: ``classifier_weight=0`` freezes it outright (no gradient, run in eval mode without a
graph: the cheapest stage 2; its parameters then get no gradient, so fewer than 80 % of the
parameters learn in a step, which the contract test would flag), and
``freeze_classifier=False`` fine-tunes it with the segmentation loss as well (the joint reading
of the paper). The trainer's optimiser holds the classifier's parameters in both stages; a
frozen one gets no gradient, which AdamW skips (no update, no weight decay).

**What is the paper's and what is ours.** The paper's: the two branches and their order
(classifier pre-trained on image labels first), fusion by concatenation and a linear projection
2C→C at every level, the fused features as the decoder's long skips, more image-labelled cases
than masked ones. Ours (the paper does not say, or says it for a bigger machine): a CNN pyramid
(``EncoderClassifier``: the U-Net encoder of ``ModelConfig`` with the presence/CAM and
image-class heads) instead of a three-stage Swin-Transformer-V2, with the same channels per
level as the segmentation encoder, so every level of the U-Net is fused; the stage split by
progress, ``stage1 = 0.1``; the freezing choice above; the fused feature continuing down the
encoder; the loss types (BCE/CE for the classifier, CE + Dice for the segmenter); predictions
that take segmentation from the segmentation branch and CAMs, presence and image class from
the classifier. Scaled down for a 2-core CPU: the classifier is the small U-Net encoder
(16-16-32-64-128 channels by default), 128 px images.

**Why ``stage1 = 0.1``.** A classifier step costs about a third of a ``supervised`` step (no
decoder, whose full-resolution blocks dominate), so 10 % of a 300 s run is already a few epochs
of classifier training on a BUSI-sized project; the classifier goes on learning in stage 2
anyway. The segmentation branch, which starts from scratch and learns from the few masks, gets
the remaining 90 %. Measured on BUSI (10 % of the masks, a label on every case, 300 s, seed 0):
holdout lesion Dice 0.611 with ``stage1 = 0.2``, 0.627 with 0.1 (``supervised``: 0.623).

**Cost of a step relative to ``supervised``** (a U-Net forward and backward on the batch).
Stage 1: about 0.3-0.4 (the encoder and heads only). Stage 2: the classifier's forward and
backward on the batch (about 0.3-0.4) plus the segmentation U-Net's (about 1.05, the 1×1
fusions included), but the segmentation branch runs only on the cases that have a segmentation
target (a mask or a negative image label): cases with only a positive image label add nothing
to its loss. With 10 % masks (at least half of each batch masked) that is about five cases of
eight, so a stage-2 step costs about as much as a ``supervised`` one; with every case masked,
about 1.5× (measured at 128 px, batch 8, 2 threads: ``supervised`` 0.14 s, stage 1 0.05 s,
stage 2 0.15 s with 5 of 8 cases masked and 0.21 s with all 8).

``predict`` runs both branches: probabilities from the segmentation branch; CAMs, presence
(gating) and image class from the classifier. MC dropout samples both (bottleneck and decoder
dropout of the U-Net, bottleneck and image-head dropout of the classifier). The stage is a
function of ``progress``, so a checkpoint from either stage resumes identically with no state
beyond the weights.
"""
from __future__ import annotations

import torch
from monai.networks.blocks import UnetOutBlock, UnetUpBlock
from torch import Tensor, nn

from training_backend.config import METHOD_CATALOG, ModelConfig
from training_backend.errors import InputError
from training_backend.learning.losses import segmentation_losses
from training_backend.learning.methods.base import Batch, Method, register
from training_backend.learning.models import _ACT, _NORMS, Encoder, EncoderClassifier, NetOutput, pad_to_multiple


def segmentation_loss(seg_logits: Tensor, target: Tensor, dice_weight: float, per_image: bool = True
                      ) -> tuple[Tensor, dict[str, Tensor]] | None:
    """``CE + dice_weight · Dice loss`` on the labelled pixels (``losses.segmentation_losses``).

    Args:
        seg_logits: (B, K+1, H, W) logits.
        target: (B, H, W) int64, -1 = ignore.
        dice_weight: weight of the soft Dice loss.
        per_image: Dice per (image, class) (True) or over the batch.

    Returns:
        ``(total, {"ce", "dice"})`` (parts detached; "dice" only when a lesion pixel is
        labelled), or ``None`` when no pixel is labelled.
    """
    seg = segmentation_losses(seg_logits, target, per_image=per_image)
    if seg is None:
        return None
    ce, dice = seg
    if dice is None:
        return ce, {"ce": ce.detach()}
    return ce + dice_weight * dice, {"ce": ce.detach(), "dice": dice.detach()}


def segmentation_rows(target: Tensor) -> Tensor:
    """Indices of the cases with at least one labelled pixel (the segmentation branch's batch).

    Args:
        target: (B, H, W) int64, -1 = ignore.

    Returns:
        (b,) int64 indices, b <= B.
    """
    return (target >= 0).flatten(1).any(1).nonzero()[:, 0]


class FusedUNet(nn.Module):
    """The segmentation branch: a U-Net whose encoder fuses a classifier's pyramid at every level.

    Level λ: ``s = block_λ(x)`` (the encoder block), ``f = fuse_λ(cat(c_λ, s))`` (1×1 conv 2C→C,
    the Feature Share Skip); ``f`` is the decoder's long skip at λ (Resolution Compensation
    Skip) and, with ``fuse_down``, the input of block λ+1 (else ``s`` is).

    Args:
        in_channels: image channels.
        n_classes: K lesion classes (K+1 outputs).
        cfg: architecture; the classifier's pyramid must have ``cfg.channels`` channels per level.
        fuse_down: the fused feature continues down the encoder.
    """

    def __init__(self, in_channels: int, n_classes: int, cfg: ModelConfig, fuse_down: bool = True):
        super().__init__()
        ch, norm = cfg.channels, _NORMS[cfg.norm]
        self.fuse_down = fuse_down
        self.encoder = Encoder(in_channels, cfg)  # its blocks and bottleneck dropout
        self.fuse = nn.ModuleList([nn.Conv2d(2 * c, c, kernel_size=1) for c in ch])
        # decoder[j] takes level depth-j up to level depth-j-1 (as in models.UNet)
        self.decoder = nn.ModuleList(
            [UnetUpBlock(2, ch[i + 1], ch[i], kernel_size=3, stride=1, upsample_kernel_size=2,
                         norm_name=norm, act_name=_ACT)
             for i in reversed(range(cfg.depth))])
        self.decoder_dropout = nn.ModuleList(
            [nn.Dropout2d(cfg.dropout) if i > 0 else nn.Identity() for i in reversed(range(cfg.depth))])
        self.out = UnetOutBlock(2, ch[0], n_classes + 1)

    def forward(self, x: Tensor, guide: list[Tensor]) -> Tensor:
        """Segmentation logits over the (padded) input.

        Args:
            x: (B, C, Hp, Wp) images padded to a multiple of ``2**depth``.
            guide: the classifier's levels, level λ (B, C_λ, Hp/2^λ, Wp/2^λ).

        Returns:
            (B, K+1, Hp, Wp) logits.
        """
        skips = []
        y = x
        for block, fuse, c in zip(self.encoder.levels, self.fuse, guide):
            s = block(y)  # (B, C_λ, Hp/2^λ, Wp/2^λ)
            f = fuse(torch.cat([c, s], 1))  # (B, C_λ, ...) Feature Share Skip
            skips.append(f)
            y = f if self.fuse_down else s
        y = self.encoder.bottleneck_dropout(skips[-1])
        for j, (up, drop) in enumerate(zip(self.decoder, self.decoder_dropout)):
            y = drop(up(y, skips[-2 - j]))  # Resolution Compensation Skip: (B, C_i, Hp/2^i, Wp/2^i)
        return self.out(y)


@register
class DualUNet(Method):
    """SKS: image-label classifier first, then a U-Net fused with its pyramid at every level."""

    spec = METHOD_CATALOG["dual_unet"]

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, model=None, **options):
        super().__init__(in_channels, n_classes, n_image_classes, model, **options)
        if not 0.0 <= float(self.options["stage1"]) < 1.0:
            raise InputError("stage1", f"must be in [0, 1), got {self.options['stage1']!r}")
        if float(self.options["classifier_weight"]) < 0:
            raise InputError("classifier_weight", f"must be >= 0, got {self.options['classifier_weight']!r}")
        cfg = self.model_config
        # the segmentation branch first: its first convolution is the method's first parameter
        self.seg = FusedUNet(in_channels, n_classes, cfg, bool(self.options["fuse_down"]))
        self.classifier = EncoderClassifier(in_channels, n_classes, n_image_classes, cfg)

    # ------------------------------------------------------------ branches
    def in_stage1(self, progress: float) -> bool:
        """Whether ``progress`` falls in stage 1 (classifier only).

        Args:
            progress: fraction of training done.
        """
        return progress < float(self.options["stage1"])

    def _classify(self, padded: Tensor, size: tuple[int, int]) -> tuple[NetOutput, list[Tensor]]:
        """The classifier's outputs and its feature pyramid.

        Args:
            padded: (B, C, Hp, Wp) images padded to a multiple of ``2**depth``.
            size: (H, W) before padding.
        """
        feats = self.classifier.encoder(padded)  # level λ: (B, C_λ, Hp/2^λ, Wp/2^λ)
        presence, cam, image_logits, pooled = self.classifier.heads(feats, size)
        return NetOutput(None, presence, cam, image_logits, pooled), feats

    def _frozen_classify(self, padded: Tensor, size: tuple[int, int]) -> tuple[NetOutput, list[Tensor]]:
        """``_classify`` without a graph, in eval mode (running statistics, no dropout): the
        classifier frozen outright in stage 2 (``classifier_weight=0``)."""
        was_training = self.classifier.training
        self.classifier.eval()
        try:
            with torch.no_grad():
                return self._classify(padded, size)
        finally:
            self.classifier.train(was_training)

    def _segment(self, padded: Tensor, feats: list[Tensor], size: tuple[int, int]) -> Tensor:
        """Segmentation logits at the input size.

        Args:
            padded: (B, C, Hp, Wp) padded images.
            feats: the classifier's pyramid for those images.
            size: (H, W) before padding.

        Returns:
            (B, K+1, H, W) logits.
        """
        if self.options["freeze_classifier"]:
            feats = [f.detach() for f in feats]
        return self.seg(padded, feats)[..., : size[0], : size[1]]

    def predict_forward(self, image: Tensor) -> NetOutput:
        size = tuple(image.shape[-2:])
        padded = pad_to_multiple(image, self.model_config.multiple)
        out, feats = self._classify(padded, size)
        return out._replace(seg_logits=self._segment(padded, feats, size))

    # -------------------------------------------------------------- training
    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        size = tuple(batch.image.shape[-2:])
        padded = pad_to_multiple(batch.image, self.model_config.multiple)
        if self.in_stage1(progress):
            out, _ = self._classify(padded, size)
            return self.supervised_losses(out, batch)
        return self._stage2_step(batch, padded, size)

    def _stage2_step(self, batch: Batch, padded: Tensor, size: tuple[int, int]) -> dict[str, Tensor]:
        """Segmentation losses on the cases with a target, plus the classifier's own losses."""
        cls_weight = float(self.options["classifier_weight"])
        fully_frozen = cls_weight <= 0 and bool(self.options["freeze_classifier"])
        out, feats = (self._frozen_classify if fully_frozen else self._classify)(padded, size)
        terms: list[Tensor] = []
        parts: dict[str, Tensor] = {}
        if cls_weight > 0:
            cls = self.supervised_losses(out, batch)
            terms.append(cls_weight * cls.pop("loss"))
            parts.update(cls)
        target = self.supervised_target(batch)  # (B, S, S)
        rows = segmentation_rows(target)  # (b,)
        if rows.numel():
            logits = self._segment(padded[rows], [f[rows] for f in feats], size)  # (b, K+1, S, S)
            seg = segmentation_loss(logits, target[rows], float(self.options["dice_weight"]),
                                    bool(self.options["dice_per_image"]))
            terms.append(seg[0])
            parts.update(seg[1])
        if not terms:  # nothing to learn from in this batch: a zero that belongs to the graph
            terms.append(sum(p.sum() for p in self.seg.out.parameters()) * 0.0)
        return {"loss": torch.stack(terms).sum(), **parts}
