"""The method contract (``Method``, ``Batch``, ``Prediction``, ``Supervision``) and the registry.

A method owns its networks and its losses; the one training loop (``trainer.py``) calls
``training_step`` / ``after_step`` and the inference code calls ``predict``. The shared helpers
here give every method the same supervised losses:

* segmentation: partial CE + masked soft Dice on labelled pixels (full masks: every pixel;
  sparse masks: painted pixels; ignore = -1). A case with no mask whose presence is all 0
  (a negative image label such as "normal") is an all-background target — correct supervision
  that teaches the segmenter to leave lesion-free images empty.
* presence: BCE on the known presence entries (-1 masked).
* image class: CE on the known image classes (-1 masked).

**Gating.** ``predict`` returns ``gate_prediction(pred, threshold, use_segmentation)`` (options
``gate_threshold``, default 0.5, 0 disables it; ``gate_segmentation``): lesion class k is
removed (its probability moved to background) from every image whose evidence for k is below
the threshold. The evidence is the presence head's probability, or with ``gate_segmentation``
the geometric mean of it and the segmentation's strongest pixel of k (`gate_evidence`): two
detectors that must agree, so a lesion the segmenter is sure of survives a hesitant presence
head (kept down to presence 0.25), while a weak spot on an image the presence head calls
normal is still removed. The presence head sees image-level labels, so lesion-free images come
out empty far more often than from the segmentation head alone. Gating is skipped while the
presence head has never seen a label.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, ClassVar, Iterable

import torch
from torch import Tensor, nn

from training_backend.config import COMMON_OPTIONS as COMMON_OPTION_SPECS
from training_backend.config import DATA_KINDS, METHOD_CATALOG, REQUIREMENT_KINDS, MethodSpec, Supervision
from training_backend.config import available_methods as _available_in
from training_backend.learning.contract import Batch, Prediction
from training_backend.errors import InputError
from training_backend.learning.losses import image_class_loss, presence_loss, segmentation_losses
from training_backend.learning.models import ModelConfig, NetOutput, UNet, cam_to_maps, enable_dropout, fold_batch_norm


def gate_probs(probs: Tensor, presence: Tensor, threshold: float = 0.5) -> Tensor:
    """Move the probability of lesion class k to background in images whose presence
    probability of k is below ``threshold`` (0 = no gating); ``probs`` still sums to 1.

    Args:
        probs: (B, K+1, ...) softmax probabilities.
        presence: (B, K) presence probabilities.
        threshold: presence probability below which a class is removed.
    """
    if threshold <= 0:
        return probs
    keep = (presence >= threshold).to(probs.dtype)  # (B, K)
    if bool(keep.all()):  # nothing removed
        return probs
    lesion = probs[:, 1:] * keep.reshape(keep.shape + (1,) * (probs.ndim - 2))  # (B, K, ...)
    background = (1.0 - lesion.sum(1, keepdim=True)).clamp(0.0, 1.0)  # (B, 1, ...)
    return torch.cat([background, lesion], 1)


def gate_evidence(probs: Tensor, presence: Tensor, use_segmentation: bool = False) -> Tensor:
    """Evidence that lesion class k is in an image, the quantity gating compares with its
    threshold: the presence probability, or with ``use_segmentation`` the geometric mean of it
    and the segmentation's strongest pixel of k.

    Args:
        probs: (B, K+1, ...) softmax probabilities (ungated).
        presence: (B, K) presence probabilities.
        use_segmentation: combine with the segmentation's evidence.

    Returns:
        (B, K) in [0, 1].
    """
    if not use_segmentation:
        return presence
    seg = probs[:, 1:].flatten(2).amax(2)  # (B, K)
    return (presence * seg).clamp_min(0).sqrt()


def gate_prediction(pred: Prediction, threshold: float = 0.5,
                    use_segmentation: bool = False) -> Prediction:
    """`gate_probs` applied to a prediction (on `gate_evidence`): the argmax of a gated image
    has no pixel of a removed class. CAMs, presence and features are kept.

    Args:
        pred: a prediction.
        threshold: evidence below which a class is removed (0 = no gating).
        use_segmentation: see `gate_evidence`.
    """
    if threshold <= 0:
        return pred
    evidence = gate_evidence(pred.probs, pred.presence, use_segmentation)
    return replace(pred, probs=gate_probs(pred.probs, evidence, threshold))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, ema_decay: float, step: int) -> None:
    """Mean-teacher update after a step: ``teacher = d * teacher + (1 - d) * student`` with
    ``d = min(ema_decay, 1 - 1/(step + 1))`` (a plain average over the first steps); buffers
    (batch-norm statistics) are copied from the student.

    Args:
        teacher: the EMA copy (same structure as ``student``).
        student: the network being trained.
        ema_decay: the decay once ``step`` is large.
        step: the global step just taken.
    """
    decay = min(float(ema_decay), 1.0 - 1.0 / (step + 1))
    for tp, sp in zip(teacher.parameters(), student.parameters()):
        tp.mul_(decay).add_(sp.detach(), alpha=1.0 - decay)
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        tb.copy_(sb)  # batch-norm statistics follow the student


#: Options every method accepts (``TrainConfig.method_options``), with their defaults (their
#: help is in ``config.COMMON_OPTIONS``).
COMMON_OPTIONS: dict[str, Any] = {k: o.default for k, o in COMMON_OPTION_SPECS.items()}


def _coerce(name: str, default: Any, value: Any) -> Any:
    """Convert an option value (possibly a string from the CLI) to the type of its default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            f = float(value)
            if f != int(f):
                raise ValueError(value)
            return int(f)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise InputError("method_options", f"option {name!r} must be a {type(default).__name__}, got {value!r}") from None
    return value


class Method(nn.Module):
    """Base class of training methods; see the module docstring and docs/architecture.md.

    Args:
        in_channels: image channels (1 grey, 3 RGB).
        n_classes: K lesion classes.
        n_image_classes: image-level classes (0 = none).
        model: architecture (``ModelConfig``, its dict form, or ``None`` for defaults).
        **options: method options (``COMMON_OPTIONS`` plus the method's ``default_options``);
            an unknown name raises ``InputError`` listing the valid ones.
    """

    #: the method's entry in ``config.METHOD_CATALOG``: `register` copies its name,
    #: supervision, description and option defaults onto the class
    spec: ClassVar[MethodSpec | None] = None
    name: ClassVar[str] = ""
    supervision: ClassVar[Supervision]
    description: ClassVar[str] = ""
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, model: ModelConfig | dict | None = None, **options: Any):
        super().__init__()
        if n_classes < 1:
            raise InputError("classes", f"a method needs at least one lesion class, got {n_classes}")
        self.in_channels, self.n_classes, self.n_image_classes = int(in_channels), int(n_classes), int(n_image_classes)
        self.model_config = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(model)
        self.options = self.resolve_options(options)
        # number of known presence labels trained on (gating waits for the first); in state_dict
        self.register_buffer("presence_seen", torch.zeros((), dtype=torch.long))

    # ----------------------------------------------------------------- options
    @classmethod
    def all_default_options(cls) -> dict[str, Any]:
        """Every option this method accepts, with its default."""
        return {**COMMON_OPTIONS, **cls.default_options}

    @classmethod
    def resolve_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """Defaults updated with ``options`` (type-checked; unknown names raise ``InputError``).

        Args:
            options: user options, e.g. ``TrainConfig.method_options``.
        """
        defaults = cls.all_default_options()
        unknown = sorted(set(options) - set(defaults))
        if unknown:
            raise InputError(
                "method_options", f"unknown option(s) {', '.join(unknown)} for method {cls.name!r}; valid: {', '.join(sorted(defaults))}"
            )
        return {k: _coerce(k, v, options.get(k, v)) for k, v in defaults.items()}

    # -------------------------------------------------------------- networks
    def build_unet(self) -> UNet:
        """A fresh ``UNet`` for this method's channels/classes/config."""
        return UNet(self.in_channels, self.n_classes, self.n_image_classes, self.model_config)

    def predict_forward(self, image: Tensor) -> NetOutput:
        """Network outputs used by ``predict`` (default: ``self.net``). Override to combine nets.

        Args:
            image: (B, C, H, W) normalised images.
        """
        return self.net(image)

    @property
    def cam_stride(self) -> int:
        return self.model_config.cam_stride

    def inference_copy(self) -> "Method":
        """A frozen copy for prediction: eval mode, batch norms folded into their convolutions
        (``models.fold_batch_norm``): the same outputs to float rounding, about 10 % less time
        per forward on CPU. This method is left as it is (it may go on training).
        """
        clone = copy.deepcopy(self).eval()
        for p in clone.parameters():
            p.requires_grad_(False)
        fold_batch_norm(clone)
        return clone

    # ---------------------------------------------------------- the contract
    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        """One optimisation step's losses: ``{"loss": total, **parts}`` (parts detached).

        Args:
            batch: the batch.
            step: global step (0-based).
            progress: fraction of training done, in [0, 1].
        """
        raise NotImplementedError

    def after_step(self, step: int, progress: float) -> None:
        """Called after each optimiser step (default: nothing).

        Args:
            step: global step just taken.
            progress: fraction of training done.
        """

    def start_new_run(self) -> None:
        """Called by the trainer when a run starts from another run's weights (fine-tuning with
        ``init_from``; not on resume): reset what belongs to one run (default: nothing)."""

    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters the optimiser updates (default: those with ``requires_grad``)."""
        return [p for p in self.parameters() if p.requires_grad]

    def predict(self, image: Tensor, dropout: bool = False, gate: bool = True) -> Prediction:
        """Predict a batch in eval mode (``dropout=True``: dropout stays on, for MC sampling).

        The previous train/eval mode is restored afterwards; a method whose own ``training``
        flag is False is taken to be in eval mode throughout (``eval()`` and ``train()`` set
        every submodule, and no method switches a submodule alone outside its training step).
        Gating (module docstring) is applied with the ``gate_threshold`` option unless ``gate``
        is False (callers that pool several passes gate once, on the pooled presence).

        Args:
            image: (B, C, H, W) normalised images, any H, W.
            dropout: keep dropout active (one MC sample per call).
            gate: apply presence gating to this batch's probabilities.
        """
        was_training = self.training
        # switching modes walks every module (about 0.5 ms each way for a U-Net): a method
        # already in eval mode is left alone unless dropout is switched on for this call
        switch = was_training or dropout
        if switch:
            self.eval()
            if dropout:
                enable_dropout(self)
        try:
            with torch.no_grad():
                out = self.predict_forward(image)
                pred = self.prediction_from_output(out, tuple(image.shape[-2:]))
        finally:
            if switch:
                self.train(was_training)
        if gate and int(self.presence_seen) > 0:
            pred = gate_prediction(pred, float(self.options["gate_threshold"]),
                                   bool(self.options["gate_segmentation"]))
        return pred

    # --------------------------------------------------------------- helpers
    def prediction_from_output(self, out: NetOutput, size: tuple[int, int]) -> Prediction:
        """Turn network outputs into an (ungated) ``Prediction``.

        Args:
            out: outputs of a ``UNet`` (``seg_logits`` required).
            size: (H, W) of the input.
        """
        return Prediction(
            # channel-first: a softmax of the same cost as on the channels-last logits, and
            # later per-channel reads (background, entropy, argmax) are contiguous planes
            probs=torch.softmax(out.seg_logits.contiguous(), 1),  # (B, K+1, H, W)
            cams=cam_to_maps(out.cam_logits, size, self.cam_stride),  # (B, K, H, W)
            presence=torch.sigmoid(out.presence_logits),  # (B, K)
            image_class=None if out.image_logits is None else torch.softmax(out.image_logits, 1),
            features=out.features,  # (B, F)
        )

    def supervised_target(self, batch: Batch) -> Tensor:
        """The segmentation target, with maskless negative images turned all-background.

        Args:
            batch: the batch.

        Returns:
            (B, S, S) int64 target.
        """
        target = batch.target
        if self.options["negative_background"]:
            negative = (~batch.has_mask) & (batch.presence == 0).all(dim=1)  # (B,)
            if bool(negative.any()):
                target = torch.where(negative[:, None, None], torch.zeros_like(target), target)
        return target

    def supervised_losses(self, out: NetOutput, batch: Batch, target: Tensor | None = None, seg_weight: float = 1.0) -> dict[str, Tensor]:
        """Segmentation + presence + image-class losses on one batch's outputs.

        Args:
            out: network outputs for ``batch.image`` (``seg_logits`` may be ``None``).
            batch: the batch.
            target: segmentation target (default: ``supervised_target(batch)``).
            seg_weight: multiplier of the segmentation terms (0 skips them).

        Returns:
            ``{"loss": total, "ce", "dice", "presence", "image_class"}`` — only the parts that had
            supervision; parts are detached, ``loss`` carries the graph.
        """
        o = self.options
        parts: dict[str, Tensor] = {}
        terms: list[Tensor] = []
        if out.seg_logits is not None and seg_weight > 0:
            seg = segmentation_losses(out.seg_logits,
                                      self.supervised_target(batch) if target is None else target,
                                      per_image=bool(o["dice_per_image"]))
            if seg is not None:
                ce, dice = seg
                parts["ce"] = ce
                terms.append(seg_weight * ce)
                if dice is not None:
                    parts["dice"] = dice
                    terms.append(seg_weight * o["dice_weight"] * dice)
        pres = presence_loss(out.presence_logits, batch.presence)
        if pres is not None:
            parts["presence"] = pres
            terms.append(o["presence_weight"] * pres)
            if self.training:
                self.presence_seen += int((batch.presence >= 0).sum())
        img = image_class_loss(out.image_logits, batch.image_class)
        if img is not None:
            parts["image_class"] = img
            terms.append(o["image_class_weight"] * img)
        # no supervision at all: a zero that still belongs to the graph
        total = torch.stack(terms).sum() if terms else out.presence_logits.sum() * 0.0
        return {"loss": total, **{k: v.detach() for k, v in parts.items()}}


# ------------------------------------------------------------------ registry
METHODS: dict[str, type[Method]] = {}

def register(cls: type[Method]) -> type[Method]:
    """Class decorator adding a method to ``METHODS`` under its name.

    A class with a ``spec`` (its ``config.METHOD_CATALOG`` entry: what the window and the CLI
    know of it without torch) takes its name, supervision, description and option defaults from
    it; a class without one (a plug-in outside the catalog) sets them itself.

    Args:
        cls: a ``Method`` subclass.
    """
    spec = cls.__dict__.get("spec")  # its own, not one inherited from a built-in method
    if spec is not None:
        cls.name, cls.supervision = spec.name, spec.supervision
        cls.description = spec.description
        cls.default_options = {k: o.default for k, o in spec.options.items()}
    if not cls.name or not isinstance(getattr(cls, "supervision", None), Supervision):
        raise TypeError(f"{cls.__name__} needs a name and a Supervision")
    bad = sorted(set(cls.supervision.requires) - set(DATA_KINDS))
    bad += sorted(set(cls.supervision.requires_all) - set(REQUIREMENT_KINDS))
    if bad:
        raise TypeError(f"{cls.__name__}.supervision.requires names unknown kinds {bad}")
    METHODS[cls.name] = cls
    return cls


def create_method(name: str, **kw: Any) -> Method:
    """Instantiate the registered method ``name``.

    Args:
        name: a key of ``METHODS``.
        **kw: constructor arguments (in_channels, n_classes, n_image_classes, model, options...).

    The convolution weights are put in channels-last memory format: on CPU (oneDNN) that makes
    a U-Net forward about 1.7x and a training step about 1.4x faster than torch's default
    format (``benchmarks/bench_overhead.py``); the outputs are the same to float precision.
    """
    if name not in METHODS:
        raise InputError("method", f"unknown method {name!r}; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name](**kw).to(memory_format=torch.channels_last)


def available_methods(counts: dict[str, int]) -> list[str]:
    """Names of the registered methods whose ``requires`` is met by ``counts``
    (``config.available_methods`` over the registry).

    Args:
        counts: number of cases per kind: keys "full", "sparse", "image_label", "unlabelled"
            (missing keys count 0).
    """
    specs = {n: METHOD_CATALOG.get(n) or MethodSpec(n, cls.supervision, cls.description)
             for n, cls in METHODS.items()}
    return _available_in(counts, specs)
