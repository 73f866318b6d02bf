"""FLOPs of whatever runs under `count(fn)`: torch's own per-op formulas (the registry of
`torch.utils.flop_counter`: matmuls, convolutions and their backward, attention) summed by a
dispatch mode of our own. torch's `FlopCounterMode` tracks modules with hooks that refuse
`torch.autograd.grad`, which every attack takes, so it cannot count a training step.

The convention is the model-FLOP one of MFU figures (PaLM, Chowdhery et al. 2022, App. B):
2 x the multiply-accumulates of those ops; ops whose cost is linear in their tensors' size
(pointwise, reductions, normalization, softmax, losses, pooling, copies, views, the
optimizer's update) count zero. Any other op has no formula here: `Count.uncounted` names it
with its number of calls, and the rest is counted. Runs on the meta device (no memory, no
arithmetic: shapes are all the formulas read)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode


def _registry() -> dict[Any, Callable[..., int]]:
    """{op packet: formula(*args, out_val=..., **kwargs) -> FLOPs}: the module-level table
    (torch 2.1 to 2.14), else what a FlopCounterMode instance holds (the same table)."""
    table = getattr(flop_counter, "flop_registry", None)
    if table is None:
        table = flop_counter.FlopCounterMode(display=False).flop_registry
    return dict(table)


FORMULAS = _registry()

# Tags of ops linear in their tensors' size (`reduction` is newer than some supported torch)
LINEAR_TAGS = {getattr(torch.Tag, t) for t in ("pointwise", "reduction") if hasattr(torch.Tag, t)}
# Other ops without model FLOPs, by their base name (trailing "_" of in-place forms dropped)
LINEAR_OPS = frozenset(
    """
    native_batch_norm native_batch_norm_backward _native_batch_norm_legit
    _native_batch_norm_legit_no_training _native_batch_norm_legit_functional native_layer_norm
    native_layer_norm_backward native_group_norm native_group_norm_backward _softmax
    _log_softmax _softmax_backward_data _log_softmax_backward_data nll_loss_forward
    nll_loss_backward nll_loss2d_forward nll_loss2d_backward mse_loss mse_loss_backward
    max_pool2d_with_indices max_pool2d_with_indices_backward avg_pool2d avg_pool2d_backward
    _adaptive_avg_pool2d _adaptive_avg_pool2d_backward constant_pad_nd linalg_vector_norm norm
    normal empty empty_like empty_strided zeros zeros_like ones ones_like full full_like
    new_zeros new_ones new_empty new_full new_empty_strided arange scalar_tensor rand rand_like
    randn randn_like randint randint_like randperm uniform bernoulli native_dropout
    native_dropout_backward clone copy _to_copy lift_fresh cat stack gather scatter scatter_add
    index index_select index_put index_add masked_select masked_scatter sort topk cumsum flip
    roll repeat _local_scalar_dense
    """.split()  # noqa: SIM905 (names read better as words than as a list literal)
)


@dataclass
class Count:
    """FLOPs counted, and the ops d2r has no formula for ({"aten.op": calls})."""

    flops: int = 0
    uncounted: dict[str, int] = field(default_factory=dict)

    def __add__(self, other: Count) -> Count:
        return Count(
            self.flops + other.flops, dict(Counter(self.uncounted) + Counter(other.uncounted))
        )

    def times(self, k: float) -> Count:
        """This count k times over (the uncounted ops' calls too)."""
        return Count(round(self.flops * k), {op: round(n * k) for op, n in self.uncounted.items()})


def without_model_flops(func: torch._ops.OpOverload) -> bool:
    """Whether `func` does no matmul-like work: linear-cost by its tags or name, a view or
    in-place op (its result aliases an input), or outside aten (profiler marks, prims)."""
    if func.namespace != "aten" or set(func.tags) & LINEAR_TAGS:
        return True
    if any(r.alias_info is not None for r in func._schema.returns):
        return True
    name = func._schema.name.split("::")[-1]
    return name.startswith(("_foreach_", "_fused_")) or name.rstrip("_") in LINEAR_OPS


class FlopCounter(TorchDispatchMode):
    """Sums the formulas of every op dispatched under it. An op without one is decomposed
    when torch can (its parts are counted, as FlopCounterMode does); otherwise, unless it has
    no model FLOPs, its name goes to `uncounted`."""

    def __init__(self) -> None:
        super().__init__()
        self.flops, self.uncounted = 0, Counter[str]()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in FORMULAS and func is not torch.ops.prim.device.default:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        if packet in FORMULAS:
            self.flops += int(FORMULAS[packet](*args, **kwargs, out_val=out))
        elif not without_model_flops(func):
            self.uncounted[str(packet)] += 1
        return out


def count(fn: Callable[[], Any]) -> Count:
    """The FLOPs of `fn()` (run once, under the counter)."""
    with FlopCounter() as counter:
        fn()
    return Count(counter.flops, dict(counter.uncounted))
