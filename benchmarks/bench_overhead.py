"""Cost of the shared training loop and of inference against bare torch, same model, same run.

    .venv/bin/python benchmarks/bench_overhead.py [--steps 60] [--repeats 3] [--threads N] [--classes 1 4]

Training: time per step of `run_training` (sampling, augmentation, lr schedule, events,
periodic checkpoints) against a bare forward / loss / backward / AdamW loop over the same
pre-sampled batches with the same model and loss (the default `supervised` method, 128 px,
batch 8, on the bundled sample). Wall time per step from the first progress report at or after the 5th step to the last; median of
``--repeats`` alternating runs. Target: ≤ 1.10×.

Inference on a 512×512 RGB image, for a model of one lesion class (BUSI) and of four (IDRiD):
`inference.predict_image` (preprocessing from the stored uint8 array, heads, gating, resize
back, numpy) with one pass (``tta=False, mc_samples=1``) on the model's ``inference_copy()``,
which is what ``iter_predictions`` predicts with (eval mode, batch norms folded into their
convolutions), against a bare ``model(x)`` forward of the model as trained, on the
already-preprocessed tensor. Target: ≤ 1.10×. A second row compares the same prediction with
the bare forward of the folded copy: the cost of everything around the network. The default
prediction (flip TTA + 4 MC-dropout samples, for the uncertainty maps) is reported against the
same number of bare forwards.

The models are built by ``create_method``, which puts the convolution weights in channels-last
memory format; the bare side uses that same model. One more row compares that forward with the
same weights in torch's default (contiguous) format, i.e. what the change of format gains.
Like the trainer process and the CLI, the benchmark keeps freed memory (``runtime.py``), for
the bare side and ours alike.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_training(project_path: Path, steps: int, repeats: int, threads: int) -> tuple[float, float]:
    import torch

    from training_backend.learning.data import build_training_set
    from training_backend.events import Progress
    from training_backend.learning.methods import METHODS, create_method
    from training_backend.learning.models import ModelConfig
    from training_backend.project.store import Project
    from training_backend.learning.trainer import TrainConfig, run_training

    model = ModelConfig()
    size, bs, warm = 128, 8, 5
    project = Project.open(project_path)
    ts = build_training_set(project, size, METHODS["supervised"].supervision)
    g = torch.Generator().manual_seed(0)
    batches = [ts.sample(bs, g) for _ in range(steps)]

    def bare() -> float:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        m = create_method("supervised", in_channels=ts.channels, n_classes=len(ts.classes),
                          n_image_classes=len(ts.image_classes), model=model)
        opt = torch.optim.AdamW(m.parameters(), 1e-3, weight_decay=1e-4)
        m.train()
        t0 = 0.0
        for i, b in enumerate(batches):
            if i == warm:
                t0 = time.perf_counter()
            loss = m.training_step(b, i, i / steps)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / (steps - warm)

    def loop() -> float:
        cfg = TrainConfig(method="supervised", steps=steps, batch_size=bs, image_size=size,
                          model=model, threads=threads, validate_every=10**6, predict=False,
                          checkpoint_every_s=60.0)
        # Progress events are throttled (at most one every 0.5 s, plus the first and last
        # step): time between the first one at or after the warm-up and the last one
        seen: list[tuple[int, float]] = []
        for e in run_training(project_path, cfg):
            if isinstance(e, Progress) and e.step >= warm:
                seen.append((e.step, time.perf_counter()))
        (s0, t0), (s1, t1) = seen[0], seen[-1]
        if s1 - s0 < steps // 2:
            raise RuntimeError(f"too few timed steps ({s0}..{s1}); use more --steps")
        return (t1 - t0) / (s1 - s0)

    bares, loops = [], []
    for _ in range(repeats):
        bares.append(bare())
        loops.append(loop())
    return statistics.median(bares), statistics.median(loops)


def bench_inference(repeats: int, threads: int, n_classes: int) -> dict[str, float]:
    import numpy as np
    import torch

    from training_backend.learning.data import preprocess_image
    from training_backend.learning.inference import predict_image
    from training_backend.learning.methods import create_method

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    m = create_method("supervised", in_channels=3, n_classes=n_classes, n_image_classes=3)
    m.eval()
    net = m.net  # the U-Net itself, as trained
    frozen = m.inference_copy()  # what iter_predictions predicts with (batch norms folded)
    x = preprocess_image(image, 3, 512)[None]  # (1, 3, 512, 512)

    def timed_rounds(fns: dict, n: int, warm_s: float = 3.0) -> dict[str, float]:
        """Medians of ``n`` rounds, each timing every function once in turn (load on the
        machine hits all alike), after ``warm_s`` seconds of untimed rounds (the first seconds
        of a process run up to 30 % slower here)."""
        t_end = time.perf_counter() + warm_s
        while time.perf_counter() < t_end:
            for fn in fns.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(n):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
        return {name: statistics.median(v) for name, v in times.items()}

    def bare(k: int = 1):
        with torch.no_grad():
            for _ in range(k):
                net(x)

    plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format)  # torch's default format

    def plain_forward():
        with torch.no_grad():
            plain(x)

    def folded_forward():
        with torch.no_grad():
            frozen.net(x)

    out = timed_rounds({
        "bare_1": bare, "folded_1": folded_forward, "plain_1": plain_forward,
        "ours_1": lambda: predict_image(frozen, image, 3, 512, mc_samples=1, tta=False),
    }, max(25, repeats * 8))
    out.update(timed_rounds({
        "bare_6": lambda: bare(6),
        "ours_default": lambda: predict_image(frozen, image, 3, 512, mc_samples=4, tta=True),
    }, max(5, repeats), warm_s=0.0))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--classes", type=int, nargs="+", default=[1, 4],
                    help="lesion classes of the predicted model (1: BUSI, 4: IDRiD)")
    args = ap.parse_args()
    from training_backend.learning.runtime import keep_freed_memory

    keep_freed_memory()  # as the trainer process and the CLI do (bare and ours alike)

    from training_backend.project.sample import create_sample_project

    with tempfile.TemporaryDirectory(prefix="lesionseg-bench-") as tmp:
        project = Path(tmp) / "sample"
        create_sample_project(project)
        bare_s, loop_s = bench_training(project, args.steps, args.repeats, args.threads)
    print(f"threads: {args.threads}; training 128 px, batch 8, {args.steps} steps x {args.repeats}")
    print("| measurement | bare torch | lesionseg | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| training step (s) | {bare_s:.3f} | {loop_s:.3f} | {loop_s / bare_s:.2f}x | <= 1.10x |")
    for k in args.classes:
        inf = bench_inference(args.repeats, args.threads, k)
        what = f"predict 512x512, {k} lesion class{'es' if k > 1 else ''}"
        print(f"| {what}, one pass (s) | {inf['bare_1']:.3f} | {inf['ours_1']:.3f} | "
              f"{inf['ours_1'] / inf['bare_1']:.2f}x | <= 1.10x |")
        print(f"| {what}, one pass, vs the folded model's forward (s) | {inf['folded_1']:.3f} | "
              f"{inf['ours_1']:.3f} | {inf['ours_1'] / inf['folded_1']:.2f}x | - |")
        print(f"| {what}, one pass, vs the default-format forward (s) | {inf['plain_1']:.3f} | "
              f"{inf['ours_1']:.3f} | {inf['ours_1'] / inf['plain_1']:.2f}x | - |")
        print(f"| {what}, flip TTA + 4 MC samples (s) | {inf['bare_6']:.3f} (6 forwards) | "
              f"{inf['ours_default']:.3f} | {inf['ours_default'] / inf['bare_6']:.2f}x | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
