"""``supervised``: a U-Net trained on full and sparse masks plus image-level labels.

Losses (``Method.supervised_losses``): Dice + CE on full masks, partial CE + masked soft Dice on
sparse masks, an all-background target for maskless negative images, BCE on known presence and
CE on known image classes. The presence head gates predictions (``gate_threshold``), which is
what keeps lesion-free images empty.
"""
from __future__ import annotations

from torch import Tensor

from training_backend.config import METHOD_CATALOG
from training_backend.learning.methods.base import Batch, Method, register


@register
class Supervised(Method):
    """Fully/partially supervised U-Net with presence and image-class heads."""

    spec = METHOD_CATALOG["supervised"]

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, model=None, **options):
        super().__init__(in_channels, n_classes, n_image_classes, model, **options)
        self.net = self.build_unet()

    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        out = self.net(batch.image)  # seg (B, K+1, S, S), presence (B, K), ...
        return self.supervised_losses(out, batch)
