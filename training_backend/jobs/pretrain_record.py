"""Where a project's pretrained encoder lives and what it says about itself (no torch).

``lesionseg pretrain`` (`training_backend.learning.pretrain`) writes ``P/models/_pretrained/``:

* ``encoder.pt`` — ``{"model": the encoder's state dict, "meta": ...}``: what a training starts
  from (`config.TrainConfig.pretrained`);
* ``state.pt`` — what a resumed pretraining needs: the whole masked-image model, the
  optimiser, the step, the seconds so far, the random streams and the image order;
* ``meta.json`` — the meta of ``encoder.pt`` as JSON, for readers without torch (the window).

Every file is replaced atomically. The folder is not a trained model: it is never registered in
``outputs.json`` (the model list and the label-efficiency curve do not show it), it has no
``latest.pt`` (``--resume`` and ``--init-from`` never pick it), and a model id cannot start with
an underscore.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from training_backend.config import ModelConfig, PretrainConfig

#: The folder under ``P/models/``.
PRETRAINED_ID = "_pretrained"
ENCODER_FILE = "encoder.pt"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
#: The `ModelConfig` fields that shape the encoder's weights.
ENCODER_FIELDS = ("base", "depth", "norm")


def pretrained_dir(project_path: str | os.PathLike) -> Path:
    """``P/models/_pretrained``.

    Args:
        project_path: the project folder.
    """
    return Path(project_path) / "models" / PRETRAINED_ID


def read_meta(project_path: str | os.PathLike) -> dict[str, Any] | None:
    """The pretrained encoder's meta (None when there is none, or it is unreadable).

    Keys: ``image_size``, ``channels``, ``model`` (`ModelConfig` dict), ``config``
    (`PretrainConfig` dict), ``images`` (images pretrained on), ``samples`` (images drawn in
    all), ``step``, ``elapsed_s``, ``loss`` (the last reported reconstruction loss), ``done``
    (the config's steps or budget were reached), ``time``.

    Args:
        project_path: the project folder.
    """
    try:
        meta = json.loads((pretrained_dir(project_path) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def encoder_settings(model: ModelConfig | dict) -> dict[str, Any]:
    """The settings of a network that shape its encoder's weights.

    Args:
        model: a `ModelConfig` or its dict form.
    """
    d = model.to_dict() if isinstance(model, ModelConfig) else ModelConfig.from_dict(model).to_dict()
    return {k: d[k] for k in ENCODER_FIELDS}


def mismatch(meta: dict[str, Any], image_size: int, model: ModelConfig | dict,
             channels: int | None = None, ours: str = "this run") -> str:
    """Why an encoder pretrained as ``meta`` says does not fit a network ("" when it fits).

    Args:
        meta: `read_meta`'s result (or the ``meta`` of ``encoder.pt``).
        image_size: the training's image side.
        model: the training's network.
        channels: the training's input channels (None: not compared).
        ours: what the training is called in the text (e.g. "this panel").
    """
    if int(meta.get("image_size", -1)) != int(image_size):
        return f"pretrained at {meta.get('image_size')} px, {ours} trains at {image_size} px"
    if channels is not None and int(meta.get("channels", -1)) != int(channels):
        return f"pretrained on {meta.get('channels')}-channel images, {ours} has {channels}"
    theirs, ours = encoder_settings(meta.get("model") or {}), encoder_settings(model)
    if theirs != ours:
        diff = ", ".join(f"{k} {theirs[k]} vs {ours[k]}" for k in ENCODER_FIELDS if theirs[k] != ours[k])
        return f"pretrained with another network ({diff})"
    return ""


def target_reached(meta: dict[str, Any] | None, config: PretrainConfig) -> bool:
    """Whether a pretraining at ``meta`` has done ``config``'s steps or budget (a resume would
    stop at once).

    Args:
        meta: `read_meta`'s result (None: nothing pretrained yet).
        config: the pretraining wanted.
    """
    if meta is None:
        return False
    if config.steps is not None and int(meta.get("step", 0)) >= int(config.steps):
        return True
    budget = config.budget
    return budget is not None and float(meta.get("elapsed_s", 0.0)) >= budget


def describe(meta: dict[str, Any] | None) -> str:
    """One line about the pretrained encoder, e.g. "pretrained encoder: 1200 steps on 437
    images (128 px), 600 s"."""
    if meta is None:
        return "no pretrained encoder yet"
    return (f"pretrained encoder: {meta.get('step', 0)} steps on {meta.get('images', 0)} images "
            f"({meta.get('image_size')} px), {float(meta.get('elapsed_s', 0.0)):.0f} s"
            + ("" if meta.get("done") else " so far"))


__all__ = ["PRETRAINED_ID", "ENCODER_FILE", "STATE_FILE", "META_FILE", "pretrained_dir",
           "read_meta", "encoder_settings", "mismatch", "target_reached", "describe"]
