"""Training one model in two CPU processes (torchrun, gloo) on the bundled sample."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training_backend.learning import distributed

from training_backend import events as ev

from training_backend.jobs import runs
from training_backend.learning.checkpoints import load_checkpoint
from training_backend.errors import InputError
from training_backend.project.store import Project

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
#: A tiny, fast run: 32 px, 4-channel networks, one thread per process.
TINY = ["--image-size", "32", "--batch-size", "2", "--base", "4", "--device", "cpu",
        "--threads", "1", "--validate-every", "1000", "--fold-validation", "0", "--no-predict"]


@pytest.fixture()
def project(bundled_sample):
    return bundled_sample


def test_env_context_and_devices():
    assert not distributed.env_context({}).enabled
    ctx = distributed.env_context({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (1, 2, 1, False)
    assert distributed.device_name("cpu", ctx) == "cpu"
    assert distributed.device_name("cuda", ctx) == "cuda:1"     # the GPU of the local rank
    with pytest.raises(InputError, match="each one takes the GPU of its local rank"):
        distributed.device_name("cuda:0", ctx)
    with pytest.raises(InputError, match="WORLD_SIZE"):
        distributed.env_context({"RANK": "2", "WORLD_SIZE": "2"})
    # rank 0 keeps the checkpointed streams; the others' are derived, distinct and repeatable
    seeds = {distributed.rank_seed(0, r, 10) for r in range(1, 4)}
    assert len(seeds) == 3 and distributed.rank_seed(0, 1, 10) in seeds
    assert distributed.rank_seed(0, 1, 10) != distributed.rank_seed(0, 1, 11)


def test_every_method_trains_in_step_on_two_ranks(project, tmp_path):
    """Gradients are averaged exactly; the weights of every method (teachers, second
    networks) stay equal on both ranks; without the averaging they would not."""
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node=2", str(HERE / "ddp_worker.py"), str(out), str(project)],
                   env=ENV, check=True, timeout=150, capture_output=True)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):
        assert r["grads"]["max_diff"] < 1e-6          # = one process on the global batch
        assert r["grads"]["only1"] == [1.5, 1.5]      # used on one rank of two: 3.0 / 2
        assert r["grads"]["never_is_none"]            # used nowhere: no gradient, AdamW skips it
    assert set(r0["methods"]) == set(r1["methods"]) and len(r0["methods"]) >= 8
    for name, a in r0["methods"].items():
        b = r1["methods"][name]
        assert a["finished"] and b["finished"] and a["step"] == b["step"] == 2, name
        assert a["world"] == 2, name
        assert a["digest"] == b["digest"], f"{name}: the ranks' weights differ"
    assert r0["unsynced"]["digest"] != r1["unsynced"]["digest"]


def _records(project: Path, model_id: str) -> list[dict]:
    records, _ = runs.read_records(runs.run_dir(project, model_id) / runs.EVENTS_FILE)
    return records


def test_two_processes_checkpoint_die_and_resume_in_one(project):
    mid = "ddp-kill"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "training_backend", "train", "--nproc", "2", "--project",
         str(project), "--steps", "60", "--checkpoint-every-s", "0.001", "--model-id", mid, *TINY],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        saved = []
        while not saved:
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            assert launcher.poll() is None, launcher.communicate()[1].decode()[-2000:]
            saved = [r for r in _records(project, mid)
                     if r.get("event") == "CheckpointSaved" and r["step"] >= 3]
            time.sleep(0.05)
        beat = runs.read_heartbeat(project, mid)
        assert beat["world_size"] == 2
        os.kill(beat["pid"], signal.SIGKILL)          # rank 0 dies mid-run
        assert launcher.wait(timeout=60) != 0         # torchrun ends the other rank too
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    ckpt = load_checkpoint(project / "models" / mid / "latest.pt")
    k = int(ckpt["step"])
    assert 3 <= k < 60 and ckpt["meta"]["world_size"] == 2
    assert runs.run_info(project, mid, stale_s=0.0).state == "stale"   # its heartbeat stopped

    done = subprocess.run([sys.executable, "-m", "training_backend", "train", "--project",
                           str(project), "--resume", "--model-id", mid, "--device", "cpu",
                           "--threads", "1"], env=ENV, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    headers = [r["run"] for r in _records(project, mid) if "run" in r]
    assert [h["world_size"] for h in headers] == [2, 1] and headers[1]["resume"]
    events = runs.read_events(runs.run_dir(project, mid) / runs.EVENTS_FILE)  # newest attempt
    started, finished = events[0], events[-1]
    assert isinstance(started, ev.Started) and started.start_step == k and started.world_size == 1
    assert isinstance(finished, ev.Finished) and finished.step == 60 and finished.reason == "steps"
    assert Project.open(project).models()[mid]["step"] == 60
    assert runs.run_info(project, mid).state == "finished"


def test_nproc_builds_the_torchrun_command():
    cmd = distributed.torchrun_command(3, ["--project", "P"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
                       "-m", "training_backend", "train", "--project", "P"]
