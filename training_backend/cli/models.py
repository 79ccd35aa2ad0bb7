"""``lesionseg models``: the starter models shipped with the package, and a project's models.

Torch-free: the starters' cards and the project's model index are JSON.
"""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` verb.

    Args:
        subparsers: the dispatcher's ``add_subparsers()`` object.
    """
    m = subparsers.add_parser(
        "models", help="list the starter models (and a project's trained models)",
        description="List the starter models shipped with the package (name, lesion classes, "
        "holdout scores; usable as `predict --model NAME` and `train --init-from NAME`) and, "
        "with --project, the project's trained models and which starters fit its classes.")
    m.add_argument("--project", help="project folder whose models are listed too")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=_models)


def _project_rows(project) -> list[dict]:
    """One row per trained model of the project, newest first."""
    rows = []
    for mid, info in project.models().items():
        metrics = info.get("metrics") or {}
        rows.append({"name": mid, "kind": "project", "method": info.get("method"),
                     "status": info.get("status"), "step": info.get("step"),
                     "val_dice": metrics.get("val_dice"),
                     "n_annotations": info.get("n_annotations"),
                     "image_size": info.get("image_size"), "checkpoint": info.get("checkpoint"),
                     "updated": info.get("updated")})
    return sorted(rows, key=lambda r: r.get("updated") or "", reverse=True)


def _models(args: argparse.Namespace) -> int:
    from training_backend.learning.starters import starters

    project = None
    if args.project:
        from training_backend.project.store import Project

        project = Project.open(args.project, mode="r")
    shipped = list(starters().values())
    rows = []
    for starter in shipped:
        row = starter.summary()
        if project is not None:
            row["fits_project"] = starter.fits(project.classes)
        rows.append(row)
    own = _project_rows(project) if project is not None else []
    if args.json:
        out: dict = {"starters": rows}
        if project is not None:
            out["project"] = {"path": str(project.path), "classes": project.classes,
                              "models": own}
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    print("starter models (shipped with napari-lesionseg):")
    if not rows:
        print("  none installed")
    for starter, row in zip(shipped, rows):
        state = ("" if row["installed"]
                 else f"  NOT INSTALLED ({starter.checkpoint.name} missing)")
        fits = ""
        if project is not None:
            fits = "  fits this project" if row["fits_project"] else "  other classes"
        print(f"  {row['name']}  classes {', '.join(row['classes'])}  {row['method']}, "
              f"{row['channels']} channel(s), {row['image_size']} px  "
              f"{starter.score_text()}{fits}{state}")
    if project is not None:
        print(f"models of {project.path} (classes {', '.join(project.classes)}):")
        if not own:
            print("  none trained yet")
        for r in own:
            dice = "-" if r["val_dice"] is None else f"{r['val_dice']:.3f}"
            print(f"  {r['name']}  {r['method']}  {r['status']} at step {r['step']}  "
                  f"validation Dice {dice}  {r['n_annotations']} annotated cases")
    return 0
