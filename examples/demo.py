"""The README demo: the bundled IDRiD sample in the lesion workspace.

    .venv/bin/python examples/demo.py                      # opens napari (needs a display)
    .venv/bin/python examples/demo.py --folder my_demo     # another project folder
    xvfb-run -a .venv/bin/python examples/demo.py --screenshot demo.png   # headless: PNG, exit

The sample project is created in ``--folder`` (default ``demo_project/``) if it is not there
yet; with ``--reference`` the sample's masks and labels are hidden as a reference, so you start
from unlabelled images (the active-learning workflow) and can score what you annotate. Then
napari opens with the workspace docked and the first suggested case shown.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

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
        workspace.cases_panel.next_case()   # the case the ranking suggests annotating next
        wait_until(lambda: ann.layers.get("prediction") is not None, 30)
        ann.show_model_layers(prediction=True, cam=True, uncertainty=False)
        wait_until(lambda: False, 1.0)
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


if __name__ == "__main__":
    sys.exit(main())
