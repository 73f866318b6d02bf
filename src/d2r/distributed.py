"""Data-parallel training under torchrun: `torchrun --nproc_per_node=N -m d2r train ...`.

Each rank trains on its slice of every global batch (`data.batch_size` is the global batch;
DeviceLoader cuts the same seeded permutation on every rank). The whole Method is wrapped in
DistributedDataParallel, so its forward - attack and loss - runs inside DDP's forward and the
gradients of both models are all-reduced once, in the one backward of the step. The attack's
`torch.autograd.grad` calls differentiate w.r.t. the input only: they never reach the
parameters' gradient accumulators, so DDP's reducer sees nothing until that backward.

Only rank 0 writes (run directory, logs, checkpoints) and evaluates; checkpoints hold the
unwrapped models' state dicts, so a run resumes with any number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank r of world_size, local_rank on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> Context:
    """The context torchrun sets in RANK, WORLD_SIZE, LOCAL_RANK (a single process without)."""
    env = os.environ
    return Context(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def device_name(name: str, ctx: Context) -> str:
    """One GPU per process: "auto"/"cuda" becomes cuda:LOCAL_RANK under torchrun."""
    if ctx.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    return name


def setup(ctx: Context, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) once; nothing for one process."""
    if not ctx.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # Rank 0 evaluates alone after each epoch while the others wait in the next collective
    # (within the default 30-minute timeout for the per-epoch eval.subset).
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(method: nn.Module, ctx: Context, device: torch.device, sync_bn: bool) -> nn.Module:
    """What the training step calls: `method` itself for one process, else DDP around it
    (with SyncBatchNorm first if asked). Call before building the optimizer."""
    if not ctx.enabled:
        return method
    if sync_bn:
        if device.type != "cuda":
            raise ValueError(
                "train.sync_bn=true needs CUDA (torch's SyncBatchNorm has no CPU "
                "kernel); use train.sync_bn=false on CPU"
            )
        nn.SyncBatchNorm.convert_sync_batchnorm(method)  # replaces the BN children in place
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(method, device_ids=ids)


def all_mean(x: Tensor) -> Tensor:
    """The mean of `x` over ranks (x itself for one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def mean_over_ranks(x: Tensor) -> Tensor:
    """For a loss term that is not a mean of per-example terms (D2R's |K1 - K2|): the value of
    `x` averaged over ranks, with the gradient of the local `x`. DDP's gradient averaging then
    supplies the 1/N of the mean, so the step is the global batch's, and the only collective
    runs in the forward pass (one in the backward could interleave with DDP's own all-reduces
    in a different order on each rank). `x` itself in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return x + (all_mean(x.detach()) - x).detach()
