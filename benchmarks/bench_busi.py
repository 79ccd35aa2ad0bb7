"""Label efficiency on the shared BUSI breast-ultrasound set, under one CPU wall budget per run.

Runs, each for the same wall-clock budget (default 300 s) on the same train/holdout split:

  baseline   plain MONAI BasicUNet (16-16-32-64-128, DiceCE, Adam 1e-3, batch 16, 128 px,
             flips), all masks, in a bare torch loop (the bar to beat; `training_backend.learning.peer`,
             the same peer as `lesionseg simulate`'s)
  <m><p>     method <m> with full masks on <p> % of the training cases (the 5 % are a subset of
             the 10 %), image labels on those cases only, every other case unlabelled;
  <m><p>b    the same masks plus an image label (normal/benign/malignant) on every training case;
             <m>: sup (`supervised`), mt (`mean_teacher`), caml, crii, dual (`dual_unet`),
             collab (`collaborative`); e.g. sup100 (all masks), sup10, mt10b, caml5b
  cam        `cam`: image labels only, no masks at all
  mcwss      `mcwss`: image labels only, no masks at all

and reports, on the holdout cases (never trained on): mean Dice, IoU and HD95 over lesion cases,
and the share of normal (lesion-free) images whose predicted mask is empty; the image-level
AUC of lesion presence (the presence probability against "has a lesion"), the one-vs-rest AUC
of the image-class head (normal/benign/malignant, averaged over the classes); and the share of
holdout lesion images whose CAM peak falls inside the lesion. Our models are
predicted as the product predicts (flip TTA + MC dropout, the method's own gate); beside that,
from the same ungated predictions, what the other gating rules would give (`gate_presence`:
presence head alone; `ungated`). Each run can be repeated over ``--seeds`` (training seed; the
split stays the same) and the table gives mean ± half the range.

    .venv/bin/python benchmarks/bench_busi.py [--budget-s 300] [--runs baseline,sup100,...]
                                              [--seeds 0,1,2] [--tag NAME]
                                              [--data ../shared/data/busi] [--out bench_out/busi]
                                              [--lr LR] [-o NAME=VALUE ...] [--set NAME=VALUE ...]

``-o`` passes a method option, ``--set`` a training setting (a `TrainConfig` field, e.g.
``--set batch_size=16 --set fold_validation=0``); ``--tag`` names the variant in the table.

``--pretrain-s S`` (or ``--pretrain-steps N``) first pretrains the encoder without labels
(`training_backend.learning.pretrain`, masked image modelling) for S seconds on the training
cases' images (never the holdout ones), at the runs' image size and network width, once: the
images are the same in every scenario, so one pretraining (cached in ``OUT/pretrain-...``) is
copied into each scenario project, and our runs start from it (``pretrained=auto``). The row
records the pretraining (``pretrain``: seconds, steps, images, last loss) and which encoders
started from it (``pretrained_networks``); ``--set pretrained=none`` gives the control with
the same pretraining present but unused. Pretraining time is not part of a run's budget (the
window pretrains while no training runs).

It needs ../shared/data/busi (not shipped); without it, it says so and exits 0.
Results are appended to bench_out/busi/results.jsonl and printed as a Markdown table.
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

from training_backend.project.store import Project  # noqa: E402

RUNS = ("baseline", "sup100", "sup10", "mt10", "cam")
#: run-name prefix -> method
SHORT = {"sup": "supervised", "mt": "mean_teacher", "caml": "caml", "crii": "crii",
         "dual": "dual_unet", "collab": "collaborative"}
#: methods that learn from image labels alone (no mask at all in their runs)
LABEL_ONLY = ("cam", "mcwss")
HOLDOUT_FRACTION = 0.2


def parse_run(run: str) -> tuple[str, float, bool] | None:
    """``(method, mask fraction, labels on every case)`` of a run name, None when it is not one.

    Args:
        run: e.g. "sup10b", "caml5", "mcwss".
    """
    import re

    if run in LABEL_ONLY:
        return run, 0.0, True
    m = re.fullmatch(r"([a-z]+?)(\d+)(b?)", run)
    if not m or m.group(1) not in SHORT or not 0 < int(m.group(2)) <= 100:
        return None
    return SHORT[m.group(1)], int(m.group(2)) / 100, bool(m.group(3)) or m.group(2) == "100"


def _split(project: Project, seed: int = 0) -> tuple[list[str], list[str]]:
    """Stratified (by reference class) train/holdout split, deterministic."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = {}
    for rec in project.cases():
        by_class.setdefault(rec.reference_label or rec.image_label or "?", []).append(rec.id)
    train, hold = [], []
    for cls in sorted(by_class):
        ids = sorted(by_class[cls])
        rng.shuffle(ids)
        n_hold = int(round(len(ids) * HOLDOUT_FRACTION))
        hold += ids[:n_hold]
        train += ids[n_hold:]
    return sorted(train), sorted(hold)


def base_project(data: Path, out: Path) -> Path:
    """Import BUSI once with masks and labels as hidden reference; cached in ``out/base``."""
    from training_backend.project.importer import import_csv

    base = out / "base"
    if Project.is_project(base):
        return base
    tmp = out / "base.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    project = Project.create(tmp, ["lesion"], ["normal", "benign", "malignant"])
    t = time.perf_counter()
    report = import_csv(project, data / "labels.csv", mask_cols=[("masks", "lesion")],
                        label_col="cls", reference=True)
    print(f"imported {len(report.imported)} BUSI cases in {time.perf_counter() - t:.0f} s "
          f"({len(report.skipped)} skipped)", flush=True)
    project = Project.open(tmp)
    train, hold = _split(project)
    project.set_split(hold, "holdout")
    os.rename(tmp, base)
    return base


def reveal_image_label(project: Project, rec) -> None:
    """Give a case its reference image label (BUSI: normal/benign/malignant)."""
    project.set_image_label(rec.id, rec.reference_label, author="simulated")


def scenario_project(base: Path, out: Path, run: str, seed: int = 0,
                     reveal_label=reveal_image_label) -> Path:
    """A copy of the base project with the annotations this scenario is allowed to see
    (`parse_run`; the baseline sees every mask); ``reveal_label(project, record)`` gives a
    case its image-level label (bench_idrid: the presence flags)."""
    dest = out / f"{run}"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(base, dest)
    project = Project.open(dest)
    train = [r for r in project.cases() if r.split == "train"]
    rng = np.random.default_rng(seed)
    order = [r.id for r in train]
    rng.shuffle(order)
    _, fraction, all_labels = parse_run(run) if run != "baseline" else ("", 1.0, False)
    n_masked = 0 if fraction == 0 else max(1, int(round(fraction * len(order))))
    masked_ids = set(order[:n_masked])
    with project.batch(flush_every_s=3600):
        for rec in train:
            masked = rec.id in masked_ids
            if masked:
                project.save_annotation(rec.id, project.read_reference(rec.id), "full",
                                        author="simulated", source="reference")
            if (all_labels or masked) and run != "baseline":
                reveal_label(project, rec)
            elif rec.image_label is not None or rec.presence:
                # the base import leaves the labels visible: hide what this run may not see
                project.set_image_label(rec.id, None, presence=None, author="simulated")
    return dest


# ------------------------------------------------------------------------------ baseline (bare)
def train_baseline(project_path: Path, budget_s: float, image_size: int = 128, seed: int = 0,
                   batch_size: int = 16):
    """The bar: the peer (`training_backend.learning.peer`: a plain MONAI BasicUNet in a bare loop) on
    grey images; returns a predictor of one image and its steps."""
    from training_backend.learning.peer import train_peer

    peer = train_peer(project_path, budget_s=budget_s, image_size=image_size, seed=seed,
                      batch_size=batch_size, channels=1)
    print(f"baseline: {peer.steps} steps in {budget_s:.0f} s", flush=True)
    return peer.predict, peer.steps


# ------------------------------------------------------------------------------ pretraining
def pretrained_encoder(base: Path, out: Path, seconds: float | None, steps: int | None,
                       image_size: int = 128, width: int | None = None, seed: int = 0) -> Path:
    """The encoder pretrained without labels on the base project's training images (the
    holdout ones are never read), made once per setting in ``out/pretrain-...``; returns its
    ``models/_pretrained`` folder (copied into each scenario project).

    Args:
        base: the base project (`base_project`).
        out: the benchmark's output folder.
        seconds, steps: the pretraining's budget (either or both).
        image_size, width: the runs' image size and network width (``ModelConfig.base``).
        seed: the pretraining's seed.
    """
    from training_backend.config import ModelConfig, PretrainConfig
    from training_backend.jobs.pretrain_record import pretrained_dir, read_meta
    from training_backend.learning.pretrain import pretrain

    model = ModelConfig() if width is None else ModelConfig(base=int(width))
    key = "-".join(["pretrain", *([f"{seconds:g}s"] if seconds else []),
                    *([f"{steps}steps"] if steps else []), f"{image_size}px", f"base{model.base}",
                    f"seed{seed}"])
    dest = out / key
    meta = read_meta(dest) if Project.is_project(dest) else None
    if meta is None or not meta.get("done"):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(base, dest)
        cfg = PretrainConfig(model=model, image_size=image_size, budget_s=seconds, steps=steps,
                             seed=seed)
        t = time.perf_counter()
        done = pretrain(dest, cfg)
        meta = read_meta(dest)
        print(f"pretrained the encoder: {done.step} steps on {meta['images']} images in "
              f"{time.perf_counter() - t:.0f} s (reconstruction loss {meta['loss']:.4f})", flush=True)
    return pretrained_dir(dest)


# ------------------------------------------------------------------------------ ours
def train_ours(project_path: Path, method: str, budget_s: float, events: list | None = None,
               **overrides) -> int:
    """Train with the product's trainer (no predictions); returns the steps taken
    (``events``: a list that gets every event)."""
    from training_backend.learning.trainer import TrainConfig, run_training

    cfg = TrainConfig(method=method, budget_s=budget_s, predict=False, model_id=method, **overrides)
    steps = 0
    for ev in run_training(project_path, cfg):
        name = type(ev).__name__
        if events is not None:
            events.append(ev)
        if name in ("Finished", "Failed", "Started", "ValidationFolded", "PretrainedEncoder"):
            print(f"  {name}: {ev}", flush=True)
        if name == "Failed":
            raise RuntimeError(ev.message)
        if name == "Finished":
            steps = ev.step
    return steps


def predict_ours(project_path: Path, model_id: str):
    """The product's prediction of one image, ungated, with the scores the gates read.

    Returns a function image -> (ungated class map, scores); gating one lesion class either
    keeps that map or empties it, so every gating rule can be scored from it.
    """
    from training_backend.learning.inference import gate_threshold, gate_uses_segmentation, load_model, predict_image

    project = Project.open(project_path)
    method, cfg = load_model(project.path / "models" / model_id / "latest.pt")
    threshold, use_seg = gate_threshold(method), gate_uses_segmentation(method)
    method.options["gate_threshold"] = 0.0  # ungated; the rules are applied by `score`
    method = method.inference_copy()
    channels = method.in_channels

    def predict(image: np.ndarray):
        out = predict_image(method, image, channels, cfg.image_size, cfg.mc_samples, "cpu",
                            image_classes=project.image_classes)
        cam = out["cam"].astype(np.float32).max(0)  # (H, W)
        return out["pred"], {**out["scores"], "cam_peak": np.unravel_index(int(cam.argmax()), cam.shape)}

    return predict, threshold, use_seg


def score(project_path: Path, predict, rules: dict) -> dict:
    """Holdout metrics of each gating rule: rule(scores) -> keep the lesion or not."""
    from training_backend.learning.metrics import case_metrics

    project = Project.open(project_path)
    res = {name: {"dice": [], "iou": [], "hd95": [], "empty": []} for name in rules}
    cases = []  # per holdout case: what the gates read and the ungated Dice (for analysis)
    for rec in project.cases():
        if rec.split != "holdout":
            continue
        ref = project.read_reference(rec.id)
        pred, scores = predict(project.read_image(rec.id))
        lesion = bool(np.any(ref > 0))
        peak = scores.get("cam_peak")
        cases.append({"lesion": lesion, "presence": (scores.get("presence") or [None])[0],
                      "label": rec.reference_label, "image_class": scores.get("image_class") or None,
                      "cam_in_lesion": bool(ref[peak] > 0) if (lesion and peak is not None) else None,
                      "seg": (scores.get("segmentation_presence") or [None])[0],
                      "frac": scores.get("lesion_frac"),
                      "dice": case_metrics(pred, ref, 1)["dice"][0] if lesion else None})
        for name, keep in rules.items():
            p = pred if keep(scores) else np.zeros_like(pred)
            if lesion:
                m = case_metrics(p, ref, 1)
                for key in ("dice", "iou", "hd95"):
                    res[name][key].append(m[key][0])
            else:
                res[name]["empty"].append(not bool(np.any(p > 0)))
    out = {name: {"dice": float(np.mean(r["dice"])), "iou": float(np.mean(r["iou"])),
                  "hd95": float(np.mean(r["hd95"])), "empty_rate": float(np.mean(r["empty"])),
                  "n_lesion": len(r["dice"]), "n_lesion_free": len(r["empty"])}
           for name, r in res.items()}
    from training_backend.learning.metrics import binary_auc

    pres = [(c["presence"], c["lesion"]) for c in cases if c["presence"] is not None]
    in_lesion = [c["cam_in_lesion"] for c in cases if c["cam_in_lesion"] is not None]
    out["image_auc"] = binary_auc([p for p, _ in pres], [l for _, l in pres]) if pres else None
    # the image-class head (collaborative: the grader): one-vs-rest AUC averaged over classes
    graded = [c for c in cases if c["image_class"] and c["label"] in c["image_class"]]
    names = sorted(graded[0]["image_class"]) if graded else []
    aucs = [binary_auc([c["image_class"][n] for c in graded], [c["label"] == n for c in graded])
            for n in names]
    aucs = [a for a in aucs if np.isfinite(a)]
    out["class_auc"] = float(np.mean(aucs)) if aucs else None
    out["cam_in_lesion"] = float(np.mean(in_lesion)) if in_lesion else None
    out["cases"] = cases
    return out


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "busi"))
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "busi"))
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated (default 0)")
    ap.add_argument("--tag", default="", help="name of this variant in the table")
    ap.add_argument("--score-only", action="store_true",
                    help="score the models the last run of each name left in --out (no training)")
    ap.add_argument("--lr", type=float, help="learning rate of our runs (default: the trainer's)")
    ap.add_argument("-o", "--option", action="append", default=[], metavar="NAME=VALUE",
                    help="method option for our runs (repeatable), e.g. -o cam_hi=0.35")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                    help="training setting for our runs (repeatable), e.g. --set batch_size=16")
    ap.add_argument("--pretrain-s", type=float, metavar="S",
                    help="pretrain the encoder without labels for S seconds first (once, on the "
                    "training images), and start our runs from it (module docstring)")
    ap.add_argument("--pretrain-steps", type=int, metavar="N",
                    help="the pretraining's steps (with --pretrain-s: whichever ends first)")
    args = ap.parse_args()
    options = dict(kv.split("=", 1) for kv in args.option)
    settings = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.settings)}
    if args.lr:
        settings["lr"] = args.lr
    seeds = [int(v) for v in args.seeds.split(",")]
    data, out = Path(args.data), Path(args.out)
    from training_backend.learning.runtime import keep_freed_memory

    keep_freed_memory()  # as the trainer process and the CLI do (bare and ours alike)
    if not (data / "labels.csv").is_file():
        print(f"bench_busi: {data}/labels.csv not found: the shared BUSI set is needed; skipping.")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    base = base_project(data, out)
    pre_dir, pre_row = None, None
    if args.pretrain_s or args.pretrain_steps:
        from training_backend.jobs.pretrain_record import read_meta

        pre_dir = pretrained_encoder(base, out, args.pretrain_s, args.pretrain_steps,
                                     image_size=int(settings.get("image_size", 128)))
        meta = read_meta(pre_dir.parent.parent)
        pre_row = {"seconds": meta["elapsed_s"], "steps": meta["step"], "images": meta["images"],
                   "loss": meta["loss"], "budget_s": args.pretrain_s,
                   "budget_steps": args.pretrain_steps}
    rows = []
    for run in args.runs.split(","):
        if run != "baseline" and parse_run(run) is None:
            raise SystemExit(f"bench_busi: unknown run {run!r} (baseline, {', '.join(LABEL_ONLY)}, "
                             f"or <{'|'.join(SHORT)}><percent>[b], e.g. sup10b)")
        for seed in seeds:
            print(f"== {run} seed {seed} {args.tag} ({args.budget_s:.0f} s)", flush=True)
            path = out / run if args.score_only else scenario_project(base, out, run)
            if pre_dir is not None and not args.score_only:
                shutil.copytree(pre_dir, path / "models" / pre_dir.name)
            t = time.perf_counter()
            events: list = []
            if args.score_only and run != "baseline":
                method = parse_run(run)[0]
                steps = int(Project.open(path).models()[method].get("step", 0))
                predict, threshold, use_seg = predict_ours(path, method)
            if run == "baseline":
                predict, steps = train_baseline(path, args.budget_s, seed=seed)
                rules = {"ungated": lambda s: True}
                results = score(path, lambda im: (predict(im), {}), rules)
                results["product"] = results["ungated"]
            else:
                if not args.score_only:
                    method = parse_run(run)[0]
                    steps = train_ours(path, method, args.budget_s, method_options=options,
                                       seed=seed, events=events, **settings)
                    predict, threshold, use_seg = predict_ours(path, method)
                rules = {
                    "product": lambda s: threshold <= 0 or s["gate_evidence"][0] >= threshold,
                    "gate_presence": lambda s: s["presence"][0] >= threshold,
                    # presence and the segmentation's strongest pixel (gate_segmentation=true)
                    "gate_evidence": lambda s: (s["presence"][0] * s["segmentation_presence"][0]) ** 0.5 >= threshold,
                    "ungated": lambda s: True,
                }
                results = score(path, predict, rules)
            wall = time.perf_counter() - t
            prod = results["product"]
            row = {"run": run, "tag": args.tag, "seed": seed, "budget_s": args.budget_s,
                   "steps": steps, "wall_s": round(wall, 1),
                   **{k: prod[k] for k in ("dice", "iou", "hd95", "empty_rate")},
                   "image_auc": results.get("image_auc"), "class_auc": results.get("class_auc"),
                   "cam_in_lesion": results.get("cam_in_lesion"),
                   "n_lesion": prod["n_lesion"], "n_lesion_free": prod["n_lesion_free"],
                   "rules": {k: {m: round(v[m], 4) for m in ("dice", "empty_rate")}
                             for k, v in results.items() if k in rules or k == "product"},
                   "cases": results["cases"],
                   **({"options": options} if run != "baseline" and options else {}),
                   "pretrain": pre_row if run != "baseline" else None,
                   "pretrained_networks": next((list(e.networks) for e in events
                                                if type(e).__name__ == "PretrainedEncoder"), []),
                   **({"settings": settings} if run != "baseline" and settings else {}),
                   "time": time.strftime("%Y-%m-%d %H:%M")}
            rows.append(row)
            with open(out / "results.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    """Mean ± half the range over seeds, one line per (run, tag)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        pre = r.get("pretrain") if r.get("pretrained_networks") else None
        label = f"pretrained {pre['steps']} steps" if pre else ""  # apart from the control
        groups.setdefault((r["run"], " ".join(t for t in (r.get("tag", ""), label) if t)), []).append(r)

    def stat(values, digits=3):
        values = [v for v in values if v is not None]
        if not values:
            return "–"
        mean, half = float(np.mean(values)), (max(values) - min(values)) / 2
        return f"{mean:.{digits}f}" + (f" ± {half:.{digits}f}" if len(values) > 1 else "")

    print("\n| run | seeds | steps | holdout lesion Dice | IoU | HD95 (px) | normal images left empty "
          "| image AUC | class AUC | CAM peak in lesion | Dice, presence gate | empty, presence gate "
          "| Dice ungated |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (run, tag), rs in groups.items():
        rule = lambda name, m: stat([r["rules"].get(name, {}).get(m) for r in rs])  # noqa: E731
        print(f"| {run}{' ' + tag if tag else ''} | {','.join(str(r['seed']) for r in rs)} | "
              f"{stat([r['steps'] for r in rs], 0)} | {stat([r['dice'] for r in rs])} | "
              f"{stat([r['iou'] for r in rs])} | {stat([r['hd95'] for r in rs], 1)} | "
              f"{stat([r['empty_rate'] for r in rs], 2)} | {stat([r.get('image_auc') for r in rs])} | "
              f"{stat([r.get('class_auc') for r in rs])} | "
              f"{stat([r.get('cam_in_lesion') for r in rs], 2)} | {rule('gate_presence', 'dice')} | "
              f"{rule('gate_presence', 'empty_rate')} | {rule('ungated', 'dice')} |")


if __name__ == "__main__":
    sys.exit(main())
