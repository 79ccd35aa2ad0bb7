"""The one shared training loop.

`run_training` is a generator of `events`: the CLI drains it in-process, `process.TrainerProcess`
runs it in a spawned process and forwards the events through a queue, the GUI maps them onto its
state. Methods only supply ``training_step`` / ``after_step`` / ``predict``; everything else (data,
optimiser, schedule, checkpoints, validation, rounds, cancelling, predictions) lives here.

Checkpoints (``P/models/<model_id>/step_000123.pt`` and ``latest.pt``, ``config.json`` beside)
hold tensors and plain Python values only, so they load with ``torch.load(..., weights_only=True)``.
They are written to a temporary file and moved into place with ``os.replace``: a run killed at any
moment leaves the previous checkpoint intact, and ``resume=True`` continues from it with the same
step count, learning-rate schedule and random streams.

Under ``torchrun`` the same loop runs in every process (`distributed`): rank 0 decides when to
stop, checkpoints, validates, predicts and reports; the gradients are averaged every step. The
events of rank 0 also go to ``P/runs/<model_id>/events.jsonl`` with a heartbeat and a stop
request the loop polls (`runs`), so a window can follow and stop a run started elsewhere.
"""
from __future__ import annotations

import json
import math
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from training_backend.learning import distributed

from training_backend.jobs import runs, trainlock
from training_backend.learning.data import Preprocessor, TrainingSet, build_training_set, project_channels
from training_backend.errors import InputError, LesionsegError, ProjectError
from training_backend.events import (CheckpointSaved, Event, Failed, Finished, InitFrom, Loss,
                                     PredictionProgress, PredictionsReady, PretrainedEncoder, Progress,
                                     RoundFinished, Started, Validation, ValidationFolded)
from training_backend.learning.checkpoints import (CHECKPOINT_FORMAT, latest_model_with_checkpoint, link_latest,
                                          load_checkpoint, model_dir, resolve_device, save_checkpoint)
from training_backend.config import DEFAULT_BUDGET_S, KIND_WORDS, TrainConfig  # noqa: F401  (re-exported)
from training_backend.project.atomic import atomic_write_json
from training_backend.project.records import now_iso
from training_backend.project.store import Project

#: Step checkpoints kept per model (plus ``latest.pt``).
KEEP_CHECKPOINTS = 3
#: Minimum seconds between two Progress/Loss events (the first and last step always report).
REPORT_EVERY_S = 0.5
#: Most seconds between two PredictionsReady events while predicting (the first case, and a
#: case on screen in a window showing the run, are announced at once).
PREDICTIONS_EVERY_S = 2.0


# ----------------------------------------------------------------------------- helpers
def lr_factor(step: int, fraction: float, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup_steps``, cosine decay to 0.05.

    Args:
        step: steps done so far.
        fraction: progress of the run in [0, 1] (steps or budget).
        warmup_steps: warm-up length.
    """
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    cos = 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, fraction))))
    return warm * cos


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _validate(method, ts: TrainingSet) -> tuple[float | None, dict[str, float | None]]:
    """Dice per class on the validation cases, pooled over all their pixels.

    A class absent from both the references and the predictions of every validation case has no
    Dice (None); the overall Dice is the mean of the classes that have one.
    """
    k = len(ts.classes)
    inter = torch.zeros(k, dtype=torch.float64)
    sums = torch.zeros(k, dtype=torch.float64)
    was_training = method.training
    method.eval()
    with torch.no_grad():
        for images, targets in ts.validation_batches():
            labels = method.predict(images).probs.argmax(1)  # (B, S, S), presence-gated
            valid = targets >= 0
            for c in range(1, k + 1):
                p = (labels == c) & valid
                t = targets == c
                inter[c - 1] += float((p & t).sum())
                sums[c - 1] += float(p.sum() + t.sum())
    method.train(was_training)
    per_class = {name: (None if sums[i] == 0 else float(2 * inter[i] / sums[i]))
                 for i, name in enumerate(ts.classes)}
    vals = [v for v in per_class.values() if v is not None]
    return (sum(vals) / len(vals) if vals else None), per_class


# ----------------------------------------------------------------------------- the loop
def run_training(project_path: str | os.PathLike, config: TrainConfig, resume: bool = False,
                 cancel: Callable[[], bool] | None = None) -> Iterator[Event]:
    """Train a model on a project, yielding events; the last one is `Finished` or `Failed`.

    Errors never escape as exceptions (except ``KeyboardInterrupt`` / ``GeneratorExit``): they end
    the stream with ``Failed(message, traceback, user_error)``; ``user_error`` is True for
    `LesionsegError` (bad project, bad option), whose message is one line for the user. Use
    `train` to get an exception instead.

    Args:
        project_path: the project folder.
        config: the run's settings. With ``resume=True`` the saved ``config.json`` of
            ``config.model_id`` (default: the newest model with a checkpoint) is used instead,
            except ``device``, ``threads`` and ``checkpoint_every_s``, which are taken from
            ``config``.
        resume: continue from ``latest.pt`` of that model (same step count, learning-rate
            schedule and random streams; a run killed mid-way ends at the requested total).
        cancel: polled every step; when it returns True the run stops gracefully (checkpoint,
            model registered, no predictions) with ``Finished(reason="cancelled")``. A stop
            request in the project (`runs.request_stop`) does the same.

    Under torchrun (``WORLD_SIZE`` > 1) only rank 0 yields the run's events; the other ranks
    yield their last event only (``Finished`` without a checkpoint, or ``Failed``).
    """
    threads = torch.get_num_threads()
    run = _Run(Path(project_path), config, resume, cancel)
    try:
        for event in run.events():
            yield from run.publish(event)
    except LesionsegError as exc:
        yield from run.publish(Failed(str(exc), traceback.format_exc(), user_error=True))
    except Exception as exc:  # noqa: BLE001 - reported as an event, see docstring
        yield from run.publish(Failed(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        run.close()
        torch.set_num_threads(threads)  # in-process callers keep their setting


def train(project_path: str | os.PathLike, config: TrainConfig, resume: bool = False,
          cancel: Callable[[], bool] | None = None,
          on_event: Callable[[Event], Any] | None = None) -> Finished:
    """Drain `run_training`; return its `Finished` event or raise on `Failed`.

    Args:
        project_path, config, resume, cancel: as for `run_training`.
        on_event: called with every event (e.g. to print progress).

    Raises:
        LesionsegError: a user error (one-line message).
        RuntimeError: any other failure (message and traceback).
    """
    return drain(run_training(project_path, config, resume=resume, cancel=cancel), "training",
                 on_event)


def stop_reason(step: int, total: int | None, elapsed: Callable[[], float],
                budget: float | None, cancel: Callable[[], bool]) -> str | None:
    """Why a loop stops before its next step (``"steps"``, ``"budget"``, ``"cancelled"``), or None.

    Args:
        step: steps done; total: the step count (None: none).
        elapsed: seconds of the budget spent so far; budget: the budget (None: none).
        cancel: whether a stop was asked for.
    """
    if total is not None and step >= total:
        return "steps"
    if budget is not None and elapsed() >= budget:
        return "budget"
    if cancel():
        return "cancelled"
    return None


def drain(events: Iterator[Event], what: str, on_event: Callable[[Event], Any] | None = None
          ) -> Finished:
    """Run an event stream (a training's, a pretraining's) to its end.

    Args:
        events: the stream; its last event is `Finished` or `Failed`.
        what: what it is, for the messages ("training").
        on_event: called with every event.

    Returns:
        The `Finished` event.

    Raises:
        LesionsegError: a user error (one-line message).
        RuntimeError: any other failure (message and traceback).
    """
    for event in events:
        if on_event is not None:
            on_event(event)
        if isinstance(event, Failed):
            if event.user_error:
                raise LesionsegError(event.message)
            raise RuntimeError(f"{what} failed: {event.message}\n{event.traceback}")
        if isinstance(event, Finished):
            return event
    raise RuntimeError(f"{what} ended without a Finished event")  # pragma: no cover


class _Run:
    """State of one run; `events` is the loop."""

    def __init__(self, project_path: Path, config: TrainConfig, resume: bool,
                 cancel: Callable[[], bool] | None):
        self.project_path = project_path
        self.given = config
        self.resume = resume
        self._cancel = cancel or (lambda: False)
        self.dist = distributed.DistContext()
        self.log: runs.RunWriter | None = None    # rank 0's run record in the project
        self.pretrained: PretrainedEncoder | None = None  # the pretrained encoder it started from
        self.init_event: InitFrom | None = None  # what it kept of the model it fine-tunes
        self.averager: distributed.GradientAverager | None = None

    def cancel(self) -> bool:
        """The caller's cancel flag or a stop request in the project (rank 0 decides)."""
        return bool(self._cancel() or (self.log is not None and self.log.stop_requested()))

    def publish(self, event: Event) -> Iterator[Event]:
        """Record ``event`` in the project's run log and pass it on (on rank 0; the other
        ranks pass on their last event only)."""
        if self.log is not None:
            self.log.write(event)
        elif isinstance(event, Failed) and self.dist.is_main \
                and os.environ.get("RANK", "0") in ("", "0"):  # failed before the record began
            runs.record_failure(self.project_path, self.given.model_id, event,
                                self.dist.world_size)
        if self.dist.is_main or isinstance(event, (Finished, Failed)):
            yield event

    def close(self) -> None:
        """End the run record (heartbeat removed) and leave the process group."""
        if self.log is not None:
            self.log.close()
        trainlock.release(getattr(self, "_train_lock", None))
        self._train_lock = None
        distributed.shutdown(self.dist)

    # ---- which model
    def _decide_model_id(self, project: Project) -> str:
        """The model this run trains (rank 0 decides; raises for an impossible choice)."""
        cfg = self.given
        if self.resume:
            mid = cfg.model_id or latest_model_with_checkpoint(project.path)
            if mid is None:
                raise ProjectError(f"{project.path}: no checkpoint to resume (train a model first)")
            mdir = model_dir(project.path, mid)
            if not (mdir / "latest.pt").is_file():
                raise ProjectError(f"{mdir}: no checkpoint to resume (latest.pt missing)")
            return mid
        if cfg.model_id is None:
            return runs.new_model_id(project.path, cfg.method)
        if (model_dir(project.path, cfg.model_id) / "latest.pt").exists():
            raise ProjectError(f"{model_dir(project.path, cfg.model_id)}: model already exists "
                               f"(use --resume to continue it, or another --model-id)")
        return cfg.model_id

    def _agreed_model_id(self, project: Project) -> str:
        """`_decide_model_id` on rank 0, sent to every rank (an error ends every rank)."""
        if not self.dist.enabled:
            return self._decide_model_id(project)
        decision: dict = {}
        if self.dist.is_main:
            try:
                decision = {"model_id": self._decide_model_id(project)}
            except LesionsegError as exc:
                decision = {"error": str(exc)}
        decision = distributed.broadcast_object(decision, self.dist)
        if "error" in decision:
            raise ProjectError(decision["error"])
        return decision["model_id"]

    # ---- set-up
    def _setup(self) -> None:
        from training_backend.learning.checkpoints import resolve_checkpoint
        from training_backend.learning.methods import METHODS, create_method

        ctx = distributed.env_context()
        self.device = resolve_device(distributed.device_name(self.given.device, ctx))
        self.dist = distributed.init(ctx, self.device)
        main = self.dist.is_main
        project = Project.open(self.project_path, mode="r+")
        self.project = project
        ckpt = None
        cfg = self.given
        mid = self._agreed_model_id(project)
        if main:
            # one run per project at a time (refused with a clear message); from here on,
            # what happens is recorded in the project
            self._train_lock = trainlock.acquire(project.path, mid)
            self.log = runs.RunWriter(project.path, mid, self.dist.world_size, self.resume)
        if self.resume:
            mdir = model_dir(project.path, mid)
            ckpt = load_checkpoint(mdir / "latest.pt")
            saved = ckpt["meta"]["config"]
            cfg_json = mdir / "config.json"
            if cfg_json.is_file():
                saved = json.loads(cfg_json.read_text(encoding="utf-8"))
            cfg = TrainConfig.from_dict({**saved, "device": self.given.device,
                                         "threads": self.given.threads,
                                         "checkpoint_every_s": self.given.checkpoint_every_s,
                                         "model_id": mid})
        else:
            cfg = TrainConfig.from_dict({**cfg.to_dict(), "model_id": mid})
        if cfg.method not in METHODS:
            create_method(cfg.method)  # raises the registry's error listing the valid names
        self.cfg = cfg
        self.model_id = cfg.model_id
        self.mdir = model_dir(project.path, self.model_id)
        torch.set_num_threads(int(cfg.threads or distributed.default_threads(self.dist)))
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

        method_cls = METHODS[cfg.method]
        self.supervision = method_cls.supervision
        init = None
        if ckpt is not None:
            channels = int(ckpt["meta"]["in_channels"])
        elif cfg.init_from:
            init_path = resolve_checkpoint(project, cfg.init_from)
            init = load_checkpoint(init_path)  # other classes: what fits is kept (below)
            channels = int(init["meta"]["in_channels"])
        else:
            channels = project_channels(project)
        self.channels = channels
        self.preprocessor = Preprocessor(cfg.image_size, channels)
        # validation cases join the training for the end of the run (TrainConfig.fold_validation)
        self.folded = bool(ckpt.get("folded", False)) if ckpt is not None else False
        saved_val = (ckpt.get("validation") if ckpt is not None else None) or {}
        self.val_dice = saved_val.get("dice")
        self.val_per_class = saved_val.get("per_class") or {}
        self.val_step = saved_val.get("step")
        self.ts = self._snapshot()
        self.n_val_scored = int(saved_val.get("n", 0)) if self.folded else self.ts.n_val
        self.val_round = saved_val.get("round")

        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.generator = torch.Generator().manual_seed(cfg.seed)
        k, n_img = len(project.classes), len(project.image_classes)
        self.method = create_method(cfg.method, in_channels=channels, n_classes=k,
                                    n_image_classes=n_img, model=cfg.model,
                                    **cfg.method_options).to(self.device)
        self.optimizer = torch.optim.AdamW(list(self.method.trainable_parameters()), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.step, self.elapsed0, self.round = 0, 0.0, 0
        if ckpt is not None:
            self.method.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.step = int(ckpt["step"])
            self.elapsed0 = float(ckpt["elapsed_s"])
            self.round = int(ckpt.get("round", 0))
            if main:  # other ranks' streams are re-derived below
                _set_rng_state(ckpt["rng"], self.generator, self.device)
        elif init is not None:
            own = self.method.state_dict()
            anew = self._class_specific_weights(init["meta"])
            usable = {k_: v for k_, v in init["model"].items()
                      if k_ in own and own[k_].shape == v.shape and k_ not in anew}
            if not usable:
                raise InputError(cfg.init_from, "no weights of this checkpoint fit the "
                                                f"{cfg.method!r} model")
            self.method.load_state_dict(usable, strict=False)
            self.method.start_new_run()
            self.init_event = self._init_event(init["meta"], len(usable), anew)
        else:  # a fresh run: the project's self-supervised encoder, when it fits (encoder_init)
            from training_backend.learning.encoder_init import start_from_pretrained

            self.pretrained = start_from_pretrained(project, self.method, cfg, channels)
        if self.dist.enabled:
            self._join_ranks()
        if main:
            self.mdir.mkdir(parents=True, exist_ok=True)
            for stale in self.mdir.glob(".*.tmp-*"):  # left by a run killed while saving
                stale.unlink(missing_ok=True)
            atomic_write_json(self.mdir / "config.json", cfg.to_dict())

    def _init_event(self, meta: dict, kept: int, anew: set[str]) -> InitFrom:
        """What the run keeps of the model it fine-tunes (``meta``: that model's), in one line
        when its classes are not the project's (the heads for them start anew)."""
        project = self.project
        name = str(meta.get("starter") or meta.get("model_id") or self.cfg.init_from)
        note = ""
        if anew:
            theirs, ours = list(meta.get("classes") or []), project.classes
            what = (f"lesion classes {', '.join(theirs) or '?'}, this project "
                    f"{', '.join(ours)}" if theirs != ours else
                    f"image classes {', '.join(meta.get('image_classes') or []) or '?'}, this "
                    f"project {', '.join(project.image_classes)}")
            note = (f"{name} has the {what}: its class heads start anew ({len(anew)} weight "
                    f"tensors); the other {kept} are kept")
        return InitFrom(name, kept, tuple(sorted(anew)), note)

    def _class_specific_weights(self, meta: dict) -> set[str]:
        """The weights whose meaning depends on the lesion (or image) classes, when those of
        the checkpoint being fine-tuned (``meta``) are not the project's: they start anew,
        the rest (encoder, decoder) is kept. Found by building the method with one class
        more and comparing shapes."""
        from training_backend.learning.methods import create_method

        project, cfg = self.project, self.cfg
        same = list(meta.get("classes") or []) == project.classes
        same_img = list(meta.get("image_classes") or []) == project.image_classes
        if same and same_img:
            return set()
        with torch.random.fork_rng(devices=[]):  # the run's random streams stay as they were
            probe = create_method(cfg.method, in_channels=self.channels,
                                  n_classes=len(project.classes) + (not same),
                                  n_image_classes=len(project.image_classes) + (not same_img),
                                  model=cfg.model, **cfg.method_options).state_dict()
        return {k for k, v in self.method.state_dict().items()
                if k not in probe or probe[k].shape != v.shape}

    def _join_ranks(self) -> None:
        """Rank 0's weights everywhere, a sampling stream of its own per rank (`distributed`)."""
        distributed.broadcast_module(self.method, self.dist)
        self.averager = distributed.GradientAverager(self.method.trainable_parameters(), self.dist)
        if not self.dist.is_main:
            seed = distributed.rank_seed(self.cfg.seed, self.dist.rank, self.step)
            self.generator.manual_seed(seed)
            torch.manual_seed(seed + 1)  # dropout and augmentation on the device

    def _snapshot(self) -> TrainingSet:
        """Re-read the store and rebuild the training tensors (cached preprocessing)."""
        self.project.refresh()
        ts = build_training_set(self.project, self.cfg.image_size, self.supervision,
                                channels=self.channels, seed=self.cfg.seed,
                                preprocessor=self.preprocessor, validation=not self.folded)
        counts = ts.counts
        if self.supervision.requires and not self.supervision.met_by(counts):
            need = self.supervision.needs()
            have = ", ".join(f"{v} {KIND_WORDS[k_]}" for k_, v in counts.items())
            raise ProjectError(f"{self.project.path}: method {self.cfg.method!r} needs {need} "
                               f"on training cases; the project has {have}")
        if ts.labelled.numel() == 0:
            raise ProjectError(f"{self.project.path}: no training case has supervision that method "
                               f"{self.cfg.method!r} can use")
        return ts.to(self.device)

    # ---- checkpoints
    def _meta(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "model_id": self.model_id, "method": self.cfg.method,
                "in_channels": self.channels, "n_classes": len(self.project.classes),
                "n_image_classes": len(self.project.image_classes),
                "classes": self.project.classes, "image_classes": self.project.image_classes,
                "image_size": self.cfg.image_size, "config": self.cfg.to_dict(),
                "world_size": self.dist.world_size,
                "project": str(self.project.path), "time": now_iso()}

    def _save(self, elapsed: float) -> Path:
        path = self.mdir / f"step_{self.step:06d}.pt"
        save_checkpoint(path, {"model": self.method.state_dict(),
                               "optimizer": self.optimizer.state_dict(),
                               "step": self.step, "elapsed_s": float(elapsed), "round": self.round,
                               "rng": _rng_state(self.generator, self.device),
                               "folded": self.folded,
                               "validation": {"dice": self.val_dice, "per_class": self.val_per_class,
                                              "step": self.val_step, "n": self.n_val_scored,
                                              "round": self.val_round},
                               "meta": self._meta()})
        link_latest(path)
        steps = sorted(self.mdir.glob("step_*.pt"))
        for old in steps[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)
        return path

    # ---- predictions
    def round_dice(self) -> float | None:
        """The validation Dice of the round ending now: None when it was measured in an earlier
        round (the validation cases were folded into training since), so a label-efficiency
        curve never pairs a Dice with an annotation count it was not measured at."""
        return self.val_dice if self.val_round == self.round else None

    def focus(self) -> list[str]:
        """The cases a window showing this run has on screen now (`runs.request_focus`)."""
        return self.log.focus() if self.log is not None else []

    def prediction_order(self) -> list[str]:
        """Every case: those on screen in a window showing the run (`focus`), then
        ``predict_first`` (those that exist), then the rest in order."""
        self.project.refresh()
        ids = self.project.case_ids()
        known = set(ids)
        first = list(dict.fromkeys(c for c in [*self.focus(), *self.cfg.predict_first]
                                   if c in known))
        chosen = set(first)
        return first + [c for c in ids if c not in chosen]

    def _predict(self) -> Iterator[Event]:
        from training_backend.learning.inference import iter_predictions

        order = self.prediction_order()
        pending: list[str] = []
        t0 = last = time.monotonic()
        for item in iter_predictions(self.project, self.method, order,
                                     image_size=self.cfg.image_size, channels=self.channels,
                                     mc_samples=self.cfg.mc_samples, device=self.device,
                                     model_id=self.model_id, cancel=self.cancel,
                                     first=self.focus):
            pending.append(item.case_id)
            now = time.monotonic()
            if (item.index == 1 or item.index == item.total or now - last >= PREDICTIONS_EVERY_S
                    or item.case_id in self.focus()):  # the case on screen: announced at once
                yield PredictionsReady(self.model_id, tuple(pending))
                yield PredictionProgress(item.index, item.total, now - t0)
                pending, last = [], now
        if pending:  # cancelled between two announcements
            yield PredictionsReady(self.model_id, tuple(pending))
        self.method.train()

    # ---- the loop
    def events(self) -> Iterator[Event]:
        self._setup()
        cfg, method, opt = self.cfg, self.method, self.optimizer
        total, budget = cfg.total_steps, cfg.budget
        warmup = min(50, max(1, (total or 500) // 10))
        unl_size = max(1, cfg.batch_size // 2) if self.supervision.unlabelled else 0
        main = self.dist.is_main
        yield Started(self.model_id, cfg.method, str(self.device), self.ts.n_train, self.ts.n_val,
                      total, budget, start_step=self.step, world_size=self.dist.world_size)
        if self.init_event is not None and main:
            yield self.init_event  # what it kept of the model it fine-tunes (class heads anew)
        if self.pretrained is not None and main:
            yield self.pretrained  # which encoders start from the pretrained one (or why none)

        t0 = time.monotonic()
        paused = 0.0  # seconds spent predicting between rounds (not training time)

        def elapsed() -> float:
            return self.elapsed0 + time.monotonic() - t0 - paused

        def fraction() -> float:
            f = []
            if total:
                f.append(self.step / total)
            if budget:
                f.append(elapsed() / budget)
            return min(1.0, max(f))

        acc: dict[str, torch.Tensor] = {}
        n_acc = 0
        last_report = last_ckpt = time.monotonic()
        last_val_step = -1
        reason = None
        first_step = True
        method.train()

        last_report_step = -1

        def validate() -> Iterator[Event]:
            nonlocal last_val_step
            self.val_dice, self.val_per_class = _validate(method, self.ts)
            self.val_step = last_val_step = self.step
            self.n_val_scored, self.val_round = self.ts.n_val, self.round
            yield Validation(self.step, self.val_dice, self.val_per_class)

        def report() -> Iterator[Event]:
            nonlocal acc, n_acc, last_report, last_report_step
            if n_acc:
                values = {k_: float(v) / n_acc for k_, v in acc.items()}  # one sync per report
                bad = [k_ for k_, v in values.items() if not math.isfinite(v)]
                if bad:
                    raise LesionsegError(f"{self.mdir}: loss became {values[bad[0]]} at step "
                                         f"{self.step} ({bad[0]}); try a lower learning rate")
                yield Loss(self.step, values)
            acc, n_acc = {}, 0
            yield Progress(self.step, total, elapsed(), fraction())
            last_report = time.monotonic()
            last_report_step = self.step

        while True:
            frac = 0.0
            if main:  # rank 0 decides for every rank (distributed.control)
                reason = reason or stop_reason(self.step, total, elapsed, budget, self.cancel)
                frac = fraction()
            reason, frac = distributed.control(self.dist, reason, frac, self.device)
            if reason:
                break
            # round boundary: re-snapshot the store (new annotations join the training)
            if cfg.rounds > 1 and self.round < cfg.rounds - 1 and frac >= (self.round + 1) / cfg.rounds:
                t_pause = time.monotonic()
                if main:  # the other ranks wait in the next step's control()
                    yield from report()
                    if self.ts.n_val and last_val_step != self.step:
                        yield from validate()
                    yield RoundFinished(self.round + 1, self.ts.n_annotated, self.round_dice())
                    t_pause = time.monotonic()
                    if cfg.predict:
                        yield from self._predict()
                self.round += 1
                self.ts = self._snapshot()
                paused += time.monotonic() - t_pause
                continue
            # the end of the run: the validation cases are trained on too (scored once before)
            if (not self.folded and cfg.fold_validation > 0 and self.ts.n_val
                    and frac >= 1.0 - cfg.fold_validation):
                if main and last_val_step != self.step:
                    yield from validate()
                n_val = self.ts.n_val
                self.folded = True
                self.ts = self._snapshot()
                yield ValidationFolded(self.step, n_val, self.val_dice)

            batch = self.ts.sample(cfg.batch_size, self.generator, unlabelled_size=unl_size,
                                   crop_size=cfg.crop_size)
            lr = cfg.lr * lr_factor(self.step, frac, warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            parts = method.training_step(batch, self.step, frac)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            if self.averager is not None:
                self.averager()  # the mean gradient of all ranks' batches
            opt.step()
            method.after_step(self.step, frac)
            self.step += 1
            for k_, v in parts.items():
                v = v.detach()
                acc[k_] = acc[k_] + v if k_ in acc else v
            n_acc += 1

            if not main:
                continue
            now = time.monotonic()
            if first_step or now - last_report >= REPORT_EVERY_S:
                first_step = False
                yield from report()
            if self.ts.n_val and self.step % cfg.validate_every == 0:
                yield from validate()
            if now - last_ckpt >= cfg.checkpoint_every_s:
                path = self._save(elapsed())
                last_ckpt = time.monotonic()
                yield CheckpointSaved(self.step, str(path))

        # ---- the end
        if not main:
            yield Finished(self.model_id, self.step, reason)
            return
        if n_acc or last_report_step != self.step:
            yield from report()
        if self.ts.n_val and last_val_step != self.step and reason != "cancelled":
            yield from validate()
        end_elapsed = elapsed()
        path = self._save(end_elapsed)
        yield CheckpointSaved(self.step, str(path))
        if reason != "cancelled":
            yield RoundFinished(self.round + 1, self.ts.n_annotated, self.round_dice())
            if cfg.predict:
                yield from self._predict()
        self.project.register_model(self.model_id, {
            "method": cfg.method, "step": self.step, "time": now_iso(),
            "checkpoint": str(path), "status": "cancelled" if reason == "cancelled" else "finished",
            "metrics": {"val_dice": self.val_dice, "per_class": self.val_per_class,
                        # measured at this step, on cases not trained on until then
                        "val_step": self.val_step, "val_folded": self.folded},
            "device": str(self.device),
            "n_train": self.ts.n_train, "n_val": self.n_val_scored,
            "n_annotations": self.ts.n_annotated, "elapsed_s": round(end_elapsed, 3),
            "image_size": cfg.image_size, "channels": self.channels, "config": cfg.to_dict(),
            "pretrained": None if not (self.pretrained and self.pretrained.networks) else {
                "source": self.pretrained.source, "networks": list(self.pretrained.networks),
                "steps": self.pretrained.steps, "images": self.pretrained.images},
        })
        yield Finished(self.model_id, self.step, reason, str(path))
