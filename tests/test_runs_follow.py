"""Runs followed through the project (`runs`) and started by command templates (`launchers`)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

from training_backend import events as ev

from training_backend.jobs import runs
from training_backend.cli.train import config_from_args, register
from training_backend.config import ModelConfig, TrainConfig
from training_backend.errors import InputError
from training_backend.jobs.launchers import (LaunchedRun, Launcher, load_launchers, save_launchers,
                                        train_args)
from training_backend.project.store import Project

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = dict(image_size=32, batch_size=2, device="cpu", threads=1, model=ModelConfig(base=4),
            fold_validation=0.0, validate_every=1000, predict=False)

EXAMPLES = [
    ev.Started("m", "supervised", "cpu", 3, 1, 10, None, start_step=2, world_size=2),
    ev.Progress(3, 10, 1.5, 0.3), ev.Loss(3, {"loss": 0.5, "ce": 0.25}),
    ev.Validation(4, 0.5, {"EX": 0.5, "MA": None}), ev.ValidationFolded(4, 1, 0.5),
    ev.CheckpointSaved(4, "/p/models/m/step_000004.pt"), ev.RoundFinished(1, 7, None),
    ev.PredictionsReady("m", ("a", "b")), ev.PredictionProgress(1, 2, 0.1),
    ev.PretrainedEncoder("/p/models/_pretrained/encoder.pt", ("net.encoder", "teacher.encoder"),
                         40, 12),
    ev.InitFrom("fundus-starter", 52, ("net.out.conv.conv.bias", "net.out.conv.conv.weight"),
                "its class heads start anew"),
    ev.Finished("m", 10, "steps", "/p/x.pt"), ev.Failed("bad", "tb", user_error=True),
]


@pytest.fixture()
def project(bundled_sample):
    return bundled_sample


# ----------------------------------------------------------------------------- the record
def test_every_event_goes_through_json():
    assert {type(e).__name__ for e in EXAMPLES} == set(ev.EVENT_TYPES)
    for event in EXAMPLES:
        assert ev.from_dict(json.loads(json.dumps(ev.to_dict(event)))) == event
    with pytest.raises(ValueError, match="unknown event"):
        ev.from_dict({"event": "Nope"})


def test_writer_heartbeat_stop_request_and_a_torn_line(tmp_path, monkeypatch):
    monkeypatch.setattr(runs, "STOP_POLL_S", 0.0)
    monkeypatch.setattr(runs, "HEARTBEAT_S", 0.02)
    writer = runs.RunWriter(tmp_path, "m1", world_size=2)
    folder = runs.run_dir(tmp_path, "m1")
    for event in EXAMPLES[:3]:
        writer.write(event)
    assert [i.model_id for i in runs.list_runs(tmp_path)] == ["m1"]
    deadline = time.monotonic() + 5
    while runs.run_info(tmp_path, "m1").step != 3 and time.monotonic() < deadline:
        time.sleep(0.01)                # the next heartbeat carries the step
    info = runs.run_info(tmp_path, "m1")
    assert (info.state, info.world_size, info.step) == ("running", 2, 3)
    assert not writer.stop_requested()
    runs.request_stop(tmp_path, "m1", by="tester")
    assert writer.stop_requested() and runs.run_info(tmp_path, "m1").stop_requested
    # a reader never sees half a line: the tail waits for its newline
    path = folder / runs.EVENTS_FILE
    with open(path, "ab") as fh:
        fh.write(b'{"event": "Progress", "step": 9')
    records, offset = runs.read_records(path)
    assert [r.get("event") for r in records] == [None, "Started", "Progress", "Loss"]
    assert offset < path.stat().st_size
    writer.close()                      # after a torn line, the next line starts afresh
    assert not (folder / runs.HEARTBEAT_FILE).exists() and not (folder / runs.STOP_FILE).exists()
    runs.RunWriter(tmp_path, "m1", resume=True).close()
    records, _ = runs.read_records(path)
    assert sum("run" in r for r in records) == 2
    assert runs.read_events(path) == []                       # the newest attempt wrote nothing
    assert runs.list_runs(tmp_path) == []


def test_stop_after_the_run_ended_leaves_no_request_behind(tmp_path):
    writer = runs.RunWriter(tmp_path, "m3")
    writer.write(EXAMPLES[0])
    writer.write(ev.Finished("m3", 5, "steps", "ckpt.pt"))
    writer.close()
    follower = runs.RunFollower(tmp_path, "m3")
    follower.cancel()  # the run is over: a request now would stop its next resume at step 0
    assert not follower.stop_sent
    assert not (runs.run_dir(tmp_path, "m3") / runs.STOP_FILE).exists()


def test_follower_notices_a_trainer_that_died(tmp_path):
    writer = runs.RunWriter(tmp_path, "m2")
    writer.write(EXAMPLES[0])
    writer._done.set()                  # noqa: SLF001 - the heartbeat stops, as when killed
    writer._thread.join()               # noqa: SLF001
    follower = runs.RunFollower(tmp_path, "m2", stale_s=0.3)
    assert follower.poll() == [EXAMPLES[0]] and not follower.done
    time.sleep(0.5)
    [failed] = follower.poll()
    assert isinstance(failed, ev.Failed) and "stopped reporting" in failed.message
    assert runs.run_info(tmp_path, "m2", stale_s=0.3).state == "stale"


def test_follow_and_stop_a_cli_run_through_the_project(project):
    """A run started by the command line in another process is listed, followed and stopped."""
    cmd = [sys.executable, "-m", "training_backend", "train", "--project", str(project),
           "--budget-s", "600", "--model-id", "cli-run", "--checkpoint-every-s", "3600",
           *train_args(TrainConfig(**TINY), project)[4:]]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while "cli-run" not in [i.model_id for i in runs.list_runs(project)]:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        follower = runs.RunFollower(project, "cli-run", by="tester")
        seen: list = []
        while not any(isinstance(e, ev.Loss) for e in seen):
            assert time.monotonic() < deadline
            seen += follower.poll()
            time.sleep(0.1)
        assert isinstance(seen[0], ev.Started) and seen[0].budget_s == 600
        follower.cancel()
        seen += follower.wait(timeout=60)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert isinstance(seen[-1], ev.Finished) and seen[-1].reason == "cancelled"
    assert any(isinstance(e, ev.Progress) for e in seen)
    assert Project.open(project).models()["cli-run"]["status"] == "cancelled"
    assert runs.run_info(project, "cli-run").state == "finished"
    assert not (runs.run_dir(project, "cli-run") / runs.STOP_FILE).exists()  # acted on


# ----------------------------------------------------------------------------- launchers
def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def test_train_args_give_the_config_back():
    cfg = TrainConfig(method="mean_teacher", method_options={"ema_decay": 0.9, "name": "x y",
                                                             "flag": "1"},
                      model=ModelConfig(base=8), steps=12, budget_s=30.5, batch_size=3,
                      image_size=64, crop_size=32, lr=3e-4, device="cuda", threads=2, seed=5, rounds=2,
                      checkpoint_every_s=9.5, validate_every=7, fold_validation=0.1,
                      predict=False, mc_samples=2, predict_first=["c1", "c2"],
                      init_from="/p/models/a/latest.pt", model_id="mt-1", pretrained="none")
    args = _parse(train_args(cfg, "/p q/project", resume=True))
    assert args.project == "/p q/project" and args.resume
    assert config_from_args(args) == cfg
    with pytest.raises(InputError, match="weight_decay"):
        train_args(TrainConfig(weight_decay=0.5), "/p")


def test_launcher_template_quoting_paths_and_settings(tmp_path, monkeypatch):
    launcher = Launcher("gpu1", 'ssh gpu1 "lesionseg train {args}" # {model_id} {project}',
                        local_root="/Volumes/shared", remote_root="/mnt/shared")
    cfg = TrainConfig(steps=5, model_id="sup-1", init_from="/Volumes/shared/p q/models/a/latest.pt")
    cmd = launcher.command(cfg, "/Volumes/shared/p q")
    inner = shlex.split(cmd)[2]              # what the remote shell receives
    args = _parse(shlex.split(inner)[2:])
    assert args.project == "/mnt/shared/p q" and args.init_from.startswith("/mnt/shared/p q/")
    assert cmd.endswith("# sup-1 '/mnt/shared/p q'")
    assert launcher.remote_path("/Volumes/sharedX/p") == "/Volumes/sharedX/p"   # not the prefix
    with pytest.raises(InputError, match="must contain {args}"):
        Launcher("bad", "ssh gpu1 lesionseg train")
    monkeypatch.setenv("LESIONSEG_CONFIG_DIR", str(tmp_path / "cfg"))
    assert load_launchers() == []
    save_launchers([launcher])
    assert load_launchers() == [launcher]
    (tmp_path / "cfg" / "launchers.json").write_text("{not json")
    with pytest.raises(InputError, match="launchers.json"):
        load_launchers()


def test_a_templated_launcher_trains_and_its_failures_are_reported(project):
    ok = Launcher("local shell", 'bash -c "{python} -m training_backend train {args}"')
    run = LaunchedRun(ok, project, TrainConfig(steps=3, **TINY))
    assert run.model_id.startswith("supervised-")
    run.start()
    events = run.wait(timeout=90)
    assert isinstance(events[0], ev.Started) and events[0].model_id == run.model_id
    assert isinstance(events[-1], ev.Finished) and events[-1].step == 3, events[-1]
    assert run.model_id in Project.open(project).models()
    run.close()

    unreachable = Launcher("gpu9", 'echo "ssh: Could not resolve hostname gpu9" >&2; exit 255 '
                                   "# {args}")
    run = LaunchedRun(unreachable, project, TrainConfig(steps=3, **TINY))
    run.start()
    [failed] = run.wait(timeout=30)
    assert failed.message == ("launcher 'gpu9' failed (exit code 255): "
                              "ssh: Could not resolve hostname gpu9")
    run.close()

    # a launcher that returns at once (sbatch) leaves the run to be followed
    queued = Launcher("queue", "echo 'Submitted batch job 42' # {args}")
    run = LaunchedRun(queued, project, TrainConfig(steps=3, **TINY))
    run.start()
    deadline = time.monotonic() + 10
    while run.returncode is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert run.poll() == [] and not run.done
    assert run.status() == "queue returned (Submitted batch job 42); waiting for the run to start"
    run.close()
