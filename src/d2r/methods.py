"""Training methods: which attack, which function of `losses`, and which model modes.

A Method is an nn.Module owning its model(s); `forward(x, y)` returns the dict of a loss
function (scalar "loss" + detached terms). It knows nothing about optimizers, devices or
checkpoints. Two-model methods hold `self.target` and `self.guide`; only the target is evaluated.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

from torch import Tensor, nn

from d2r.attacks import KLAttack, cag
from d2r.losses import KL_REDUCTIONS, SYM_RULES, d2r_loss
from d2r.registry import Registry

METHODS = Registry("method")


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode for an attack and restore each one's previous mode after."""
    previous = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in zip(models, previous):
            m.train(was_training)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"method option {name}={value!r} invalid; choose one of {', '.join(choices)}")


class Method(nn.Module):
    """Base class. `uses_guide` tells the trainer whether to build a guide model."""

    uses_guide: ClassVar[bool] = False

    def __init__(self, target: nn.Module, guide: nn.Module | None = None) -> None:
        super().__init__()
        self.target = target
        if self.uses_guide:
            if guide is None:
                raise ValueError(f"method {type(self).__name__} needs a guide model (config 'guide')")
            self.guide = guide

    def models(self) -> dict[str, nn.Module]:
        """The trained models by name, in optimizer parameter-group order."""
        return {"target": self.target, **({"guide": self.guide} if self.uses_guide else {})}

    def after_step(self) -> None:
        """Called by the trainer after each optimizer step (AWP restores weights here)."""

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


ATTACK_CHOICES = ("cag", "trades")


@METHODS.register("d2r")
class D2R(Method):
    """D2R: Dual Regularization with a guide model, trained on Collaborative Adversarial
    Generation (CAG) examples (the D2R paper; SPEC sections 2-3).

    `attack="trades"` is "D2R without CAG": the TRADES/LBGAT KL attack on the target alone.
    `sym_rule` and `kl_reduction` are passed to `d2r_loss` (see there)."""

    uses_guide = True

    def __init__(
        self,
        target: nn.Module,
        guide: nn.Module,
        *,
        lam: float = 1.0,
        alpha: float = 30.0,
        beta: float = 20.0,
        attack: str = "cag",
        eps: float = 0.031,
        step_size: float = 0.007,
        steps: int = 10,
        sym_rule: str = "abs",
        kl_reduction: str = "mean_bc",
    ) -> None:
        super().__init__(target, guide)
        check_choice("attack", attack, ATTACK_CHOICES)
        check_choice("sym_rule", sym_rule, SYM_RULES)
        check_choice("kl_reduction", kl_reduction, KL_REDUCTIONS)
        self.lam, self.alpha, self.beta = lam, alpha, beta
        self.attack, self.sym_rule, self.kl_reduction = attack, sym_rule, kl_reduction
        self.eps, self.step_size, self.steps = eps, step_size, steps

    def generate(self, x: Tensor) -> Tensor:
        # Both models in eval mode for the attack, as the released code does.
        with eval_mode(self.target, self.guide):
            if self.attack == "cag":
                return cag(self.target, self.guide, x, eps=self.eps, step_size=self.step_size,
                           steps=self.steps)
            return KLAttack(self.eps, self.step_size, self.steps)(self.target, x)

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x_adv = self.generate(x)
        # Three separate passes, in the reference's order, so BatchNorm sees each batch alone.
        logits_adv = self.target(x_adv)
        logits_clean = self.target(x)
        logits_guide = self.guide(x)
        return d2r_loss(
            logits_adv, logits_clean, logits_guide, y, lam=self.lam, alpha=self.alpha,
            beta=self.beta, sym_rule=self.sym_rule, kl_reduction=self.kl_reduction,
        )
