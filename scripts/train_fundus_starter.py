"""Train the ``fundus-starter`` model: fundus lesions (MA, HE, EX, SE) from the IDRiD photographs.

Anyone with the shared IDRiD copy can rerun it; it uses nothing but the product (its importer,
its trainer, its predictor), so the model it ships is one the product itself can make:

    .venv/bin/python scripts/train_fundus_starter.py [--data ../shared/data/idrid_1024]
        [--steps 1600] [--image-size 512] [--crop-size 256] [--batch-size 8]
        [--out bench_out/fundus_starter] [--resume] [--install]

1. imports ``labels.csv`` into ``<out>/project`` (lesion masks as full annotations, the per-class
   presence flags; the 62 IDRiD_NAR_* photographs, which have no lesion mask, as lesion-free);
2. keeps 20 % of the cases (stratified by "any lesion", seed 0: the same cases as
   ``benchmarks/bench_idrid.py``) as a holdout the trainer never reads;
3. trains the ``supervised`` method on the rest by steps (so the result does not depend on how
   busy the machine is) on random crops of the ``image_size`` images, half of them centred on a
   lesion (`TrainConfig.crop_size`); ``--resume`` continues a stopped run;
4. scores the holdout from the product's predictions at the photographs' own size: per lesion
   class the mean Dice over the holdout images that hold it, the Dice of all their pixels pooled,
   the presence AUC, and the share of lesion-free photographs predicted empty
   (``<out>/scores-<model id>.json``);
5. with ``--install``, writes the model, its card (data, command, scores) and the model card text
   into the package (`training_backend.learning.starters`), where ``--model fundus-starter`` and
   ``--init-from fundus-starter`` find it.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_backend.project.store import Project  # noqa: E402

CLASSES = ("MA", "HE", "EX", "SE")
CLASS_NAMES = {"MA": "microaneurysms", "HE": "haemorrhages", "EX": "hard exudates",
               "SE": "soft exudates"}
HOLDOUT_FRACTION = 0.2
MODEL_ID = "fundus-starter"


def build_project(data: Path, path: Path) -> Project:
    """Import the IDRiD copy (once) and mark the stratified holdout."""
    from training_backend.project.importer import import_csv

    if Project.is_project(path):
        return Project.open(path)
    partial = path.with_name(path.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    project = Project.create(partial, list(CLASSES), [], name="IDRiD fundus lesions")
    report = import_csv(project, data / "labels.csv",
                        mask_cols=[(f"{c}_mask", c) for c in CLASSES],
                        presence_cols=[(f"{c}_present", c) for c in CLASSES],
                        empty_as_background=True)
    print(f"imported {len(report.imported)} IDRiD cases ({len(report.skipped)} skipped)", flush=True)
    for row, file, problem in report.skipped:
        print(f"  skipped row {row}: {file}: {problem}", flush=True)
    project = Project.open(partial)
    rng = np.random.default_rng(0)
    groups: dict[bool, list[str]] = {}
    for rec in project.cases():
        groups.setdefault(any(v == 1 for v in project.presence_target(rec)), []).append(rec.id)
    hold: list[str] = []
    for key in sorted(groups):
        ids = sorted(groups[key])
        rng.shuffle(ids)
        hold += ids[:int(round(len(ids) * HOLDOUT_FRACTION))]
    project.set_split(hold, "holdout")
    partial.rename(path)
    return Project.open(path)


def train(project: Project, args: argparse.Namespace) -> int:
    """Train by steps, printing progress with an ETA; returns the last step."""
    from training_backend.learning.trainer import TrainConfig, run_training

    cfg = TrainConfig(method="supervised", steps=args.steps, image_size=args.image_size,
                      crop_size=args.crop_size, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, predict=False, model_id=args.model_id, validate_every=100,
                      checkpoint_every_s=120.0, threads=args.threads, init_from=args.init_from)
    t0, first = time.monotonic(), None
    for ev in run_training(project.path, cfg, resume=args.resume):
        name = type(ev).__name__
        if name == "Started":
            first = ev.start_step
            print(f"training: {ev.n_train} cases, {ev.n_val} validation, steps "
                  f"{ev.start_step}→{ev.total_steps}", flush=True)
        elif name == "Progress" and ev.step % 25 == 0 and first is not None:
            done = ev.step - first
            rate = (time.monotonic() - t0) / max(done, 1)
            eta = rate * (args.steps - ev.step)
            print(f"  step {ev.step}/{args.steps}  {rate:.2f} s/step  ETA {eta / 60:.1f} min",
                  flush=True)
        elif name in ("Validation", "ValidationFolded"):
            print(f"  {ev}", flush=True)
        elif name == "Failed":
            raise SystemExit(f"training failed: {ev.message}")
        elif name == "Finished":
            print(f"finished: {ev}", flush=True)
            return int(ev.step)
    raise SystemExit("training ended without a Finished event")


def run_totals(project: Project, model_id: str) -> tuple[int, float]:
    """Steps and training seconds of a model, counting the models it was fine-tuned from."""
    models = project.models()
    info = models.get(model_id) or {}
    steps, seconds = int(info.get("step") or 0), float(info.get("elapsed_s") or 0.0)
    parent = (info.get("config") or {}).get("init_from")
    if parent and parent in models and parent != model_id:
        more = run_totals(project, parent)
        steps, seconds = steps + more[0], seconds + more[1]
    return steps, round(seconds, 1)


def score(project: Project, model_id: str) -> dict:
    """Holdout scores of the trained model, from the product's predictions at full size."""
    from training_backend.learning.inference import load_model, predict_image
    from training_backend.learning.metrics import binary_auc

    method, cfg = load_model(project.path / "models" / model_id / "latest.pt")
    method = method.inference_copy()
    per_image = {c: [] for c in CLASSES}
    pooled = {c: [0, 0, 0] for c in CLASSES}  # intersection, predicted, reference pixels
    presence = {c: [] for c in CLASSES}
    empty = []
    for rec in project.cases():
        if rec.split != "holdout":
            continue
        ref = project.read_annotation(rec.id)[0]
        out = predict_image(method, project.read_image(rec.id), method.in_channels, cfg.image_size,
                            cfg.mc_samples, "cpu")
        for k, c in enumerate(CLASSES):
            p, r = out["pred"] == k + 1, ref == k + 1
            inter, n_p, n_r = int((p & r).sum()), int(p.sum()), int(r.sum())
            presence[c].append((float(out["scores"]["presence"][k]), n_r > 0))
            if n_r:
                per_image[c].append(2 * inter / (n_p + n_r))
                for i, v in enumerate((inter, n_p, n_r)):
                    pooled[c][i] += v
        if not np.any(ref > 0):
            empty.append(not np.any(out["pred"] > 0))
    return {
        "dice": {c: (round(float(np.mean(v)), 4) if v else None) for c, v in per_image.items()},
        "dice_pooled": {c: (round(2 * i / (p + r), 4) if r else None)
                        for c, (i, p, r) in pooled.items()},
        "images_with_class": {c: len(v) for c, v in per_image.items()},
        "presence_auc": {c: binary_auc([s for s, _ in v], [t for _, t in v]) for c, v in presence.items()},
        "lesion_free_empty": round(float(np.mean(empty)), 4) if empty else None,
        "lesion_free_images": len(empty),
        "holdout_images": sum(1 for r in project.cases() if r.split == "holdout"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "idrid_1024"))
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "fundus_starter"))
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--crop-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--resume", action="store_true", help="continue a stopped run")
    ap.add_argument("--model-id", default=MODEL_ID, help=f"model folder (default {MODEL_ID})")
    ap.add_argument("--init-from", metavar="MODEL",
                    help="fine-tune from this model of the project (a second, continuing run)")
    ap.add_argument("--before", metavar="COMMAND", action="append", default=[],
                    help="with --install: a command that made the --init-from model (for the card)")
    ap.add_argument("--score-only", action="store_true", help="score the trained model again")
    ap.add_argument("--install", action="store_true",
                    help="install the model and its card into the package")
    ap.add_argument("--install-only", action="store_true",
                    help="install with the scores of the last scoring (no training, no scoring)")
    args = ap.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if not (data / "labels.csv").is_file():
        print(f"train_fundus_starter: {data / 'labels.csv'} not found: the IDRiD copy is needed.",
              file=sys.stderr)
        return 2
    from training_backend.learning.runtime import keep_freed_memory

    keep_freed_memory()
    out.mkdir(parents=True, exist_ok=True)
    project = build_project(data, out / "project")
    saved = out / f"scores-{args.model_id}.json"
    if args.install_only:  # the scores of the last scoring, no new prediction
        if not saved.is_file():
            print(f"train_fundus_starter: {saved} not found: score the model first", file=sys.stderr)
            return 2
        install(project, json.loads(saved.read_text()), argv if argv is not None else sys.argv[1:],
                args.before)
        return 0
    if not args.score_only:
        train(project, args)
    steps, train_s = run_totals(project, args.model_id)
    scores = score(project, args.model_id)
    result = {"scores": scores, "steps": steps, "train_wall_s": train_s,  # over every run
              "settings": {k: getattr(args, k) for k in ("steps", "image_size", "crop_size",
                                                           "batch_size", "lr", "seed")},
              "init_from": args.init_from, "model_id": args.model_id,
              "date": time.strftime("%Y-%m-%d")}
    saved.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2), flush=True)
    if args.install:
        install(project, result, argv if argv is not None else sys.argv[1:], args.before)
    return 0


def install(project: Project, result: dict, argv: list[str], before: list[str]) -> None:
    """Write the model and its card into the package (``before``: the commands that made the
    model this run fine-tuned, in order)."""
    from training_backend.learning.starters import STARTERS_DIR, export_starter

    skip = {"--install", "--score-only", "--install-only"}
    own, i = [], 0
    while i < len(argv):  # this run's command without --install and the --before texts
        if argv[i] == "--before":
            i += 2
            continue
        if argv[i] not in skip:
            own.append(shlex.quote(argv[i]))
        i += 1
    command = " && ".join([*before, " ".join([".venv/bin/python scripts/train_fundus_starter.py",
                                              *own])])
    train_cases = [r for r in project.cases() if r.split != "holdout"]
    n_all, n_train = len(project.cases()), len(train_cases)
    n_lesion = sum(1 for r in train_cases if any(v == 1 for v in project.presence_target(r)))
    card = {
        "name": MODEL_ID,
        "description": "Fundus lesions in colour fundus photographs: " + ", ".join(
            f"{c} ({CLASS_NAMES[c]})" for c in CLASSES) + ".",
        "classes": list(CLASSES),
        "method": "supervised",
        "data": ("IDRiD segmentation set (Porwal et al., Data 3(3):25, 2018; CC BY 4.0), a "
                 f"1024x1024 JPEG copy: {n_train} of its {n_all} photographs ({n_lesion} with "
                 f"lesion masks, {n_train - n_lesion} without lesions); the other "
                 f"{n_all - n_train} held out for the scores"),
        "licence": "weights derived from IDRiD, CC BY 4.0: attribution in NOTICE",
        "command": command,
        "scores": result["scores"],
        "steps": result["steps"],
        "train_wall_s": result["train_wall_s"],
        "settings": result["settings"],
        "date": result["date"],
    }
    dest = STARTERS_DIR / MODEL_ID
    export_starter(project.path / "models" / result["model_id"] / "latest.pt", dest, card)
    print(f"installed {dest}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
