"""Robust accuracy: per-sample flags for each attack and their worst case (RobustBench style:
a sample is robust only if every attack in the suite failed on it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from d2r import attacks as attacks_mod
from d2r.methods import eval_mode

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def correct_flags(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> Tensor:
    """(N,) bool on the CPU: is sample i classified correctly (after `attack`, if given)?"""
    device = device or next(model.parameters()).device
    flags = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device)
        if xb.dtype == torch.uint8:  # data sets are held as uint8; models take [0, 1] floats
            xb = xb.float() / 255
        if attack is not None:
            xb = attack(model, xb, yb)
        with torch.no_grad():
            flags.append((model(xb).argmax(1) == yb).cpu())
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[str] = ("pgd20", "cw20"),
    eps: float = 8 / 255,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Clean, per-attack and worst-case accuracy (fractions in [0, 1]) of `model` on (x, y),
    in eval mode and fp32. Each attack is seeded with `seed` so reruns give the same number."""
    suite = {name: attacks_mod.from_name(name, eps) for name in attacks}
    with eval_mode(model):
        flags = {"clean": correct_flags(model, x, y, batch_size=batch_size, device=device)}
        for name, attack in suite.items():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                flags[name] = correct_flags(model, x, y, attack, batch_size=batch_size, device=device)
    worst = torch.stack(list(flags.values())).all(0)
    result: dict[str, Any] = {name: f.float().mean().item() for name, f in flags.items()}
    result["worst_case"] = worst.float().mean().item()
    result["settings"] = {
        "eps": eps, "norm": "Linf", "n": len(y), "seed": seed,
        "attacks": {name: vars(a) for name, a in suite.items()},
    }
    return result
