"""What the trainer's validation, the sanity checks and the evaluation share: per-sample
correct flags of a model, batch by batch (after an attack, if given), and the seeding that
makes every batch's random start the same whichever batch a resumed evaluation starts from."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch `index` of an attack: a resumed evaluation draws the random starts a
    straight one draws, whichever batch it starts from."""
    digest = hashlib.sha256(f"d2r-eval|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def batch_flags(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int | None = None,
    first: int = 0,
) -> Iterator[Tensor]:
    """(B,) bool on the CPU per batch from batch `first` on: is each sample classified correctly
    (after `attack`, if given)? With `seed`, batch i is seeded from (seed, i) (`batch_seed`);
    without, it draws from the caller's RNG."""
    device = torch.device(device) if device is not None else device_of(model)
    for index in range(first, -(-len(x) // batch_size)):
        start = index * batch_size
        xb = as_float(x[start : start + batch_size].to(device))
        yb = y[start : start + batch_size].to(device)
        if attack is not None:
            with seeded(batch_seed(seed, index), device) if seed is not None else nullcontext():
                xb = attack(model, xb, yb)
        with torch.no_grad():
            yield (model(xb).argmax(1) == yb).cpu()


def correct_flags(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> Tensor:
    """(N,) bool on the CPU: is sample i classified correctly (after `attack`, if given)?
    Random starts come from the caller's RNG."""
    flags = list(batch_flags(model, x, y, attack, batch_size=batch_size, device=device))
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def as_float(x: Tensor) -> Tensor:
    # data sets are held as uint8; models take fp32 in [0, 1] (no bf16 in evaluation)
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.zeros(0)).device


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for one attack without disturbing the caller's RNG streams."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
