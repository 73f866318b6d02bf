"""L-inf attacks through one loop: PGD (CE or CW margin), the TRADES KL attack, and CAG.

Contract (DESIGN.md): `attack(model, x, y, **ref) -> x_adv` inside the eps-ball and [0, 1].
An attack never changes a model's train/eval mode (the caller sets it: the references differ)
and never writes parameter `.grad` (it differentiates with torch.autograd.grad on the input).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2r.losses import kl_elem
from d2r.registry import Registry

ATTACKS = Registry("attack")

# (B, C) logits -> (B,) per-sample objective to maximize
Objective = Callable[[Tensor], Tensor]


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Clip to the L-inf eps-ball around x, then to the image range [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def attack_loop(
    model: nn.Module,
    x: Tensor,
    x_start: Tensor,
    objective: Objective,
    *,
    eps: float,
    step_size: float,
    steps: int,
    y_stop: Tensor | None = None,
) -> Tensor:
    """The one sign-gradient ascent loop. With `y_stop`, a sample stops moving once the model
    misclassifies it (per-sample early stop, the evaluation protocol of SPEC section 7)."""
    x_adv = x_start.detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        grad = torch.autograd.grad(objective(logits).sum(), x_adv)[0]
        step = step_size * grad.sign()
        if y_stop is not None:  # freeze samples already misclassified
            still_right = logits.argmax(1) == y_stop  # (B,)
            step = step * still_right.view(-1, *[1] * (x.dim() - 1))
        x_adv = project(x_adv.detach() + step, x, eps)
    return x_adv.detach()


def ce_objective(y: Tensor) -> Objective:
    return lambda logits: F.cross_entropy(logits, y, reduction="none")


def cw_objective(y: Tensor) -> Objective:
    """Carlini-Wagner margin max_{j != y} z_j - z_y (no kappa), as the reference CW-inf."""

    def margin(logits: Tensor) -> Tensor:
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        return others.amax(1) - true

    return margin


def kl_objective(ref_probs: Tensor) -> Objective:
    """sum_c kl_elem(log p(x'), q) = KL(q || p(x')) per sample (TRADES / CAG)."""
    return lambda logits: kl_elem(F.log_softmax(logits, 1), ref_probs).sum(1)


_OBJECTIVES = {"ce": ce_objective, "cw": cw_objective}


@ATTACKS.register("pgd")
@dataclass(frozen=True)
class PGD:
    """Projected gradient descent, Madry et al. 2018 (arXiv:1706.06083): uniform start in the
    eps-ball, `steps` signed-gradient steps on `loss` ("ce", or "cw" for CW-inf, Carlini &
    Wagner 2017), projection to the ball and [0, 1], per-sample early stop when `early_stop`."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 20
    loss: str = "ce"
    random_start: bool = True
    early_stop: bool = True

    def __post_init__(self) -> None:
        if self.loss not in _OBJECTIVES:
            raise ValueError(f"PGD loss {self.loss!r} unknown; choose one of {', '.join(_OBJECTIVES)}")

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        start = x
        if self.random_start:
            start = project(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
        return attack_loop(
            model, x, start, _OBJECTIVES[self.loss](y), eps=self.eps, step_size=self.step_size,
            steps=self.steps, y_stop=y if self.early_stop else None,
        )


@ATTACKS.register("kl")
@dataclass(frozen=True)
class KLAttack:
    """The TRADES attack (Zhang et al. 2019, arXiv:1901.08573): maximize KL(q || p(x')) from
    x + 0.001 * N(0, I) (not clipped before the first step). `q` defaults to the model's own
    clean softmax (TRADES, LBGAT); CAG passes the guide's."""

    eps: float = 0.031
    step_size: float = 0.007
    steps: int = 10
    init_std: float = 0.001

    def __call__(
        self, model: nn.Module, x: Tensor, y: Tensor | None = None, *, ref_probs: Tensor | None = None
    ) -> Tensor:
        if ref_probs is None:
            with torch.no_grad():
                ref_probs = F.softmax(model(x), 1)
        start = x + self.init_std * torch.randn_like(x)
        return attack_loop(
            model, x, start, kl_objective(ref_probs), eps=self.eps, step_size=self.step_size,
            steps=self.steps,
        )


def cag(
    target: nn.Module,
    guide: nn.Module,
    x: Tensor,
    *,
    eps: float = 0.031,
    step_size: float = 0.007,
    steps: int = 10,
) -> Tensor:
    """Collaborative Adversarial Generation (D2R paper, SPEC section 3): the KL attack on the
    target with the guide's clean softmax as reference, computed once (no grad). The caller puts
    both models in eval mode first, as the reference does."""
    with torch.no_grad():
        guide_probs = F.softmax(guide(x), 1)  # (B, C), fixed for all steps
    attack = KLAttack(eps=eps, step_size=step_size, steps=steps)
    return attack(target, x, ref_probs=guide_probs)


_NAMED = re.compile(r"^(pgd|cw)(\d+)$")


def from_name(name: str, eps: float, step_size: float | None = None) -> PGD:
    """'pgd20' -> PGD-20 on CE, 'cw20' -> CW-inf with 20 steps; step size eps/4 (2/255 at 8/255)."""
    match = _NAMED.match(name)
    if not match or int(match.group(2)) < 1:
        raise ValueError(f"attack {name!r} unknown; use pgdK or cwK with K >= 1, e.g. pgd20, cw20")
    loss = "ce" if match.group(1) == "pgd" else "cw"
    step = eps / 4 if step_size is None else step_size
    return PGD(eps=eps, step_size=step, steps=int(match.group(2)), loss=loss)
