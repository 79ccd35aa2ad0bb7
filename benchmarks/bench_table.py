"""The workspace's case table on a big project: refill and one-case update, on the GUI thread.

    .venv/bin/python benchmarks/bench_table.py [--cases 10000] [--keep DIR] [--repeats 5]

(re-runs itself under ``xvfb-run`` when there is no display). Builds a project of N cases (as
``bench_store.py`` does), opens it in the real workspace and times, fastest of ``--repeats``:

* refilling the whole table from the project index (what a re-read index or new predictions
  trigger), and
* updating one case's row (what every saved annotation or label triggers),

against a baseline measured in the same run: a ``QTableWidget`` with one item per cell, filled
with the same rows (the case table before it became a model/view pair), and its one-row
update, which first has to find the row.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _best(fn, repeats: int, app) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        app.processEvents()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--keep", help="build the project here and keep it")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not os.environ.get("DISPLAY") and shutil.which("xvfb-run") and not os.environ.get("_BENCH_XVFB"):
        os.environ["_BENCH_XVFB"] = "1"
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", sys.executable, *sys.argv]
        os.execvp(cmd[0], cmd)

    from bench_store import build_project

    path = Path(args.keep) if args.keep else Path(tempfile.mkdtemp()) / "big"
    build_project(path, args.cases)

    import napari
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication, QTableWidget, QTableWidgetItem

    from napari_lesionseg._cases_panel import COLUMNS
    from napari_lesionseg._launch import open_workspace

    viewer = napari.Viewer(show=False)
    app = QApplication.instance()
    ws = open_workspace(viewer, path)
    app.processEvents()
    panel, project = ws.cases_panel, ws.project
    last = project.case_ids()[-1]

    widget = QTableWidget(0, len(COLUMNS))

    def widget_fill() -> None:  # the baseline: an item per cell, from the same rows
        widget.setRowCount(0)
        rows = [panel._row(project, rec) for rec in project.cases()]  # noqa: SLF001
        widget.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for col, text in enumerate((row.name, row.status_text, row.label, row.model_text, "")):
                item = QTableWidgetItem(text)
                if col == 0:
                    item.setData(Qt.ItemDataRole.UserRole, row.cid)
                widget.setItem(i, col, item)

    def widget_update() -> None:  # find the case's row, replace its items
        row = next(i for i in range(widget.rowCount())
                   if widget.item(i, 0).data(Qt.ItemDataRole.UserRole) == last)
        r = panel._row(project, project.case(last))  # noqa: SLF001
        for col, text in enumerate((r.name, r.status_text, r.label, r.model_text, "")):
            item = QTableWidgetItem(text)
            if col == 0:
                item.setData(Qt.ItemDataRole.UserRole, r.cid)
            widget.setItem(row, col, item)

    results = [
        ("refill the table", _best(widget_fill, args.repeats, app), _best(panel.rebuild, args.repeats, app)),
        ("update one case's row", _best(widget_update, args.repeats, app),
         _best(lambda: panel._update_row(last), args.repeats, app)),  # noqa: SLF001
    ]
    print(f"{len(project)} cases")
    print("| measurement | item-per-cell table (baseline) | case table | ratio |")
    print("|---|---|---|---|")
    for name, base, ours in results:
        print(f"| {name} | {base * 1000:.0f} ms | {ours * 1000:.0f} ms | {ours / base:.2f}× |")
    from napari_lesionseg._tasks import running_tasks

    deadline = time.monotonic() + 60
    while running_tasks() and time.monotonic() < deadline:  # the workspace's ranking worker
        app.processEvents()
        time.sleep(0.05)
    ws.shutdown()
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
