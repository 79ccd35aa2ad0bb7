"""``lesionseg rank`` and ``lesionseg strategies``: active learning from the command line."""
from __future__ import annotations

import argparse
import json

from training_backend.active import acquisition


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``rank`` and ``strategies`` verbs.

    Args:
        subparsers: the dispatcher's ``add_subparsers()`` object.
    """
    p = subparsers.add_parser(
        "rank", help="propose the cases to annotate next (active learning)",
        description="Rank the cases without a full annotation (holdout cases excluded) by a "
        "strategy over the scores and features stored by the last `train`/`predict`. Cases "
        "without a prediction come after the scored ones.")
    p.add_argument("--project", required=True, help="project folder")
    p.add_argument("--strategy", default=acquisition.DEFAULT_STRATEGY, metavar="NAME",
                   help=f"acquisition strategy (default: {acquisition.DEFAULT_STRATEGY}, the one that saved "
                   "the most masks in simulated BUSI sessions); see `lesionseg strategies`")
    p.add_argument("-k", type=int, default=10, help="how many cases to propose (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed for random choices (default: 0)")
    p.add_argument("--include-annotated", action="store_true",
                   help="also rank fully annotated cases")
    p.add_argument("--duplicate-threshold", type=float, default=None, metavar="COS",
                   help="score strategies: skip a case whose feature cosine similarity to an "
                   f"already proposed one is above COS (default: "
                   f"{acquisition.DEFAULT_DUPLICATE_THRESHOLD}; 1 disables)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_rank)

    s = subparsers.add_parser("strategies", help="list the acquisition strategies",
                              description="List the strategies `lesionseg rank` accepts.")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(func=_strategies)


def _rank(args: argparse.Namespace) -> int:
    from training_backend.project.store import Project  # the store (zarr) only when needed

    options = {}
    if args.duplicate_threshold is not None:
        options["duplicate_threshold"] = args.duplicate_threshold
    strategy = acquisition.create_strategy(args.strategy, **options)
    project = Project.open(args.project, mode="r")
    ranked = acquisition.rank(project, strategy, k=args.k,
                              include_annotated=args.include_annotated, seed=args.seed)
    if args.json:
        doc = {"project": str(project.path), "strategy": strategy.name, "k": args.k,
               "seed": args.seed, "include_annotated": args.include_annotated,
               "ranked": [{"rank": i, **r.as_dict()} for i, r in enumerate(ranked, 1)]}
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return 0
    if not ranked:
        print("no candidates: every case is fully annotated or in the holdout split"
              + ("" if args.include_annotated else " (see --include-annotated)"))
        return 0
    rows = [(str(i), r.name, "-" if r.score is None else f"{r.score:.4g}", r.reason)
            for i, r in enumerate(ranked, 1)]
    print(_table(("rank", "case", "score", "reason"), rows, right=(0, 2)))
    return 0


def _strategies(args: argparse.Namespace) -> int:
    strategies = list(acquisition.STRATEGIES.values())
    if args.json:
        print(json.dumps([{"name": s.name, "description": s.description, "needs": list(s.needs),
                           "options": s.option_values} for s in strategies], indent=2))
        return 0
    rows = [(s.name, ", ".join(s.needs) or "-", s.description) for s in strategies]
    print(_table(("strategy", "needs", "description"), rows))
    return 0


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> str:
    """Plain-text columns; the last column is not padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row[:-1], widths))]
        return "  ".join([*cells, row[-1]])

    return "\n".join(line(r) for r in [header, *rows])
