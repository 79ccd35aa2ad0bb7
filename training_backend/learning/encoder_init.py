"""A fresh training run starts its U-Net encoders from the project's pretrained encoder.

`start_from_pretrained` is what the trainer calls at the start of a fresh run (not a resume, not
``init_from``), following `TrainConfig.pretrained`: ``"auto"`` takes
``P/models/_pretrained/encoder.pt`` (`lesionseg pretrain`, `training_backend.learning.pretrain`)
when it was pretrained at the run's image size, on images of its channel count and with its
encoder settings; ``"none"`` never; a path names an encoder file (used when its weights fit,
whatever size it was pretrained at).

Every `models.Encoder` inside the method gets the weights (``load_encoder_into``): that is the
U-Net of `supervised` and `collaborative`, the student and the EMA teacher of `mean_teacher` and
`crii`, the U-Net and its CAM snapshot of `cam` (and its own classifier with
``separate_classifier``) and `mcwss`, the fused U-Net and the classifier of `dual_unet`, both
U-Nets of `caml` (the second's cross-sample attention keeps its own initialisation). Networks without a U-Net encoder (the grader and the
discriminator of `collaborative`) keep theirs.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor, nn

from training_backend.config import TrainConfig
from training_backend.errors import InputError
from training_backend.events import PretrainedEncoder
from training_backend.jobs.pretrain_record import ENCODER_FILE, mismatch, pretrained_dir
from training_backend.learning.checkpoints import load_checkpoint
from training_backend.learning.models import Encoder

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.project.store import Project

#: ``meta["kind"]`` of an encoder file written by the pretraining.
ENCODER_KIND = "masked-image-model encoder"


def encoder_modules(module: nn.Module) -> list[tuple[str, Encoder]]:
    """Every U-Net `Encoder` inside ``module``, by its dotted name (e.g. ``teacher.encoder``).

    Args:
        module: a method (or any network).
    """
    return [(name, m) for name, m in module.named_modules() if isinstance(m, Encoder)]


def load_encoder_into(module: nn.Module, state: dict[str, Tensor]) -> list[str]:
    """Copy encoder weights (and batch-norm statistics) into every `Encoder` of ``module`` whose
    tensors have their shapes; a subclass's own extra layers keep their weights.

    Args:
        module: a method (or any network).
        state: an `Encoder`'s state dict.

    Returns:
        The names of the encoders that got the weights.
    """
    loaded = []
    for name, enc in encoder_modules(module):
        own = enc.state_dict()
        if not state or any(k not in own or own[k].shape != v.shape for k, v in state.items()):
            continue
        enc.load_state_dict(state, strict=False)  # missing keys: e.g. caml's attention layers
        loaded.append(name)
    return loaded


def _encoder_path(choice: str, project: Project) -> tuple[Path | None, bool]:
    """The encoder file a ``pretrained`` setting names (None: nothing to load) and whether the
    user named it."""
    if choice == "none":
        return None, False
    if choice == "auto":
        path = pretrained_dir(project.path) / ENCODER_FILE
        return (path if path.is_file() else None), False
    path = Path(choice).expanduser()
    return (path / ENCODER_FILE if path.is_dir() else path), True


def start_from_pretrained(project: Project, method: nn.Module, config: TrainConfig,
                          channels: int) -> PretrainedEncoder | None:
    """Load the pretrained encoder ``config.pretrained`` asks for into ``method``'s encoders.

    Args:
        project: the project trained on.
        method: the freshly built method.
        config: the run's settings (``pretrained``, ``image_size``, ``model``).
        channels: the run's input channels.

    Returns:
        The event to report (which encoders got it, or why none did); None when there is no
        pretrained encoder to consider ("none", or "auto" without one).

    Raises:
        InputError: a named file (not "auto") that is unreadable, is not a pretrained encoder
            or fits no encoder of the method (one line). Under "auto" such a file is not used
            and the event says why (``note`` "not used: unreadable (...)").
    """
    path, named = _encoder_path(config.pretrained.strip(), project)
    if path is None:
        return None
    try:
        ckpt = load_checkpoint(path)
        meta = ckpt["meta"] if isinstance(ckpt.get("meta"), dict) else {}
        if meta.get("kind") != ENCODER_KIND:
            raise InputError(path, "not a pretrained encoder (`lesionseg pretrain` writes "
                                   "PROJECT/models/_pretrained/encoder.pt)")
    except InputError as exc:
        if named:
            raise
        # "auto" is a convenience: a damaged file must not stop every fresh training
        return PretrainedEncoder(str(path), (), 0, 0, note=f"not used: {_unusable(exc)}")
    steps, images = int(meta.get("step", 0)), int(meta.get("images", 0))
    why = mismatch(meta, config.image_size, config.model, channels)
    if why and not named:
        return PretrainedEncoder(str(path), (), steps, images, note=f"not used: {why}")
    loaded = load_encoder_into(method, ckpt["model"])
    if not loaded:
        if named:
            raise InputError(path, f"its weights fit no encoder of method {config.method!r} ({why or 'other shapes'})")
        return PretrainedEncoder(str(path), (), steps, images, note="not used: its weights fit "
                                                                   "no encoder of this method")
    return PretrainedEncoder(str(path), tuple(loaded), steps, images, note=why)


def _unusable(exc: InputError) -> str:
    """Why an encoder file cannot be used, in one line without its path (the event names
    it)."""
    text = exc.problem
    return text if text.startswith("not a pretrained encoder") else f"unreadable ({text})"


__all__ = ["ENCODER_KIND", "encoder_modules", "load_encoder_into", "start_from_pretrained"]
