"""Training throughput in one and in several processes (torchrun), in the same run.

    .venv/bin/python benchmarks/bench_ddp.py [--procs 1,2] [--steps 60] [--image-size 128]
        [--batch-size 8] [--method supervised] [--device cpu] [--repeats 1] [--project P]

Each row is ``lesionseg train --nproc N`` on the bundled sample (or ``--project``): N
processes, each taking ``--batch-size`` images per step, so a step trains N x batch images.
On the CPU the processes share the machine's cores (each gets cores / N threads), so the ratio
says what splitting the same cores between processes costs or gains; on GPUs (``--device
cuda``) each process has a GPU of its own. Images per second are read from the run's own record
(``runs/<model id>/events.jsonl``): the steps between the first progress report at or after
step 5 and the last one, over the training time between them (set-up, validation, checkpoints
and predictions are left out: validation and predictions are off, one checkpoint at the end).
The median of ``--repeats`` runs per row; the last line gives each row against one process.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP_STEPS = 5


def images_per_s(project: Path, model_id: str, nproc: int, batch_size: int) -> float:
    """Training images per second of a finished run, from its events."""
    from training_backend import events as ev
    from training_backend.jobs import runs

    progress = [e for e in runs.read_events(runs.run_dir(project, model_id) / runs.EVENTS_FILE)
                if isinstance(e, ev.Progress) and e.step >= WARMUP_STEPS]
    if len(progress) < 2 or progress[-1].elapsed_s <= progress[0].elapsed_s:
        raise SystemExit(f"{model_id}: too few progress reports; give more --steps")
    first, last = progress[0], progress[-1]
    return (last.step - first.step) * nproc * batch_size / (last.elapsed_s - first.elapsed_s)


def run_once(project: Path, nproc: int, args: argparse.Namespace, tag: str) -> float:
    model_id = f"bench-ddp-{tag}-n{nproc}"
    cmd = [sys.executable, "-m", "training_backend", "train", "--nproc", str(nproc),
           "--project", str(project), "--method", args.method, "--steps", str(args.steps),
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--device", args.device, "--validate-every", "1000000", "--fold-validation", "0",
           "--checkpoint-every-s", "1e9", "--no-predict", "--model-id", model_id]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return images_per_s(project, model_id, nproc, args.batch_size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", default="1,2", help="process counts (default: 1,2)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="images per process and step")
    parser.add_argument("--method", default="supervised")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--project", type=Path, help="a project (default: the bundled sample)")
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]

    from training_backend.project.sample import create_sample_project

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        if args.project is not None:
            shutil.copytree(args.project, project)
        else:
            create_sample_project(project)
        rows = {}
        for n in procs:
            rates = [run_once(project, n, args, str(r)) for r in range(args.repeats)]
            rows[n] = statistics.median(rates)
            print(f"{n} process(es): {rows[n]:.1f} images/s  (runs: "
                  f"{', '.join(f'{x:.1f}' for x in rates)})", flush=True)
    base = rows.get(1)
    if base:
        print("ratio to 1 process: " + ", ".join(f"{n}: {rows[n] / base:.2f}x" for n in procs))
    print(f"({args.method}, {args.image_size} px, batch {args.batch_size} per process, "
          f"{args.steps} steps, device {args.device}, {os.cpu_count()} CPU cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
