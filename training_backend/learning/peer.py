"""The peer: what a user would train instead of lesionseg — a plain MONAI network and loop.

A MONAI ``BasicUNet`` (16-16-32-64-128 channels) trained with ``DiceCELoss`` and Adam (1e-3),
batch 16, random flips, at a fixed square size, on the training cases' latest annotations, for a
wall-clock budget or a number of steps; nothing of the product's trainer (no presence gate,
no validation folding, no learning-rate schedule, no test-time augmentation). Scribbles
(sparse annotations) are learned with cross-entropy on their labelled pixels only (the
unlabelled ones ignored), as a plain loop would; full masks with Dice + cross-entropy.

The BUSI benchmark (``benchmarks/bench_busi.py``, its ``baseline`` run) and ``lesionseg
simulate`` (its ``peer`` row) both use `train_peer`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from training_backend.errors import ProjectError
from training_backend.project.store import Project, mask_to_target

#: BasicUNet channels (encoder levels and the last decoder level).
FEATURES = (16, 16, 32, 64, 128, 16)


def prepare(image: np.ndarray, size: int, channels: int = 1) -> torch.Tensor:
    """A stored image as the peer's input: grey (the mean of RGB) or RGB, scaled so that its 1st
    and 99th percentiles are 0 and 1, resized to ``size`` × ``size`` (bilinear).

    Args:
        image: (H, W) or (H, W, 3) array.
        size: output side.
        channels: 1 (grey) or 3 (RGB; a grey image is repeated).

    Returns:
        (channels, size, size) float32 tensor.
    """
    img = np.asarray(image).astype(np.float32)
    if img.ndim == 3 and channels == 1:
        img = img.mean(-1)
    if img.ndim == 2:
        img = img[..., None].repeat(channels, -1) if channels == 3 else img[..., None]
    lo, hi = np.percentile(img, (1, 99))
    img = ((img - lo) / max(hi - lo, 1e-6)).astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, -1, 0)))[None]  # (1, C, H, W)
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]


@dataclass
class PeerModel:
    """A trained peer: `predict` gives a class map at the image's own size.

    Attributes:
        net: the BasicUNet (eval mode).
        image_size: its input side.
        channels: its input channels.
        steps: optimisation steps it was trained for (in total, over fine-tuning too).
    """

    net: torch.nn.Module
    image_size: int
    channels: int
    steps: int

    def predict(self, image: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class map of one image (argmax of the softmax, upsampled bilinearly).

        Args:
            image: (H, W) or (H, W, 3) array as stored.
        """
        with torch.no_grad():
            x = prepare(image, self.image_size, self.channels)[None]  # (1, C, S, S)
            prob = torch.softmax(self.net(x), 1)
            prob = F.interpolate(prob, size=image.shape[:2], mode="bilinear", align_corners=False)[0]
            return prob.argmax(0).numpy().astype(np.uint8)

    def state(self) -> dict[str, Any]:
        """Tensors and plain values only (saves and loads with ``weights_only=True``)."""
        return {"model": self.net.state_dict(), "steps": self.steps, "image_size": self.image_size,
                "channels": self.channels}


def build_net(n_classes: int, channels: int) -> torch.nn.Module:
    """The peer's network: MONAI ``BasicUNet`` for ``n_classes`` lesion classes + background."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=channels, out_channels=n_classes + 1,
                     features=FEATURES)


def training_pairs(project: Project, image_size: int, channels: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every training case's latest annotation, resized (nearest) to ``image_size``.

    Returns:
        images (N, C, S, S), targets (N, 1, S, S) int64 (-1 ignored, 0 background, k class k),
        full (N,) bool (a full mask, not scribbles).
    """
    xs, ys, full = [], [], []
    for rec in project.cases():
        if rec.split != "train" or rec.latest is None or rec.latest.labelled_fraction <= 0:
            continue
        xs.append(prepare(project.read_image(rec.id), image_size, channels))
        mask, av = project.read_annotation(rec.id)
        target = torch.from_numpy(mask_to_target(mask, av.kind).astype(np.float32))[None, None]
        ys.append(F.interpolate(target, size=(image_size,) * 2, mode="nearest")[0])
        full.append(av.kind == "full")
    if not xs:
        raise ProjectError(f"{project.path}: the peer needs masks or scribbles on training cases")
    return torch.stack(xs), torch.stack(ys).long(), torch.tensor(full)


def train_peer(project_path: str | os.PathLike, budget_s: float | None = None,
               steps: int | None = None, image_size: int = 128, seed: int = 0,
               batch_size: int = 16, channels: int | None = None,
               init: dict[str, Any] | None = None, device: str = "cpu",
               on_progress: Callable[[float], Any] | None = None,
               cancel: Callable[[], bool] | None = None) -> PeerModel:
    """Train the peer on a project's annotated training cases.

    Args:
        project_path: the project folder.
        budget_s: wall-clock seconds (with ``steps``: whichever ends first).
        steps: optimisation steps.
        image_size: training side.
        seed: torch seed (weights, batches, flips).
        batch_size: images per step.
        channels: 1 (grey, as the BUSI benchmark) or 3; default: the project's (`data.project_channels`).
        init: a `PeerModel.state` to continue from (fine-tuning); its channels and size are kept.
        device: ``cpu``, ``cuda``, ``mps`` or ``auto`` (as `checkpoints.resolve_device`).
        on_progress: called with the fraction of the run done, about every half second.
        cancel: polled every step; True ends the training early.
    """
    from monai.losses import DiceCELoss

    from training_backend.learning.checkpoints import resolve_device
    from training_backend.learning.data import project_channels

    if budget_s is None and steps is None:
        raise ValueError("train_peer needs budget_s or steps")
    torch.manual_seed(seed)
    project = Project.open(project_path, mode="r")
    if init is not None:
        channels, image_size = int(init["channels"]), int(init["image_size"])
    channels = channels or project_channels(project)
    dev = resolve_device(device)
    x, y, full = (t.to(dev) for t in training_pairs(project, image_size, channels))
    net = build_net(len(project.classes), channels)
    done = 0
    if init is not None:
        net.load_state_dict(init["model"])
        done = int(init.get("steps", 0))
    net.to(dev)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    net.train()
    t0, step, last = time.perf_counter(), 0, 0.0

    def fraction() -> float:
        f = [step / steps] if steps else []
        if budget_s:
            f.append((time.perf_counter() - t0) / budget_s)
        return min(1.0, max(f))

    while fraction() < 1.0 and not (cancel is not None and cancel()):
        idx = torch.randint(0, len(x), (batch_size,)).to(dev)
        xb, yb, fb = x[idx], y[idx], full[idx]
        if torch.rand(()) < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        if torch.rand(()) < 0.5:
            xb, yb = xb.flip(-2), yb.flip(-2)
        opt.zero_grad()
        logits = net(xb)  # (B, K+1, S, S)
        loss = logits.new_zeros(())
        if fb.any():
            loss = loss + dice_ce(logits[fb], yb[fb])
        if (~fb).any():  # scribbles: cross-entropy on the labelled pixels only
            loss = loss + F.cross_entropy(logits[~fb], yb[~fb][:, 0], ignore_index=-1)
        loss.backward()
        opt.step()
        step += 1
        now = time.perf_counter()
        if on_progress is not None and now - last >= 0.5:
            on_progress(fraction())
            last = now
    net.eval().cpu()
    return PeerModel(net, image_size, channels, done + step)


__all__ = ["FEATURES", "PeerModel", "build_net", "prepare", "train_peer", "training_pairs"]
