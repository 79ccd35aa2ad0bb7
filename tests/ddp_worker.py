"""One rank of the distributed tests (`tests/test_ddp.py`), run by torchrun.

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py OUT PROJECT``
writes ``OUT/rank<r>.json``:

* ``grads``: the averaged gradients against one process's gradient of the mean loss of both
  ranks' batches, a parameter only rank 1 used, one no rank used;
* ``methods``: for every registered method, a digest of all its parameters (teachers and
  second networks included) after two distributed steps, and its last event;
* ``unsynced``: the same for ``supervised`` with the gradient averaging switched off.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from training_backend.learning import distributed
from training_backend.config import ModelConfig, TrainConfig
from training_backend.events import Finished
from training_backend.learning.methods import METHODS
from training_backend.learning.trainer import _Run


def grads_check(ctx: distributed.DistContext) -> dict:
    """Averaged gradients vs the gradient of the mean loss over both ranks' batches."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    only1 = torch.nn.Parameter(torch.ones(2))
    never = torch.nn.Parameter(torch.ones(2))
    params = [*lin.parameters(), only1, never]
    xs = [torch.randn(5, 4, generator=torch.Generator().manual_seed(10 + r)) for r in range(2)]

    def loss(r: int) -> torch.Tensor:
        value = (lin(xs[r]) ** 2).sum(1).mean()
        return value + (only1.sum() * 3.0 if r == 1 else 0.0)

    loss(ctx.rank).backward()
    distributed.GradientAverager(params, ctx, bucket_bytes=40)()  # several buckets
    got = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    ((loss(0) + loss(1)) / 2).backward()  # one process, the global batch
    diffs = [float((g - p.grad).abs().max()) for g, p in zip(got[:2], params[:2])]
    return {"max_diff": max(diffs), "only1": got[2].tolist() if got[2] is not None else None,
            "never_is_none": got[3] is None}


def digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def methods_check(project: str, names: list[str], tag: str = "ddp") -> dict:
    out = {}
    for name in names:
        cfg = TrainConfig(method=name, steps=2, image_size=32, batch_size=2, device="cpu",
                          threads=1, predict=False, fold_validation=0.0, validate_every=1000,
                          checkpoint_every_s=3600, model=ModelConfig(base=4, depth=3),
                          model_id=f"{tag}-{name}")
        run = _Run(Path(project), cfg, False, None)
        last = None
        try:
            for event in run.events():
                last = event
        finally:
            run.close()
        out[name] = {"digest": digest(run.method), "step": run.step,
                     "finished": isinstance(last, Finished), "world": run.dist.world_size}
    return out


def main() -> None:
    out_dir, project = Path(sys.argv[1]), sys.argv[2]
    ctx = distributed.env_context()
    dist.init_process_group("gloo")  # kept across the runs below (the trainer joins it)
    result = {"grads": grads_check(ctx), "methods": methods_check(project, list(METHODS))}
    # the control: without the averaging the ranks drift apart (so the digests can differ)
    distributed.GradientAverager.__call__ = lambda self: None
    result["unsynced"] = methods_check(project, ["supervised"], tag="unsynced")["supervised"]
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
