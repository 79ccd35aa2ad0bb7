"""The README demo: the bundled IDRiD sample in the lesion workspace.

    .venv/bin/python examples/demo.py                      # opens napari (needs a display)
    .venv/bin/python examples/demo.py --folder my_demo     # another project folder
    xvfb-run -a .venv/bin/python examples/demo.py --screenshot demo.png   # headless: PNG, exit

The sample project is created in ``--folder`` (default ``demo_project/``) if it is not there
yet; with ``--reference`` the sample's masks and labels are hidden as a reference, so you start
from unlabelled images (the active-learning workflow) and can score what you annotate. Then
napari opens with the workspace docked and the first suggested case shown.

With ``--screenshot`` it trains for ``--train-s`` seconds in the trainer process, fine-tuning a
starter model when one predicts the sample's lesion classes (``fundus-starter``, trained on
IDRiD; `choose_start` says which it used, or why it trains from scratch), then ends on a case
with lesions (in its annotation, else its hidden reference): the one whose prediction overlaps
them best (Dice over the lesion pixels, class by class), with the prediction (filled), the
annotation (outlined) and the CAM of the class the prediction gets most right there shown, and
says which case and why (`pick_lesion_case`).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lesionseg demo on the bundled IDRiD sample")
    parser.add_argument("--project", "--folder", dest="folder", default="demo_project",
                        help="sample project folder (created if missing)")
    parser.add_argument("--reference", action="store_true",
                        help="hide the sample's masks/labels as reference (start unlabelled)")
    parser.add_argument("--screenshot", metavar="PATH",
                        help="headless: run the loop (train, show CAM/uncertainty, rank, export), "
                        "save a screenshot of the window and exit")
    parser.add_argument("--train-s", type=float, default=60.0,
                        help="headless: training budget in seconds (default 60)")
    args = parser.parse_args(argv)

    from training_backend.project.sample import create_sample_project
    from training_backend.project.store import Project

    folder = Path(args.folder)
    if not Project.is_project(folder):
        create_sample_project(folder, reference=args.reference, hide_labels=args.reference)
        print(f"created the sample project in {folder}")

    import napari

    from napari_lesionseg._launch import open_workspace

    viewer = napari.Viewer(title="lesionseg demo")
    viewer.window.resize(1500, 950)
    workspace = open_workspace(viewer, folder)
    workspace.cases_panel.next_case()

    if args.screenshot:
        return _headless_loop(viewer, workspace, Path(args.screenshot), args.train_s)

    try:
        napari.run()
    finally:
        workspace.shutdown()
    return 0


@dataclass(frozen=True)
class Showcase:
    """The case the demo ends on, and why.

    Args:
        case_id, name: the case.
        source: where its lesions come from ("annotation" or "reference").
        lesion_px: its lesion pixels (any class).
        predicted_px: its pixels the prediction gives a lesion class.
        dice: Dice of the prediction against the lesions, class by class (pixels of the right
            class count as overlap).
        top_class: 1-based lesion class whose CAM is shown: the one with the most pixels
            predicted right, else the one with the most lesion pixels.
        n_lesion_cases: cases with lesions the pick was made among.
    """

    case_id: str
    name: str
    source: str
    lesion_px: int
    predicted_px: int
    dice: float
    top_class: int
    n_lesion_cases: int

    def reason(self) -> str:
        """One line for the demo's output."""
        among = f"of the {self.n_lesion_cases} cases with lesions"
        if self.dice > 0:
            why = f"its prediction overlaps them best {among} (Dice {self.dice:.2f})"
        else:
            why = (f"no prediction overlaps a lesion yet, so the case with the most lesion "
                   f"pixels {among}")
        return (f"{self.name} ({self.case_id}): {self.lesion_px} lesion pixels in its "
                f"{self.source}, {self.predicted_px} predicted; {why}")


def lesion_truth(project, cid: str) -> tuple[np.ndarray, str] | None:
    """A case's lesion mask and where it comes from: its latest annotation (scribbles count
    by their painted lesion pixels), else its hidden reference; None when it has neither.

    Args:
        project: the open project.
        cid: the case id.
    """
    from training_backend.project.store import BACKGROUND

    found = project.read_annotation(cid)
    if found is not None:
        mask = np.asarray(found[0])
        return np.where(mask == BACKGROUND, 0, mask), "annotation"
    ref = project.read_reference(cid)
    return None if ref is None else (np.asarray(ref), "reference")


def pick_lesion_case(project) -> Showcase | None:
    """The case to end the demo on: among the cases whose annotation (or reference) has lesion
    pixels, the one with the best Dice of its latest prediction against them; ties (e.g. no
    prediction overlaps anything) go to the case with more lesion pixels. None: no case has
    lesions.

    Args:
        project: the open project (its outputs re-read first).
    """
    project.refresh()
    scored: list[tuple[float, int, str, str, int, int]] = []
    for cid in project.case_ids():
        found = lesion_truth(project, cid)
        if found is None:
            continue
        truth, source = found
        lesion = truth > 0
        n = int(lesion.sum())
        if n == 0:
            continue
        outputs = project.read_outputs(cid)
        pred = np.zeros_like(truth) if outputs is None else np.asarray(outputs.pred)
        hit = int((lesion & (pred == truth)).sum())
        n_pred = int((pred > 0).sum())
        hits = np.bincount(truth[lesion & (pred == truth)].ravel(), minlength=2)
        top = int(hits.argmax() if hits[1:].any() else np.bincount(truth[lesion].ravel()).argmax())
        scored.append((2.0 * hit / (n + n_pred), n, cid, source, n_pred, top))
    if not scored:
        return None
    dice, n, cid, source, n_pred, top = max(scored, key=lambda s: (s[0], s[1]))
    return Showcase(cid, project.case(cid).name, source, n, n_pred, dice, top, len(scored))


def _headless_loop(viewer, workspace, shot: Path, train_s: float) -> int:
    """What a user does with the mouse, driven through the same widgets: train in the trainer
    process, look at the next suggested case with its prediction, CAM and uncertainty, export."""
    import imageio.v3 as iio
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()

    def wait_until(condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            app.processEvents()
            if condition():
                return True
            time.sleep(0.03)
        return False

    ann, trainer = workspace.annotate_panel, workspace.trainer_panel
    wait_until(lambda: ann.shown_case is not None, 30)
    status = 0
    if train_s > 0:
        wait_until(lambda: bool(trainer.available_methods()), 60)
        print(f"demo: {choose_start(trainer)}", flush=True)
        trainer.configure(budget_s=int(train_s), steps=0)
        t0 = time.monotonic()
        if not trainer.start():
            print("demo: the trainer did not start", file=sys.stderr)
            return 1
        print(f"demo: training {trainer.settings().method} for {train_s:.0f} s in the trainer "
              "process ...", flush=True)
        if not wait_until(lambda: trainer.process is None, train_s + 240):
            print("demo: training did not finish in time", file=sys.stderr)
            trainer.stop(force=True)
            status = 1
        print(f"demo: trainer done after {time.monotonic() - t0:.0f} s: {trainer.status_text()}",
              flush=True)
    _show_lesion_case(workspace, wait_until)
    export = workspace.export_panel
    out_root = Path(workspace.project.path) / "export"
    for source in ("annotation", "prediction") if train_s > 0 else ("annotation",):
        export.last_report = None
        export.export(out_dir=str(out_root / source), fmt="png", source=source)
        if wait_until(lambda: export.last_report is not None, 120):
            print(f"demo: {source}s: {export.last_report.summary()}", flush=True)
        else:
            print(f"demo: exporting {source} masks did not finish", file=sys.stderr)
            status = 1
    viewer.reset_view()
    wait_until(lambda: False, 1.0)
    shot.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(shot, viewer.screenshot(canvas_only=False, flash=False))
    print(f"demo: wrote {shot}", flush=True)
    workspace.shutdown()
    viewer.close()
    return status


def choose_start(trainer) -> str:
    """Start from a starter model when one predicts the project's lesion classes (the bundled
    IDRiD sample fits ``fundus-starter``), else from scratch; returns the line that says which
    and why.

    Args:
        trainer: the workspace's trainer panel.
    """
    control = trainer.start_from
    names = control.starter_names()
    if not names:
        trainer.configure(start_from="scratch")
        return f"training from scratch: {control.why_no_starter}"
    trainer.configure(start_from=names[0])  # also its image size (and crops)
    starter = control.starter()
    settings = trainer.settings()
    crop = f", crops of {settings.crop_size} px" if settings.crop_size else ""
    return (f"fine-tuning the starter model {starter.name} (lesion classes "
            f"{', '.join(starter.classes)}, as this project's; {starter.score_text()}) at "
            f"{settings.image_size} px{crop}, instead of training from scratch (the sample's "
            f"photographs come from IDRiD and most were among its training images: its scores "
            f"on photographs it never saw are in its model card)")


def _show_lesion_case(workspace, wait_until) -> None:
    """End on the case `pick_lesion_case` chooses, with its prediction, annotation and CAM."""
    ann = workspace.annotate_panel
    pick = pick_lesion_case(workspace.project)
    if pick is None:
        print("demo: no case has lesions in its annotation or reference; showing the case "
              "the ranking suggests", flush=True)
        workspace.cases_panel.next_case()
    else:
        print(f"demo: showing {pick.reason()}", flush=True)
        workspace.go_to(pick.case_id)
    project = workspace.project
    wait_until(lambda: ann.shown_case is not None and ann.shown_case == workspace.state.case_id
               and (ann.shown_output_id is not None
                    or project.output_record(ann.shown_case) is None), 30)
    if pick is not None:
        ann.select_paint_class(pick.top_class)  # the CAM shown is the paint class's
    ann.show_model_layers(prediction=True, cam=True, uncertainty=False)
    # one picture of both: the prediction filled, the annotation as outlines on top of it
    prediction, annotation = ann.layers.get("prediction"), ann.layers.get("annotation")
    if prediction is not None:
        prediction.contour = 0
    if annotation is not None:
        annotation.visible = True
        annotation.contour = 1
        annotation.opacity = 1.0
    print("demo: prediction filled, annotation outlined, CAM of "
          f"{project.classes[pick.top_class - 1] if pick else 'the paint class'} as a heat map",
          flush=True)
    wait_until(lambda: False, 1.0)


if __name__ == "__main__":
    sys.exit(main())
