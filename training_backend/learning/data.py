"""From the project store to training tensors.

`build_training_set` takes a consistent snapshot of a project (the in-memory index after
`Project.refresh()`; every annotation read is the version listed there, so a mask that another
process is still writing is never seen), preprocesses every usable case once (resize to
``image_size``², per-image robust normalisation, grey/RGB made consistent) and keeps the tensors in
memory. `TrainingSet.sample` builds augmented `Batch` objects for the training loop.

Who trains on what:

* ``split == "holdout"`` cases are never read here;
* a deterministic ~15 % of the fully annotated training cases (at least 1, only when there are at
  least 4, at most 20) are validation cases: scored, not trained on — until the trainer folds
  them back in for the end of a run (``validation=False``: every mask is trained on);
* the remaining cases are *labelled* when they carry supervision the method can use (a full or a
  sparse mask, an image label or per-class presence), otherwise *unlabelled* (fed to methods
  whose ``supervision.unlabelled`` is True, skipped for the others);
* for those semi-supervised methods, every case without a usable mask is also in the
  unlabelled pool, whatever image labels it has: for segmentation it is unlabelled (its image
  label still trains the image-level heads through the labelled pool).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from training_backend.learning.contract import Batch, Supervision
from training_backend.project.labels import (IGNORE, count_supervision, has_image_label, mask_kind,
                                     mask_to_target)
from training_backend.project.store import CaseRecord, Project

#: Fraction of fully annotated cases used for validation (at least 1 when there are ``MIN_FULL_FOR_VAL``).
VAL_FRACTION = 0.15
MIN_FULL_FOR_VAL = 4
#: At most this many validation cases: enough for a progress signal, and every further full
#: mask is worth more as training data (masks are the scarce resource here).
MAX_VAL = 20
#: Robust normalisation percentiles.
LOW_PCT, HIGH_PCT = 1.0, 99.0
#: Pixels (at least) that the percentiles are computed from (a strided sample of bigger images).
PCT_SAMPLE = 131_072
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)


# ----------------------------------------------------------------------------- preprocessing
def project_channels(project: Project, records: Iterable[CaseRecord] | None = None) -> int:
    """The channel count a project's model works with: 1 when most images are grey, else 3.

    Mixed projects (BUSI has a few RGB images among grey ones) convert the minority. Ties go to 3
    (grey → RGB loses nothing).

    Args:
        project: the project (all cases, holdout included, so training and prediction agree).
        records: the records to count (default: all cases of the project).
    """
    recs = list(project.cases() if records is None else records)
    grey = sum(1 for r in recs if r.channels == 1)
    return 1 if grey > len(recs) - grey else 3


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) array of any dtype → (channels, H, W) float32.

    Grey → RGB repeats the grey plane; RGB → grey uses ITU-R 601 luma weights.

    Args:
        image: the image as stored.
        channels: 1 or 3.
    """
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3:
        img = img[..., :3]
        if channels == 1:
            return np.tensordot(img.astype(np.float32, copy=False), _GREY_WEIGHTS, axes=([-1], [0]))[None]  # (1, H, W)
        return np.ascontiguousarray(np.moveaxis(img, -1, 0), dtype=np.float32)  # (3, H, W), one pass
    img = img.astype(np.float32, copy=False)[None]  # (1, H, W)
    return np.repeat(img, channels, axis=0) if channels == 3 else img


def percentiles(values: np.ndarray, qs: Sequence[float] = (LOW_PCT, HIGH_PCT)) -> list[float]:
    """Percentiles of all values, as ``np.percentile`` (linear interpolation) computes them.

    8- and 16-bit images (almost every stored image) get the exact values from a histogram, which
    needs no sort; other dtypes use a strided sample of ``PCT_SAMPLE`` values when larger.

    Args:
        values: array of any shape.
        qs: percentiles in [0, 100].
    """
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.dtype in (np.uint8, np.uint16) and flat.size:
        codes = torch.from_numpy(flat if flat.dtype == np.uint8 else flat.astype(np.int32))
        # torch's bincount: about 2x numpy's, which first casts every value to int64
        cum = np.cumsum(torch.bincount(codes, minlength=1 << (8 * flat.dtype.itemsize)).numpy())
        n = int(cum[-1])
        out = []
        for q in qs:
            rank = q / 100.0 * (n - 1)  # position in the sorted values
            i = int(math.floor(rank))
            # the sorted value at position i is the first v with more than i values <= v
            v0 = int(np.searchsorted(cum, i, side="right"))
            v1 = int(np.searchsorted(cum, min(i + 1, n - 1), side="right"))
            out.append(v0 + (rank - i) * (v1 - v0))
        return out
    if flat.size > 2 * PCT_SAMPLE:  # a strided sample is plenty for two percentiles
        step = flat.size // PCT_SAMPLE
        step += step % 3 == 0  # never a multiple of 3: pixel-interleaved RGB samples every channel
        flat = flat[::step]
    return [float(v) for v in np.percentile(flat, list(qs))]


def normalise(image: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Per-image robust normalisation: [lo, hi] (the image's percentiles, see `percentiles`)
    → [0, 1] (clipped), then centred and scaled to about [-2, 2]. A constant image becomes zeros.

    Args:
        image: (C, H, W) tensor, any real dtype (integer images are converted as they are scaled).
        lo, hi: the image's (LOW_PCT, HIGH_PCT) percentiles.

    Returns:
        (C, H, W) float32, in ``image``'s memory layout.
    """
    if hi - lo < 1e-6:
        lo, hi = float(image.min()), float(image.max())
        if hi - lo < 1e-6:
            return torch.zeros(image.shape, dtype=torch.float32)
    # ((v - lo) / (hi - lo) clipped to [0, 1] - 0.5) / 0.25 in three passes (the first one also
    # converts integer images to float32)
    scale = 4.0 / (hi - lo)
    return image.mul(scale).to(torch.float32).sub_(lo * scale + 2.0).clamp_(-2.0, 2.0)


def resize_image(image: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (antialiased when shrinking).

    Args:
        image: (C, H, W) float32.
        size: output side or (height, width).
    """
    out = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(image.shape[-2:]) == out:
        return image
    shrink = image.shape[-2] > out[0] or image.shape[-1] > out[1]
    return F.interpolate(image[None], size=out, mode="bilinear", align_corners=False,
                         antialias=shrink)[0]  # (C, *out)


def preprocess_image(image: np.ndarray, channels: int, size: int | tuple[int, int]) -> torch.Tensor:
    """Stored image → normalised network input.

    The normalisation percentiles are those of the image at its own size (in the model's channel
    count), so an image is normalised alike whatever size it is resized to. An RGB image keeps
    its pixel-interleaved layout: the tensor is channels-last in memory, as the network's
    convolution weights are (no transposing copy here nor in the first convolution).

    Args:
        image: (H, W) or (H, W, 3) array as stored.
        channels: 1 or 3 (the model's input channels).
        size: output side or (height, width).

    Returns:
        (channels, size, size) float32 tensor.
    """
    img = np.asarray(image)
    if img.dtype == np.bool_:
        img = img.view(np.uint8)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 3 and channels == 1:
        img = to_channels(img, 1)[0]  # (H, W) float32 luma
    elif img.ndim == 3:
        img = np.ascontiguousarray(img[..., :3])  # (H, W, 3)
    lo, hi = percentiles(img)  # of the values as stored: exact and sort-free for 8/16-bit
    t = torch.from_numpy(img)
    x = t.permute(2, 0, 1) if img.ndim == 3 else t[None]  # (C, H, W), a view
    out = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) != out:
        x = resize_image(x.float(), out)
    x = normalise(x, lo, hi)
    if x.shape[0] != channels:  # grey image, RGB model: the same plane three times
        x = x.expand(channels, -1, -1).contiguous()
    return x


def resize_target(target: np.ndarray, size: int) -> torch.Tensor:
    """Resize a training target (-1 ignore, 0 bg, k class k) by a label-preserving area vote.

    Each output pixel takes the class covering most of its footprint among the *labelled* input
    pixels; it is ignored only when none of its footprint is labelled (so scribbles survive
    shrinking). Enlarging reduces to nearest neighbour.

    Args:
        target: (H, W) int64.
        size: output side.

    Returns:
        (size, size) int64 tensor.
    """
    t = torch.from_numpy(np.ascontiguousarray(target))
    if tuple(t.shape) == (size, size):
        return t.clone()
    out = torch.full((size, size), IGNORE, dtype=torch.int64)
    best = torch.zeros((size, size), dtype=torch.float32)
    for value in torch.unique(t).tolist():  # background (0) first, then lesion classes
        if value == IGNORE:
            continue
        frac = F.adaptive_avg_pool2d((t == value).float()[None, None], size)[0, 0]  # (S, S)
        win = frac > best if value == 0 else frac >= best  # ties go to the lesion
        win &= frac > 0
        out[win] = value
        best = torch.where(win, frac, best)
    return out  # (S, S)


class Preprocessor:
    """Preprocesses images and annotations once and caches the tensors in memory.

    Keys include the stored array keys (images never change; every annotation version has its own
    key), so a cache survives re-snapshots between rounds and only new annotations are read.

    Args:
        image_size: side of the square training images.
        channels: 1 or 3.
    """

    def __init__(self, image_size: int, channels: int):
        self.image_size = int(image_size)
        self.channels = int(channels)
        self._images: dict[str, torch.Tensor] = {}
        self._targets: dict[str, tuple[torch.Tensor, list[int]]] = {}

    def image(self, project: Project, rec: CaseRecord) -> torch.Tensor:
        """(C, S, S) float32 normalised image of a case."""
        key = rec.image_key or rec.id
        if key not in self._images:
            self._images[key] = preprocess_image(project.read_image(rec.id), self.channels,
                                                 self.image_size)
        return self._images[key]

    def target(self, project: Project, rec: CaseRecord) -> tuple[torch.Tensor, list[int]]:
        """(S, S) int64 target of the case's latest annotation (all -1 when it has none), and
        the presence target (K values in {1, 0, -1})."""
        latest = rec.latest
        key = "|".join([latest.key if latest else f"none:{rec.id}", str(rec.image_label),
                        repr(sorted((rec.presence or {}).items()))])
        if key not in self._targets:
            if latest is None:
                tgt = torch.full((self.image_size, self.image_size), IGNORE, dtype=torch.int64)
            else:
                # the version listed in this snapshot, never a newer (maybe half-saved) one
                mask, av = project.read_annotation(rec.id, latest.version)
                tgt = resize_target(mask_to_target(mask, av.kind), self.image_size)
            self._targets[key] = (tgt, project.presence_target(rec))
        return self._targets[key]


# ----------------------------------------------------------------------------- the training set
def _stable_rank(cid: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{cid}".encode()).hexdigest()


def select_validation(full_ids: list[str], seed: int = 0, fraction: float = VAL_FRACTION,
                      minimum_full: int = MIN_FULL_FOR_VAL, maximum: int = MAX_VAL) -> list[str]:
    """Deterministic validation subset of the fully annotated cases.

    Args:
        full_ids: ids of fully annotated training cases.
        seed: changes the choice.
        fraction: share of the full cases to hold out.
        minimum_full: no validation below this many full cases.
        maximum: at most this many validation cases.
    """
    if len(full_ids) < minimum_full:
        return []
    n = min(maximum, max(1, int(round(fraction * len(full_ids)))))
    return sorted(sorted(full_ids, key=lambda c: _stable_rank(c, seed))[:n])


@dataclass
class TrainingSet:
    """Preprocessed tensors of one snapshot. Index groups point into the stacked tensors."""

    case_ids: list[str]
    images: torch.Tensor          # (N, C, S, S) float32
    targets: torch.Tensor         # (N, S, S) int64
    has_mask: torch.Tensor        # (N,) bool
    full: torch.Tensor            # (N,) bool
    image_class: torch.Tensor     # (N,) int64, -1 unknown
    presence: torch.Tensor        # (N, K) float32 in {1, 0, -1}
    labelled: torch.Tensor        # (L,) int64 indices trained with labels
    unlabelled: torch.Tensor      # (U,) int64 indices of images without a usable mask (SSL pool)
    val: torch.Tensor             # (V,) int64 indices of validation cases
    label_probs: torch.Tensor     # (L,) float32 sampling probabilities of the labelled cases
    classes: list[str]
    image_classes: list[str]
    channels: int
    image_size: int
    counts: dict[str, int] = field(default_factory=dict)  # supervision counts (train, not val)

    @property
    def n_train(self) -> int:
        """Training cases (a case in both the labelled and the unlabelled pool counts once)."""
        return int(torch.unique(torch.cat([self.labelled, self.unlabelled])).numel())

    @property
    def n_val(self) -> int:
        return int(self.val.numel())

    @property
    def n_annotated(self) -> int:
        """Cases with supervision the method uses, validation cases included (the same count
        whether or not they are held out at the moment)."""
        return int(self.labelled.numel() + self.val.numel())

    def to(self, device: torch.device | str) -> "TrainingSet":
        """Move the stacked tensors to ``device`` (index tensors stay on the CPU)."""
        for name in ("images", "targets", "has_mask", "full", "image_class", "presence"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def sample(self, batch_size: int, generator: torch.Generator, augment: bool = True,
               unlabelled_size: int = 0, crop_size: int | None = None) -> Batch:
        """A random training batch (labelled mix + optional unlabelled images).

        Args:
            batch_size: labelled images per batch.
            generator: CPU generator (its state is checkpointed, so a resumed run continues
                the same sample stream).
            augment: random flips and a small intensity jitter.
            unlabelled_size: unlabelled images to add (0: none; ``batch.unlabelled`` is None
                too when the snapshot has no unlabelled case).
            crop_size: cut a random square of this side from every (augmented) image
                (`crop_batch`); None or ``image_size``: whole images.
        """
        if self.labelled.numel() == 0:
            raise ValueError("no labelled case to sample from")
        pick = self.labelled[torch.multinomial(self.label_probs, batch_size, replacement=True,
                                               generator=generator)]  # (B,)
        pick = pick.to(self.images.device)
        image, target = self.images[pick], self.targets[pick]  # (B, C, S, S), (B, S, S)
        if augment:
            image, target = augment_batch(image, target, generator)
        unl = None
        if unlabelled_size > 0 and self.unlabelled.numel() > 0:
            upick = self.unlabelled[torch.randint(self.unlabelled.numel(), (unlabelled_size,),
                                                  generator=generator)].to(self.images.device)
            unl = self.images[upick]  # (U, C, S, S)
            if augment:
                unl, _ = augment_batch(unl, None, generator)
        batch = Batch(image=image, target=target, has_mask=self.has_mask[pick], full=self.full[pick],
                      image_class=self.image_class[pick], presence=self.presence[pick],
                      unlabelled=unl)
        if crop_size is not None and int(crop_size) < self.image_size:
            batch = crop_batch(batch, int(crop_size), generator)
        return batch

    def validation_batches(self, batch_size: int = 8) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (images (B, C, S, S), targets (B, S, S)) of the validation cases."""
        for start in range(0, self.val.numel(), batch_size):
            idx = self.val[start:start + batch_size].to(self.images.device)
            yield self.images[idx], self.targets[idx]


#: Share of the crops of a case with lesion pixels that are centred on one of them.
CROP_LESION_SHARE = 0.5


def crop_batch(batch: Batch, size: int, generator: torch.Generator) -> Batch:
    """Cut one random ``size``² square from each image of a batch (and its target).

    A case whose target holds lesion pixels gets, with probability `CROP_LESION_SHARE`, a crop
    centred on one of them: a lesion class is drawn uniformly among those present, then one of
    its pixels (so a few-pixel class is seen as often as a large one); the other crops are
    uniform. The image-level targets follow what the crop still shows:

    * presence of a class is recomputed from a full mask (exact); from a sparse mask a crop that
      shows a stroke of the class keeps "present", and otherwise a positive becomes unknown
      (-1); a negative stays negative (a crop of a lesion-free image is lesion-free);
    * the image class is unknown (-1): a crop need not show what the whole image was graded by;
    * ``has_mask`` says whether the crop still holds an annotated pixel.

    Unlabelled images get uniform crops.

    Args:
        batch: a batch of square images (B, C, S, S) with targets (B, S, S).
        size: crop side in pixels (< S).
        generator: CPU generator for the random draws.
    """
    b, s = batch.image.shape[0], batch.image.shape[-1]
    target = batch.target.cpu()
    r = torch.rand(b, 4, generator=generator)  # (B, 4): lesion-centred?, class, pixel, (spare)
    tops, lefts = [], []
    for i in range(b):
        lesion = target[i] > 0  # (S, S)
        centre = None
        if bool(r[i, 0] < CROP_LESION_SHARE) and bool(lesion.any()):
            present = torch.unique(target[i][lesion])  # lesion classes in this case
            k = present[min(int(r[i, 1] * present.numel()), present.numel() - 1)]
            ys, xs = torch.nonzero(target[i] == k, as_tuple=True)
            j = min(int(r[i, 2] * ys.numel()), ys.numel() - 1)
            centre = (int(ys[j]), int(xs[j]))
        if centre is None:
            top, left = torch.randint(0, s - size + 1, (2,), generator=generator).tolist()
        else:
            top = min(max(centre[0] - size // 2, 0), s - size)
            left = min(max(centre[1] - size // 2, 0), s - size)
        tops.append(top)
        lefts.append(left)
    image = torch.stack([batch.image[i, :, t:t + size, l:l + size] for i, (t, l) in enumerate(zip(tops, lefts))])
    tgt = torch.stack([batch.target[i, t:t + size, l:l + size] for i, (t, l) in enumerate(zip(tops, lefts))])
    k = batch.presence.shape[1]
    shown = torch.stack([(tgt == c + 1).flatten(1).any(1) for c in range(k)], 1)  # (B, K)
    presence = batch.presence.clone()
    full = batch.full.view(b, 1).expand(b, k)
    presence = torch.where(full, shown.to(presence.dtype), presence)
    sparse_pos = (~full) & (presence > 0)
    presence = torch.where(sparse_pos & ~shown, torch.full_like(presence, -1.0), presence)
    unl = batch.unlabelled
    if unl is not None:
        corners = torch.randint(0, s - size + 1, (unl.shape[0], 2), generator=generator).tolist()
        unl = torch.stack([unl[i, :, t:t + size, l:l + size] for i, (t, l) in enumerate(corners)])
    return Batch(image=image.contiguous(), target=tgt.contiguous(),
                 has_mask=(tgt >= 0).flatten(1).any(1), full=batch.full,
                 image_class=torch.full_like(batch.image_class, -1), presence=presence,
                 unlabelled=None if unl is None else unl.contiguous())


def augment_batch(image: torch.Tensor, target: torch.Tensor | None, generator: torch.Generator,
                  affine: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random geometry (image and target alike) and intensity gain/offset.

    Geometry: with ``affine``, a random rotation (±``AFFINE_ROTATE_DEG``), scaling
    (``AFFINE_SCALE``) and shift (±``AFFINE_SHIFT`` of the side) with reflected borders
    (bilinear for the image, nearest for the target, so -1 "unlabelled" stays -1); then random
    horizontal and vertical flips.

    Args:
        image: (B, C, S, S) float32.
        target: (B, S, S) int64 or None.
        generator: CPU generator for the random draws.
        affine: also rotate, scale and shift.
    """
    b = image.shape[0]
    r = torch.rand(b, 4, generator=generator).to(image.device)  # (B, 4)
    if affine:
        image, target = random_affine(image, target, generator)
    hflip = (r[:, 0] < 0.5)
    vflip = (r[:, 1] < 0.5)
    gain = (1.0 + (r[:, 2] - 0.5) * 0.2).view(b, 1, 1, 1)
    bias = ((r[:, 3] - 0.5) * 0.2).view(b, 1, 1, 1)
    image = torch.where(hflip.view(b, 1, 1, 1), image.flip(-1), image)
    image = torch.where(vflip.view(b, 1, 1, 1), image.flip(-2), image)
    image = image * gain + bias  # (B, C, S, S)
    if target is not None:
        target = torch.where(hflip.view(b, 1, 1), target.flip(-1), target)
        target = torch.where(vflip.view(b, 1, 1), target.flip(-2), target)
    return image, target


#: Ranges of the random affine augmentation.
AFFINE_ROTATE_DEG = 15.0
AFFINE_SCALE = (0.85, 1.15)
AFFINE_SHIFT = 0.08


def random_affine(image: torch.Tensor, target: torch.Tensor | None, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One random rotation/scale/shift per image, applied to image and target alike.

    Args:
        image: (B, C, S, S) float32.
        target: (B, S, S) int64 (-1 unlabelled) or None.
        generator: CPU generator for the random draws.
    """
    b = image.shape[0]
    r = torch.rand(b, 4, generator=generator)  # (B, 4)
    angle = (r[:, 0] * 2 - 1) * math.radians(AFFINE_ROTATE_DEG)
    scale = AFFINE_SCALE[0] + r[:, 1] * (AFFINE_SCALE[1] - AFFINE_SCALE[0])
    tx, ty = (r[:, 2] * 2 - 1) * 2 * AFFINE_SHIFT, (r[:, 3] * 2 - 1) * 2 * AFFINE_SHIFT  # [-1, 1] coords
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    theta = theta.to(image.device, image.dtype)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)  # (B, S, S, 2)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if target is not None:
        shifted = (target + 1).to(image.dtype)[:, None]  # (B, 1, S, S), 0 = unlabelled
        target = F.grid_sample(shifted, grid, mode="nearest", padding_mode="reflection",
                               align_corners=False)[:, 0].round().long() - 1  # (B, S, S)
    return image, target


def _uses(rec_kind: str | None, has_image_info: bool, sup: Supervision | None) -> tuple[bool, bool]:
    """(mask usable, image-level labels usable) for a method's supervision."""
    if sup is None:
        return rec_kind is not None, has_image_info
    mask_ok = (rec_kind == "full" and sup.full_masks) or (rec_kind == "sparse" and sup.sparse_masks)
    return bool(mask_ok), bool(has_image_info and sup.image_labels)


def build_training_set(project: Project, image_size: int, supervision: Supervision | None = None,
                       channels: int | None = None, seed: int = 0,
                       preprocessor: Preprocessor | None = None,
                       validation: bool = True) -> TrainingSet:
    """Snapshot the project and preprocess every case the method can train on.

    Call ``project.refresh()`` first to see other processes' latest saves; the snapshot is the
    project's index at this moment.

    Args:
        project: the open project.
        image_size: side of the square training images.
        supervision: what the method learns from (None: everything counts).
        channels: model input channels (default: `project_channels`).
        seed: seed of the validation choice.
        preprocessor: cache to reuse across rounds (must match image_size and channels).
        validation: hold the validation cases out (False: they are trained on like the others).
    """
    records = [r for r in project.cases() if r.split != "holdout"]
    if channels is None:
        channels = project_channels(project)
    if preprocessor is None:
        preprocessor = Preprocessor(image_size, channels)
    elif (preprocessor.image_size, preprocessor.channels) != (image_size, channels):
        raise ValueError("preprocessor image size / channels do not match")
    image_classes = project.image_classes
    use_unlabelled = supervision is None or supervision.unlabelled
    k = len(project.classes)

    full_ids = [r.id for r in records if r.latest is not None and r.latest.kind == "full"]
    val_ids = set(select_validation(full_ids, seed)) if validation else set()

    rows: list[tuple[CaseRecord, str]] = []  # (record, group) group ∈ mask | image | unlabelled | val
    counts = count_supervision(r for r in records if r.id not in val_ids)  # as the store counts
    for rec in records:
        if rec.id in val_ids:
            rows.append((rec, "val"))
            continue
        kind = mask_kind(rec)
        has_info = has_image_label(rec) or kind == "full"
        mask_ok, label_ok = _uses(kind, has_info, supervision)
        if mask_ok:
            rows.append((rec, "mask"))
        elif label_ok:
            rows.append((rec, "image"))
        elif use_unlabelled:
            rows.append((rec, "unlabelled"))

    images, targets, presences, img_cls = [], [], [], []
    has_mask, full = [], []
    for rec, group in rows:
        images.append(preprocessor.image(project, rec))
        if group == "unlabelled":
            tgt = torch.full((image_size, image_size), IGNORE, dtype=torch.int64)
            pres = [-1] * k
            cls_idx = -1
        else:
            tgt, pres = preprocessor.target(project, rec)
            cls_idx = image_classes.index(rec.image_label) if rec.image_label in image_classes else -1
        targets.append(tgt)
        presences.append(pres)
        img_cls.append(cls_idx)
        has_mask.append(bool((tgt >= 0).any()))
        full.append(group in ("mask", "val") and rec.latest is not None and rec.latest.kind == "full")

    groups = [g for _, g in rows]
    idx = {g: torch.tensor([i for i, gg in enumerate(groups) if gg == g], dtype=torch.int64)
           for g in ("mask", "image", "unlabelled", "val")}
    labelled = torch.cat([idx["mask"], idx["image"]])
    # semi-supervised methods: every maskless training image is unlabelled for segmentation
    unlabelled = torch.cat([idx["image"], idx["unlabelled"]]).sort().values if use_unlabelled \
        else idx["unlabelled"]
    n_mask, n_img = idx["mask"].numel(), idx["image"].numel()
    probs = torch.ones(labelled.numel(), dtype=torch.float32)
    if n_mask and n_img:  # masks carry more information: at least half of each batch
        p_mask = max(0.5, n_mask / (n_mask + n_img))
        probs[:n_mask] = p_mask / n_mask
        probs[n_mask:] = (1 - p_mask) / n_img
    s = image_size
    return TrainingSet(
        case_ids=[r.id for r, _ in rows],
        images=torch.stack(images) if images else torch.zeros((0, channels, s, s)),
        targets=torch.stack(targets) if targets else torch.zeros((0, s, s), dtype=torch.int64),
        has_mask=torch.tensor(has_mask, dtype=torch.bool),
        full=torch.tensor(full, dtype=torch.bool),
        image_class=torch.tensor(img_cls, dtype=torch.int64),
        presence=torch.tensor(presences, dtype=torch.float32).reshape(len(rows), k),
        labelled=labelled, unlabelled=unlabelled, val=idx["val"],
        label_probs=probs, classes=project.classes, image_classes=image_classes,
        channels=channels, image_size=image_size, counts=counts,
    )
