"""One model trained by several processes (``torchrun``, ``torch.distributed``).

``torchrun --nproc-per-node N -m training_backend train --project P ...`` (or ``lesionseg train
--nproc N``, which starts ``torch.distributed.run`` itself) runs the same training loop in N
processes. This module holds what the loop needs for that; ``trainer.py`` calls it at a few
points and stays a plain one-process loop when ``WORLD_SIZE`` is 1 or unset.

* **Environment.** `env_context` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
  ``LOCAL_WORLD_SIZE`` (set by torchrun); `init` starts the process group: NCCL on CUDA (each
  process takes the GPU of its local rank), gloo on the CPU.
* **Gradients.** After ``backward()`` every process has the gradient of its own batch;
  `GradientAverager` replaces it by the mean over the processes with one ``all_reduce`` per
  flat bucket of ``method.trainable_parameters()``, and all processes take the same optimiser
  step. The weights start equal (`broadcast_module` sends rank 0's at the start), so they stay
  equal. We do this rather than wrap the networks in ``DistributedDataParallel``: DDP
  synchronises inside ``backward`` of *one* wrapped module's forward, while our methods run
  several forward passes per step (student and EMA teacher, two networks trained together,
  clean and perturbed passes, no-grad teacher passes) and some parameters get no gradient in a
  given step. Averaging after ``backward`` needs nothing from the method and is correct for all
  of them; what it gives up is DDP's overlap of communication with the backward pass, which
  matters little for networks of this size. A parameter that got no gradient on any process
  keeps ``grad=None`` (AdamW skips it, as in one process); one that got a gradient on some
  processes only is averaged with zeros for the others.
* **Buffers.** Batch-norm statistics stay each process's own (DDP with
  ``broadcast_buffers=False``); rank 0's are the ones checkpointed, validated and predicted with.
  EMA teachers follow the (equal) student weights, so they stay equal too.
* **Decisions.** Only rank 0 knows the wall clock, the cancel flag and the stop request:
  `control` broadcasts its decision (stop or go, and the run's progress fraction, which drives
  the learning-rate schedule, the rounds and the validation fold) every step in one small tensor.
* **Data.** Every process samples its batch from the whole training set with its own generator
  (`rank_seed`). The sampler draws with replacement, weighted, so N processes drawing B images
  each draw exactly as one process drawing N x B would; disjoint shards would change the
  weights and leave a small project's shard without a kind of supervision.
"""
from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist

from training_backend.errors import InputError

#: Seconds a process waits in a collective before giving up. Rank 0 validates, checkpoints and
#: predicts the project's cases alone while the others wait in the next step's broadcast, which
#: can take a while on a big project.
TIMEOUT_S = 4 * 3600.0
#: Gradient bucket size for one ``all_reduce``.
BUCKET_BYTES = 25 * 1024 * 1024
#: Stop codes of `control`, in order; 0 = go on.
STOP_REASONS = (None, "steps", "budget", "cancelled")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a distributed run.

    Args:
        rank: global rank (0 decides, logs and saves).
        world_size: number of processes (1: not distributed).
        local_rank: rank on this machine (picks the GPU).
        local_world_size: processes on this machine (share its CPU cores).
        backend: ``"nccl"`` or ``"gloo"`` once `init` ran.
        owns_group: `init` created the process group (and `shutdown` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, events and predictions."""
        return self.rank == 0


def env_context(environ: dict[str, str] | None = None) -> DistContext:
    """The context torchrun describes in the environment (a single process without it).

    Args:
        environ: the environment (default ``os.environ``).
    """
    env = os.environ if environ is None else environ

    def read(name: str, default: int) -> int:
        value = env.get(name)
        if value in (None, ""):
            return default
        try:
            return int(value)
        except ValueError:
            raise InputError(name, f"environment variable must be an integer, got {value!r}") from None

    world = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise InputError("RANK", f"rank {rank} does not fit WORLD_SIZE {world}")
    local_rank = read("LOCAL_RANK", 0)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank,
                       local_world_size=max(1, read("LOCAL_WORLD_SIZE", world)))


def device_name(name: str, ctx: DistContext) -> str:
    """The device this process trains on: under torchrun, ``auto`` and ``cuda`` mean the GPU
    of the local rank.

    Args:
        name: the run's ``device`` setting.
        ctx: this process's context.
    """
    if not ctx.enabled:
        return name
    if name == "auto":
        return f"cuda:{ctx.local_rank}" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return f"cuda:{ctx.local_rank}"
    if name.startswith("cuda:"):
        raise InputError("--device", f"{name}: with several processes each one takes the GPU of "
                                     "its local rank; give --device cuda (or auto)")
    if name == "mps":
        raise InputError("--device", "mps: training across processes needs CUDA or the CPU")
    return name


def default_threads(ctx: DistContext) -> int:
    """CPU threads per process: the machine's cores shared by its processes."""
    return max(1, (os.cpu_count() or 1) // max(1, ctx.local_world_size))


def init(ctx: DistContext, device: torch.device, timeout_s: float = TIMEOUT_S) -> DistContext:
    """Join the process group (NCCL on CUDA, gloo otherwise); nothing for one process.

    A process group the caller already started is used as it is (and left to the caller).

    Args:
        ctx: from `env_context`.
        device: this process's device.
        timeout_s: seconds a collective may wait.
    """
    if not ctx.enabled:
        return ctx
    if dist.is_initialized():
        return replace(ctx, backend=str(dist.get_backend()), owns_group=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:  # torch >= 2.3
            kwargs["device_id"] = device
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return replace(ctx, backend=backend, owns_group=True)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group `init` created."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects; e.g. the model id it chose).

    Args:
        obj: the object (ignored on ranks > 0).
        ctx: this process's context.
    """
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's parameters and buffers (every network, teachers included) to all ranks.

    Args:
        module: the method.
        ctx: this process's context.
    """
    if not ctx.enabled:
        return
    for tensor in module.state_dict().values():
        if isinstance(tensor, torch.Tensor):
            dist.broadcast(tensor, src=0)


def _buckets(params: list[torch.nn.Parameter], limit: int) -> list[list[torch.nn.Parameter]]:
    """Consecutive groups of parameters of one dtype and device, each at most ``limit`` bytes
    (a larger parameter gets a bucket of its own)."""
    out: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        last = out[-1] if out else None
        if (last is None or last[0].dtype != p.dtype or last[0].device != p.device
                or size + nbytes > limit):
            out.append([p])
            size = nbytes
        else:
            last.append(p)
            size += nbytes
    return out


class GradientAverager:
    """Replace each parameter's gradient by its mean over the ranks (call after ``backward``).

    One flat ``all_reduce`` per bucket; each bucket also carries one flag per parameter (had a
    gradient on this rank) so that a parameter no rank computed a gradient for stays
    ``grad=None`` everywhere.

    Args:
        params: the parameters the optimiser updates (``method.trainable_parameters()``).
        ctx: this process's context.
        bucket_bytes: most gradient bytes per ``all_reduce``.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], ctx: DistContext,
                 bucket_bytes: int = BUCKET_BYTES):
        self.ctx = ctx
        self.buckets = _buckets(list(params), bucket_bytes)

    @torch.no_grad()
    def __call__(self) -> None:
        if not self.ctx.enabled:
            return
        world = float(self.ctx.world_size)
        for bucket in self.buckets:
            parts = [p.grad.reshape(-1) if p.grad is not None
                     else torch.zeros(p.numel(), dtype=p.dtype, device=p.device) for p in bucket]
            flags = torch.tensor([p.grad is not None for p in bucket], dtype=bucket[0].dtype,
                                 device=bucket[0].device)
            flat = torch.cat(parts + [flags])  # (sum numel + n_params,)
            dist.all_reduce(flat)  # sum over the ranks
            n = flat.numel() - len(bucket)
            flat[:n].div_(world)
            offset = 0
            for p, seen in zip(bucket, flat[n:].tolist()):
                view = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if seen == 0:
                    p.grad = None
                elif p.grad is None:
                    p.grad = torch.zeros_like(p).copy_(view)
                else:
                    p.grad.copy_(view)


def control(ctx: DistContext, reason: str | None, fraction: float,
            device: torch.device) -> tuple[str | None, float]:
    """Rank 0's decision for this step, on every rank: stop (and why) or go on, and the run's
    progress fraction.

    Args:
        ctx: this process's context.
        reason: rank 0's stop reason (`STOP_REASONS`); ignored on other ranks.
        fraction: rank 0's progress fraction; ignored on other ranks.
        device: where the collective's tensor lives (the CUDA device for NCCL).
    """
    if not ctx.enabled:
        return reason, fraction
    t = torch.tensor([float(STOP_REASONS.index(reason)), float(fraction)], dtype=torch.float64,
                     device=device)
    dist.broadcast(t, src=0)
    code, frac = t.tolist()
    return STOP_REASONS[int(code)], float(frac)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """Seed of rank ``rank``'s streams from step ``step`` on (a resumed run re-derives them;
    rank 0 keeps the checkpointed streams instead).

    Args:
        seed: the run's seed.
        rank: the process's rank.
        step: the step the streams start at.
    """
    state = np.random.SeedSequence([int(seed), int(rank), int(step)]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The ``torch.distributed.run`` command that trains with ``argv`` in ``nproc`` processes
    on this machine.

    Args:
        nproc: processes (e.g. the GPUs of this machine).
        argv: ``lesionseg train`` arguments without ``--nproc``.
    """
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={int(nproc)}", "-m", "training_backend", "train", *argv]


def launch(nproc: int, argv: list[str], on_interrupt: Callable[[], None] | None = None) -> int:
    """Run ``lesionseg train`` in ``nproc`` processes on this machine through torchrun and
    return its exit code.

    torchrun runs in a session of its own, so Ctrl-C in the terminal reaches this process
    only: the first calls ``on_interrupt`` (the CLI writes a stop request into the project, and
    the run stops gracefully as one process does); a second one, SIGTERM or SIGHUP, ends
    torchrun, which ends its processes.

    Args:
        nproc: processes.
        argv: the train arguments without ``--nproc``.
        on_interrupt: called on the first Ctrl-C.
    """
    if nproc < 1:
        raise InputError("--nproc", f"must be at least 1, got {nproc}")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(default_threads(DistContext(world_size=nproc,
                                                                      local_world_size=nproc))))
    proc = subprocess.Popen(torchrun_command(nproc, argv), env=env, start_new_session=True)
    interrupts = 0

    def interrupt(signum, frame) -> None:
        nonlocal interrupts
        interrupts += 1
        if signum == signal.SIGINT and interrupts == 1 and on_interrupt is not None:
            on_interrupt()
        elif proc.poll() is None:
            proc.terminate()

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, interrupt) for s in handled} if _main_thread() else {}
    try:
        return proc.wait()  # retried after each handler (PEP 475)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


__all__ = ["DistContext", "env_context", "device_name", "default_threads", "init", "shutdown",
           "broadcast_object", "broadcast_module", "GradientAverager", "control", "rank_seed",
           "torchrun_command", "launch", "TIMEOUT_S", "STOP_REASONS"]
