"""Closing napari while the workspace is busy: a case loading, an import, the trainer training.

Each scenario runs in its own Python process (a real napari window under the test's Xvfb
display) so that a Qt abort fails the test instead of killing pytest. The window is closed
while the work is still running; the process must exit with status 0, print no traceback, and
leave no trainer process behind.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.gui

ROOT = Path(__file__).resolve().parents[1]

SCENARIO = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import numpy as np
    import napari
    from qtpy.QtCore import QTimer
    from napari_lesionseg import _annotate_panel
    from napari_lesionseg._launch import open_workspace
    from training_backend.project import io
    from training_backend.project.sample import create_sample_project

    mode, path = sys.argv[1], sys.argv[2]
    create_sample_project(path)
    load_case, read_image = _annotate_panel.load_case, io.read_image

    def slow_load(*args):  # a big image on a slow disk
        time.sleep(2.0)
        return load_case(*args)

    def slow_read(p):
        time.sleep(0.2)
        return read_image(p)

    _annotate_panel.load_case = slow_load
    io.read_image = slow_read
    viewer = napari.Viewer(show=True)
    ws = open_workspace(viewer, path)
    pids = []

    if mode == "load":
        ws.show_first_case()
        QTimer.singleShot(300, viewer.close)
    elif mode == "import":
        folder = os.path.join(os.path.dirname(path), "more")
        os.makedirs(folder)
        for i in range(30):
            io.write_mask(os.path.join(folder, f"img{{i}}.png"), np.full((64, 64), i, np.uint8))
        ws.project_panel.import_folder(folder)
        QTimer.singleShot(800, viewer.close)
    else:  # train
        panel = ws.trainer_panel
        panel.configure(method="supervised", steps=100000, budget_s=0, image_size=32)
        assert panel.start(), "the trainer did not start"
        pids.append(panel.process.pid)

        def close_when_training():
            if panel._started_seen or time.monotonic() - t0 > 60:
                viewer.close()
            else:
                QTimer.singleShot(100, close_when_training)

        t0 = time.monotonic()
        QTimer.singleShot(100, close_when_training)
    napari.run()
    for pid in pids:  # the trainer ends with the window
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{{pid}}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.1)
        else:
            print(f"trainer {{pid}} still running", flush=True)
            sys.exit(3)
    print("exited cleanly", flush=True)
""")


@pytest.mark.parametrize("mode", ["load", "import", "train"])
def test_closing_the_window_mid_work_exits_cleanly(mode, tmp_path):
    if not os.environ.get("DISPLAY"):
        pytest.skip("needs a display (pytest-xvfb provides one)")
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LESIONSEG_SYNC": ""}
    env.pop("QT_QPA_PLATFORM", None)
    proc = subprocess.run([sys.executable, str(script), mode, str(tmp_path / "p")],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "exited cleanly" in proc.stdout, output[-3000:]
    for bad in ("Traceback", "has been deleted", "Aborted", "QThread: Destroyed"):
        assert bad not in output, output[-3000:]


# ---------------------------------------------------------------- in-process window tests
@pytest.fixture()
def workspace_on(make_napari_viewer, qtbot, tmp_path):
    """``factory(path) -> workspace`` on a viewer of its own (two windows, one project)."""
    from napari_lesionseg._tasks import running_tasks
    from napari_lesionseg._widget import LesionWorkspace

    made = []

    def factory(path):
        viewer = make_napari_viewer()
        ws = LesionWorkspace(viewer)
        viewer.window.add_dock_widget(ws, name="Lesion workspace")
        ws.open_project(path)
        made.append(ws)
        return ws

    yield factory
    for ws in made:
        ws.shutdown()
    qtbot.waitUntil(lambda: running_tasks() == 0, timeout=10_000)


def _show(ws, qtbot, cid):
    from napari_lesionseg._layers import ANNOTATION

    ws.go_to(cid)
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case == cid, timeout=10_000)
    return ws.viewer.layers[ANNOTATION]


def test_two_windows_stale_autosave_is_refused_explicit_save_goes_on_top(workspace_on, qtbot,
                                                                          tmp_path, monkeypatch):
    from napari_lesionseg import _mask_editor
    from training_backend.project.sample import create_sample_project
    from training_backend.project.store import Project

    path = tmp_path / "p"
    create_sample_project(path, reference=True, hide_labels=True)
    a, b = workspace_on(path), workspace_on(path)
    cid = a.project.case_ids()[0]
    layer_a, layer_b = _show(a, qtbot, cid), _show(b, qtbot, cid)
    layer_b.data[0:4, 0:4] = 2
    assert b.annotate_panel.save_now().version == 1       # window B saves first
    layer_a.data[10:14, 10:14] = 1                        # window A still shows "no annotation"
    shown = []
    monkeypatch.setattr(_mask_editor, "show_warning", shown.append)
    assert a.annotate_panel.editor.save_now() is None     # its autosave is refused ...
    layer_a.data[20:24, 20:24] = 1
    assert a.annotate_panel.editor.save_now() is None     # ... at every paint pause,
    assert len(shown) == 1 and "saved meanwhile" in shown[0]  # with one message, not one each
    assert [av.version for av in Project.open(path).case(cid).annotations] == [1]
    av = a.annotate_panel.save_now()                      # Save now: on top, both kept
    assert av.version == 2
    saved = Project.open(path)
    assert saved.read_annotation(cid, 1)[0][0, 0] == 2 and saved.read_annotation(cid, 2)[0][10, 10] == 1


def test_read_only_project_folder_opens_for_looking(workspace_on, qtbot, tmp_path, monkeypatch):
    from napari_lesionseg import _mask_editor
    from training_backend.project.sample import create_sample_project

    path = tmp_path / "p"
    create_sample_project(path)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw:
                        False if mode == os.W_OK and str(path) in str(p) else real(p, mode))
    ws = workspace_on(path)
    assert ws.project is not None and ws.project.mode == "r"
    cid = ws.project.case_ids()[0]
    layer = _show(ws, qtbot, cid)
    before = len(ws.project.case(cid).annotations)
    layer.data[0:4, 0:4] = 1
    errors = []
    monkeypatch.setattr(_mask_editor, "show_error", errors.append)
    for i in range(3):  # autosaves at three paint pauses: one message, the status says the rest
        layer.data[i, 10] = 1
        assert ws.annotate_panel.editor.save_now() is None
        assert "NOT saved" in ws.annotate_panel._save_status.text()
    assert len(errors) == 1 and "read-only" in errors[0]
    assert ws.annotate_panel.save_now() is None           # Save now says it again, keeps the paint
    assert len(errors) == 2
    assert "NOT saved" in ws.annotate_panel._save_status.text()
    assert len(ws.project.case(cid).annotations) == before
