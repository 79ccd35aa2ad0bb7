"""The trainer panel with runs elsewhere: it follows and stops a run the command line started,
and starts one through a command-template launcher (a local shell here, SSH or SLURM in use).

Style as in test_plugin_workspace: call the panel's handlers, wait with ``qtbot.waitUntil``.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from napari_lesionseg import _trainer_panel
from napari_lesionseg._layers import PREDICTION
from napari_lesionseg._tasks import running_tasks
from napari_lesionseg._widget import LesionWorkspace
from training_backend import events as ev
from training_backend.jobs import runs
from training_backend.jobs.launchers import Launcher

pytestmark = pytest.mark.gui


@pytest.fixture()
def workspace(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    monkeypatch.setenv("LESIONSEG_CONFIG_DIR", str(tmp_path / "config"))  # the user's settings
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # runs started from here inherit it
    viewer = make_napari_viewer()
    ws = LesionWorkspace(viewer)
    viewer.window.add_dock_widget(ws, name="Lesion workspace")
    yield ws
    ws.shutdown()
    qtbot.waitUntil(lambda: running_tasks() == 0, timeout=10_000)


def test_follow_a_cli_run_and_stop_it_through_the_project(workspace, qtbot, tiny_project):
    ws = workspace
    ws.open_project(tiny_project.path)
    trainer = ws.trainer_panel
    cli = subprocess.Popen(
        [sys.executable, "-m", "training_backend", "train", "--project", str(tiny_project.path),
         "--budget-s", "600", "--model-id", "from-cli", "--image-size", "32", "--base", "4",
         "--batch-size", "2", "--device", "cpu", "--threads", "1", "--validate-every", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        qtbot.waitUntil(lambda: "from-cli" in trainer.refresh_runs(), timeout=60_000)
        assert trainer._attach_btn.isEnabled()                            # noqa: SLF001
        assert trainer.attach(trainer._runs.currentData())                # noqa: SLF001
        assert ws.state.training and not trainer.start()                   # one run at a time
        qtbot.waitUntil(lambda: "validation Dice" in trainer.status_text(), timeout=60_000)
        assert "from-cli on cpu" in trainer.status_text()
        assert trainer.run_curve.loss and trainer.run_curve.dice
        assert trainer._bar.format().startswith("step ")                  # noqa: SLF001
        trainer.stop()                          # a stop request through the project
        assert trainer._stop_btn.text() == "Detach"                       # noqa: SLF001
        qtbot.waitUntil(lambda: trainer.process is None, timeout=60_000)
        assert cli.wait(timeout=30) == 0
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    last = trainer.events_seen[-1]
    assert isinstance(last, ev.Finished) and last.reason == "cancelled"
    assert trainer._bar.format().startswith("finished: cancelled")        # noqa: SLF001
    assert ws.project.models()["from-cli"]["status"] == "cancelled"
    assert not ws.state.training and trainer.refresh_runs() == []


def test_a_templated_launcher_trains_and_its_errors_show(workspace, qtbot, tiny_project,
                                                        monkeypatch):
    ws = workspace
    ws.open_project(tiny_project.path)
    trainer = ws.trainer_panel
    qtbot.waitUntil(lambda: "supervised" in trainer.available_methods(), timeout=10_000)
    trainer.save_launcher(Launcher("local shell",
                                   'bash -c "{python} -m training_backend train {args}"'))
    assert trainer._where.currentText() == "local shell"                  # noqa: SLF001
    cid = tiny_project.case_ids()[7]
    ws.go_to(cid)
    qtbot.waitUntil(lambda: ws.annotate_panel.shown_case == cid, timeout=10_000)
    trainer.configure(method="supervised", steps=3, budget_s=0, image_size=32, device="cpu")
    assert trainer.start()
    assert trainer.process.command.startswith("bash -c ")
    qtbot.waitUntil(lambda: trainer.process is None, timeout=90_000)
    kinds = [type(e).__name__ for e in trainer.events_seen]
    assert kinds[0] == "Started" and kinds[-1] == "Finished", kinds
    ready = [e for e in trainer.events_seen if isinstance(e, ev.PredictionsReady)]
    assert ready[0].case_ids == (cid,)                  # the case on screen first, as locally
    qtbot.waitUntil(lambda: PREDICTION in ws.viewer.layers, timeout=10_000)
    model_id = trainer.events_seen[0].model_id
    assert ws.project.models()[model_id]["step"] == 3
    assert runs.run_info(tiny_project.path, model_id).state == "finished"

    # a launcher that cannot reach its host: its own message, in one line
    errors: list[str] = []
    monkeypatch.setattr(_trainer_panel, "show_error", errors.append)
    trainer.save_launcher(Launcher("gpu9", 'echo "ssh: Could not resolve hostname gpu9: Name '
                                           'or service not known" >&2; exit 255 # {args}'))
    assert trainer.start()
    qtbot.waitUntil(lambda: trainer.process is None, timeout=30_000)
    assert errors == ["launcher 'gpu9' failed (exit code 255): ssh: Could not resolve hostname "
                      "gpu9: Name or service not known"]
    assert "failed: launcher 'gpu9'" in trainer.status_text()
    assert trainer._start_btn.isEnabled()                                 # noqa: SLF001
    # the launchers are the user's settings: a new panel lists them
    trainer.reload_launchers()
    names = [trainer._where.itemText(i) for i in range(trainer._where.count())]  # noqa: SLF001
    assert names == ["this computer", "local shell", "gpu9"]
    trainer.remove_launcher("gpu9")
    assert trainer._where.count() == 2                                    # noqa: SLF001
