"""Predictions, CAMs, uncertainty and acquisition scores for every case → the project store.

Per case: the image is preprocessed exactly as for training (resize to the model's image size,
robust normalisation, the model's channel count), then

* one deterministic pass on the image and its horizontal flip (flip test-time augmentation): the
  CAMs, presence and image-class probabilities are the mean of the two, and their disagreement
  gives ``tta_var``;
* ``mc_samples`` MC-dropout passes: the stored probability map is the mean of the deterministic
  (flip-averaged) and the MC-dropout means; the mutual information (BALD) between prediction and
  dropout mask is the stored uncertainty map, unless the method has an uncertainty of its own
  (``Prediction.uncertainty``, e.g. the disagreement of two sub-models: flip-averaged, stored
  instead, and its mean is the ``disagreement`` score);
* *presence gating*, once, on the presence pooled over the passes: a lesion class whose evidence
  (the presence probability; with the method's ``gate_segmentation`` option, its geometric mean
  with the segmentation's strongest pixel of that class) is below the method's
  ``gate_threshold`` (0.5) is removed from that image; the stored CAM of class k is its map
  weighted by the presence probability of k;
* everything is upsampled to the image's own size; the class map is the argmax.

Optionally the working image can be larger than the training size (``working_size``); the spatial
maps are then computed with MONAI's sliding-window inference, the image-level heads on the
downsized image. The scores written beside the arrays (see docs/architecture.md) are what
``acquisition`` ranks by.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from training_backend.learning.data import preprocess_image
from training_backend.errors import InputError, ProjectError
from training_backend.learning.checkpoints import check_compatible, load_checkpoint, resolve_checkpoint, resolve_device
from training_backend.config import TrainConfig
from training_backend.learning.methods.base import gate_evidence, gate_probs
from training_backend.project.store import Project

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.learning.methods.base import Method

#: Presence probability below which a lesion class is removed from an image's class map.
PRESENCE_THRESHOLD = 0.5


@dataclass(frozen=True)
class CasePredicted:
    """Progress of `iter_predictions`: case ``index`` (1-based) of ``total`` was written."""

    index: int
    total: int
    case_id: str
    output_id: str


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to predict, with what it was trained on."""

    method: "Method"
    config: "TrainConfig"
    meta: dict
    path: Path

    @property
    def model_id(self) -> str:
        return str(self.meta.get("model_id") or self.path.parent.name)


# ----------------------------------------------------------------------------- loading
def _load(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    from training_backend.learning.methods import create_method

    dev = resolve_device(device) if isinstance(device, str) else device
    path = Path(path)
    ckpt = load_checkpoint(path, "cpu")
    meta = ckpt["meta"]
    cfg = TrainConfig.from_dict(meta["config"])
    method = create_method(meta["method"], in_channels=int(meta["in_channels"]),
                           n_classes=int(meta["n_classes"]),
                           n_image_classes=int(meta["n_image_classes"]), model=cfg.model,
                           **cfg.method_options)
    try:
        method.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise InputError(path, f"weights do not fit the {meta['method']!r} model "
                               f"({str(exc).splitlines()[0]})") from None
    method.to(dev).eval()
    return LoadedModel(method, cfg, dict(meta), path)


def load_model(checkpoint_path: str | os.PathLike, device: str | torch.device = "cpu"
               ) -> tuple["Method", "TrainConfig"]:
    """Rebuild a trained method from a checkpoint (loaded with ``weights_only=True``).

    Args:
        checkpoint_path: a ``step_*.pt`` / ``latest.pt`` file.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ... or a torch device.

    Returns:
        (method in eval mode on ``device``, its `TrainConfig`).
    """
    loaded = _load(checkpoint_path, device)
    return loaded.method, loaded.config


# ----------------------------------------------------------------------------- one case
def gate_threshold(method: "Method") -> float:
    """The method's presence-gating threshold (0 while its presence head has seen no label)."""
    if hasattr(method, "presence_seen") and int(method.presence_seen) == 0:
        return 0.0
    options = getattr(method, "options", {}) or {}
    return float(options.get("gate_threshold", PRESENCE_THRESHOLD))


def gate_uses_segmentation(method: "Method") -> bool:
    """Whether the method gates on presence and segmentation together (`gate_evidence`)."""
    return bool((getattr(method, "options", {}) or {}).get("gate_segmentation", False))


def _entropy(p: torch.Tensor, dim: int) -> torch.Tensor:
    # -sum p log p, with 0 log 0 = 0 (the clamp): the vectorised log and in-place passes are
    # about 2x faster than torch.special.entr (scalar code on this CPU) or xlogy
    return p.clamp_min(1e-30).log_().mul_(p).sum(dim).neg_()


def _argmax_channels(p: torch.Tensor) -> torch.Tensor:
    """Index of the largest channel of (C, H, W) non-negative floats → (H, W) uint8 (C <= 256).

    Ties go to the lowest index, as with ``torch.max``.
    """
    c = p.shape[0]
    if c == 2:  # background and one lesion class: a comparison, 10x faster than max
        return (p[1] > p[0]).view(torch.uint8)
    if c > 16 or p.dtype != torch.float32:
        return torch.max(p, 0).indices.to(torch.uint8)
    # Non-negative float32 values order as their int32 bit patterns. The lowest ``bits``
    # mantissa bits of each value are replaced by (c - 1 - channel), so one integer amax over
    # the channels (a vectorised reduction) yields the largest value and, in its low bits, its
    # channel: about 10x faster than torch.max's indices on CPU. Values closer than a relative
    # 2**-(23 - bits) (at most 1e-6 here) count as tied.
    bits = (c - 1).bit_length()
    code = torch.arange(c - 1, -1, -1, dtype=torch.int32, device=p.device)[:, None, None]
    packed = torch.bitwise_and(p.view(torch.int32), -(1 << bits)).bitwise_or_(code).amax(0)
    return (c - 1 - packed.bitwise_and_((1 << bits) - 1)).to(torch.uint8)


def _forward(method: "Method", x: torch.Tensor, dropout: bool, image_size: int):
    """Prediction heads for a batch; sliding window when ``x`` is larger than ``image_size``.

    Returns (probs (B, K+1, H, W), cams (B, K, H, W), presence (B, K), image_class or None,
    features (B, F), the method's own uncertainty (B, H, W) or None).
    """
    if max(x.shape[-2:]) <= image_size:
        pred = method.predict(x, dropout=dropout, gate=False)
        return pred.probs, pred.cams, pred.presence, pred.image_class, pred.features, pred.uncertainty
    from monai.inferers import sliding_window_inference

    small = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=True)  # (B, C, S, S) for the image-level heads
    glob = method.predict(small, dropout=dropout, gate=False)
    k1 = glob.probs.shape[1]

    own = glob.uncertainty is not None

    def spatial(t: torch.Tensor) -> torch.Tensor:
        p = method.predict(t, dropout=dropout, gate=False)
        parts = [p.probs, p.cams] + ([p.uncertainty[:, None]] if own else [])
        return torch.cat(parts, 1)  # (b, K+1+K[+1], S, S)

    maps = sliding_window_inference(x, roi_size=(image_size, image_size), sw_batch_size=4,
                                    predictor=spatial, overlap=0.25, mode="gaussian")
    probs = maps[:, :k1].clamp_min(0)
    probs = probs / probs.sum(1, keepdim=True).clamp_min(1e-8)
    k = glob.cams.shape[1]
    unc = maps[:, 2 * k1 - 1].clamp(0, 1) if own else None
    return probs, maps[:, k1:k1 + k].clamp(0, 1), glob.presence, glob.image_class, glob.features, unc


def predict_image(method: "Method", image: np.ndarray, channels: int, image_size: int,
                  mc_samples: int = 4, device: torch.device | str = "cpu",
                  working_size: int | None = None, image_classes: Sequence[str] = (),
                  tta: bool = True) -> dict:
    """All outputs of one image (arrays at the image's size, scores, features).

    Args:
        method: a trained method.
        image: (H, W) or (H, W, 3) as stored.
        channels: the model's input channels.
        image_size: the model's training size.
        mc_samples: MC-dropout samples (1: a single deterministic pass, BALD = 0).
        device: where to compute.
        working_size: side of the working image (default ``image_size``; larger → sliding window).
        image_classes: names of the model's image classes (for ``scores["image_class"]``).
        tta: average with the horizontally flipped image (and score their disagreement);
            False = one forward pass, ``tta_var`` 0 (the fastest prediction).

    Returns:
        dict with ``pred`` (H, W) uint8, ``prob`` (K+1, H, W) float16, ``cam`` (K, H, W) float16,
        ``uncertainty`` (H, W) float16, ``scores`` dict and ``features`` (F,) float32.
    """
    h, w = int(image.shape[0]), int(image.shape[1])
    size = int(working_size or image_size)
    x = preprocess_image(image, channels, size)[None].to(device)  # (1, C, S, S)
    if method.training:
        method.eval()
    with torch.no_grad():
        batch = torch.cat([x, x.flip(-1)]) if tta else x  # (2 or 1, C, S, S): image, flipped
        probs, cams, presence, image_class, features, own_unc = _forward(method, batch, False, image_size)
        p_det = probs[0]  # (K+1, S, S)
        p_flip = probs[1].flip(-1) if tta else p_det
        cam = 0.5 * (cams[0] + cams[1].flip(-1)) if tta else cams[0]  # (K, S, S)
        pres = presence.mean(0)  # (K,)
        img_cls = None if image_class is None else image_class.mean(0)
        feat = features[0]  # (F,)
        n_cls = probs.shape[1]
        log_c = math.log(n_cls)
        det = 0.5 * (p_det + p_flip) if tta else p_det  # (K+1, S, S) deterministic passes
        if mc_samples >= 2:
            mc = _forward(method, x.expand(mc_samples, -1, -1, -1), True, image_size)[0]  # (T, K+1, S, S)
            mc_mean = mc.mean(0)  # (K+1, S, S)
            bald = (_entropy(mc_mean, 0) - _entropy(mc, 1).mean(0)).clamp_min(0) / log_c  # (S, S)
            ungated = 0.5 * (det + mc_mean)  # deterministic and MC passes alike
        else:
            ungated = det
            bald = None
        # gating once, on the presence pooled over the passes (a pass is never gated alone)
        evidence = gate_evidence(ungated[None], pres[None], gate_uses_segmentation(method))  # (1, K)
        prob = gate_probs(ungated[None], evidence, gate_threshold(method))[0]  # (K+1, S, S)
        # the CAM as shown and ranked: class k's map weighted by its presence probability, so
        # an image the classifier calls lesion-free has a faint map, not one scaled to 1
        cam = cam.mul_(pres[:, None, None])  # (K, S, S)
        ent = _entropy(prob, 0).div_(log_c)  # (S, S) in [0, 1]
        unc = bald if mc_samples >= 2 else ent
        disagreement = None
        if own_unc is not None:  # the method's own (e.g. its two sub-models disagreeing)
            disagreement = 0.5 * (own_unc[0] + own_unc[1].flip(-1)) if tta else own_unc[0]  # (S, S)
            unc = disagreement
        # variance of the two passes
        tta_var = (((p_det - p_flip) / 2) ** 2).sum(0) if tta else None  # (S, S)
        # lesion region (a scalar score needs no full resolution: at most 128 px): predicted
        # lesion + a boundary band of 1/32 of the side, dilated with two 1-D max-pools
        f = max(1, size // 128)
        winner = _argmax_channels(prob)  # (S, S) uint8, of the gated probabilities
        if f > 1 and size % f == 0:  # any lesion pixel in each f x f block, on the uint8 map
            lesion = winner.view(size // f, f, size // f, f).amax((1, 3)).float()[None, None]
        else:
            lesion = (winner > 0).float()[None, None]  # (1, 1, S, S) lesion wins
            lesion = F.max_pool2d(lesion, f) if f > 1 else lesion  # (1, 1, s, s)
        ent_small = F.avg_pool2d(ent[None, None], f)[0, 0] if f > 1 else ent  # (s, s)
        r = max(1, size // 32 // f)
        region = F.max_pool2d(lesion, (1, 2 * r + 1), stride=1, padding=(0, r))
        region = F.max_pool2d(region, (2 * r + 1, 1), stride=1, padding=(r, 0))[0, 0] > 0
        p_lesion = 1.0 - prob[0]  # (S, S)
        cam_mask = (cam.amax(0) > 0.5).float()  # (S, S)
        inter = (cam_mask * p_lesion).sum()
        union = cam_mask.sum() + p_lesion.sum() - inter
        soft_iou = 1.0 if float(union) < 1e-6 else float(inter / union)
        seg_presence = 1.0 - float(ungated[0].amin())  # strongest lesion pixel, before gating

        # back to the image's size
        def to_image(t: torch.Tensor) -> torch.Tensor:  # (C, S, S) -> (C, H, W)
            if tuple(t.shape[-2:]) == (h, w):
                return t
            return F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=False)[0]

        prob_full = to_image(prob)  # (K+1, H, W)
        pred_full = winner if prob_full is prob else _argmax_channels(prob_full)  # (H, W)
        cam_full = to_image(cam)  # (K, H, W)
        unc_full = to_image(unc[None])[0]  # (H, W)

    lesion_frac = int(torch.count_nonzero(pred_full)) / pred_full.numel()
    pres_list = [float(v) for v in pres.cpu()]
    scores = {
        "presence": pres_list,
        "image_class": ({} if img_cls is None else
                        {name: float(p) for name, p in zip(image_classes, img_cls.cpu())}),
        "lesion_frac": lesion_frac,
        "entropy": float(ent.mean()),
        "entropy_lesion": float(ent_small[region].mean()) if bool(region.any()) else 0.0,
        "bald": 0.0 if bald is None else float(bald.mean()),
        "tta_var": 0.0 if tta_var is None else float(tta_var.mean()),
        "cam_disagreement": 1.0 - soft_iou,
        # classifier vs segmenter: presence against the ungated segmentation's strongest lesion
        "burden_disagreement": abs(max(pres_list, default=0.0) - seg_presence),
        # each lesion class's strongest pixel before gating (the segmenter's own presence)
        "segmentation_presence": [float(v) for v in ungated[1:].flatten(1).amax(1).cpu()],
        # what the gate compared with its threshold (gate_evidence)
        "gate_evidence": [float(v) for v in evidence[0].cpu()],
        "uncertainty_mean": float(unc.mean()),
        # the method's own uncertainty (sub-models disagreeing), where it has one
        "disagreement": 0.0 if disagreement is None else float(disagreement.mean()),
    }
    return {
        "pred": pred_full.cpu().numpy(),  # uint8
        # float16 in torch: about 10x faster than numpy's astype
        "prob": prob_full.half().cpu().numpy(),
        "cam": cam_full.half().cpu().numpy(),  # in [0, 1]: bilinear of [0, 1] maps
        "uncertainty": unc_full.half().cpu().numpy(),  # >= 0: entropy or clamped BALD
        "scores": scores,
        "features": feat.float().cpu().numpy(),
    }


# ----------------------------------------------------------------------------- a project
def iter_predictions(project: Project, method_or_checkpoint, case_ids: Sequence[str] | None = None,
                     mc_samples: int | None = None, image_size: int | None = None,
                     channels: int | None = None, device: str | torch.device = "auto",
                     model_id: str | None = None, working_size: int | None = None,
                     cancel: Callable[[], bool] | None = None,
                     first: Callable[[], Sequence[str]] | None = None) -> Iterator[CasePredicted]:
    """Predict cases and write their outputs to the store, yielding progress per case.

    Args:
        project: the open (writable) project.
        method_or_checkpoint: a trained `Method` (then ``image_size``, ``channels`` and
            ``model_id`` are required) or a checkpoint path / model folder / model id.
        case_ids: cases to predict (default: all, holdout included).
        mc_samples: MC-dropout samples (default: the model's training config).
        image_size: the model's training size (default: from the checkpoint).
        channels: the model's input channels (default: from the checkpoint).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a torch device.
        model_id: recorded with the outputs (default: from the checkpoint).
        working_size: predict at this side (sliding window when above ``image_size``).
        cancel: polled before each case; True stops early.
        first: polled before each case; the cases it names that are still to do are done
            next, in its order (the case a user has on screen jumps the queue).
    """
    if isinstance(device, str):
        device = resolve_device(device)
    image_classes = project.image_classes
    if isinstance(method_or_checkpoint, (str, os.PathLike)):
        path = resolve_checkpoint(project, method_or_checkpoint)
        loaded = _load(path, device)
        check_compatible(project, loaded.meta, path)
        method = loaded.method
        image_size = image_size or int(loaded.meta["image_size"])
        channels = channels or int(loaded.meta["in_channels"])
        model_id = model_id or loaded.model_id
        mc_samples = mc_samples or loaded.config.mc_samples
        image_classes = list(loaded.meta.get("image_classes") or [])
    else:
        method = method_or_checkpoint
        if image_size is None or channels is None or model_id is None:
            raise ValueError("image_size, channels and model_id are needed with a method object")
        method.to(device)
    mc_samples = int(mc_samples or 4)
    # one frozen copy for the whole round: eval mode, batch norms folded (a training method
    # passed in is left untouched)
    method = method.inference_copy()
    project.refresh()
    todo = list(dict.fromkeys(project.case_ids() if case_ids is None else case_ids))
    total = len(todo)
    for i in range(1, total + 1):
        if cancel is not None and cancel():
            return
        if first is not None:
            urgent = [c for c in dict.fromkeys(first()) if c in todo]
            if urgent:
                moved = set(urgent)
                todo = urgent + [c for c in todo if c not in moved]
        cid = todo.pop(0)
        out = predict_image(method, project.read_image(cid), channels, image_size, mc_samples,
                            device, working_size, image_classes)
        output_id = project.write_outputs(cid, model_id, out["pred"], out["prob"], out["cam"],
                                          out["uncertainty"], out["scores"], out["features"])
        yield CasePredicted(i, total, cid, output_id)


def predict_project(project: Project, method_or_checkpoint, case_ids: Sequence[str] | None = None,
                    mc_samples: int | None = None, image_size: int | None = None,
                    device: str | torch.device = "auto", **kw) -> list[str]:
    """Predict cases and write outputs; returns the ids written (see `iter_predictions`).

    Args:
        project: the open (writable) project.
        method_or_checkpoint: a trained `Method` or a checkpoint path / model folder / model id.
        case_ids: cases to predict (default: all).
        mc_samples: MC-dropout samples (default: the model's training config).
        image_size: the model's training size (default: from the checkpoint).
        device: where to compute.
        **kw: ``channels``, ``model_id``, ``working_size``, ``cancel``.
    """
    if project.mode != "r+":
        raise ProjectError(f"{project.path}: project was opened read-only")
    return [item.case_id for item in iter_predictions(project, method_or_checkpoint, case_ids,
                                                      mc_samples, image_size, device=device, **kw)]


__all__ = ["CasePredicted", "LoadedModel", "gate_threshold", "gate_uses_segmentation", "resolve_checkpoint", "check_compatible", "load_model",
           "predict_image", "iter_predictions", "predict_project"]
