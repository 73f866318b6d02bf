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
    """Where this process stands: rank r of world_size, local_rank on its machine; `launched`
    when a launcher (torchrun) set up the process group's rendezvous."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Distributed (process group, DDP): under torchrun even as its only process, so that
        `torchrun --nproc_per_node=1` on one GPU runs the code path of N GPUs (NCCL, DDP,
        SyncBatchNorm) and can test it."""
        return self.launched or self.world_size > 1


# What torchrun sets, and what init_process_group's env:// rendezvous reads
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def from_env() -> Context:
    """The context torchrun sets in RANK, WORLD_SIZE, LOCAL_RANK (a single process without)."""
    env = os.environ
    return Context(
        int(env.get("RANK", 0)),
        int(env.get("WORLD_SIZE", 1)),
        int(env.get("LOCAL_RANK", 0)),
        launched=all(key in env for key in _LAUNCHER_VARS),
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
    (with SyncBatchNorm first if asked: torch's on CUDA, GlooSyncBatchNorm on CPU). Call before
    building the optimizer."""
    if not ctx.enabled:
        return method
    if sync_bn and device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(method)  # replaces the BN children in place
    elif sync_bn:
        convert_gloo_sync_batchnorm(method, dist.new_group(backend="gloo"))
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(method, device_ids=ids)


def all_reduce(x: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """`x` reduced over ranks by `op` into a copy (x itself for one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=op)
    return x


def all_mean(x: Tensor) -> Tensor:
    """The mean of `x` over ranks (x itself for one process)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return x if world == 1 else all_reduce(x) / world


def all_max(x: Tensor) -> Tensor:
    """The elementwise maximum of `x` over ranks (x itself for one process)."""
    return all_reduce(x, dist.ReduceOp.MAX)


def mean_over_ranks(x: Tensor) -> Tensor:
    """For a loss term that is not a mean of per-example terms (D2R's |K1 - K2|): the value of
    `x` averaged over ranks, with the gradient of the local `x`. DDP's gradient averaging then
    supplies the 1/N of the mean, so the step is the global batch's, and the only collective
    runs in the forward pass (one in the backward could interleave with DDP's own all-reduces
    in a different order on each rank). `x` itself in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    return x + (all_mean(x.detach()) - x).detach()


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch normalization over the union of the ranks' batches, exact in value and gradient:
    two all-reduces in the forward (sum, then squared deviations, for a stable variance) and
    one in the backward (the sums of dy and dy * x_hat that every input's gradient needs). As in
    torch's SyncBatchNorm, the input gradient is that of the sum of all ranks' losses and the
    weight and bias gradients are local, so DDP's averaging gives the global batch's step."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        ctx.dtype = x.dtype  # statistics in fp32 whatever the autocast dtype
        x = x.float()
        dims = [d for d in range(x.dim()) if d != 1]
        local = torch.cat([x.sum(dims), x.new_tensor([x.numel() / x.shape[1]])])
        dist.all_reduce(local, group=group)
        count = local[-1]
        mean = local[:-1] / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = x - mean.view(shape)
        var = centred.square().sum(dims)
        dist.all_reduce(var, group=group)
        var = var / count
        invstd = torch.rsqrt(var + eps)
        x_hat = centred * invstd.view(shape)
        ctx.save_for_backward(x_hat, invstd, weight, count)
        ctx.group, ctx.dims, ctx.shape = group, dims, shape
        y = x_hat * weight.view(shape) + bias.view(shape)
        return y.to(ctx.dtype), mean, var, count

    @staticmethod
    def backward(ctx, dy, *_unused):
        x_hat, invstd, weight, count = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        dy = dy.float()
        d_bias = dy.sum(dims)
        d_weight = (dy * x_hat).sum(dims)
        sums = torch.cat([d_bias, d_weight])
        dist.all_reduce(sums, group=ctx.group)
        g_bias, g_weight = sums.chunk(2)
        scale = (weight * invstd).view(shape)
        dx = scale * (dy - (g_bias.view(shape) + x_hat * g_weight.view(shape)) / count)
        return dx.to(ctx.dtype), d_weight, d_bias, None, None


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """SyncBatchNorm for CPU processes (gloo), which torch's SyncBatchNorm refuses. Its
    collectives run on a process group of their own: the backward's all-reduce would otherwise
    share the default group with DDP's gradient all-reduces, whose order may differ per rank.
    In eval mode or outside a process group it is BatchNorm."""

    def __init__(self, num_features: int, group=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.group = group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        weight, bias = self.weight, self.bias
        if not self.affine:
            weight, bias = x.new_ones(self.num_features), x.new_zeros(self.num_features)
        y, mean, var, count = _SyncBatchNormFn.apply(x, weight, bias, self.eps, self.group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1 / float(self.num_batches_tracked)
                )
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(unbiased, m)
        return y


def convert_gloo_sync_batchnorm(module: nn.Module, group=None) -> nn.Module:
    """Replace every BatchNorm in `module` (in place) with a GlooSyncBatchNorm holding the
    same parameters and statistics; returns the module (or its replacement if it is a BN)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlooSyncBatchNorm
    ):
        new = GlooSyncBatchNorm(
            module.num_features,
            group,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_gloo_sync_batchnorm(child, group))
    return module


def pick_device(name: str) -> torch.device:
    """The device `train.device` / `--device` names; "auto": CUDA where there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use train.device=cpu")
    return torch.device(name)
