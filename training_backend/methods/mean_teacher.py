"""``mean_teacher``: supervised losses plus consistency with an EMA teacher (Tarvainen & Valpola 2017).

The student is trained with the supervised losses on the labelled batch and, on
``batch.unlabelled`` (or on the labelled images when a batch has none), with the mean squared
difference between its softmax / presence probabilities and the teacher's. Student and teacher
see the images with independent Gaussian noise and independent horizontal flips (outputs are
flipped back before comparison); the teacher also keeps its dropout on. The consistency weight
follows a sigmoid ramp-up over the first ``rampup`` fraction of training. After every step the
teacher becomes an exponential moving average of the student (``ema_decay``; warm-started as
``min(decay, 1 - 1/(step+1))``). ``predict`` uses the teacher.
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


@register
class MeanTeacher(Method):
    """Semi-supervised U-Net: supervised losses + EMA-teacher consistency on unlabelled images."""

    name = "mean_teacher"
    supervision = Supervision(full_masks=True, sparse_masks=True, image_labels=True, unlabelled=True, requires=("full", "sparse"))
    description = "Supervised losses plus consistency with an EMA teacher on unlabelled images (sigmoid ramp-up); predicts with the teacher."
    default_options = {
        "ema_decay": 0.99,  # teacher = decay * teacher + (1 - decay) * student
        "consistency": 1.0,  # maximum consistency weight
        "rampup": 0.4,  # fraction of training over which the weight ramps up
        "noise": 0.1,  # std of the Gaussian input noise (images are normalised)
    }

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, model=None, **options):
        super().__init__(in_channels, n_classes, n_image_classes, model, **options)
        self.net = self.build_unet()
        self.teacher: UNet = copy.deepcopy(self.net)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def predict_forward(self, image: Tensor) -> NetOutput:
        return self.teacher(image)

    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        o = self.options
        n = len(batch)
        u = batch.unlabelled if batch.unlabelled is not None and len(batch.unlabelled) > 0 else batch.image  # (U, C, S, S)
        flip_s, flip_t = bool(torch.rand(()) < 0.5), bool(torch.rand(()) < 0.5)
        x_s = _flip(u + o["noise"] * torch.randn_like(u), flip_s)
        x_t = _flip(u + o["noise"] * torch.randn_like(u), flip_t)

        # one student pass over labelled + perturbed unlabelled images
        out = self.net(torch.cat([batch.image, x_s], 0))
        labelled = NetOutput(*(None if t is None else t[:n] for t in out))
        losses = self.supervised_losses(labelled, batch)

        with torch.no_grad():
            self.teacher.train(self.training)  # dropout on, as in the original method
            t = self.teacher(x_t)
            t_probs = torch.softmax(_flip(t.seg_logits, flip_t), 1)  # (U, K+1, S, S)
            t_pres = torch.sigmoid(t.presence_logits)  # (U, K)
        s_logits = _flip(out.seg_logits[n:], flip_s)  # (U, K+1, S, S)
        consistency = softmax_mse(s_logits, t_probs) + F.mse_loss(torch.sigmoid(out.presence_logits[n:]), t_pres)
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
