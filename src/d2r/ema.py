"""Exponential moving average (EMA) of a model's weights, the weight averaging of the strongest
adversarially trained models: Gowal, Qin, Uesato, Mann, Kohli, "Uncovering the limits of
adversarial training against norm-bounded adversarial examples" (arXiv:2010.03593); Rebuffi et
al. 2021 (arXiv:2103.01946); Wang et al. 2023 (arXiv:2302.04638), decay 0.995.

After every optimizer step (`train.ema_decay` > 0), for each parameter w of the target:

    ema <- d_t * ema + (1 - d_t) * w,    d_t = min(decay, (1 + t) / (10 + t))

with t the number of updates so far: the warm-up keeps the random initialization from
dominating the early average (d_0 = 0.1). BatchNorm's running statistics (buffers) are not
averaged: they are copied from the model at each update, as the references copy them
(`update_bn`), so the EMA model normalizes with the current weights' statistics. Every update is
two multi-tensor kernels and one copy, on the device, with no host sync; under torchrun every
rank holds the same weights after a step, so each keeps the same EMA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    """The EMA of `model`'s parameters (and a copy of its buffers), keyed like its state_dict,
    so `state_dict()` loads into the same architecture (d2r.checkpoint: prefix "ema")."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(
                f"EMA decay must be in (0, 1) (0.995 in Wang et al. 2023), got {decay}"
            )
        self.decay, self.updates = decay, 0
        self._live = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
        self.shadow = {k: v.clone() for k, v in self._live.items()}  # memory format kept
        params = {id(p) for p in model.parameters()}
        averaged = [
            k
            for k, v in model.state_dict(keep_vars=True).items()
            if id(v) in params and v.is_floating_point()
        ]
        copied = [k for k in self._live if k not in averaged]
        self._pairs = {
            name: ([self.shadow[k] for k in keys], [self._live[k] for k in keys])
            for name, keys in (("averaged", averaged), ("copied", copied))
        }

    def decay_at(self, t: int) -> float:
        """d_t of update t (0-based): the warm-up, then `decay`."""
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the model's current weights (call after the optimizer step)."""
        d = self.decay_at(self.updates)
        ema, live = self._pairs["averaged"]
        if ema:
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, live, alpha=1 - d)
        buffers, live_buffers = self._pairs["copied"]
        if buffers:
            torch._foreach_copy_(buffers, live_buffers)
        self.updates += 1

    def reset(self) -> None:
        """Start again from the model's current weights (t = 0)."""
        with torch.no_grad():
            for key, value in self._live.items():
                self.shadow[key].copy_(value)
        self.updates = 0

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, tensors: dict[str, Tensor], updates: int, source: str) -> None:
        """Restore `state_dict()`'s tensors (strictly: the same keys) and the update count."""
        if tensors.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - tensors.keys())
            unexpected = sorted(tensors.keys() - self.shadow.keys())
            raise ValueError(
                f"{source}: EMA weights do not fit the target (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); resume with the same target model"
            )
        with torch.no_grad():
            for key, value in tensors.items():
                self.shadow[key].copy_(value)
        self.updates = updates

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the model holds the EMA weights; afterwards its own, restored
        exactly (the per-epoch check measures the EMA this way, without a second model)."""
        saved = {k: v.clone() for k, v in self._live.items()}
        with torch.no_grad():
            for key, value in self._live.items():
                value.copy_(self.shadow[key])
        try:
            yield
        finally:
            with torch.no_grad():
                for key, value in self._live.items():
                    value.copy_(saved[key])
