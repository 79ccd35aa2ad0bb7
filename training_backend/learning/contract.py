"""The data contract between the data layer, the methods and inference (torch tensors).

* `Batch` — what ``data.py`` builds and a method's ``training_step`` receives;
* `Prediction` — what a method's ``predict`` returns and inference turns into stored outputs;
* `Supervision` — what a method learns from (plain data, defined in ``config``).

This module sits below both ``data`` and ``methods``: neither imports the other for these.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from training_backend.config import Supervision


@dataclass
class Batch:
    """One training batch (built by ``data.py``; every tensor on the training device)."""

    image: Tensor  # (B, C, S, S) float32, normalised
    target: Tensor  # (B, S, S) int64, -1 ignore, 0 background, k lesion class k
    has_mask: Tensor  # (B,) bool — any non-ignored pixel
    full: Tensor  # (B,) bool — full annotation
    image_class: Tensor  # (B,) int64, -1 unknown
    presence: Tensor  # (B, K) float32 in {1, 0, -1 unknown}
    unlabelled: Tensor | None = None  # (U, C, S, S) images without a mask (image labels or none)

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on ``device``.

        Args:
            device: target device.
        """
        return Batch(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(device)) for f in fields(self)})

    def __len__(self) -> int:
        return int(self.image.shape[0])


@dataclass
class Prediction:
    """Model outputs for a batch of images (at the input size)."""

    probs: Tensor  # (B, K+1, H, W) softmax
    cams: Tensor  # (B, K, H, W) in [0, 1]
    presence: Tensor  # (B, K) probabilities that lesion class k is present
    image_class: Tensor | None  # (B, n_image_classes) softmax, or None
    features: Tensor  # (B, F) pooled encoder features
    #: the method's own uncertainty in [0, 1], where it has one (e.g. the disagreement of two
    #: sub-models); inference stores it beside the MC-dropout one. None: MC dropout only.
    uncertainty: Tensor | None = None  # (B, H, W)


__all__ = ["Batch", "Prediction", "Supervision"]
