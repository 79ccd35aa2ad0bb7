"""The contract layer's settings: what a training run, a model and a method are, without torch.

Everything here is plain data with its defaults in one place, so the window (which never
imports torch), the CLI, the trainer process and the benchmarks all build the same objects:

* `ModelConfig` — the network architecture (saved beside every checkpoint);
* `TrainConfig` — one training run (saved as the model's ``config.json``);
* `Supervision`, `Option`, `MethodSpec` and `METHOD_CATALOG` — every built-in method's name,
  the annotations it learns from, its description and its options with defaults and help.
  The method classes (``training_backend.learning.methods``, which need torch) take these from here;
  a contract test checks that the catalog and the registry agree;
* `available_methods` — which methods a project's annotations can train.

``python -c "import training_backend.config"`` imports no torch (a test checks it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from training_backend.errors import InputError

#: Default wall-clock budget when neither ``steps`` nor ``budget_s`` is given.
DEFAULT_BUDGET_S = 300.0
#: The window's first budget: a round of the annotation loop is kept short so that the clinician
#: sees a model soon; the CLI and the benchmarks use `DEFAULT_BUDGET_S`.
WINDOW_BUDGET_S = 120.0
#: Normalisation layers a model may use.
NORMS = ("batch", "instance")
#: Devices offered by name (``TrainConfig.device`` also takes ``"cuda:N"``).
DEVICES = ("auto", "cpu", "cuda", "mps")
#: No encoder level has more channels than this.
MAX_CHANNELS = 512


# ----------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """Architecture of the networks (saved beside every checkpoint).

    Args:
        base: channels of the first two encoder levels; level i >= 1 has ``base * 2**(i-1)``
            (at most 512): with the defaults 16-16-32-64-128, light enough for a CPU.
        depth: number of downsamplings (the bottleneck has stride ``2**depth``).
        dropout: dropout probability (bottleneck, deeper decoder blocks, image-class head).
        norm: ``"batch"`` or ``"instance"``.
        cam_levels: how many of the deepest encoder levels feed the CAM (1 = bottleneck only).
        pool_r: sharpness of the log-sum-exp pooling of CAM logits into presence logits
            (0 = global average pooling; large = max pooling).
    """

    base: int = 16
    depth: int = 4
    dropout: float = 0.1
    norm: str = "batch"
    cam_levels: int = 2
    pool_r: float = 4.0

    def __post_init__(self) -> None:
        if not (isinstance(self.base, int) and self.base >= 1):
            raise InputError("model.base", f"must be a positive integer, got {self.base!r}")
        if not (isinstance(self.depth, int) and 1 <= self.depth <= 6):
            raise InputError("model.depth", f"must be an integer from 1 to 6, got {self.depth!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise InputError("model.dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.norm not in NORMS:
            raise InputError("model.norm", f"must be one of {sorted(NORMS)}, got {self.norm!r}")
        if not (isinstance(self.cam_levels, int) and 1 <= self.cam_levels <= self.depth + 1):
            raise InputError("model.cam_levels", f"must be an integer from 1 to depth+1 ({self.depth + 1}), got {self.cam_levels!r}")
        if float(self.pool_r) < 0:
            raise InputError("model.pool_r", f"must be >= 0, got {self.pool_r!r}")

    @property
    def channels(self) -> list[int]:
        """Channels of encoder levels 0..depth."""
        return [min(self.base * 2 ** max(i - 1, 0), MAX_CHANNELS) for i in range(self.depth + 1)]

    @property
    def multiple(self) -> int:
        """Input sizes are padded to a multiple of this (the bottleneck stride)."""
        return 2**self.depth

    @property
    def cam_stride(self) -> int:
        """Stride (in input pixels) of one CAM cell."""
        return 2 ** (self.depth - self.cam_levels + 1)

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> ModelConfig:
        """Build from ``to_dict`` output; missing keys take their defaults.

        Args:
            d: mapping of field names to values (``None`` = all defaults).
        """
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError("model", f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**d)


# ----------------------------------------------------------------------------- a run
@dataclass
class TrainConfig:
    """Everything a training run needs besides the project (saved as ``config.json``).

    Args:
        method: registered method name (``lesionseg methods``).
        method_options: keyword options passed to the method's constructor.
        model: network architecture.
        steps: optimisation steps (with ``budget_s`` too: whichever ends first).
        budget_s: wall-clock seconds of training. With neither, the budget is 300 s.
        batch_size: labelled images per step (methods using unlabelled images get half as many
            unlabelled ones on top).
        image_size: side of the square training images.
        crop_size: train on random square crops of this side cut from the ``image_size``
            images (None: whole images), for large images whose lesions are small (fundus);
            half the crops of a case with lesion pixels are centred on one. Prediction and
            validation always see the whole ``image_size`` image.
        lr, weight_decay: AdamW settings (linear warm-up, then cosine decay to 5 % of ``lr``).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        threads: CPU threads for torch (default: all cores).
        seed: seeds weights, sampling, augmentation and the validation choice.
        rounds: the store is re-read between rounds, so new annotations join without a restart.
        checkpoint_every_s: seconds between periodic checkpoints.
        validate_every: steps between validations (when there are validation cases).
        fold_validation: the last fraction of the run in which the validation cases are trained
            on too, so the final model learns from every mask (0: never). The run's validation
            Dice is the one measured just before they join (`events.ValidationFolded`).
        predict: write predictions for all cases at the end (and after each round).
        mc_samples: MC-dropout samples for the uncertainty maps.
        predict_first: case ids predicted first, in this order (the case on screen, the top
            of the ranking); the rest follow in project order. Predictions are announced in
            parts (`events.PredictionsReady`) as they are written.
        init_from: checkpoint (path, model folder or model id) to fine-tune from.
        model_id: name of the model folder (default ``<method>-<yyyymmdd-hhmmss>``).
        pretrained: encoder weights a fresh run starts from (not a resume, not ``init_from``):
            "auto" uses the project's self-supervised pretrained encoder (``lesionseg
            pretrain``) when it was pretrained with this image size, channels and network;
            "none" never does; a path names an encoder file.
    """

    method: str = "supervised"
    method_options: dict = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int | None = None
    budget_s: float | None = None
    batch_size: int = 8
    image_size: int = 128
    crop_size: int | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    rounds: int = 1
    checkpoint_every_s: float = 60.0
    validate_every: int = 50
    fold_validation: float = 0.25
    predict: bool = True
    mc_samples: int = 4
    predict_first: list = field(default_factory=list)
    init_from: str | None = None
    model_id: str | None = None
    pretrained: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        checks = [
            ("pretrained", isinstance(self.pretrained, str) and bool(self.pretrained.strip()),
             'must be "auto", "none" or the path of a pretrained encoder'),
            ("steps", self.steps is None or (int(self.steps) == self.steps and self.steps >= 1),
             "must be a positive integer"),
            ("budget_s", self.budget_s is None or self.budget_s > 0, "must be > 0 seconds"),
            ("batch_size", int(self.batch_size) >= 1, "must be at least 1"),
            ("image_size", int(self.image_size) >= 16, "must be at least 16 pixels"),
            ("crop_size", self.crop_size is None or (int(self.crop_size) == self.crop_size
                                                     and 16 <= self.crop_size <= self.image_size),
             "must be a whole number of pixels from 16 to image_size"),
            ("lr", self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("rounds", int(self.rounds) >= 1, "must be at least 1"),
            ("validate_every", int(self.validate_every) >= 1, "must be at least 1"),
            ("mc_samples", int(self.mc_samples) >= 1, "must be at least 1"),
            ("threads", self.threads is None or int(self.threads) >= 1, "must be at least 1"),
            ("checkpoint_every_s", self.checkpoint_every_s > 0, "must be > 0"),
            ("fold_validation", 0 <= self.fold_validation < 1, "must be in [0, 1)"),
            ("predict_first", isinstance(self.predict_first, (list, tuple)), "must be a list of case ids"),
        ]
        for name, ok, problem in checks:
            if not ok:
                raise InputError(name, f"{problem}, got {getattr(self, name)!r}")
        if not isinstance(self.method_options, dict):
            raise InputError("method_options", "must be a mapping of option names to values")
        if self.model_id is not None and (not self.model_id or "/" in self.model_id
                                          or self.model_id.startswith((".", "_"))):
            # "_": the project's own folders under models/ (the pretrained encoder)
            raise InputError("model_id", f"{self.model_id!r} is not a usable folder name")

    @property
    def total_steps(self) -> int | None:
        return None if self.steps is None else int(self.steps)

    @property
    def budget(self) -> float | None:
        """Wall-clock budget in seconds (the default one in budget mode)."""
        if self.budget_s is not None:
            return float(self.budget_s)
        return DEFAULT_BUDGET_S if self.steps is None else None

    def to_dict(self) -> dict:
        """Plain-JSON form (``model`` as a nested dict)."""
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from `to_dict` output; unknown keys (from a newer version) are ignored.

        Args:
            d: the mapping.
        """
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in dict(d).items() if k in known}
        if isinstance(kw.get("model"), dict):
            kw["model"] = ModelConfig.from_dict(kw["model"])
        return cls(**kw)


# ----------------------------------------------------------------------------- pretraining
#: Wall-clock budget of a pretraining when neither ``steps`` nor ``budget_s`` is given.
PRETRAIN_BUDGET_S = 600.0


@dataclass
class PretrainConfig:
    """Self-supervised pretraining of the U-Net encoder on a project's own images, without
    labels (masked image modelling, ``training_backend.learning.pretrain``); saved with the
    pretrained encoder.

    Args:
        model: network architecture (a training with the same encoder settings reuses it).
        image_size: side of the square images; ``TrainConfig.pretrained="auto"`` uses the
            encoder only in a training of the same size.
        steps: optimisation steps in all (a resumed pretraining counts those before its stop).
        budget_s: wall-clock seconds in all (likewise). With neither, 600 s.
        batch_size: images per step.
        mask_ratio: share of the square patches hidden from the network, in (0, 1).
        patch_size: side of a hidden patch in pixels (at ``image_size``).
        lr: peak learning rate (AdamW; linear warm-up, then cosine decay).
        weight_decay: AdamW weight decay.
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        threads: CPU threads (default: all cores).
        seed: seeds the weights, the image order, the masks and the augmentation.
        checkpoint_every_s: seconds between checkpoints (a stop always writes one).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    image_size: int = 128
    steps: int | None = None
    budget_s: float | None = None
    batch_size: int = 16
    mask_ratio: float = 0.6
    patch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    checkpoint_every_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig.from_dict(self.model)
        checks = [
            ("steps", self.steps is None or (int(self.steps) == self.steps and self.steps >= 1),
             "must be a positive integer"),
            ("budget_s", self.budget_s is None or self.budget_s > 0, "must be > 0 seconds"),
            ("batch_size", int(self.batch_size) >= 1, "must be at least 1"),
            ("image_size", int(self.image_size) >= 16, "must be at least 16 pixels"),
            ("mask_ratio", 0 < float(self.mask_ratio) < 1, "must be between 0 and 1"),
            ("patch_size", 1 <= int(self.patch_size) <= int(self.image_size),
             "must be from 1 pixel to image_size"),
            ("lr", self.lr > 0, "must be > 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("threads", self.threads is None or int(self.threads) >= 1, "must be at least 1"),
            ("checkpoint_every_s", self.checkpoint_every_s > 0, "must be > 0"),
        ]
        for name, ok, problem in checks:
            if not ok:
                raise InputError(name, f"{problem}, got {getattr(self, name)!r}")

    @property
    def budget(self) -> float | None:
        """Wall-clock budget in seconds (the default one when no steps are given)."""
        if self.budget_s is not None:
            return float(self.budget_s)
        return PRETRAIN_BUDGET_S if self.steps is None else None

    def to_dict(self) -> dict:
        """Plain-JSON form (``model`` as a nested dict)."""
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        """Build from `to_dict` output; unknown keys (from a newer version) are ignored.

        Args:
            d: the mapping.
        """
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in dict(d).items() if k in known})


# ----------------------------------------------------------------------------- methods
#: The kinds of annotation a ``Supervision`` may name.
DATA_KINDS = ("full", "sparse", "image_label", "unlabelled")
#: What ``Supervision.requires_all`` may name besides `DATA_KINDS`: "maskless" counts the
#: training cases without a usable mask, whatever image label they have (the images a
#: semi-supervised method learns from without a mask).
REQUIREMENT_KINDS = DATA_KINDS + ("maskless",)


#: Words for the kinds in messages.
KIND_WORDS = {"full": "full masks", "sparse": "sparse masks (scribbles)", "image_label": "image labels",
              "unlabelled": "unlabelled images", "maskless": "images without a mask"}


@dataclass(frozen=True)
class Supervision:
    """What a method can learn from.

    Args:
        full_masks, sparse_masks, image_labels, unlabelled: kinds of data the method uses.
        requires: at least one of these kinds ("full", "sparse", "image_label") must exist.
        requires_all: and each of these too (`REQUIREMENT_KINDS`), e.g. ``("image_label",)``
            for a method that needs masks *and* image labels, ``("maskless",)`` for one that
            needs images without a mask besides the masked ones.
    """

    full_masks: bool
    sparse_masks: bool
    image_labels: bool
    unlabelled: bool
    requires: tuple[str, ...]
    requires_all: tuple[str, ...] = ()

    def met_by(self, counts: dict[str, int]) -> bool:
        """Whether a project with ``counts`` cases per kind can train a method of this supervision.

        Args:
            counts: training cases per kind (keys of `REQUIREMENT_KINDS`; missing keys count 0;
                without a "maskless" key it is "image_label" + "unlabelled", an upper bound).
        """
        have = dict(counts)
        have.setdefault("maskless", have.get("image_label", 0) + have.get("unlabelled", 0))
        return (any(have.get(k, 0) > 0 for k in self.requires)
                and all(have.get(k, 0) > 0 for k in self.requires_all))

    def needs(self) -> str:
        """The requirement in words, e.g. "full masks or sparse masks (scribbles), and image labels"."""
        any_of = " or ".join(KIND_WORDS.get(k, k) for k in self.requires)
        all_of = [KIND_WORDS.get(k, k) for k in self.requires_all]
        return ", and ".join([any_of] + all_of) if all_of else any_of

    @property
    def uses(self) -> tuple[str, ...]:
        """The kinds of annotation the method learns from (`DATA_KINDS` order)."""
        flags = (self.full_masks, self.sparse_masks, self.image_labels, self.unlabelled)
        return tuple(k for k, on in zip(DATA_KINDS, flags) if on)


@dataclass(frozen=True)
class Option:
    """A method option: its default (whose type the value must have) and a line of help."""

    default: Any
    help: str


@dataclass(frozen=True)
class MethodSpec:
    """Everything about a method that needs no torch."""

    name: str
    supervision: Supervision
    description: str
    options: dict[str, Option] = field(default_factory=dict)

    def all_options(self) -> dict[str, Option]:
        """`COMMON_OPTIONS` and this method's own."""
        return {**COMMON_OPTIONS, **self.options}

    def defaults(self) -> dict[str, Any]:
        """Every option this method accepts, with its default."""
        return {k: o.default for k, o in self.all_options().items()}


#: Options every method accepts (``TrainConfig.method_options``).
COMMON_OPTIONS: dict[str, Option] = {
    "dice_weight": Option(1.0, "weight of the soft Dice term"),
    "dice_per_image": Option(True, "Dice per (image, class) as the metric counts it; false: batch Dice"),
    "presence_weight": Option(0.5, "weight of the presence BCE"),
    "image_class_weight": Option(0.5, "weight of the image-class CE"),
    "negative_background": Option(True, "maskless negative images (e.g. 'normal') get an all-background target"),
    "gate_threshold": Option(0.5, "lesion classes whose presence is below this are removed from a prediction (0: no gating)"),
    "gate_segmentation": Option(False, "gate on the presence head and the segmentation's strongest pixel together (their geometric mean)"),
}

METHOD_CATALOG: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec(
        "supervised",
        Supervision(full_masks=True, sparse_masks=True, image_labels=True, unlabelled=False,
                    requires=("full", "sparse")),
        "U-Net on full masks (Dice+CE) and scribbles (partial CE); image labels train the "
        "presence head that gates empty predictions."),
    MethodSpec(
        "mean_teacher",
        Supervision(full_masks=True, sparse_masks=True, image_labels=True, unlabelled=True,
                    requires=("full", "sparse")),
        "Supervised losses plus consistency with an EMA teacher on CutMix-perturbed images "
        "without a mask (confident pseudo-labels, sigmoid ramp-up); predicts with the teacher.",
        {
            "ema_decay": Option(0.99, "teacher = decay * teacher + (1 - decay) * student"),
            "consistency": Option(1.0, "maximum consistency weight"),
            "rampup": Option(0.3, "fraction of training over which the weight ramps up"),
            "noise": Option(0.1, "std of the Gaussian input noise (images are normalised)"),
            "cutmix": Option(True, "box-mixed student inputs (false: noise + flips, the original recipe)"),
            "confidence": Option(0.9, "teacher probability for a pseudo-label (0: softmax MSE instead)"),
            "paste_labelled": Option(False, "CutMix with labelled images (bidirectional copy-paste)"),
            "skip_below": Option(0.05, "no unlabelled passes while the weight is below this share of its maximum"),
        }),
    MethodSpec(
        "cam",
        Supervision(full_masks=False, sparse_masks=False, image_labels=True, unlabelled=False,
                    requires=("image_label",)),
        "Image labels only: presence classifier -> multi-scale CAM -> thresholded pseudo-masks "
        "-> segmenter.",
        {
            "warmup": Option(0.4, "fraction of training before the segmenter starts (and the snapshot is taken)"),
            "cam_hi": Option(0.5, "CAM above this: lesion"),
            "cam_lo": Option(0.2, "CAM below this: background"),
            "seg_weight": Option(1.0, "weight of the pseudo-mask losses after the ramp"),
            "superpixels": Option(0, "SLIC superpixels for CAM refinement (0: off)"),
            "separate_classifier": Option(False, "a classifier of its own beside the U-Net instead of a shared encoder"),
            "pseudo_source": Option("snapshot", "CAMs for pseudo-masks: 'snapshot' (classifier frozen at warmup) or 'live'"),
            "snapshot_ema": Option(0.995, "weight average of the snapshot during warmup (0: a plain copy at warmup)"),
            "snapshot_refresh": Option(0.7, "progress at which the snapshot is re-copied from the classifier once (0: never)"),
        }),
    MethodSpec(
        "caml",
        Supervision(full_masks=True, sparse_masks=True, image_labels=True, unlabelled=True,
                    requires=("full", "sparse"), requires_all=("maskless",)),
        "Two different U-Nets teach each other on the images without a mask (sharpened "
        "pseudo-labels, attention across images, agreement of pixel similarities to annotated "
        "pixels); predicts with the first, their disagreement is the uncertainty.",
        {
            "sup_weight": Option(0.5, "weight of each sub-model's supervised losses"),
            "consistency": Option(1.0, "maximum weight of the sharpened cross pseudo-supervision"),
            "occ_weight": Option(0.05, "maximum weight of the omni-correlation consistency"),
            "rampup": Option(0.4, "fraction of training over which both weights ramp up (sigmoid)"),
            "skip_below": Option(0.05, "no unlabelled passes (and no cross-supervision or correlation loss) while the ramp is below this share of its maximum"),
            "temperature": Option(0.1, "sharpening temperature T of the cross pseudo-labels"),
            "detach_targets": Option(True, "sharpened and correlation targets are constants "
                                           "(false: gradients flow through them, as in the paper's code)"),
            "tau": Option(0.1, "temperature of the correlation softmax"),
            "occ_normalise": Option(False, "L2-normalise embeddings and bank entries (cosine "
                                           "similarity) instead of the paper's raw dot products"),
            "occ_topk": Option(512, "most confident agreeing unlabelled pixels per class in the correlation loss"),
            "bank_size": Option(256, "memory bank entries per class (background included)"),
            "bank_update": Option(64, "new bank entries per class per step (the oldest are overwritten)"),
            "cma_stride": Option(8, "stride of the encoder level with cross-sample attention "
                                    "(clamped to the bottleneck)"),
            "cma_heads": Option(4, "attention heads of the cross-sample attention"),
            "cma_dropout": Option(0.1, "dropout of the cross-sample attention layers"),
        }),
    MethodSpec(
        "crii",
        Supervision(full_masks=True, sparse_masks=True, image_labels=True, unlabelled=True,
                    requires=("full", "sparse"), requires_all=("maskless",)),
        "Masks plus images without one: learns from the unmasked images where its coarse and "
        "detailed predictions agree, and from the masks with ranking losses that sharpen lesion "
        "borders and faint lesions (CRII-Net, reconstructed from its abstract).",
        {
            "coarse_stride": Option(4, "decoder stride of the coarse prediction (a power of 2)"),
            "refine_width": Option(8, "hidden channels of the module refining the prediction with the coarse one"),
            "coarse_weight": Option(0.4, "weight of the coarse prediction's Dice+CE and of its consistency term"),
            "intra_weight": Option(0.2, "weight of the intra-patch (pixel, boundary) ranked loss"),
            "intra_margin": Option(0.5, "cosine margin of the intra-patch ranked loss"),
            "intra_patches": Option(32, "most boundary patches per step for the intra-patch loss"),
            "inter_weight": Option(0.2, "weight of the inter-patch (lesion vs background patch) ranked loss"),
            "inter_margin": Option(0.5, "cosine margin of the inter-patch ranked loss"),
            "inter_hard": Option(0.25, "share of the least separable patch pairs the inter-patch loss averages"),
            "patch_size": Option(16, "side of the patches of the ranked losses, in pixels (a multiple of coarse_stride)"),
            "min_pixels": Option(4, "labelled pixels a class needs in a patch to count"),
            "embed_dim": Option(16, "channels of the pixel and patch embeddings the ranked losses compare"),
            "ema_decay": Option(0.99, "teacher = decay * teacher + (1 - decay) * student"),
            "consistency": Option(1.0, "maximum weight of the consistency on images without a mask"),
            "rampup": Option(0.3, "fraction of training over which the consistency weight ramps up"),
            "skip_below": Option(0.05, "no unlabelled passes while the weight is below this share of its maximum"),
            "confidence": Option(0.9, "teacher probability for a pseudo-label pixel"),
            "stable": Option(True, "pseudo-labels only where the teacher's coarse and refined predictions agree"),
            "agreement": Option(1.0, "weight of the coarse-refined agreement of the student (times the ramped weight)"),
            "noise": Option(0.1, "std of the Gaussian input noise on the student's images"),
        }),
    MethodSpec(
        "mcwss",
        Supervision(full_masks=False, sparse_masks=False, image_labels=True, unlabelled=False,
                    requires=("image_label",)),
        "Image labels only (MCWSS): two-level class activation maps for each lesion class or "
        "image class, kept apart from each other and compared across images sharing a class, "
        "turned into pseudo-masks for the segmenter.",
        {
            "warmup": Option(0.4, "fraction of training before the segmenter starts (and the snapshot is taken)"),
            "cam_hi": Option(0.2, "CAM product (over its image maximum) above this: lesion"),
            "cam_lo": Option(0.05, "CAM product (over its image maximum) below this: background"),
            "cam_relative": Option(True, "pseudo-masks threshold the CAM product over its per-image maximum (false: the raw product)"),
            "seg_weight": Option(1.0, "weight of the pseudo-mask losses after the ramp"),
            "superpixels": Option(0, "SLIC superpixels for CAM refinement (0: off)"),
            "pseudo_source": Option("snapshot", "CAMs for pseudo-masks: 'snapshot' (network frozen at warmup) or 'live'"),
            "snapshot_ema": Option(0.995, "weight average of the snapshot during warmup (0: a plain copy at warmup)"),
            "snapshot_refresh": Option(0.7, "progress at which the snapshot is re-copied from the network once (0: never)"),
            "cam_weight": Option(1.0, "weight of the whole MCWSS CAM loss beside presence and segmentation"),
            "balance_cam": Option(True, "the CAM loss weighs positive and negative images like the classification ([p, 1-p]; false: equally, as the paper)"),
            "excl_weight": Option(0.2, "weight of the mutual-exclusion terms (erasure + overlap) in each branch"),
            "overlap_weight": Option(0.1, "weight of the overlap penalty within the exclusion terms"),
            "overlap_reward": Option(0.1, "weight of the union reward inside the overlap penalty"),
            "coatt_weight": Option(0.1, "weight of the co-attended branch's loss (0 with align_weight 0: no co-attention)"),
            "align_weight": Option(0.1, "weight of the alignment of original and co-attended CAMs"),
        }),
    MethodSpec(
        "dual_unet",
        Supervision(full_masks=True, sparse_masks=True, image_labels=True, unlabelled=False,
                    requires=("full", "sparse"), requires_all=("image_label",)),
        "SKS: a classifier first learns the image labels of every case, then a U-Net learns "
        "the masks with the classifier's features fused in at every level.",
        {
            "stage1": Option(0.1, "fraction of training spent on the classifier alone before the U-Net starts"),
            "freeze_classifier": Option(True, "the segmentation loss does not change the classifier (its features enter detached)"),
            "classifier_weight": Option(1.0, "weight of the classifier's own image-label loss after stage 1 (0 with freezing: fully frozen)"),
            "fuse_down": Option(True, "fused features also feed the next U-Net encoder level (false: only the decoder's skips)"),
        }),
    MethodSpec(
        "collaborative",
        Supervision(full_masks=True, sparse_masks=True, image_labels=True, unlabelled=False,
                    requires=("full", "sparse"), requires_all=("image_label",)),
        "A few masks plus image labels on many cases: a segmenter and a lesion-attentive grader "
        "teach each other; the grader's attention turns the segmenter's maps into pseudo-masks "
        "on the image-labelled cases, and a discriminator keeps those maps mask-like.",
        {
            "pretrain": Option(0.3, "fraction of the run in which the segmenter learns from the masks only (the grader learns beside it)"),
            "cycles": Option(7, "alternating cycles after pretraining, each a segmenter window then a grader window"),
            "segmenter_share": Option(0.5, "share of each cycle in which the segmenter learns from pseudo-masks (the rest trains the grader)"),
            "pseudo_weight": Option(0.5, "weight of the pseudo-mask losses (CE + Dice) after the ramp"),
            "pseudo_hi": Option(0.5, "refined map above this: lesion (for a class labelled present)"),
            "pseudo_lo": Option(0.1, "refined map below this for every class not known absent: background"),
            "pseudo_min_peak": Option(0.25, "a present class whose map peaks below this leaves the image unlabelled; weaker maps are not stretched"),
            "rampup": Option(0.2, "fraction of the run over which the pseudo-mask and adversarial weights ramp up after pretraining"),
            "attention": Option(True, "refine the segmenter's maps with the grader's attention (false: its maps alone)"),
            "adversarial": Option(True, "discriminator on image + lesion maps (masks real, segmenter's maps on image-labelled cases fake)"),
            "adv_weight": Option(0.01, "weight of the segmenter's adversarial term after the ramp"),
            "gate_on": Option("segmenter", "presence that gates predictions: 'segmenter' (its presence head, trained on every image label), 'grader', or 'both' (their mean)"),
        }),
)}


def available_methods(counts: dict[str, int], catalog: dict[str, MethodSpec] | None = None) -> list[str]:
    """Names of the methods whose ``requires`` is met by ``counts`` (sorted).

    Args:
        counts: number of cases per kind: keys "full", "sparse", "image_label", "unlabelled",
            "maskless" (see `Supervision.met_by`).
        catalog: the methods to choose from (default: `METHOD_CATALOG`).
    """
    specs = METHOD_CATALOG if catalog is None else catalog
    return sorted(n for n, spec in specs.items() if spec.supervision.met_by(counts))


__all__ = ["DEFAULT_BUDGET_S", "WINDOW_BUDGET_S", "DEVICES", "ModelConfig", "TrainConfig", "DATA_KINDS", "REQUIREMENT_KINDS", "KIND_WORDS", "Supervision", "Option",
           "MethodSpec", "COMMON_OPTIONS", "METHOD_CATALOG", "available_methods"]
