"""``mean_teacher``: supervised losses plus consistency with an EMA teacher on unlabelled images.

The teacher is an exponential moving average of the student (Tarvainen & Valpola 2017): after
every step ``teacher = d * teacher + (1 - d) * student`` with ``d = min(ema_decay, 1 - 1/(step+1))``
(batch-norm statistics are copied). ``predict`` uses the teacher.

Consistency on ``batch.unlabelled`` (or on the labelled images when a batch has none), with a
sigmoid ramp-up of its weight over the first ``rampup`` fraction of training:

* ``cutmix=True`` (default; the perturbation French et al. 2020 found segmentation needs): the
  teacher predicts each unlabelled image as it is (no dropout); the student sees pairs of them
  mixed by a random box (each image's box is filled from the previous image in the batch) plus Gaussian
  noise, and must match the teacher's predictions mixed by the same box. Mixing moves lesions
  into new contexts, so the student cannot just copy the teacher's smooth guess.
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

from training_backend.losses import sigmoid_rampup, softmax_mse
from training_backend.methods.base import Batch, Method, Supervision, register
from training_backend.models import NetOutput, UNet


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


def confident_ce(student_logits: Tensor, teacher_probs: Tensor, threshold: float) -> Tensor:
    """Cross-entropy towards the teacher's class where its probability is ≥ ``threshold``.

    Args:
        student_logits: (B, C, H, W) (gradient flows here).
        teacher_probs: (B, C, H, W) probabilities (constant).
        threshold: minimum teacher probability for a pixel to count.

    Returns:
        scalar: the sum over confident pixels divided by the number of all pixels.
    """
    conf, label = teacher_probs.detach().max(1)  # (B, H, W)
    ce = F.cross_entropy(student_logits, label, reduction="none")  # (B, H, W)
    return (ce * (conf >= threshold).to(ce.dtype)).mean()


@register
class MeanTeacher(Method):
    """Semi-supervised U-Net: supervised losses + EMA-teacher consistency on unlabelled images."""

    name = "mean_teacher"
    supervision = Supervision(full_masks=True, sparse_masks=True, image_labels=True, unlabelled=True, requires=("full", "sparse"))
    description = ("Supervised losses plus consistency with an EMA teacher on CutMix-perturbed unlabelled images "
                   "(confident pseudo-labels, sigmoid ramp-up); predicts with the teacher.")
    default_options = {
        "ema_decay": 0.99,  # teacher = decay * teacher + (1 - decay) * student
        "consistency": 1.0,  # maximum consistency weight
        "rampup": 0.3,  # fraction of training over which the weight ramps up
        "noise": 0.1,  # std of the Gaussian input noise (images are normalised)
        "cutmix": True,  # box-mixed student inputs (False: noise + flips, the original recipe)
        "confidence": 0.9,  # teacher probability for a pseudo-label (0: softmax MSE instead)
    }
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

    def _consistency_loss(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        threshold = float(self.options["confidence"])
        if threshold > 0:
            return confident_ce(student_logits, teacher_probs, threshold)
        return softmax_mse(student_logits, teacher_probs)

    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        o = self.options
        n = len(batch)
        u = batch.unlabelled if batch.unlabelled is not None and len(batch.unlabelled) > 0 else batch.image  # (U, C, S, S)
        if o["cutmix"]:
            box = cutmix_boxes(len(u), tuple(u.shape[-2:]), self.CUTMIX_AREA, u.device)  # (U, 1, S, S)
            other = torch.roll(u, 1, 0)  # each image's box is filled from the previous one
            x_s = u * (1 - box) + other * box + o["noise"] * torch.randn_like(u)
            flip_s = flip_t = False
            x_t = u
        else:
            flip_s, flip_t = bool(torch.rand(()) < 0.5), bool(torch.rand(()) < 0.5)
            x_s = _flip(u + o["noise"] * torch.randn_like(u), flip_s)
            x_t = _flip(u + o["noise"] * torch.randn_like(u), flip_t)

        # one student pass over labelled + perturbed unlabelled images
        out = self.net(torch.cat([batch.image, x_s], 0))
        labelled = NetOutput(*(None if t is None else t[:n] for t in out))
        losses = self.supervised_losses(labelled, batch)

        with torch.no_grad():
            # CutMix: the teacher's clean prediction; otherwise dropout on, as in the original
            self.teacher.train(self.training and not o["cutmix"])
            t = self.teacher(x_t)
            t_probs = torch.softmax(_flip(t.seg_logits, flip_t), 1)  # (U, K+1, S, S)
            if o["cutmix"]:
                t_probs = t_probs * (1 - box) + torch.roll(t_probs, 1, 0) * box
        s_logits = _flip(out.seg_logits[n:], flip_s)  # (U, K+1, S, S)
        consistency = self._consistency_loss(s_logits, t_probs)
        if not o["cutmix"]:  # a mixed image's presence is not the teacher's
            consistency = consistency + F.mse_loss(torch.sigmoid(out.presence_logits[n:]),
                                                   torch.sigmoid(t.presence_logits))
        weight = o["consistency"] * sigmoid_rampup(progress / o["rampup"] if o["rampup"] > 0 else 1.0)
        losses["loss"] = losses["loss"] + weight * consistency
        losses["consistency"] = consistency.detach()
        return losses

    @torch.no_grad()
    def after_step(self, step: int, progress: float) -> None:
        decay = min(float(self.options["ema_decay"]), 1.0 - 1.0 / (step + 1))
        for tp, sp in zip(self.teacher.parameters(), self.net.parameters()):
            tp.mul_(decay).add_(sp.detach(), alpha=1.0 - decay)
        for tb, sb in zip(self.teacher.buffers(), self.net.buffers()):
            tb.copy_(sb)  # batch-norm statistics follow the student
