"""Self-supervised pretraining of the U-Net encoder on the project's own images, without labels.

**Objective: masked image modelling.** Each image is cut into square patches of
``patch_size`` pixels; a random ``mask_ratio`` of them is set to 0 (the middle of the
normalised intensity range) and the network reconstructs the hidden pixels: the U-Net's own
encoder and decoder (the `models.Encoder` every method trains, a decoder of the same blocks as
`models.UNet`'s) with a 1×1 convolution to the image's channels. The loss is the mean squared
error on the hidden pixels only (`masked_mse`), so the encoder must infer tissue from its
context instead of copying pixels through the skips. Why this and not contrastive learning:

* it trains the very encoder of the methods, at their image size and channel count, with the
  preprocessing of training (`data.Preprocessor`) and its augmentation (`data.augment_batch`);
* each image is its own target, so it learns at any batch size: contrastive objectives
  (SimCLR, MoCo) need large batches or a queue of negatives and many augmented views, which a
  CPU does not afford;
* it is what works for convolutional networks on medical images at small scale (SimMIM and
  SparK's masked modelling; Models Genesis' restoration of hidden patches).

What is ours: zero-filling instead of SparK's sparse convolutions (a plain U-Net; the
encoder's batch-norm statistics see masked images, the training that follows re-estimates
them), and patches of 16 px at 128 px by default (SimMIM's 32 px at 192 px, scaled).

**Which images.** Every case of the project that is not in the ``holdout`` split: a holdout
image is never read, not even without its labels (evaluation stays clean). Images are read and
preprocessed as the pretraining reaches them (cached), in epochs: a seeded permutation of the
cases, so every image is seen once per epoch.

**Files** (`jobs.pretrain_record`): ``P/models/_pretrained/encoder.pt`` (the encoder and its
meta), ``state.pt`` (what a resume needs) and ``meta.json``, written atomically at every
checkpoint. A pretraining is stopped (a checkpoint, then ``Finished(reason="cancelled")``)
when the user trains and resumed later with the same step count, schedule, random streams and
image order; the steps and the budget count over every attempt. It holds the project's
training lock (`jobs.trainlock`) while it runs, so it never competes with a training (a
training refused meanwhile is told "already training (encoder pretraining, process N)"); once
it holds the lock, it removes the temporary files a pretraining killed while saving left.

`run_pretraining` is a generator of the trainer's events (`Started`, `Progress`, `Loss`,
`CheckpointSaved`, `Finished` / `Failed`), for the CLI (``lesionseg pretrain``) and the window
(`jobs.process.PretrainProcess`).
"""
from __future__ import annotations

import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from monai.networks.blocks import UnetUpBlock
from torch import Tensor, nn

from training_backend.config import ModelConfig, PretrainConfig
from training_backend.errors import LesionsegError, ProjectError
from training_backend.events import CheckpointSaved, Event, Failed, Finished, Loss, Progress, Started
from training_backend.jobs import trainlock
from training_backend.jobs.pretrain_record import (ENCODER_FILE, META_FILE, PRETRAINED_ID, STATE_FILE,
                                                   pretrained_dir)
from training_backend.learning.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, resolve_device, save_checkpoint
from training_backend.learning.data import Preprocessor, augment_batch, project_channels
from training_backend.learning.encoder_init import ENCODER_KIND
from training_backend.learning.models import _ACT, _NORMS, Encoder, pad_to_multiple
from training_backend.learning.trainer import REPORT_EVERY_S, drain, lr_factor, stop_reason
from training_backend.project.atomic import atomic_write_json, remove_dead_temporaries
from training_backend.project.records import now_iso
from training_backend.project.store import Project

#: The method name the events carry.
METHOD = "pretrain"
#: How a run refused by the project's training lock is told who holds it.
LOCK_HOLDER = "encoder pretraining"


# ----------------------------------------------------------------------------- the objective
class MaskedImageModel(nn.Module):
    """The U-Net encoder, a U-Net decoder and a 1×1 convolution back to the image's channels.

    Args:
        in_channels: image channels.
        cfg: architecture (the encoder is exactly that of `models.UNet` with this config).
    """

    def __init__(self, in_channels: int, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ch, norm = cfg.channels, _NORMS[cfg.norm]
        self.encoder = Encoder(in_channels, cfg)
        # decoder[j] takes level depth-j up to level depth-j-1 (as in models.UNet)
        self.decoder = nn.ModuleList(
            [UnetUpBlock(2, ch[i + 1], ch[i], kernel_size=3, stride=1, upsample_kernel_size=2,
                         norm_name=norm, act_name=_ACT)
             for i in reversed(range(cfg.depth))])
        self.head = nn.Conv2d(ch[0], in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstructed images.

        Args:
            x: (B, C, H, W) masked images.

        Returns:
            (B, C, H, W).
        """
        size = x.shape[-2:]
        feats = self.encoder(pad_to_multiple(x, self.cfg.multiple))  # level i: (B, ch[i], ...)
        y = feats[-1]
        for j, up in enumerate(self.decoder):
            y = up(y, feats[-2 - j])  # (B, ch[i], Hp/2^i, Wp/2^i)
        return self.head(y)[..., : size[0], : size[1]]


def patch_mask(batch: int, size: int, patch: int, ratio: float,
               generator: torch.Generator) -> Tensor:
    """Random square patches to hide: exactly ``round(ratio * n)`` of the ``n`` patches of each
    image (at least one; patches at the border are cut to the image).

    Args:
        batch: number of images.
        size: image side in pixels.
        patch: patch side in pixels.
        ratio: share of the patches hidden.
        generator: CPU generator.

    Returns:
        (B, 1, size, size) float32: 1 hidden, 0 shown.
    """
    grid = math.ceil(size / patch)
    n = grid * grid
    k = min(n, max(1, int(round(ratio * n))))
    order = torch.rand(batch, n, generator=generator).argsort(1)  # (B, n)
    hidden = torch.zeros(batch, n)
    hidden.scatter_(1, order[:, :k], 1.0)
    cells = hidden.view(batch, 1, grid, grid)
    full = cells.repeat_interleave(patch, 2).repeat_interleave(patch, 3)  # (B, 1, grid*p, grid*p)
    return full[..., :size, :size].contiguous()


def mask_images(images: Tensor, mask: Tensor) -> Tensor:
    """The network's input: hidden pixels set to 0 (the middle of the normalised range).

    Args:
        images: (B, C, H, W) normalised images.
        mask: (B, 1, H, W), 1 hidden.
    """
    return images * (1.0 - mask)


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the hidden pixels (and every channel); 0 when none is hidden.

    Args:
        pred: (B, C, H, W) reconstruction.
        target: (B, C, H, W) the images.
        mask: (B, 1, H, W), 1 hidden.
    """
    squared = (pred - target).pow(2) * mask  # (B, C, H, W)
    count = mask.sum() * pred.shape[1]
    return squared.sum() / count.clamp_min(1.0)


# ----------------------------------------------------------------------------- the run
def run_pretraining(project_path: str | os.PathLike, config: PretrainConfig, resume: bool = False,
                    cancel: Callable[[], bool] | None = None) -> Iterator[Event]:
    """Pretrain the project's encoder, yielding events; the last one is `Finished` or `Failed`.

    Errors end the stream with ``Failed`` (``user_error`` for a one-line user error), as
    `trainer.run_training` does.

    Args:
        project_path: the project folder.
        config: the pretraining's settings. With ``resume`` the saved settings are used, except
            ``device``, ``threads`` and ``checkpoint_every_s``, and ``steps`` / ``budget_s``
            when ``config`` gives one of them (a new target over every attempt).
        resume: continue from ``state.pt`` (its step count, schedule, random streams, image
            order); without it a pretraining starts over (the files are replaced at its first
            checkpoint).
        cancel: polled every step; True stops gracefully (checkpoint, then
            ``Finished(reason="cancelled")``).
    """
    threads = torch.get_num_threads()
    run = _Pretraining(Path(project_path), config, resume, cancel or (lambda: False))
    try:
        yield from run.events()
    except LesionsegError as exc:
        run.close()  # the lock is free before anyone hears of the failure
        yield Failed(str(exc), traceback.format_exc(), user_error=True)
    except Exception as exc:  # noqa: BLE001 - reported as an event, see docstring
        run.close()
        yield Failed(f"{type(exc).__name__}: {exc}", traceback.format_exc())
    finally:
        run.close()
        torch.set_num_threads(threads)


def pretrain(project_path: str | os.PathLike, config: PretrainConfig, resume: bool = False,
             cancel: Callable[[], bool] | None = None,
             on_event: Callable[[Event], Any] | None = None) -> Finished:
    """Drain `run_pretraining`; return its `Finished` event or raise on `Failed`.

    Args:
        project_path, config, resume, cancel: as for `run_pretraining`.
        on_event: called with every event.

    Raises:
        LesionsegError: a user error (one-line message).
        RuntimeError: any other failure.
    """
    return drain(run_pretraining(project_path, config, resume=resume, cancel=cancel),
                 "pretraining", on_event)


class _Pretraining:
    """State of one pretraining attempt; `events` is the loop."""

    def __init__(self, project_path: Path, config: PretrainConfig, resume: bool,
                 cancel: Callable[[], bool]):
        self.project_path = project_path
        self.given = config
        self.resume = resume
        self.cancel = cancel
        self.lock = None
        self.folder = pretrained_dir(project_path)

    def close(self) -> None:
        """Release the project's training lock (idempotent)."""
        trainlock.release(self.lock)
        self.lock = None

    # ---- set-up
    def _config(self, state: dict | None) -> PretrainConfig:
        """The settings of this attempt (the saved ones when resuming)."""
        if state is None:
            return self.given
        given = self.given.to_dict()
        keep = {k: given[k] for k in ("device", "threads", "checkpoint_every_s")}
        if self.given.steps is not None or self.given.budget_s is not None:
            keep.update(steps=self.given.steps, budget_s=self.given.budget_s)
        return PretrainConfig.from_dict({**state["meta"]["config"], **keep})

    def _setup(self) -> None:
        project = Project.open(self.project_path, mode="r+")
        self.project = project
        self.lock = trainlock.acquire(project.path, PRETRAINED_ID, what=LOCK_HOLDER)
        remove_dead_temporaries(self.folder)  # left by a pretraining killed while saving
        state = None
        if self.resume:
            path = self.folder / STATE_FILE
            if not path.is_file():
                raise ProjectError(f"{self.folder}: no pretraining to resume (run `lesionseg "
                                   "pretrain` without --resume first)")
            state = load_checkpoint(path)
        cfg = self.cfg = self._config(state)
        self.device = resolve_device(cfg.device)
        torch.set_num_threads(int(cfg.threads or max(1, os.cpu_count() or 1)))
        # every image but the holdout ones (never read: not even unlabelled)
        self.records = {r.id: r for r in project.cases() if r.split != "holdout"}
        if not self.records:
            raise ProjectError(f"{project.path}: no image to pretrain on (every case is in the "
                               "holdout split)")
        self.channels = (int(state["meta"]["channels"]) if state is not None
                         else project_channels(project))
        self.preprocessor = Preprocessor(cfg.image_size, self.channels)
        torch.manual_seed(cfg.seed)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.model = MaskedImageModel(self.channels, cfg.model).to(
            memory_format=torch.channels_last).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.step, self.elapsed0, self.samples = 0, 0.0, 0
        self.order: list[str] = []
        self.position = 0
        self.loss: float | None = None
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.elapsed0 = int(state["step"]), float(state["elapsed_s"])
            self.samples = int(state.get("samples", 0))
            self.order, self.position = list(state.get("order", [])), int(state.get("position", 0))
            self.loss = state["meta"].get("loss")
            torch.set_rng_state(state["rng"]["torch"])
            self.generator.set_state(state["rng"]["data"])
            if self.device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    # ---- data
    def _next_ids(self, n: int) -> list[str]:
        """The next ``n`` cases of the epoch order (a new seeded permutation when it runs out;
        cases removed since are skipped, new ones join at the next epoch)."""
        out: list[str] = []
        while len(out) < n:
            if self.position >= len(self.order):
                ids = list(self.records)
                perm = torch.randperm(len(ids), generator=self.generator).tolist()
                self.order, self.position = [ids[i] for i in perm], 0
            cid = self.order[self.position]
            self.position += 1
            if cid in self.records:
                out.append(cid)
        return out

    def _batch(self) -> Tensor:
        ids = self._next_ids(self.cfg.batch_size)
        images = torch.stack([self.preprocessor.image(self.project, self.records[c]) for c in ids])
        images = images.to(self.device).contiguous(memory_format=torch.channels_last)
        images, _ = augment_batch(images, None, self.generator)  # (B, C, S, S)
        return images

    # ---- checkpoints
    def _meta(self, elapsed: float, done: bool) -> dict:
        cfg = self.cfg
        return {"format": CHECKPOINT_FORMAT, "kind": ENCODER_KIND, "image_size": cfg.image_size,
                "channels": self.channels, "model": cfg.model.to_dict(), "config": cfg.to_dict(),
                "images": len(self.records), "samples": self.samples, "step": self.step,
                "elapsed_s": round(float(elapsed), 3), "loss": self.loss, "done": bool(done),
                "project": str(self.project.path), "time": now_iso()}

    def _rng(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "data": self.generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _save(self, elapsed: float, done: bool) -> Path:
        """``state.pt``, then ``encoder.pt``, then ``meta.json`` (each replaced atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self._meta(elapsed, done)
        save_checkpoint(self.folder / STATE_FILE, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step, "elapsed_s": float(elapsed), "samples": self.samples,
            "order": list(self.order), "position": self.position, "rng": self._rng(),
            "meta": meta})
        encoder = {k: v.detach().to("cpu").contiguous() for k, v in self.model.encoder.state_dict().items()}
        save_checkpoint(self.folder / ENCODER_FILE, {"model": encoder, "meta": meta})
        atomic_write_json(self.folder / META_FILE, meta)
        return self.folder / ENCODER_FILE

    # ---- the loop
    def events(self) -> Iterator[Event]:
        self._setup()
        cfg = self.cfg
        total, budget = cfg.steps, cfg.budget
        warmup = min(50, max(1, (total or 500) // 10))
        yield Started(PRETRAINED_ID, METHOD, str(self.device), len(self.records), 0, total,
                      budget, start_step=self.step)
        t0 = time.monotonic()

        def elapsed() -> float:
            return self.elapsed0 + time.monotonic() - t0

        def fraction() -> float:
            parts = ([self.step / total] if total else []) + ([elapsed() / budget] if budget else [])
            return min(1.0, max(parts))

        acc, n_acc = 0.0, 0
        last_report = last_ckpt = time.monotonic()
        start_step = self.step
        self.model.train()
        while True:
            reason = stop_reason(self.step, total, elapsed, budget, self.cancel)
            if reason:
                break
            frac = fraction()
            for group in self.optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(self.step, frac, warmup)
            images = self._batch()
            mask = patch_mask(images.shape[0], cfg.image_size, cfg.patch_size, cfg.mask_ratio,
                              self.generator).to(self.device)
            loss = masked_mse(self.model(mask_images(images, mask)), images, mask)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            self.samples += images.shape[0]
            acc += float(loss.detach())
            n_acc += 1
            now = time.monotonic()
            if self.step == start_step + 1 or now - last_report >= REPORT_EVERY_S:
                self.loss = acc / n_acc
                if not math.isfinite(self.loss):
                    raise LesionsegError(f"{self.folder}: the reconstruction loss became "
                                         f"{self.loss} at step {self.step}; try a lower learning rate")
                yield Loss(self.step, {"loss": self.loss})
                yield Progress(self.step, total, elapsed(), fraction())
                acc, n_acc, last_report = 0.0, 0, now
            if now - last_ckpt >= cfg.checkpoint_every_s:
                path = self._save(elapsed(), done=False)
                last_ckpt = time.monotonic()
                yield CheckpointSaved(self.step, str(path))
        if n_acc:
            self.loss = acc / n_acc
            yield Loss(self.step, {"loss": self.loss})
        end = elapsed()
        yield Progress(self.step, total, end, fraction())
        path = self.folder / ENCODER_FILE
        if self.step > start_step or reason != "cancelled" or not path.is_file():
            path = self._save(end, done=reason != "cancelled")
            yield CheckpointSaved(self.step, str(path))
        self.close()  # the training lock is free before the window hears that this run ended
        yield Finished(PRETRAINED_ID, self.step, reason, str(path))


__all__ = ["MaskedImageModel", "patch_mask", "mask_images", "masked_mse", "run_pretraining",
           "pretrain", "METHOD"]
