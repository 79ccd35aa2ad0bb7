"""Starter models shipped with the package: useful before the first annotation.

Each starter lives in a folder of its own beside this file, named as the model is called
(``fundus-starter/``):

* ``model-<first 12 hex digits of its SHA-256>.pt`` — a checkpoint in the product's format
  (``{"model": state_dict, "meta": ...}``, loads with ``torch.load(..., weights_only=True)``),
  stripped of the optimiser and the other state only a resumed run needs;
* ``card.json`` — what the model is: name, description, lesion classes, channels, image size,
  method, the data and its licence, the command that made it, the date, steps, holdout scores,
  the model file's name (``model_file``) and SHA-256 (a model file that does not match its
  card is refused);
* ``MODEL_CARD.md`` — the same for people, generated from ``card.json``.

The card is the commit point of an install: `export_starter` writes the new model file beside
the old one, then the card naming it, then removes the other model files, so an install
killed at any moment leaves the old starter or the new one usable (readers take the file the
card names).

``lesionseg predict --model fundus-starter`` and ``lesionseg train --init-from fundus-starter``
find a starter by name (`checkpoints.resolve_checkpoint`, after the project's own model ids, so
a user's model of that name wins); ``lesionseg models`` lists them. This module reads the cards
with ``json`` and imports no torch (the window and the CLI's parser use it); only
`export_starter` loads and writes checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from training_backend.errors import InputError

#: Where the starter folders live (monkeypatched by tests).
STARTERS_DIR = Path(__file__).resolve().parent
#: The model file of a card without ``model_file`` (written before the files were named by
#: their hash).
MODEL_FILE = "model.pt"
#: The model files of a starter folder (`model_file_name`), besides the legacy `MODEL_FILE`.
MODEL_GLOB = "model-*.pt"
CARD_FILE = "card.json"
CARD_TEXT_FILE = "MODEL_CARD.md"
#: Card fields `export_starter` needs from its caller (the rest it reads from the checkpoint).
REQUIRED_CARD_FIELDS = ("description", "data", "licence", "command")
#: Settings of the run's ``TrainConfig`` that describe the machine it ran on or the project it
#: trained, not the model; cleared in a starter's ``meta["config"]``.
RUN_ONLY_SETTINGS = {"device": "auto", "threads": None, "init_from": None, "predict_first": [],
                     "pretrained": "none"}
REINSTALL = "reinstall napari-lesionseg (or rerun the script named in its card.json with --install)"


@dataclass(frozen=True)
class Starter:
    """One shipped starter model, as its card describes it.

    Args:
        name: the model's name (its folder's name).
        folder: its folder.
        card: the parsed ``card.json``.
    """

    name: str
    folder: Path
    card: dict

    @property
    def checkpoint(self) -> Path:
        """The model file its card names."""
        return self.folder / str(self.card.get("model_file") or MODEL_FILE)

    @property
    def installed(self) -> bool:
        """Its model file is there (a card without one is a broken install)."""
        return self.checkpoint.is_file()

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.card.get("classes") or []]

    @property
    def channels(self) -> int | None:
        value = self.card.get("channels")
        return None if value is None else int(value)

    @property
    def image_size(self) -> int | None:
        value = self.card.get("image_size")
        return None if value is None else int(value)

    @property
    def crop_size(self) -> int | None:
        value = self.card.get("crop_size")
        return None if value is None else int(value)

    @property
    def method(self) -> str | None:
        return self.card.get("method")

    @property
    def scores(self) -> dict:
        return dict(self.card.get("scores") or {})

    def fits(self, classes: Iterable[str]) -> bool:
        """It predicts exactly these lesion classes, in this order.

        Args:
            classes: a project's lesion classes.
        """
        return self.classes == list(classes)

    def score_text(self) -> str:
        """Its holdout Dice per class in one line (``-`` when the card has none)."""
        return score_text(self.scores)

    def summary(self) -> dict[str, Any]:
        """What ``lesionseg models --json`` prints for it."""
        return {"name": self.name, "kind": "starter", "installed": self.installed,
                "checkpoint": str(self.checkpoint), "classes": self.classes,
                "channels": self.channels, "image_size": self.image_size,
                "method": self.method, "description": self.card.get("description", ""),
                "data": self.card.get("data", ""), "licence": self.card.get("licence", ""),
                "date": self.card.get("date"), "steps": self.card.get("steps"),
                "scores": self.scores}


def score_text(scores: dict) -> str:
    """``"Dice MA 0.12 · HE 0.40 ..."`` from a card's ``scores`` (the per-class ``dice``).

    Args:
        scores: a card's ``scores`` mapping.
    """
    dice = scores.get("dice")
    if not isinstance(dice, dict) or not dice:
        return "-"
    parts = [f"{c} {'-' if v is None else f'{float(v):.2f}'}" for c, v in dice.items()]
    return "holdout Dice " + " · ".join(parts)


def _read_card(path: Path) -> dict:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"unreadable starter model card ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(card, dict) or not isinstance(card.get("classes"), list):
        raise InputError(path, "not a starter model card (no list of classes)")
    name = card.get("model_file")
    if name is not None and (not isinstance(name, str) or Path(name).name != name
                             or not name.endswith(".pt") or name.startswith(".")):
        raise InputError(path, f"not a starter model card (model_file {name!r} is not a file "
                               "name beside it)")
    return card


def model_file_name(sha256: str) -> str:
    """``model-<first 12 hex digits>.pt``: a starter's model file, named by its content.

    Args:
        sha256: the file's hex SHA-256.
    """
    return f"model-{sha256[:12]}.pt"


def starters(root: str | os.PathLike | None = None) -> dict[str, Starter]:
    """Every starter folder with a ``card.json``, by name (sorted).

    Args:
        root: the folder to look in (default: `STARTERS_DIR`).

    Raises:
        InputError: a card that cannot be read (naming the file).
    """
    base = Path(STARTERS_DIR if root is None else root)
    found: dict[str, Starter] = {}
    if not base.is_dir():
        return found
    for card in sorted(base.glob(f"*/{CARD_FILE}")):
        found[card.parent.name] = Starter(card.parent.name, card.parent, _read_card(card))
    return found


def find_starter(name: str) -> Starter | None:
    """The starter called ``name`` (None: there is none of that name).

    Args:
        name: a starter's name, e.g. ``"fundus-starter"``.
    """
    name = str(name)
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return None
    card = Path(STARTERS_DIR) / name / CARD_FILE
    return Starter(name, card.parent, _read_card(card)) if card.is_file() else None


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def starter_checkpoint(name: str) -> Path | None:
    """The model file of the starter ``name``; None when no starter has that name.

    Args:
        name: a starter's name.

    Raises:
        InputError: the starter exists but its model file is missing or does not match its
            card (a broken or interrupted install).
    """
    starter = find_starter(name)
    if starter is None:
        return None
    if not starter.installed:
        raise InputError(starter.checkpoint, f"starter model {name!r} is not installed (its "
                                             f"{starter.checkpoint.name} is missing): {REINSTALL}")
    expected = starter.card.get("model_sha256")
    if expected and file_sha256(starter.checkpoint) != expected:
        raise InputError(starter.checkpoint, f"starter model {name!r} does not match its "
                                             f"{CARD_FILE} (an interrupted install?): {REINSTALL}")
    return starter.checkpoint


def fitting_starters(classes: Iterable[str]) -> tuple[list[Starter], str]:
    """The installed starters that predict exactly ``classes``, and, when there is none, why.

    Args:
        classes: a project's lesion classes.

    Returns:
        (starters, reason): ``reason`` is "" when some fit, else one line for the user.
    """
    classes = list(classes)
    try:
        every = list(starters().values())
    except InputError as exc:
        return [], str(exc)
    fit = [s for s in every if s.fits(classes) and s.installed]
    if fit:
        return fit, ""
    if not every:
        return [], "no starter model is installed"
    broken = [s for s in every if s.fits(classes) and not s.installed]
    if broken:
        return [], (f"starter model {broken[0].name} is not installed (its "
                    f"{broken[0].checkpoint.name} is missing)")
    names = "; ".join(f"{s.name} predicts {', '.join(s.classes)}" for s in every)
    return [], f"no starter model predicts the classes {', '.join(classes)} ({names})"


# ----------------------------------------------------------------------------- writing
def export_starter(checkpoint: str | os.PathLike, dest_dir: str | os.PathLike, card: dict) -> Path:
    """Install a trained model as a starter: ``model-<sha12>.pt``, ``card.json``,
    ``MODEL_CARD.md``.

    The checkpoint is loaded safely (``weights_only=True``); only the weights and the model's
    description (``meta``: method, channels, classes, image size, network settings) are kept,
    so the file is small and holds no optimiser state and no path of the machine that made it.
    The card gets what the checkpoint says (classes, channels, image size, method) and the
    name and SHA-256 of the model file. Each file is written atomically, and the card is the
    commit point: the new model file is written beside the old one, then the card that names
    it, then ``MODEL_CARD.md``, and only then are the other model files removed. An install
    killed at any moment leaves the old starter or the new one usable, never neither.

    Args:
        checkpoint: a ``latest.pt`` / ``step_*.pt`` of a trained model.
        dest_dir: the starter's folder (created if missing); its name is the model's name.
        card: the card's fields (``description``, ``data``, ``licence``, ``command`` needed;
            ``scores``, ``steps``, ``date``, ``settings`` ... kept as given). ``classes`` and
            ``method``, when given, must be the checkpoint's.

    Returns:
        The path of the written model file.

    Raises:
        InputError: an unreadable checkpoint, a missing card field, or a card that contradicts
            the checkpoint.
    """
    from training_backend.project.atomic import (atomic_write_bytes, atomic_write_json,
                                                 atomic_write_text, remove_dead_temporaries)

    dest = Path(dest_dir)
    name = str(card.get("name") or dest.name)
    if name != dest.name:
        raise InputError(dest, f"the card names the model {name!r}; its folder must be called so")
    missing = [f for f in REQUIRED_CARD_FIELDS if not card.get(f)]
    if missing:
        raise InputError(dest / CARD_FILE, f"the card needs {', '.join(missing)}")
    ckpt = _load(Path(checkpoint))
    meta = _starter_meta(ckpt["meta"], name)
    for key, theirs in (("classes", meta["classes"]), ("method", meta["method"])):
        if key in card and card[key] != theirs:
            raise InputError(checkpoint, f"the card says {key} {card[key]!r}, the checkpoint "
                                         f"{theirs!r}")
    dest.mkdir(parents=True, exist_ok=True)
    remove_dead_temporaries(dest)  # left by an install that was killed
    data = _serialise({"model": ckpt["model"], "meta": meta})
    sha = hashlib.sha256(data).hexdigest()
    model_path = dest / model_file_name(sha)
    atomic_write_bytes(model_path, data)          # beside the old one: nothing replaced yet
    config = meta["config"]
    full = {**card, "name": name, "classes": list(meta["classes"]),
            "image_classes": list(meta.get("image_classes") or []),
            "channels": int(meta["in_channels"]), "image_size": int(meta["image_size"]),
            "crop_size": config.get("crop_size"), "method": meta["method"],
            "model": config.get("model"), "format": meta.get("format"),
            "model_file": model_path.name, "model_bytes": len(data), "model_sha256": sha}
    atomic_write_json(dest / CARD_FILE, full)     # the commit point: the new model from here
    atomic_write_text(dest / CARD_TEXT_FILE, model_card_text(full))
    for old in [*dest.glob(MODEL_GLOB), dest / MODEL_FILE]:
        if old.name != model_path.name:
            old.unlink(missing_ok=True)
    return model_path


def _load(path: Path) -> dict:
    """A trained model's checkpoint, read safely (``weights_only=True``), as
    `checkpoints.load_checkpoint` reads it (that module finds starters, so it is not imported
    here)."""
    import torch

    if not path.is_file():
        raise InputError(path, "no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem is a bad file
        raise InputError(path, "not a readable lesionseg checkpoint "
                               f"({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(
            ckpt.get("meta"), dict):
        raise InputError(path, "not a lesionseg checkpoint (no model/meta)")
    return ckpt


def _serialise(payload: dict) -> bytes:
    """``torch.save`` into memory (a starter is a few MB): its hash names the file."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _starter_meta(meta: dict, name: str) -> dict:
    """A checkpoint's ``meta`` as a starter keeps it: named after the starter, without the
    path of the project and the machine-specific settings of the run that made it."""
    out = {k: v for k, v in meta.items() if k not in ("project", "world_size", "time")}
    config = dict(out.get("config") or {})
    config.update(RUN_ONLY_SETTINGS, model_id=name)
    out.update(model_id=name, starter=name, config=config)
    return out


def model_card_text(card: dict) -> str:
    """The human-readable model card (Markdown) of a starter, from its ``card.json`` fields.

    Args:
        card: the full card (as `export_starter` writes it).
    """
    classes = ", ".join(card.get("classes") or [])
    lines = [f"# {card.get('name', 'starter model')}", "", str(card.get("description", "")), "",
             "| | |", "|---|---|",
             f"| lesion classes | {classes} |",
             f"| input | {card.get('channels')} channel(s), resized to "
             f"{card.get('image_size')} px |",
             f"| method | `{card.get('method')}` |",
             f"| training steps | {card.get('steps', '-')} |",
             f"| date | {card.get('date', '-')} |",
             f"| model file | `{card.get('model_file', MODEL_FILE)}` "
             f"({card.get('model_bytes', '?')} bytes, SHA-256 `{card.get('model_sha256', '?')}`) |", "",
             "## Data and licence", "", str(card.get("data", "")), "", str(card.get("licence", "")),
             "", "## How it was made", "", "```bash", str(card.get("command", "")), "```", ""]
    if card.get("settings"):
        lines += ["Settings: " + ", ".join(f"{k} {v}" for k, v in card["settings"].items()), ""]
    lines += ["## Holdout scores", "", *_scores_markdown(card.get("scores") or {}), "",
              "## Use", "", "```bash",
              f"lesionseg predict --project P --model {card.get('name')}",
              f"lesionseg train --project P --init-from {card.get('name')}{_scale_args(card)}",
              "```", "",
              "It predicts these lesion classes only, on images like the ones it was trained "
              "on. On other images (another camera, field of view, resolution or population) "
              "its scores above do not apply: check its predictions on your own cases, or "
              "fine-tune it on a few of your annotations (`--init-from`).", ""]
    return "\n".join(lines)


def _scale_args(card: dict) -> str:
    """`` --image-size N [--crop-size M]``: fine-tune at the scale the model was trained at."""
    size = f" --image-size {card['image_size']}" if card.get("image_size") else ""
    return size + (f" --crop-size {card['crop_size']}" if card.get("crop_size") else "")


def _scores_markdown(scores: dict) -> list[str]:
    """Per-class scores as a table (one column per score), the other scores as a list."""
    if not scores:
        return ["(none recorded)"]
    per_class = {k: v for k, v in scores.items() if isinstance(v, dict)}
    other = {k: v for k, v in scores.items() if not isinstance(v, dict)}
    lines: list[str] = []
    if per_class:
        classes = list(dict.fromkeys(c for v in per_class.values() for c in v))
        lines += ["| class | " + " | ".join(per_class) + " |",
                  "|---|" + "---|" * len(per_class)]
        for c in classes:
            cells = [_cell(v.get(c)) for v in per_class.values()]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"- {k}: {_cell(v)}" for k, v in other.items()]
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


__all__ = ["STARTERS_DIR", "MODEL_FILE", "MODEL_GLOB", "model_file_name", "CARD_FILE",
           "CARD_TEXT_FILE", "Starter", "starters", "find_starter", "starter_checkpoint", "fitting_starters", "export_starter",
           "model_card_text", "score_text", "file_sha256"]
