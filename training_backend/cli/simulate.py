"""``lesionseg simulate``: simulated annotation sessions (`training_backend.active.simulate`).

A progress bar with the time left goes to stderr (tqdm; a line per round when stderr is not a
terminal); Ctrl-C stops, and the same command continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training_backend.active.curves import COST_SOURCE, DEFAULT_COSTS_S

#: ``--cost`` names → kinds.
COST_NAMES = {"mask": "full", "scribble": "sparse", "label": "image_label",
              "full": "full", "sparse": "sparse", "image_label": "image_label"}
#: The defaults of the options `--quick` changes: (normal, quick).
PRESETS = {
    "method": ("supervised", "supervised"),
    "start": (10, 2),
    "step": (10, 2),
    "rounds": (8, 3),
    "seeds": (3, 2),
    "budget_s": (60.0, None),
    "steps": (None, 10),
    "image_size": (128, 64),
    "eval_fraction": (0.2, 0.3),
    "threads": (None, 1),  # tiny images: more threads only wait for each other
}
#: Training settings `--quick` adds (fewer MC-dropout passes, smaller batches).
QUICK_SETTINGS = {"mc_samples": 1, "batch_size": 4, "validate_every": 5}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` verb.

    Args:
        subparsers: the dispatcher's ``add_subparsers()`` object.
    """
    from training_backend.active.acquisition import DEFAULT_STRATEGY

    p = subparsers.add_parser(
        "simulate", help="simulated annotation sessions: does active learning save annotations?",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the real loop headless with a simulated annotator on a project whose "
        "masks/labels were imported as hidden reference (`lesionseg import ... --reference`): "
        "a cold-start set, then rounds of train -> rank -> reveal the chosen cases' reference "
        "-> evaluate on cases kept out of the pool. `random` always runs beside the given "
        "strategies, and a plain MONAI loop (the peer) trains on random's cases each round. "
        "The project itself is only read: everything happens in copies under --out. "
        "Writes OUT/results.{csv,json}, OUT/dice_vs_annotations.png, OUT/dice_vs_time.png and "
        "OUT/summary.{md,json}. Ctrl-C stops; the same command continues after the last "
        "completed round.",
        epilog="example:\n  lesionseg simulate --project busi --method mean_teacher --strategy bald "
        "--annotate mask --start 10 --step 10 --rounds 8 --seeds 3 --budget-s 60 --out results/\n"
        "  lesionseg simulate --quick --out quick/   # the bundled sample, about a minute")
    p.add_argument("--project", help="project with hidden reference annotations (only read)")
    p.add_argument("--out", required=True, help="results folder; rerun with it to continue")
    p.add_argument("--quick", action="store_true",
                   help="a short run on the bundled sample (unless --project): 2 seeds, 3 rounds "
                   "of 2 cases, 10 steps at 64 px on one thread; every option below still "
                   "applies")
    p.add_argument("--method", help="training method (default: supervised); see `lesionseg methods`")
    p.add_argument("--strategy", action="append", default=[], metavar="NAME",
                   help=f"acquisition strategy, repeatable (default: {DEFAULT_STRATEGY}); random "
                   "always runs too; see `lesionseg strategies`")
    p.add_argument("--annotate", choices=("mask", "scribble", "label"), default="mask",
                   help="what the simulated annotator gives a chosen case: its full reference mask "
                   "(default), synthetic scribbles drawn from it, or its image label")
    p.add_argument("--label-all", action="store_true",
                   help="first give every pool case its image label (\"label everything, mask a few\")")
    p.add_argument("--start", type=int, help="cold-start cases (default: 10)")
    p.add_argument("--start-mode", choices=("random", "diversity"), default="random",
                   help="cold start: random cases (default) or diverse ones (k-means on thumbnails)")
    p.add_argument("--step", type=int, help="cases revealed per round (default: 10)")
    p.add_argument("--rounds", type=int, help="rounds, the cold start included (default: 8)")
    p.add_argument("--seeds", type=int, help="runs per strategy, seeds 0..N-1 (default: 3)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--budget-s", type=float, metavar="S",
                        help="training per round, wall-clock seconds (default: 60)")
    length.add_argument("--steps", type=int, help="training per round, optimisation steps")
    tune = p.add_mutually_exclusive_group()
    tune.add_argument("--fine-tune", dest="fine_tune", action="store_true", default=True,
                      help="each round continues from the previous round's model (default: what "
                      "the window's loop does, and with the same budget per round a model that "
                      "keeps its weights learns the new cases instead of relearning the old)")
    tune.add_argument("--from-scratch", dest="fine_tune", action="store_false",
                      help="train each round from scratch")
    p.add_argument("--candidates", type=int, metavar="N",
                   help="each round, rank a seeded random subset of N unrevealed pool cases "
                   "(default: all); only they and the evaluation cases are predicted, which is "
                   "most of a round's time on a large project")
    costs = ", ".join(f"{k}={DEFAULT_COSTS_S[v]:g}" for k, v in
                      (("mask", "full"), ("scribble", "sparse"), ("label", "image_label")))
    p.add_argument("--cost", action="append", default=[], metavar="KIND=SECONDS",
                   help=f"annotation seconds per case, KIND mask|scribble|label (defaults {costs}: "
                   f"{COST_SOURCE})")
    p.add_argument("--eval-fraction", type=float,
                   help="share of each reference class kept out of the pool for evaluation when the "
                   "project has no holdout cases (default: 0.2)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of that split (default: 0)")
    p.add_argument("--no-peer", dest="peer", action="store_false",
                   help="do not train the peer (a plain MONAI loop on random's cases)")
    p.add_argument("--image-size", type=int, help="training image side (default: 128)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option (repeatable; VALUE parsed as JSON when possible)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                   help="training setting (a TrainConfig field, e.g. mc_samples=2, batch_size=16)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores; --quick: 1)")
    p.add_argument("--keep-projects", action="store_true",
                   help="keep each strategy's working project under OUT/work when it is done")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_simulate)


def _pairs(items: list[str], flag: str) -> dict:
    from training_backend.errors import InputError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(flag, f"{item!r} is not NAME=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_config(args: argparse.Namespace):
    """The `SimulationConfig` the parsed options describe (``--quick`` presets filled in)."""
    from training_backend.errors import InputError
    from training_backend.active.simulate import SimulationConfig

    quick = bool(args.quick)
    values = {k: (getattr(args, k) if getattr(args, k) is not None else pair[int(quick)])
              for k, pair in PRESETS.items()}
    if args.budget_s is not None:
        values["steps"] = None
    elif args.steps is not None:
        values["budget_s"] = None
    costs = {}
    for key, value in _pairs(args.cost, "--cost").items():
        if key not in COST_NAMES or not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InputError("--cost", f"{key}={value!r}: expected mask|scribble|label=SECONDS")
        costs[COST_NAMES[key]] = float(value)
    settings = {**(QUICK_SETTINGS if quick else {}), **_pairs(args.settings, "--set")}
    project = args.project
    if project is None and not quick:
        raise InputError("--project", "required (or --quick for the bundled sample)")
    if project is None:
        project = str(_quick_source(Path(args.out)))
    return SimulationConfig(
        out=args.out, project=project, strategies=args.strategy or [_default_strategy()],
        annotate=args.annotate, label_all=args.label_all, start_mode=args.start_mode,
        fine_tune=args.fine_tune, candidates=args.candidates, costs=costs, eval_seed=args.eval_seed, peer=args.peer,
        method_options=_pairs(args.option, "--option"), settings=settings, device=args.device,
        keep_projects=args.keep_projects, **values)


def _default_strategy() -> str:
    from training_backend.active.acquisition import DEFAULT_STRATEGY

    return DEFAULT_STRATEGY


def _quick_source(out: Path) -> Path:
    """The bundled sample with hidden references, made once under ``OUT/source``."""
    import shutil

    from training_backend.project.sample import create_sample_project
    from training_backend.project.store import Project

    src = out / "source"
    if not Project.is_project(src):
        tmp = out / "source.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        create_sample_project(tmp, reference=True, hide_labels=True)
        tmp.rename(src)
    return src


def _simulate(args: argparse.Namespace) -> int:
    from training_backend.learning.runtime import keep_freed_memory
    from training_backend.active.simulate import SimFinished, run_simulation

    config = build_config(args)
    keep_freed_memory()
    bar = _Bar()
    finished = None
    try:
        for event in run_simulation(config):
            bar.on_event(event)
            if isinstance(event, SimFinished):
                finished = event
    except KeyboardInterrupt:
        bar.close()
        print(f"lesionseg simulate: stopped; every completed round is saved in {config.out}: "
              "run the same command to continue", file=sys.stderr)
        return 130
    finally:
        bar.close()
    if args.json:
        print((Path(config.out) / "summary.json").read_text(encoding="utf-8"))
    else:
        print(finished.summary)
        print("files: " + ", ".join(finished.files))
    return 0


class _Bar:
    """tqdm bar of trainings done (ours and the peer's) on stderr; a line per round when stderr
    is not a terminal."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.bar = None

    def on_event(self, event) -> None:
        from training_backend.active.simulate import RoundDone, SimFinished, SimProgress, SimStarted

        if isinstance(event, SimStarted):
            self._line(f"simulating: {event.n_pool} pool cases, {event.n_eval} evaluation cases; "
                       f"{event.total} trainings, {event.done} done before")
            if self.tty:
                from tqdm import tqdm

                self.bar = tqdm(total=event.total, initial=event.done, unit="training",
                                file=sys.stderr, dynamic_ncols=True, smoothing=0.1,
                                bar_format="{l_bar}{bar}| {n:.1f}/{total} trainings "
                                "[{elapsed}<{remaining}] {postfix}")
        elif isinstance(event, SimProgress) and self.bar is not None:
            self.bar.n = event.done
            self.bar.set_postfix_str(event.what, refresh=False)
            self.bar.refresh()
        elif isinstance(event, RoundDone):
            r = event.row
            dice = "-" if r.get("dice") is None else f"{r['dice']:.3f}"
            self._line(f"{r['strategy']} seed {r['seed']} round {r['round']}: {r['annotations']} "
                       f"annotated, Dice {dice} ({r['wall_s']:.0f} s)")
            if self.bar is not None:
                self.bar.n = event.done
                self.bar.refresh()
        elif isinstance(event, SimFinished):
            self.close()

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
