"""Label efficiency on the shared BUSI breast-ultrasound set, under one CPU wall budget per run.

Runs, each for the same wall-clock budget (default 300 s) on the same train/holdout split:

  baseline   plain MONAI BasicUNet (16-16-32-64-128, DiceCE, Adam 1e-3, 128 px, flips), all masks,
             in a bare torch loop written here (the bar to beat)
  sup100     our `supervised` default: all masks + image labels
  sup10      `supervised` with masks (and labels) on 10 % of the training cases only
  mt10       `mean_teacher`: the same 10 % masks, the other 90 % as unlabelled images
  cam        `cam`: image labels (normal/benign/malignant) only, no masks at all

and reports, on the holdout cases (never trained on): mean Dice and IoU over lesion cases, and
the share of normal (lesion-free) images whose predicted mask is empty.

    .venv/bin/python benchmarks/bench_busi.py [--budget-s 300] [--runs baseline,sup100,...]
                                              [--data ../shared/data/busi] [--out bench_out/busi]
                                              [--lr LR] [-o NAME=VALUE ...]

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

from training_backend.store import Project  # noqa: E402

RUNS = ("baseline", "sup100", "sup10", "mt10", "cam")
HOLDOUT_FRACTION = 0.2


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
    from training_backend.importer import import_csv

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


def scenario_project(base: Path, out: Path, run: str, seed: int = 0) -> Path:
    """A copy of the base project with the annotations this scenario is allowed to see."""
    dest = out / f"{run}"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(base, dest)
    project = Project.open(dest)
    train = [r for r in project.cases() if r.split == "train"]
    rng = np.random.default_rng(seed)
    order = [r.id for r in train]
    rng.shuffle(order)
    n10 = max(1, int(round(0.1 * len(order))))
    with project.batch(flush_every_s=3600):
        for i, rec in enumerate(project.cases()):
            if rec.split != "train":
                continue
            labelled = run in ("baseline", "sup100", "cam") or rec.id in order[:n10]
            if run in ("baseline", "sup100", "sup10", "mt10") and labelled:
                project.save_annotation(rec.id, project.read_reference(rec.id), "full",
                                        author="simulated", source="reference")
            if run in ("sup100", "sup10", "mt10", "cam") and labelled:
                project.set_image_label(rec.id, rec.reference_label, author="simulated")
    return dest


# ------------------------------------------------------------------------------ baseline (bare)
def train_baseline(project_path: Path, budget_s: float, image_size: int = 128, seed: int = 0) -> None:
    """The bar: a plain MONAI BasicUNet in a bare loop; writes its predictions to the store."""
    import torch
    import torch.nn.functional as F
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet

    torch.manual_seed(seed)
    project = Project.open(project_path)
    xs, ys = [], []
    for rec in project.cases():
        if rec.split != "train" or rec.latest is None:
            continue
        xs.append(_prep(project.read_image(rec.id), image_size))
        m = project.read_annotation(rec.id)[0]
        ys.append(F.interpolate(torch.from_numpy(m)[None, None].float(), size=(image_size,) * 2,
                                mode="nearest")[0])
    x, y = torch.stack(xs), torch.stack(ys).long()  # (N,1,S,S), (N,1,S,S)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(16, 16, 32, 64, 128, 16))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < budget_s:
        idx = torch.randint(0, len(x), (8,))
        xb, yb = x[idx], y[idx]
        if torch.rand(()) < 0.5:
            xb, yb = xb.flip(-1), yb.flip(-1)
        if torch.rand(()) < 0.5:
            xb, yb = xb.flip(-2), yb.flip(-2)
        opt.zero_grad()
        loss = loss_fn(net(xb), yb)
        loss.backward()
        opt.step()
        step += 1
    print(f"baseline: {step} steps in {budget_s:.0f} s", flush=True)
    net.eval()
    with torch.no_grad():
        for rec in project.cases():
            img = _prep(project.read_image(rec.id), image_size)[None]
            prob = torch.softmax(net(img), 1)
            prob = F.interpolate(prob, size=rec.shape, mode="bilinear", align_corners=False)[0]
            pred = prob.argmax(0).numpy().astype(np.uint8)
            project.write_outputs(rec.id, "baseline", pred, prob.numpy(),
                                  np.zeros((1,) + rec.shape, np.float32),
                                  np.zeros(rec.shape, np.float32), {})
    project.register_model("baseline", {"method": "monai BasicUNet (bare loop)", "steps": step})


def _prep(image: np.ndarray, size: int):
    import torch
    import torch.nn.functional as F

    img = image.astype(np.float32)
    if img.ndim == 3:
        img = img.mean(-1)
    lo, hi = np.percentile(img, (1, 99))
    img = ((img - lo) / max(hi - lo, 1e-6)).astype(np.float32)
    t = torch.from_numpy(img)[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]


# ------------------------------------------------------------------------------ ours
def train_ours(project_path: Path, method: str, budget_s: float, **overrides) -> dict:
    from training_backend.trainer import TrainConfig, run_training

    cfg = TrainConfig(method=method, budget_s=budget_s, predict=True, model_id=method, **overrides)
    last = None
    for ev in run_training(project_path, cfg):
        name = type(ev).__name__
        if name in ("Finished", "Failed", "Started"):
            print(f"  {name}: {ev}", flush=True)
        if name == "Failed":
            raise RuntimeError(ev.message)
        last = ev
    return {"last_event": type(last).__name__}


def evaluate(project_path: Path) -> dict:
    from training_backend.metrics import evaluate_project

    return evaluate_project(Project.open(project_path), split="holdout")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "busi"))
    ap.add_argument("--out", default=str(ROOT / "bench_out" / "busi"))
    ap.add_argument("--budget-s", type=float, default=300.0)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--lr", type=float, help="learning rate of our runs (default: the trainer's)")
    ap.add_argument("-o", "--option", action="append", default=[], metavar="NAME=VALUE",
                    help="method option for our runs (repeatable), e.g. -o cam_hi=0.35")
    args = ap.parse_args()
    options = dict(kv.split("=", 1) for kv in args.option)
    data, out = Path(args.data), Path(args.out)
    from training_backend.runtime import keep_freed_memory

    keep_freed_memory()  # as the trainer process and the CLI do (bare and ours alike)
    if not (data / "labels.csv").is_file():
        print(f"bench_busi: {data}/labels.csv not found: the shared BUSI set is needed; skipping.")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    base = base_project(data, out)
    rows = []
    for run in args.runs.split(","):
        print(f"== {run} ({args.budget_s:.0f} s)", flush=True)
        path = scenario_project(base, out, run)
        t = time.perf_counter()
        if run == "baseline":
            train_baseline(path, args.budget_s)
        else:
            method = {"sup100": "supervised", "sup10": "supervised", "mt10": "mean_teacher",
                      "cam": "cam"}[run]
            train_ours(path, method, args.budget_s, method_options=options,
                       **({"lr": args.lr} if args.lr else {}))
        wall = time.perf_counter() - t
        res = evaluate(path)
        row = {"run": run, "budget_s": args.budget_s, "wall_s": round(wall, 1),
               "dice": res["per_class"]["lesion"]["dice"], "iou": res["per_class"]["lesion"]["iou"],
               "hd95": res["per_class"]["lesion"]["hd95"], "empty_rate": res["empty_rate"],
               "n_lesion_free": res["n_lesion_free"], "n_holdout": res["n_cases"],
               "presence_auc": (res.get("presence_auc") or {}).get("lesion"),
               **({"options": options, "lr": args.lr} if run != "baseline" and (options or args.lr) else {}),
               "time": time.strftime("%Y-%m-%d %H:%M")}
        rows.append(row)
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print("\n| run | budget (s) | holdout lesion Dice | IoU | HD95 (px) | normal images left empty |")
    print("|---|---|---|---|---|---|")
    ref = next((r for r in rows if r["run"] == "sup100"), None)
    for r in rows:
        fmt = lambda v, p=3: "–" if v is None else f"{v:.{p}f}"  # noqa: E731
        print(f"| {r['run']} | {r['budget_s']:.0f} | {fmt(r['dice'])} | {fmt(r['iou'])} | "
              f"{fmt(r['hd95'], 1)} | {fmt(r['empty_rate'], 2)} |")
    if ref and ref["dice"]:
        for r in rows:
            if r["dice"] is not None:
                print(f"{r['run']}: {r['dice'] / ref['dice']:.2f}x the Dice of sup100")
    return 0


if __name__ == "__main__":
    sys.exit(main())
