"""The fast path of the training step: bf16 autocast, channels_last, torch.compile and a
fused (or multi-tensor) optimizer, each a flag of `train` with one code path (`enabled=`),
never two. These configure objects (models, optimizer, the batch's layout); the step itself is
`d2r.trainer.train_step`.

`"auto"` turns a flag on where it pays off: on CUDA every flag; on a CPU channels_last (oneDNN's
NHWC convolutions: 1.1-1.2x faster steps, measured in benchmarks/RESULTS.md), fused SGD, and
bf16 autocast only with native bf16 (avx512_bf16 or AMX: emulated bf16 is 8-14x slower); never
compile on a CPU (minutes of C++ compilation for no gain measured). Evaluation never runs
under autocast. Autocast is bf16, never fp16: the attack's input gradient is not loss-scaled
and underflows.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# Passed to torch.compile, e.g. {"mode": "max-autotune"}; tests use {"backend": "aot_eager"}
# (the same graphs and guards as inductor without a C compiler's minutes on a CPU).
COMPILE_OPTIONS: dict[str, Any] = {}


@cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX); Linux only."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


@cache
def fused_sgd_available(device_type: str = "cuda") -> bool:
    """Whether this torch has a fused SGD kernel for `device_type` (CPU: torch >= 2.4)."""
    if "fused" not in inspect.signature(torch.optim.SGD).parameters:
        return False
    if device_type == "cuda":
        return True
    param = nn.Parameter(torch.zeros(1, device=device_type))
    param.grad = torch.ones_like(param)
    try:
        torch.optim.SGD([param], lr=0.1, momentum=0.9, fused=True).step()
    except RuntimeError:
        return False
    return True


@cache
def autocast_cache_keeps_grad(device_type: str) -> bool:
    """Whether autocast's cache of cast weights keeps gradients when one autocast region mixes
    no-grad passes with passes that train (the step's attack and loss do). In torch 2.2.2 and
    2.8.0 (seen on a CPU) a weight's bf16 copy cast under no_grad is reused by a later pass with
    gradients, so they never reach the weight: a run under bf16 autocast did not learn, and DDP
    stopped on "parameters that were not used in producing loss". torch 2.11.0 and 2.14.1 cast
    again. A feature test (a 4x4 matmul on the device), not a version check; where it fails,
    the step's autocast runs without its cache."""
    weight = nn.Parameter(torch.ones(4, 4, device=device_type))
    x = torch.ones(2, 4, device=device_type)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        with torch.no_grad():
            torch.mm(x, weight)
        return torch.mm(x, weight).requires_grad


@dataclass(frozen=True)
class FastPath:
    """The resolved flags (no "auto" left) and how to apply them."""

    device_type: str
    amp: bool
    channels_last: bool
    compile: bool
    optimizer_impl: str  # fused | foreach | for_loop

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast for the training step (attack included); a no-op when off."""
        cache = not self.amp or autocast_cache_keeps_grad(self.device_type)
        return torch.autocast(
            self.device_type, dtype=torch.bfloat16, enabled=self.amp, cache_enabled=cache
        )

    def batch(self, x: Tensor) -> Tensor:
        """The input in the models' memory format (images only: (B, C, H, W))."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @property
    def skips_on_device(self) -> bool:
        """Whether the optimizer itself skips an update when told of a non-finite loss by a
        device tensor (fused SGD's `found_inf`), so the host need not read it first."""
        return self.optimizer_impl == "fused"

    def optimizer_options(self) -> dict[str, bool]:
        """Keyword arguments for torch.optim.SGD: one fused kernel, or one multi-tensor
        (foreach) launch per operation instead of one per parameter."""
        if self.optimizer_impl == "fused":
            return {"fused": True}
        return {"foreach": self.optimizer_impl == "foreach"}

    def sgd(self, params: Any, **hyper: Any) -> torch.optim.SGD:
        """torch.optim.SGD in this implementation. Fused SGD allocates its momentum buffers
        with empty_like just before its first kernel call, so a first step it skips (a
        non-finite loss: found_inf) leaves them uninitialized and the next step uses garbage
        (torch 2.14). Zero buffers avoid that and change nothing else: without dampening, the
        first update is buf = momentum * 0 + g = g, as from no buffer."""
        if hyper.get("dampening", 0) != 0:
            raise ValueError("d2r's SGD has no dampening")
        optimizer = torch.optim.SGD(params, **hyper, **self.optimizer_options())
        for group in optimizer.param_groups:
            for param in group["params"] if group["momentum"] else ():
                buffer = torch.zeros_like(param, memory_format=torch.preserve_format)
                optimizer.state[param]["momentum_buffer"] = buffer
        return optimizer

    def prepare(self, models: Iterable[nn.Module]) -> None:
        """Apply the flags to each model in place (state_dict keys stay unchanged)."""
        for model in models:
            if self.channels_last:
                model.to(memory_format=torch.channels_last)
            if self.amp:  # losses and KL terms in fp32, whatever the autocast op lists say
                model.register_forward_hook(_logits_to_fp32)
            if self.compile:
                # In place (nn.Module.compile), so checkpoints keep their keys and the
                # attack, the loss and evaluation all call the compiled model.
                model.compile(**COMPILE_OPTIONS)

    def describe(self) -> dict[str, Any]:
        return {
            "amp": "bf16" if self.amp else "off",
            "channels_last": self.channels_last,
            "compile": self.compile,
            "optimizer_impl": self.optimizer_impl,
        }


def _logits_to_fp32(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
    return output.float()


def _switch(value: str | bool, on: str = "on") -> str:
    """A flag written as YAML true/false ("on"/"off" are booleans in YAML 1.1) as its string
    (the config has checked the choice)."""
    if isinstance(value, bool):
        return on if value else "off"
    return value


def resolve(train: Any, device: torch.device) -> FastPath:
    """Turn the `train` section's speed flags into a FastPath for `device`."""
    fast_device = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    amp = _switch(train.amp, on="bf16")
    channels_last = _switch(train.channels_last)
    compiled = _switch(train.compile)
    impl = train.optimizer_impl
    if impl == "auto":
        impl = "fused" if fused_sgd_available(device.type) else "foreach"
    if impl == "fused" and not fused_sgd_available(device.type):
        raise ValueError(
            f"train.optimizer_impl=fused: this torch has no fused SGD for {device.type}; "
            "use foreach (or a newer torch)"
        )
    return FastPath(
        device_type=device.type,
        amp=amp == "bf16" or (amp == "auto" and fast_device),
        channels_last=channels_last == "on"
        or (channels_last == "auto" and device.type in ("cuda", "cpu")),
        compile=compiled == "on" or (compiled == "auto" and device.type == "cuda"),
        optimizer_impl=impl,
    )
