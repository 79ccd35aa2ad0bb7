"""``mean_teacher``: supervised losses plus consistency with an EMA teacher on unlabelled images.

The teacher is an exponential moving average of the student (Tarvainen & Valpola 2017): after
every step ``teacher = d * teacher + (1 - d) * student`` with ``d = min(ema_decay, 1 - 1/(step+1))``
(batch-norm statistics are copied). ``predict`` uses the teacher.

Consistency on ``batch.unlabelled`` (every training image without a usable mask, whatever image
label it has: see ``data.py``), with a sigmoid ramp-up of its weight over the first ``rampup``
fraction of training. The unlabelled images cost a teacher pass and a longer student pass, so
they are only paid for when they count: while the weight is below ``skip_below`` of its maximum
(the start of the ramp-up), and in a project with no maskless image, a step is a supervised
step (the teacher still follows the student).

* ``cutmix=True`` (default; the perturbation French et al. 2020 found segmentation needs): the
  teacher predicts each unlabelled image as it is (no dropout); the student sees pairs of them
  mixed by a random box (each image's box is filled from the previous image in the batch) plus Gaussian
  noise, and must match the teacher's predictions mixed by the same box. Mixing moves lesions
  into new contexts, so the student cannot just copy the teacher's smooth guess.
* ``paste_labelled=True`` (with CutMix; bidirectional copy-paste, after Bai et al. 2023): each
  unlabelled image is mixed with a labelled image of the batch instead of another unlabelled
  one, in alternating directions (a labelled box pasted into an unlabelled image, an unlabelled
  box into a labelled image). The labelled part's target is its annotation (always confident;
  its unlabelled pixels ignored), the rest the teacher's prediction, so the few annotations
  also anchor the pseudo-labels they sit next to.
* ``cutmix=False``: student and teacher see the same images with independent Gaussian noise and
  horizontal flips (flipped back before comparison), the teacher with dropout on; the presence
  probabilities are made consistent too (the original recipe).

The consistency loss with ``confidence > 0`` (default 0.9) is cross-entropy towards the teacher's
class at the pixels where the teacher's probability of that class is at least ``confidence``
(normalised by all pixels, so an unsure teacher weighs little); with ``confidence = 0`` it is the
mean squared difference of the softmax probabilities.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from training_backend.learning.losses import sigmoid_rampup, softmax_mse
from training_backend.config import METHOD_CATALOG
from training_backend.learning.methods.base import Batch, Method, ema_update, register
from training_backend.learning.models import NetOutput, UNet


def _flip(x: Tensor, flip: bool) -> Tensor:
    return torch.flip(x, dims=(-1,)) if flip else x


def cutmix_boxes(n: int, size: tuple[int, int], area: tuple[float, float], device=None) -> Tensor:
    """Random boxes as masks: 1 inside a box covering a random ``area`` share of the image.

    Args:
        n: number of masks.
        size: (H, W).
        area: (min, max) share of the image the box covers.
        device: device of the result.

    Returns:
        (n, 1, H, W) float32 masks.
    """
    h, w = size
    r = torch.rand(n, 4)  # area, aspect, y, x
    frac = area[0] + r[:, 0] * (area[1] - area[0])  # (n,)
    aspect = torch.exp((r[:, 1] - 0.5) * 1.0)  # (n,) about 0.6 .. 1.65
    bh = (torch.sqrt(frac * aspect) * h).clamp(1, h).long()
    bw = (torch.sqrt(frac / aspect) * w).clamp(1, w).long()
    y0 = (r[:, 2] * (h - bh + 1).float()).long()
    x0 = (r[:, 3] * (w - bw + 1).float()).long()
    ys = torch.arange(h)[None, :]  # (1, H)
    xs = torch.arange(w)[None, :]  # (1, W)
    inside_y = (ys >= y0[:, None]) & (ys < (y0 + bh)[:, None])  # (n, H)
    inside_x = (xs >= x0[:, None]) & (xs < (x0 + bw)[:, None])  # (n, W)
    return (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None].to(device)


def confident_ce(student_logits: Tensor, teacher_probs: Tensor, threshold: float,
                 valid: Tensor | None = None) -> Tensor:
    """Cross-entropy towards the teacher's class where its probability is ≥ ``threshold``.

    Args:
        student_logits: (B, C, H, W) (gradient flows here).
        teacher_probs: (B, C, H, W) probabilities (constant).
        threshold: minimum teacher probability for a pixel to count.
        valid: optional (B, H, W) bool; pixels outside it never count.

    Returns:
        scalar: the sum over confident pixels divided by the number of all pixels.
    """
    conf, label = teacher_probs.detach().max(1)  # (B, H, W)
    ce = F.cross_entropy(student_logits, label, reduction="none")  # (B, H, W)
    keep = conf >= threshold
    if valid is not None:
        keep = keep & valid
    return (ce * keep.to(ce.dtype)).mean()


def paste_pairs(unlabelled: Tensor, teacher_probs: Tensor, labelled: Tensor, target: Tensor,
                box: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bidirectional copy-paste of unlabelled and labelled images (pair i with i).

    Even pairs: the labelled image's box pasted into the unlabelled image; odd pairs: the
    unlabelled image's box pasted into the labelled one.

    Args:
        unlabelled: (U, C, S, S) images.
        teacher_probs: (U, K+1, S, S) the teacher's probabilities for them.
        labelled: (U, C, S, S) annotated images.
        target: (U, S, S) their targets (-1 = unlabelled pixel).
        box: (U, 1, S, S) 0/1 boxes.

    Returns:
        mixed images (U, C, S, S), mixed target probabilities (U, K+1, S, S) (annotations
        one-hot) and the valid pixels (U, S, S) (False on the labelled images' -1 pixels).
    """
    n_cls = teacher_probs.shape[1]
    odd = (torch.arange(len(box), device=box.device) % 2 == 1).view(-1, 1, 1, 1)
    from_labelled = torch.where(odd, 1 - box, box)  # (U, 1, S, S): 1 where the pixel is the labelled image's
    onehot = F.one_hot(target.clamp(min=0), n_cls).permute(0, 3, 1, 2).to(teacher_probs.dtype)  # (U, K+1, S, S)
    images = unlabelled * (1 - from_labelled) + labelled * from_labelled
    probs = teacher_probs * (1 - from_labelled) + onehot * from_labelled
    valid = ~((from_labelled[:, 0] > 0.5) & (target < 0))  # (U, S, S)
    return images, probs, valid


@register
class MeanTeacher(Method):
    """Semi-supervised U-Net: supervised losses + EMA-teacher consistency on unlabelled images."""

    spec = METHOD_CATALOG["mean_teacher"]
    #: share of the image a CutMix box covers (min, max)
    CUTMIX_AREA = (0.25, 0.5)

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, model=None, **options):
        super().__init__(in_channels, n_classes, n_image_classes, model, **options)
        self.net = self.build_unet()
        self.teacher: UNet = copy.deepcopy(self.net)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def predict_forward(self, image: Tensor) -> NetOutput:
        return self.teacher(image)

    def _consistency_loss(self, student_logits: Tensor, teacher_probs: Tensor,
                          valid: Tensor | None = None) -> Tensor:
        threshold = float(self.options["confidence"])
        if threshold > 0:
            return confident_ce(student_logits, teacher_probs, threshold, valid)
        return softmax_mse(student_logits, teacher_probs, valid)

    def consistency_weight(self, progress: float) -> float:
        """The consistency weight at this point of training (sigmoid ramp-up to ``consistency``).

        Args:
            progress: fraction of training done.
        """
        o = self.options
        return o["consistency"] * sigmoid_rampup(progress / o["rampup"] if o["rampup"] > 0 else 1.0)

    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        o = self.options
        n = len(batch)
        weight = self.consistency_weight(progress)
        if (batch.unlabelled is None or len(batch.unlabelled) == 0
                or weight < o["skip_below"] * o["consistency"]):
            return self.supervised_losses(self.net(batch.image), batch)  # nothing to pay for yet
        u = batch.unlabelled  # (U, C, S, S)
        paste = bool(o["cutmix"] and o["paste_labelled"] and len(u) <= n)
        valid = None
        if o["cutmix"]:
            box = cutmix_boxes(len(u), tuple(u.shape[-2:]), self.CUTMIX_AREA, u.device)  # (U, 1, S, S)
            flip_s = flip_t = False
            x_t = u
            if paste:
                x_s = None  # after the teacher's pass (the targets need its probabilities)
            else:
                other = torch.roll(u, 1, 0)  # each image's box is filled from the previous one
                x_s = u * (1 - box) + other * box + o["noise"] * torch.randn_like(u)
        else:
            flip_s, flip_t = bool(torch.rand(()) < 0.5), bool(torch.rand(()) < 0.5)
            x_s = _flip(u + o["noise"] * torch.randn_like(u), flip_s)
            x_t = _flip(u + o["noise"] * torch.randn_like(u), flip_t)

        with torch.no_grad():
            # CutMix: the teacher's clean prediction; otherwise dropout on, as in the original
            self.teacher.train(self.training and not o["cutmix"])
            t = self.teacher(x_t)
            t_probs = torch.softmax(_flip(t.seg_logits, flip_t), 1)  # (U, K+1, S, S)
            if paste:
                x_s, t_probs, valid = paste_pairs(u, t_probs, batch.image[:len(u)],
                                                  batch.target[:len(u)], box)
                x_s = x_s + o["noise"] * torch.randn_like(u)
            elif o["cutmix"]:
                t_probs = t_probs * (1 - box) + torch.roll(t_probs, 1, 0) * box

        # one student pass over labelled + perturbed unlabelled images
        out = self.net(torch.cat([batch.image, x_s], 0))
        labelled = NetOutput(*(None if v is None else v[:n] for v in out))
        losses = self.supervised_losses(labelled, batch)
        s_logits = _flip(out.seg_logits[n:], flip_s)  # (U, K+1, S, S)
        consistency = self._consistency_loss(s_logits, t_probs, valid)
        if not o["cutmix"]:  # a mixed image's presence is not the teacher's
            consistency = consistency + F.mse_loss(torch.sigmoid(out.presence_logits[n:]),
                                                   torch.sigmoid(t.presence_logits))
        losses["loss"] = losses["loss"] + weight * consistency
        losses["consistency"] = consistency.detach()
        return losses

    def after_step(self, step: int, progress: float) -> None:
        ema_update(self.teacher, self.net, self.options["ema_decay"], step)
