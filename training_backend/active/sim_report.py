"""What ``lesionseg simulate`` writes: its rows, their plots and a summary.

Files in the simulation's ``OUT`` folder:

* ``results.json`` / ``results.csv`` — one row per (strategy, seed, round) (the peer's rows are
  named ``peer``): annotations by kind (``full``, ``sparse``, ``image_label``), the estimated
  annotation time ``cost_s``, lesion ``dice`` (mean over lesion classes) and ``dice_<class>``,
  ``presence_auc`` (lesion presence, mean over classes) and ``image_class_auc`` (one-vs-rest,
  macro) where defined, ``empty_rate`` (lesion-free evaluation cases left empty), training
  ``steps``, ``train_s``, ``predict_s`` and ``wall_s`` (the whole round); the JSON also holds
  the cases picked
  each round, the checkpoint a continuation starts from and the failure-detection table.
  Both are rewritten atomically after every round (`save_rows`).
* ``dice_vs_annotations.png`` and ``dice_vs_time.png`` — Dice against annotated cases and
  against estimated annotation time: one line per strategy (mean over seeds, the band from the
  lowest to the highest seed), ``random`` and the peer always drawn (`curves.series`).
* ``summary.md`` / ``summary.json`` — per strategy its final Dice and the annotations it needs
  to reach random's final Dice as a fraction of random's (`curves.savings`), and the
  failure-detection table of the last round (`metrics.failure_detection`, from ``random``'s
  final models, mean over seeds).

Torch-free; matplotlib (Agg) only when plotting.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from training_backend.active import curves
from training_backend.project.atomic import atomic_path, atomic_write_json, atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
#: CSV columns before the per-class Dice ones.
COLUMNS = ("strategy", "seed", "round", "annotations", "full", "sparse", "image_label", "cost_s",
           "dice")
#: CSV columns after them.
TAIL = ("presence_auc", "image_class_auc", "empty_rate", "n_eval", "steps", "train_s",
        "predict_s", "wall_s")
REFERENCE = "random"
PEER = "peer"


# ----------------------------------------------------------------------------- rows
def load_rows(out: str | os.PathLike) -> list[dict]:
    """The rows saved so far (``[]`` when none)."""
    path = Path(out) / RESULTS_JSON
    if not path.is_file():
        return []
    doc = json.loads(path.read_text(encoding="utf-8"))
    return list(doc.get("rows", []))


def save_rows(out: str | os.PathLike, rows: Sequence[dict], classes: Sequence[str]) -> None:
    """Rewrite ``results.json`` and ``results.csv`` atomically (a kill leaves the old ones).

    Args:
        out: the simulation folder.
        rows: every row so far.
        classes: lesion classes (the ``dice_<class>`` columns).
    """
    out = Path(out)
    atomic_write_json(out / RESULTS_JSON, {"version": 1, "rows": list(rows)})
    text = csv_text(rows, classes)
    atomic_write_text(out / RESULTS_CSV, text)


def csv_text(rows: Sequence[dict], classes: Sequence[str]) -> str:
    """The rows as CSV (scalar columns only; empty cells where a value is undefined)."""
    header = [*COLUMNS, *(f"dice_{c}" for c in classes), *TAIL]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        per_class = r.get("dice_per_class") or {}
        values = [*(r.get(k) for k in COLUMNS), *(per_class.get(c) for c in classes),
                  *(r.get(k) for k in TAIL)]
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)
                         for v in values])
    return buf.getvalue()


# ----------------------------------------------------------------------------- curves
def curve_points(rows: Iterable[dict], axis: str = "annotations") -> list[curves.CurvePoint]:
    """The rows as curve points: Dice against ``annotations`` or ``cost_s`` (minutes).

    Args:
        rows: result rows.
        axis: ``annotations`` (annotated cases of the simulated kind) or ``time`` (estimated
            annotation time in minutes, every kind priced).
    """
    pts = []
    for r in rows:
        if r.get("dice") is None:
            continue
        x = r["annotations"] if axis == "annotations" else r["cost_s"] / 60.0
        pts.append(curves.CurvePoint(float(x), float(r["dice"]), r["strategy"], r["seed"]))
    return pts


def series_order(names: Iterable[str]) -> list[str]:
    """``random`` first, the peer last, the others in between as given."""
    names = list(dict.fromkeys(names))
    middle = [n for n in names if n not in (REFERENCE, PEER)]
    return [n for n in (REFERENCE,) if n in names] + middle + [n for n in (PEER,) if n in names]


def plot(rows: Sequence[dict], path: str | os.PathLike, axis: str, title: str) -> Path:
    """A PNG of Dice against annotations or annotation time (module docstring).

    Args:
        rows: result rows.
        path: the PNG to write.
        axis: as for `curve_points`.
        title: the plot's title.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    by_series = curves.series(curve_points(rows, axis))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name in series_order(by_series):
        stats = by_series[name]
        xs = [s.x for s in stats]
        style = {"color": "0.35", "linestyle": "--"} if name == PEER else (
            {"color": "black"} if name == REFERENCE else {})
        seeds = max((s.n for s in stats), default=0)
        line, = ax.plot(xs, [s.mean for s in stats], marker="o", markersize=3,
                        label=f"{name} ({seeds} seed{'s' if seeds != 1 else ''})", **style)
        if seeds > 1:
            ax.fill_between(xs, [s.low for s in stats], [s.high for s in stats],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("annotated cases" if axis == "annotations" else "estimated annotation time (min)")
    ax.set_ylabel("lesion Dice (evaluation cases)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------- summary
def summarise(rows: Sequence[dict]) -> dict[str, Any]:
    """Per strategy: final Dice (mean, spread over seeds) and the annotations it needs to reach
    random's final Dice as a fraction of random's; the last round's failure-detection table.

    Args:
        rows: result rows.
    """
    by_series = curves.series(curve_points(rows, "annotations"))
    saved = curves.savings(by_series, REFERENCE)
    strategies = {}
    for name in series_order(by_series):
        stats = by_series[name]
        s = saved.get(name)
        strategies[name] = {
            "final_annotations": stats[-1].x, "final_dice": stats[-1].mean,
            "final_spread": stats[-1].spread, "seeds": stats[-1].n,
            "reaches_random_at": None if s is None else s.x,
            "fraction_of_random": None if s is None else s.fraction,
            "at_first_point": bool(s and s.at_first_point),
            "comparable": bool(s and s.comparable),
            "text": "-" if s is None else s.describe(),
        }
    return {"strategies": strategies, "failure_detection": _failure_table(rows)}


def _failure_table(rows: Sequence[dict]) -> dict[str, dict]:
    """Mean over seeds of the failure-detection table of random's last-round models."""
    ref = [r for r in rows if r["strategy"] == REFERENCE]
    if not ref:
        return {}
    last = max(r["round"] for r in ref)
    tables = [r.get("failure_detection") or {} for r in ref if r["round"] == last]
    out = {}
    for name in sorted({n for t in tables for n in t}):
        vals = [t[name] for t in tables if name in t]
        out[name] = {key: _mean([v.get(key) for v in vals]) for key in ("spearman", "auroc")}
        out[name]["n"] = int(sum(v.get("n", 0) for v in vals))
        out[name]["seeds"] = len(vals)
    return out


def _mean(values: Iterable[Any]) -> float | None:
    v = [float(x) for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def summary_markdown(summary: dict, meta: dict) -> str:
    """The summary as Markdown (also printed by ``lesionseg simulate``)."""
    cfg = meta.get("config", {})
    kind = curves.KIND_LABELS.get(meta.get("kind", ""), "annotations")
    lines = [f"# Simulated annotation session: {cfg.get('method')}, {kind}", ""]
    lines.append(f"Source: {cfg.get('project')}; {meta.get('n_pool')} pool cases, "
                 f"{meta.get('n_eval')} evaluation cases; cold start {cfg.get('start')} "
                 f"({cfg.get('start_mode')}), {cfg.get('step')} per round, {cfg.get('rounds')} "
                 f"rounds, {cfg.get('seeds')} seed(s), "
                 + (f"{cfg.get('budget_s'):g} s" if cfg.get("budget_s") else f"{cfg.get('steps')} steps")
                 + " of training per round, "
                 + ("fine-tuned from the previous round" if cfg.get("fine_tune") else "from scratch each round")
                 + ".")
    lines += ["", f"| strategy | final {kind} | final Dice (± half range over seeds) | {kind} to reach "
              "random's final Dice, as a fraction of random's |", "|---|---|---|---|"]
    for name, s in summary["strategies"].items():
        lines.append(f"| {name} | {s['final_annotations']:g} | {s['final_dice']:.3f} ± "
                     f"{s['final_spread']:.3f} | {s['text']} |")
    beaten = [n for n, s in summary["strategies"].items()
              if n not in (REFERENCE, PEER) and s["fraction_of_random"] is not None
              and s["fraction_of_random"] < 1.0]
    others = [n for n in summary["strategies"] if n not in (REFERENCE, PEER)]
    lines.append("")
    if others and not summary["strategies"].get(REFERENCE, {}).get("comparable", True):
        lines.append("random's final Dice is 0: no strategy can be compared with it (train "
                     "longer per round, or on more cases).")
    elif others:
        not_beaten = [n for n in others if n not in beaten]
        lines.append("Strategies that reach random's final Dice with fewer annotations: "
                     + (", ".join(beaten) if beaten else "none") + "."
                     + (f" Not better than random: {', '.join(not_beaten)}." if not_beaten else ""))
    if meta.get("kind") == "image_label":
        lines.append("The peer is not run: a plain segmentation loop learns from masks or "
                     "scribbles only.")
    fd = summary.get("failure_detection") or {}
    if fd:
        lines += ["", "Do the acquisition scores point at the model's failures? (random's last-round "
                  "models, evaluation cases with lesions; failure: Dice < 0.5)", "",
                  "| strategy | Spearman(score, 1 − Dice) | AUROC(failure) | cases |", "|---|---|---|---|"]
        for name, v in sorted(fd.items(), key=lambda kv: -(kv[1]["auroc"] or 0)):
            lines.append(f"| {name} | {_fmt(v['spearman'])} | {_fmt(v['auroc'])} | {v['n']} |")
    return "\n".join(lines) + "\n"


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def write_report(out: str | os.PathLike, rows: Sequence[dict], meta: dict) -> list[Path]:
    """Write the plots and the summary; returns the files written.

    Args:
        out: the simulation folder.
        rows: every row.
        meta: ``simulation.json``'s content plus ``kind``, ``n_pool``, ``n_eval``, ``classes``.
    """
    out = Path(out)
    cfg = meta.get("config", {})
    what = f"{cfg.get('method')}, {curves.KIND_LABELS.get(meta.get('kind', ''), '')}"
    files = [plot(rows, out / "dice_vs_annotations.png", "annotations",
                  f"Dice against annotated cases ({what})"),
             plot(rows, out / "dice_vs_time.png", "time",
                  f"Dice against estimated annotation time ({what})\nseconds per case: "
                  + ", ".join(f"{curves.KIND_LABELS[k]} {v:g}" for k, v in (cfg.get("costs") or {}).items()))]
    summary = summarise(rows)
    atomic_write_json(out / "summary.json", summary)
    text = summary_markdown(summary, meta)
    atomic_write_text(out / "summary.md", text)
    return [*files, out / "summary.json", out / "summary.md"]


__all__ = ["COLUMNS", "RESULTS_CSV", "RESULTS_JSON", "csv_text", "curve_points", "load_rows",
           "plot", "save_rows", "series_order", "summarise", "summary_markdown", "write_report"]
