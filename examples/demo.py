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
                        help="save a screenshot of the window and exit (headless runs)")
    args = parser.parse_args(argv)

    from training_backend.sample import create_sample_project
    from training_backend.store import Project

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
        from qtpy.QtWidgets import QApplication

        app = QApplication.instance()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and workspace.annotate_panel.shown_case is None:
            app.processEvents()
            time.sleep(0.03)
        viewer.reset_view()
        for _ in range(20):
            app.processEvents()
            time.sleep(0.02)
        import imageio.v3 as iio

        out = Path(args.screenshot)
        out.parent.mkdir(parents=True, exist_ok=True)
        iio.imwrite(out, viewer.screenshot(canvas_only=False, flash=False))
        print(f"wrote {out}")
        workspace.shutdown()
        viewer.close()
        return 0

    try:
        napari.run()
    finally:
        workspace.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
