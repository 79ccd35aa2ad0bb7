"""Screenshot of the lesion workspace on the bundled sample project (docs / CI smoke test).

    xvfb-run -a .venv/bin/python examples/screenshot_workspace.py out.png

Creates the sample project in a temporary folder (or uses ``--project``), opens napari with the
workspace docked, opens the first case, trains a tiny model in the background trainer process
(``--steps``, 0 to skip), waits until its prediction, CAM and uncertainty layers are shown and
saves ``viewer.screenshot(canvas_only=False)`` (a hidden canvas-only screenshot is black).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("--project", help="project folder (default: a fresh sample project)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (0: no training)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for training")
    parser.add_argument("--size", default="1800x1000", help="window size WIDTHxHEIGHT")
    parser.add_argument("--section", help="workspace section to scroll into view (e.g. Training)")
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_lesionseg._launch import open_workspace
    from training_backend.project.sample import create_sample_project

    tmp = None
    if args.project:
        project_path = Path(args.project)
        if not (project_path / "project.json").is_file():
            create_sample_project(project_path)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="lesionseg-shot-")
        project_path = Path(tmp.name) / "sample"
        create_sample_project(project_path)

    viewer = napari.Viewer(title="lesionseg", show=True)
    width, height = (int(v) for v in args.size.lower().split("x"))
    viewer.window.resize(width, height)
    workspace = open_workspace(viewer, project_path)
    app = QApplication.instance()

    def wait_until(condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            app.processEvents()
            if condition():
                return True
            time.sleep(0.03)
        return False

    ann = workspace.annotate_panel
    project = workspace.project
    first = project.case_ids()[0]
    workspace.go_to(first)
    wait_until(lambda: ann.shown_case == first, 30)
    trainer = workspace.trainer_panel
    status = 0
    if args.steps > 0:
        wait_until(lambda: bool(trainer.available_methods()), 120)
        trainer.configure(steps=args.steps, image_size=64, budget_s=0)
        if not trainer.start():
            print("the trainer did not start", file=sys.stderr)
            status = 1
        elif not wait_until(lambda: trainer.process is None, args.timeout):
            print("training timed out", file=sys.stderr)
            trainer.stop(force=True)
            status = 1
        elif not wait_until(lambda: ann.layers.get("prediction") is not None, 20):
            print("training finished but no prediction layer appeared", file=sys.stderr)
            status = 1
        else:
            ann.show_model_layers(cam=True)
    viewer.reset_view()
    if args.section:
        workspace._scroll.ensureWidgetVisible(workspace.sections[args.section], 0, 0)  # noqa: SLF001
    wait_until(lambda: False, 1.0)
    shot = viewer.screenshot(canvas_only=False, flash=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import imageio.v3 as iio

    iio.imwrite(out, shot)
    print(f"wrote {out} ({shot.shape[1]}x{shot.shape[0]}); layers: "
          f"{[layer.name for layer in viewer.layers]}")
    workspace.shutdown()
    viewer.close()
    if tmp is not None:
        tmp.cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
