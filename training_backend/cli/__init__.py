"""The ``lesionseg`` command line.

Each group of verbs lives in its own module exposing ``register(subparsers)``; every
verb's parser carries ``func`` (called with the parsed ``argparse.Namespace``, returns an
exit code). argparse lives here and in those modules only.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from training_backend.errors import LesionsegError

#: Modules that contribute verbs, in help order.
VERB_MODULES = (
    "training_backend.cli.data",   # import, export, info, sample
    "training_backend.cli.train",  # train, predict, evaluate, methods
    "training_backend.cli.models",  # models (starters and a project's)
    "training_backend.cli.pretrain",  # pretrain
    "training_backend.cli.rank",   # rank, strategies
    "training_backend.cli.simulate",  # simulate
)


def _gui(args: argparse.Namespace) -> int:
    # Imported by name so that importing training_backend never pulls in napari/Qt.
    missing = [m for m in ("napari", "qtpy") if importlib.util.find_spec(m) is None]
    if missing:
        raise LesionsegError(f"the napari window needs {' and '.join(missing)}: install "
                             "napari-lesionseg[gui] (the headless verbs work without it)")
    launch = importlib.import_module("napari_lesionseg._launch").launch
    return launch(project=args.project)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesionseg",
        description="Label-efficient lesion segmentation: project store, training, "
        "active learning and export (headless); `lesionseg gui` opens napari.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    parser.set_defaults(_verbs=sub.choices)  # verb -> its parser, for errors in the verb's terms
    sub.required = True
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    gui = sub.add_parser("gui", help="open the napari workspace (optionally on a project)")
    gui.add_argument("--project", help="project folder to open")
    gui.set_defaults(func=_gui)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # argparse would report these with the top-level usage; the verb's own usage and
        # options are what the user needs to see
        args._verbs[args.verb].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except LesionsegError as exc:
        print(f"lesionseg {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lesionseg {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `lesionseg info --json | head`: the reader left; say nothing more, exit quietly.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
