"""``lesionseg train | predict | evaluate | methods``.

Training runs in this process (the same generator the GUI's trainer process runs) and shows a
progress bar on stderr; the first Ctrl-C stops it gracefully (checkpoint, model registered), a
second one aborts. ``--nproc N`` runs it in N processes through torchrun (`distributed`); under
torchrun only rank 0 prints. torch is imported only when a verb needs it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from typing import Iterator, TextIO


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train``, ``predict``, ``evaluate`` and ``methods`` verbs.

    Args:
        subparsers: the dispatcher's ``add_subparsers()`` object.
    """
    t = subparsers.add_parser(
        "train", help="train a model on a project (in this process)",
        description="Train a segmentation model on the project's annotations with the shared "
        "training loop; checkpoints go to PROJECT/models/<model id>/, predictions for all cases "
        "are written to the project at the end. Ctrl-C stops gracefully (with a checkpoint); "
        "--resume continues a stopped or killed run.")
    t.add_argument("--project", required=True, help="project folder")
    t.add_argument("--method", default="supervised", help="training method (default: supervised); "
                   "see `lesionseg methods`")
    t.add_argument("--steps", type=int, help="optimisation steps")
    t.add_argument("--budget-s", type=float, metavar="S",
                   help="wall-clock budget in seconds (default: 300 when --steps is not given; "
                   "with both, whichever ends first)")
    t.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:N, mps")
    t.add_argument("--resume", action="store_true",
                   help="continue the model's last checkpoint with its saved settings "
                   "(default model: the newest one)")
    t.add_argument("--model-id", help="model name (default: <method>-<date>-<time>)")
    t.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    t.add_argument("--image-size", type=int, default=128, help="training image side in pixels (default: 128)")
    t.add_argument("--crop-size", type=int, metavar="PX",
                   help="train on random crops of this side cut from the image-size images, half "
                        "of them centred on a lesion (for large images with small lesions; "
                        "prediction sees the whole image; default: whole images)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 0.001)")
    t.add_argument("--rounds", type=int, default=1,
                   help="re-read the project's annotations this many times during the run (default: 1)")
    t.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    t.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    t.add_argument("--base", type=int, help="network width: channels of the first level (default: 16)")
    t.add_argument("--mc-samples", type=int, default=4, help="MC-dropout samples for uncertainty (default: 4)")
    t.add_argument("--validate-every", type=int, default=50, help="steps between validations (default: 50)")
    t.add_argument("--fold-validation", type=float, metavar="FRACTION",
                   help="train on the validation cases too for this last fraction of the run, so "
                   "the final model learns from every mask (default: 0.25; 0: never); the "
                   "reported validation Dice is the one measured before they joined")
    t.add_argument("--checkpoint-every-s", type=float, default=60.0,
                   help="seconds between checkpoints (default: 60)")
    t.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (repeatable; VALUE parsed as JSON when possible)")
    t.add_argument("--init-from", metavar="CKPT", help="fine-tune from a checkpoint, model folder or model id")
    t.add_argument("--pretrained", default="auto", metavar="auto|none|PATH",
                   help="a fresh run's encoders start from the project's self-supervised "
                   "pretrained encoder (`lesionseg pretrain`): auto (default) when it was "
                   "pretrained at this image size and network, none never, or an encoder file")
    t.add_argument("--no-predict", action="store_true", help="do not write predictions at the end")
    t.add_argument("--predict-first", metavar="IDS",
                   help="comma-separated case ids predicted first after a round (the rest follow)")
    t.add_argument("--nproc", type=int, metavar="N",
                   help="train in N processes on this machine (one per GPU, or CPU processes) "
                   "through torchrun; each takes --batch-size images per step")
    t.set_defaults(func=_train)

    p = subparsers.add_parser(
        "predict", help="write predictions, CAMs, uncertainty and scores for a project's cases",
        description="Predict every case (or --cases) with a trained model and store the outputs "
        "in the project (what `rank` and the GUI read). The model may come from another project "
        "with the same lesion classes.")
    p.add_argument("--project", required=True, help="project folder")
    p.add_argument("--model", help="checkpoint file, model folder or model id "
                   "(default: the project's latest registered model)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--mc-samples", type=int, help="MC-dropout samples (default: the model's setting)")
    p.add_argument("--cases", help="comma-separated case ids or names (default: all cases)")
    p.add_argument("--working-size", type=int,
                   help="predict at this side (sliding window when above the training size)")
    p.set_defaults(func=_predict)

    e = subparsers.add_parser(
        "evaluate", help="score the stored predictions against the reference masks",
        description="Dice/IoU/HD95 per lesion class and image-level AUC of the latest stored "
        "predictions against the hidden reference annotations.")
    e.add_argument("--project", required=True, help="project folder")
    e.add_argument("--split", choices=("holdout", "train", "all"), default="all",
                   help="which cases to score (default: all with a reference)")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.set_defaults(func=_evaluate)

    m = subparsers.add_parser("methods", help="list the training methods",
                              description="List the training methods and what supervision each needs.")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=_methods)


# ----------------------------------------------------------------------------- train
def _parse_options(items: list[str]) -> dict:
    from training_backend.errors import InputError

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError("--option", f"{item!r} is not KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


class ProgressPrinter:
    """Renders training events as a one-line progress bar (a log line every 10 % when the
    stream is not a terminal).

    Args:
        stream: where to write (default: stderr).
        width: bar width in characters.
    """

    def __init__(self, stream: TextIO | None = None, width: int = 24):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.loss: float | None = None
        self.dice: float | None = None
        self._open_line = False
        self._last_decile = -1

    def _line(self, text: str) -> None:
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def __call__(self, event) -> None:
        from training_backend import events as ev

        if isinstance(event, ev.Started):
            length = (f"{event.total_steps} steps" if event.total_steps else "")
            if event.budget_s:
                length += (" or " if length else "") + f"{event.budget_s:g} s"
            resumed = f", resuming at step {event.start_step}" if event.start_step else ""
            device = (f"{event.world_size} processes ({event.device} on rank 0)"
                      if getattr(event, "world_size", 1) > 1 else event.device)
            self._line(f"training {event.model_id}: method {event.method} on {device}, "
                       f"{event.n_train} training / {event.n_val} validation cases, {length}{resumed}")
        elif isinstance(event, ev.Loss):
            self.loss = event.values.get("loss")
        elif isinstance(event, ev.Validation):
            self.dice = event.dice
        elif isinstance(event, ev.Progress):
            self._progress(event)
        elif isinstance(event, ev.ValidationFolded):
            dice = "-" if event.dice is None else f"{event.dice:.3f}"
            self._line(f"step {event.step}: validation dice {dice}; the {event.n_cases} validation "
                       f"cases are trained on from here")
        elif isinstance(event, ev.RoundFinished):
            dice = "-" if event.dice is None else f"{event.dice:.3f}"
            self._line(f"round {event.round} done: {event.n_annotations} labelled cases, dice {dice}")
        elif isinstance(event, ev.InitFrom):
            self._line(event.note or f"starts from {event.source} ({event.kept} weight tensors)")
        elif isinstance(event, ev.PretrainedEncoder):
            if event.networks:
                self._line(f"encoders {', '.join(event.networks)} start from the pretrained "
                           f"encoder ({event.steps} steps on {event.images} images)"
                           + (f"; {event.note}" if event.note else ""))
            else:
                self._line(f"pretrained encoder {event.note} ({event.source})")
        elif isinstance(event, ev.PredictionProgress) and event.done == event.total:
            self._line(f"predictions written for {event.total} cases in {event.elapsed_s:.0f} s")
        elif isinstance(event, (ev.Finished, ev.Failed)) and self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False

    def _progress(self, event) -> None:
        frac = max(0.0, min(1.0, event.fraction))
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        step = f"{event.step}/{event.total}" if event.total else str(event.step)
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        dice = "-" if self.dice is None else f"{self.dice:.3f}"
        text = (f"[{bar}] {frac * 100:5.1f}%  step {step}  loss {loss}  dice {dice}  "
                f"{event.elapsed_s:.0f}s")
        if self.tty:
            self.stream.write("\r" + text)
            self.stream.flush()
            self._open_line = True
        else:
            decile = int(frac * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                self._line(text)


@contextlib.contextmanager
def _graceful_interrupt(stream: TextIO | None) -> Iterator[threading.Event]:
    """First Ctrl-C sets the yielded event (stop after this step); a second one aborts.

    Args:
        stream: where to say so (None: say nothing).
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()
        if stream is not None:
            stream.write("\nstopping after this step (checkpoint); Ctrl-C again to abort\n")
            stream.flush()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def config_from_args(args: argparse.Namespace):
    """The `TrainConfig` that ``lesionseg train`` arguments describe.

    Args:
        args: the parsed ``train`` arguments.
    """
    from training_backend.config import ModelConfig, TrainConfig

    model = ModelConfig() if args.base is None else ModelConfig(base=args.base)
    first = [c.strip() for c in (args.predict_first or "").split(",") if c.strip()]
    return TrainConfig(
        method=args.method, method_options=_parse_options(args.option), model=model,
        steps=args.steps, budget_s=args.budget_s, batch_size=args.batch_size,
        image_size=args.image_size, crop_size=args.crop_size, lr=args.lr, device=args.device, threads=args.threads,
        seed=args.seed, rounds=args.rounds, checkpoint_every_s=args.checkpoint_every_s,
        validate_every=args.validate_every, predict=not args.no_predict,
        **({} if args.fold_validation is None else {"fold_validation": args.fold_validation}),
        mc_samples=args.mc_samples, init_from=args.init_from, model_id=args.model_id,
        predict_first=first, pretrained=args.pretrained)


def _launch(args: argparse.Namespace, config) -> int:
    """``--nproc N``: the run in N processes through torchrun; Ctrl-C becomes a stop request in
    the project (so the first one stops gracefully, as in one process)."""
    from dataclasses import replace

    from training_backend.jobs import runs
    from training_backend.learning.checkpoints import latest_model_with_checkpoint
    from training_backend.learning.distributed import launch
    from training_backend.jobs.launchers import train_args

    mid = config.model_id
    if mid is None:  # fixed here, so that a stop request can name it
        mid = (latest_model_with_checkpoint(args.project) if args.resume
               else runs.new_model_id(args.project, config.method))
        config = replace(config, model_id=mid)

    def stop() -> None:
        print("\nstopping after this step (checkpoint); Ctrl-C again to abort", file=sys.stderr)
        if mid is not None:
            runs.request_stop(args.project, mid, by="Ctrl-C")

    return launch(args.nproc, train_args(config, args.project, resume=args.resume), stop)


def _train(args: argparse.Namespace) -> int:
    from training_backend.errors import LesionsegError
    from training_backend.events import Failed, Finished

    config = config_from_args(args)  # bad options fail here, before any process starts
    if args.nproc is not None:
        return _launch(args, config)

    from training_backend.learning.distributed import env_context
    from training_backend.learning.runtime import keep_freed_memory
    from training_backend.learning.trainer import run_training

    keep_freed_memory()
    main = env_context().is_main  # under torchrun only rank 0 reports
    printer = ProgressPrinter(sys.stderr) if main else (lambda _event: None)
    with _graceful_interrupt(sys.stderr if main else None) as stop:
        for event in run_training(args.project, config, resume=args.resume, cancel=stop.is_set):
            printer(event)
            if isinstance(event, Failed):
                if not main:
                    return 1
                if event.user_error:
                    raise LesionsegError(event.message)
                print(event.traceback, file=sys.stderr)
                print(f"lesionseg train: failed: {event.message}", file=sys.stderr)
                return 1
            if isinstance(event, Finished):
                if main:
                    print(f"model {event.model_id} ({event.reason} at step {event.step}) "
                          f"checkpoint {event.checkpoint}")
                return 0
    return 1  # pragma: no cover - the stream always ends with Finished or Failed


# ----------------------------------------------------------------------------- predict
def _predict(args: argparse.Namespace) -> int:
    from training_backend.errors import InputError, ProjectError
    from training_backend.learning.inference import iter_predictions, resolve_checkpoint
    from training_backend.learning.runtime import keep_freed_memory
    from training_backend.project.store import Project

    keep_freed_memory()
    project = Project.open(args.project, mode="r+")
    ref = args.model
    if ref is None:
        latest = project.latest_model()
        if latest is None:
            raise ProjectError(f"{project.path}: no trained model yet (run `lesionseg train` "
                               "first, or give --model)")
        ref = latest[0]  # its folder in this project; the registered path if it moved
    ckpt = resolve_checkpoint(project, ref)
    case_ids = None
    if args.cases:
        case_ids = []
        for item in (s.strip() for s in args.cases.split(",") if s.strip()):
            if item in project.case_ids():
                case_ids.append(item)
            elif (rec := project.find(item)) is not None:
                case_ids.append(rec.id)
            else:
                raise InputError("--cases", f"no case {item!r} in {project.path}")
    tty = sys.stderr.isatty()
    n = 0
    t0 = time.monotonic()
    for item in iter_predictions(project, str(ckpt), case_ids, mc_samples=args.mc_samples,
                                 device=args.device, working_size=args.working_size):
        n = item.index
        msg = f"predicted {item.index}/{item.total} ({item.case_id})"
        if tty:
            sys.stderr.write("\r" + msg)
            sys.stderr.flush()
        elif item.index == item.total or item.index % 25 == 0:
            print(msg, file=sys.stderr)
    if tty and n:
        sys.stderr.write("\n")
    print(f"wrote predictions for {n} cases with {ckpt} in {time.monotonic() - t0:.1f} s")
    return 0


# ----------------------------------------------------------------------------- evaluate
def _evaluate(args: argparse.Namespace) -> int:
    from training_backend.learning.metrics import evaluate_project, summarise
    from training_backend.project.store import Project

    project = Project.open(args.project, mode="r")
    result = evaluate_project(project, split=None if args.split == "all" else args.split)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(summarise(result))
    return 0


# ----------------------------------------------------------------------------- methods
def _methods(args: argparse.Namespace) -> int:
    from training_backend.learning.methods import METHODS

    rows = []
    for name, cls in METHODS.items():
        sup = cls.supervision
        learns = [label for flag, label in ((sup.full_masks, "full masks"),
                                            (sup.sparse_masks, "sparse masks"),
                                            (sup.image_labels, "image labels"),
                                            (sup.unlabelled, "unlabelled images")) if flag]
        rows.append({"name": name, "requires": list(sup.requires),
                     "requires_all": list(sup.requires_all), "needs": sup.needs(),
                     "learns_from": learns, "description": cls.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [(r["name"], r["needs"] or "-", ", ".join(r["learns_from"]), r["description"])
             for r in rows]
    header = ("method", "needs", "learns from", "description")
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(3)]
    for row in [header, *table]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
    return 0
