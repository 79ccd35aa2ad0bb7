"""Per-lesion-class segmentation on the shared IDRiD fundus set, under one CPU wall budget per run.

Four lesion classes (MA microaneurysms, HE haemorrhages, EX hard exudates, SE soft exudates; the
optic disc is left out), an image-level "present" flag per class from the set's table, and fundus
images without lesions (their reference is all background). The same run names as
``bench_busi.py``: ``<m><p>[b]`` (masks on p % of the training cases; ``b``: presence flags on
every training case) with m in sup, mt, caml, crii, dual, collab, and ``mcwss`` / ``cam``
(presence flags only, no masks). Each run reports on the holdout cases (20 %, stratified by
"any lesion") the Dice of each lesion class over the holdout images that hold it, the
presence AUC of each class, and the share of lesion-free images predicted empty.

    .venv/bin/python benchmarks/bench_idrid.py [--runs sup100,sup10b,collab10b,mcwss]
        [--budget-s 300] [--seeds 0] [--image-size 256] [--data ../shared/data/idrid_1024]
        [--out bench_out/idrid] [-o NAME=VALUE ...] [--set NAME=VALUE ...] [--tag NAME]

Microaneurysms are a few pixels wide at 1024 px: at the default working size of 256 px they
are one or two pixels, so their Dice stays low for every method. It needs
../shared/data/idrid_1024 (not shipped); without it, it says so and exits 0. Results are
appended to ``<out>/results.jsonl`` and printed as a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_busi import _value, parse_run, scenario_project, train_ours  # noqa: E402
from training_backend.project.store import Project  # noqa: E402

CLASSES = ("MA", "HE", "EX", "SE")
HOLDOUT_FRACTION = 0.2


def base_project(data: Path, out: Path) -> Path:
    """Import IDRiD once, masks and presence flags as hidden reference; cached in ``out/base``."""
    from training_backend.project.importer import import_csv

    base = out / "base"
    if Project.is_project(base):
        return base
    tmp = out / "base.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    project = Project.create(tmp, list(CLASSES), [])
    report = import_csv(project, data / "labels.csv",
                        mask_cols=[(f"{c}_mask", c) for c in CLASSES],
                        presence_cols=[(f"{c}_present", c) for c in CLASSES],
                        reference=True, hide_labels=True, empty_as_background=True)
    print(f"imported {len(report.imported)} IDRiD cases ({len(report.skipped)} skipped)", flush=True)
    project = Project.open(tmp)
    rng = np.random.default_rng(0)
    groups: dict[bool, list[str]] = {}
    for rec in project.cases():
        groups.setdefault(any((rec.reference_presence or {}).values()), []).append(rec.id)
    hold = []
    for key in sorted(groups):
        ids = sorted(groups[key])
        rng.shuffle(ids)
        hold += ids[:int(round(len(ids) * HOLDOUT_FRACTION))]
    project.set_split(hold, "holdout")
    os.rename(tmp, base)
    return base


def reveal_presence(project: Project, rec) -> None:
    """Give a case its reference presence flags (one per lesion class)."""
    project.set_image_label(rec.id, None, presence=dict(rec.reference_presence or {}),
                            author="simulated")


def score(project_path: Path, model_id: str) -> dict:
    """Per-class holdout Dice (images holding the class), presence AUC, lesion-free empty rate."""
    from training_backend.learning.inference import load_model, predict_image
    from training_backend.learning.metrics import binary_auc, case_metrics

    project = Project.open(project_path)
    method, cfg = load_model(project.path / "models" / model_id / "latest.pt")
    method = method.inference_copy()
    dice = {c: [] for c in CLASSES}
    pres = {c: [] for c in CLASSES}
    empty = []
    for rec in project.cases():
        if rec.split != "holdout":
            continue
        ref = project.read_reference(rec.id)
        out = predict_image(method, project.read_image(rec.id), method.in_channels,
                            cfg.image_size, cfg.mc_samples, "cpu")
        m = case_metrics(out["pred"], ref, len(CLASSES))
        for k, c in enumerate(CLASSES):
            present = bool(np.any(ref == k + 1))
            pres[c].append((out["scores"]["presence"][k], present))
            if present:
                dice[c].append(m["dice"][k])
        if not np.any(ref > 0):
            empty.append(not np.any(out["pred"] > 0))
    return {"dice": {c: (float(np.mean(v)) if v else None) for c, v in dice.items()},
            "n": {c: len(v) for c, v in dice.items()},
            "auc": {c: binary_auc([s for s, _ in v], [t for _, t in v]) for c, v in pres.items()},
            "empty_rate": float(np.mean(empty)) if empty else None, "n_lesion_free": len(empty)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "idrid_1024"))
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "idrid"))
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--runs", default="sup100,sup10b,collab10b,mcwss")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--tag", default="")
    ap.add_argument("-o", "--option", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings")
    args = ap.parse_args()
    options = dict(kv.split("=", 1) for kv in args.option)
    settings = {"image_size": args.image_size,
                **{k: _value(v) for k, v in (kv.split("=", 1) for kv in args.settings)}}
    data, out = Path(args.data), Path(args.out)
    from training_backend.learning.runtime import keep_freed_memory

    keep_freed_memory()
    if not (data / "labels.csv").is_file():
        print(f"bench_idrid: {data}/labels.csv not found: the shared IDRiD set is needed; skipping.")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    base = base_project(data, out)
    rows = []
    for run in args.runs.split(","):
        parsed = parse_run(run)
        if parsed is None:
            raise SystemExit(f"bench_idrid: unknown run {run!r}")
        for seed in (int(v) for v in args.seeds.split(",")):
            print(f"== {run} seed {seed} {args.tag} ({args.budget_s:.0f} s)", flush=True)
            path = scenario_project(base, out, run, reveal_label=reveal_presence)
            t = time.perf_counter()
            steps = train_ours(path, parsed[0], args.budget_s, method_options=options, seed=seed,
                               **settings)
            res = score(path, parsed[0])
            row = {"run": run, "tag": args.tag, "seed": seed, "budget_s": args.budget_s,
                   "steps": steps, "wall_s": round(time.perf_counter() - t, 1), **res,
                   **({"options": options} if options else {}), "settings": settings,
                   "time": time.strftime("%Y-%m-%d %H:%M")}
            rows.append(row)
            with open(out / "results.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print("\n| run | seed | steps | " + " | ".join(f"Dice {c}" for c in CLASSES) + " | "
          + " | ".join(f"AUC {c}" for c in CLASSES) + " | lesion-free empty |")
    print("|---" * (4 + 2 * len(CLASSES)) + "|")
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for r in rows:
        print(f"| {r['run']}{' ' + r['tag'] if r['tag'] else ''} | {r['seed']} | {r['steps']} | "
              + " | ".join(fmt(r["dice"][c]) for c in CLASSES) + " | "
              + " | ".join(fmt(r["auc"][c]) for c in CLASSES) + f" | {fmt(r['empty_rate'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
