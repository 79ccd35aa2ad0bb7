"""``lesionseg pretrain``: self-supervised pretraining of the encoder on the project's images.

Runs in this process with a progress bar on stderr (as ``lesionseg train``); the first Ctrl-C
stops it gracefully (checkpoint), a second one aborts; ``--resume`` continues it. torch is
imported only when the verb runs.
"""
from __future__ import annotations

import argparse
import sys

from training_backend.cli.train import ProgressPrinter, _graceful_interrupt


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` verb.

    Args:
        subparsers: the dispatcher's ``add_subparsers()`` object.
    """
    p = subparsers.add_parser(
        "pretrain", help="pretrain the encoder on the project's images, without labels",
        description="Self-supervised pretraining (masked image modelling) of the U-Net encoder "
        "on every image of the project outside the holdout split. It writes "
        "PROJECT/models/_pretrained/; every later training of the same image size and network "
        "starts its encoders from it (`lesionseg train --pretrained auto`, the default). "
        "Ctrl-C stops gracefully (with a checkpoint); --resume continues.")
    p.add_argument("--project", required=True, help="project folder")
    p.add_argument("--steps", type=int, help="optimisation steps in all")
    p.add_argument("--budget-s", type=float, metavar="S",
                   help="wall-clock seconds in all (default: 600 when --steps is not given; with "
                   "both, whichever ends first); with --resume, a new total for every attempt")
    p.add_argument("--image-size", type=int, default=128,
                   help="image side in pixels: train at the same size (default: 128)")
    p.add_argument("--base", type=int, help="network width, as for `lesionseg train` (default: 16)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step (default: 16)")
    p.add_argument("--mask-ratio", type=float, default=0.6,
                   help="share of the patches hidden from the network (default: 0.6)")
    p.add_argument("--patch-size", type=int, default=16,
                   help="side of a hidden patch in pixels (default: 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 0.001)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--checkpoint-every-s", type=float, default=30.0,
                   help="seconds between checkpoints (default: 30)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the project's pretraining with its saved settings")
    again.add_argument("--restart", action="store_true",
                       help="start over, replacing the project's pretrained encoder")
    p.set_defaults(func=_pretrain)


def config_from_args(args: argparse.Namespace):
    """The `PretrainConfig` that ``lesionseg pretrain`` arguments describe.

    Args:
        args: the parsed ``pretrain`` arguments.
    """
    from training_backend.config import ModelConfig, PretrainConfig

    model = ModelConfig() if args.base is None else ModelConfig(base=args.base)
    return PretrainConfig(model=model, image_size=args.image_size, steps=args.steps,
                          budget_s=args.budget_s, batch_size=args.batch_size,
                          mask_ratio=args.mask_ratio, patch_size=args.patch_size, lr=args.lr,
                          device=args.device, threads=args.threads, seed=args.seed,
                          checkpoint_every_s=args.checkpoint_every_s)


class PretrainPrinter(ProgressPrinter):
    """`ProgressPrinter` with the pretraining's own first line and no Dice."""

    def __call__(self, event) -> None:
        from training_backend import events as ev

        if isinstance(event, ev.Started):
            length = f"{event.total_steps} steps" if event.total_steps else ""
            if event.budget_s:
                length += (" or " if length else "") + f"{event.budget_s:g} s"
            resumed = f", resuming at step {event.start_step}" if event.start_step else ""
            self._line(f"pretraining the encoder on {event.device}: {event.n_train} images "
                       f"(holdout left out), {length}{resumed}")
            return
        super().__call__(event)

    def _progress(self, event) -> None:
        frac = max(0.0, min(1.0, event.fraction))
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        step = f"{event.step}/{event.total}" if event.total else str(event.step)
        loss = "-" if self.loss is None else f"{self.loss:.4f}"
        left = (f"  about {event.elapsed_s / frac * (1 - frac):.0f}s left"
                if 0.02 <= frac < 1 else "")
        text = (f"[{bar}] {frac * 100:5.1f}%  step {step}  reconstruction loss {loss}  "
                f"{event.elapsed_s:.0f}s{left}")
        if self.tty:
            self.stream.write("\r" + text)
            self.stream.flush()
            self._open_line = True
        else:
            decile = int(frac * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                self._line(text)


def _pretrain(args: argparse.Namespace) -> int:
    from training_backend.errors import LesionsegError, ProjectError
    from training_backend.events import Failed, Finished
    from training_backend.jobs.pretrain_record import STATE_FILE, describe, pretrained_dir, read_meta

    config = config_from_args(args)  # bad settings fail here, before torch is imported
    if not args.resume and not args.restart and (pretrained_dir(args.project) / STATE_FILE).is_file():
        raise ProjectError(f"{pretrained_dir(args.project)}: the project has a "
                           f"{describe(read_meta(args.project))}; --resume continues it, "
                           "--restart replaces it")
    from training_backend.learning.pretrain import run_pretraining
    from training_backend.learning.runtime import keep_freed_memory

    keep_freed_memory()
    printer = PretrainPrinter(sys.stderr)
    with _graceful_interrupt(sys.stderr) as stop:
        for event in run_pretraining(args.project, config, resume=args.resume, cancel=stop.is_set):
            printer(event)
            if isinstance(event, Failed):
                if event.user_error:
                    raise LesionsegError(event.message)
                print(event.traceback, file=sys.stderr)
                print(f"lesionseg pretrain: failed: {event.message}", file=sys.stderr)
                return 1
            if isinstance(event, Finished):
                print(f"{describe(read_meta(args.project))} ({event.reason}): {event.checkpoint}")
                return 0
    return 1  # pragma: no cover - the stream always ends with Finished or Failed
