"""The Method base class and what every method shares: the registry, model-mode context
managers, BatchNorm-only passes and AWP's weight perturbation (any method, `awp_gamma > 0`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from d2r import distributed
from d2r.attacks import Budget
from d2r.registry import Registry, check_range


def _check_method(name: str, obj: object) -> None:
    """An import-path method (`method.name: MODULE:CLASS`) must be a Method subclass."""
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        what = obj.__name__ if isinstance(obj, type) else type(obj).__name__
        raise ValueError(
            f"method {name!r}: {what} is not a subclass of d2r.methods.Method; a method is a "
            "class deriving from it (docs/own-models.md)"
        )


METHODS = Registry("method", check=_check_method)

# (parameter, its perturbation): what AWP added and after_step() subtracts
Perturbation = list[tuple[nn.Parameter, Tensor]]


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode for an attack and restore each one's previous mode after."""
    previous = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in zip(models, previous, strict=True):
            m.train(was_training)


@contextmanager
def frozen_buffers(*models: nn.Module) -> Iterator[None]:
    """Restore every buffer (BatchNorm running statistics) on exit, so extra train-mode passes
    leave no trace - the role of the AWP reference's separate proxy model."""
    saved = [(b, b.detach().clone()) for m in models for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def bn_only_pass(model: nn.Module, x: Tensor) -> None:
    """A released code's forward whose output d2r needs for no gradient (TRADES' repeated z(x),
    whose train-mode logits equal the first's; PGD-AT's restart selection and training-accuracy
    passes), kept for what it changes in train mode: the BatchNorm running statistics, which
    drive every later eval-mode attack and the evaluation. Without autograd, so the gradient is
    exactly that of the passes that feed the loss."""
    with torch.no_grad():
        model(x)


def awp_perturbation(model: nn.Module, loss: Tensor, gamma: float) -> Perturbation:
    """Adversarial weight perturbation (Wu et al. NeurIPS 2020, arXiv:2004.05884): one ascent step
    on `loss`, scaled layer-wise, v = gamma * ||w|| * g / ||g|| for each weight of dim > 1 (biases
    and BatchNorm parameters are not perturbed). The reference takes the step on a proxy copy;
    the normalized direction is the same, so we read the gradient with torch.autograd.grad,
    which leaves every parameter's .grad untouched."""
    params = [p for p in model.parameters() if p.dim() > 1 and p.requires_grad]
    grads = _mean_over_ranks(torch.autograd.grad(loss, params, allow_unused=True))
    # nan_to_num: from a non-finite loss (a batch the trainer then skips) the offset would be
    # NaN, and w + v - v would leave NaN weights; a zero offset leaves w exactly as it was.
    return [
        (p, torch.nan_to_num(gamma * p.detach().norm() * g / (g.norm() + 1e-20), 0, 0, 0))
        for p, g in zip(params, grads, strict=True)
        if g is not None
    ]


def _mean_over_ranks(grads: tuple[Tensor | None, ...]) -> list[Tensor | None]:
    """Under torchrun, the mean of each rank's gradient: the gradient of the global batch's
    loss, so every rank adds the same perturbation (one all-reduce of the flattened grads).
    A no-op in one process."""
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    flat = distributed.all_mean(torch.cat([g.flatten() for g in present]))
    chunks = iter(flat.split([g.numel() for g in present]))
    return [None if g is None else next(chunks).view_as(g) for g in grads]


BUDGET_KEYS = frozenset(Budget.__dataclass_fields__)  # eps, step_size, steps, norm


class Method(nn.Module):
    """Base class. `uses_guide` tells the trainer whether to build a guide model.

    Subclasses implement `generate(x, y) -> x_adv` and `loss(x, y, x_adv) -> dict`. With
    `awp_gamma > 0`, `forward` adds AWP to the target's weights between the two (the adversarial
    examples are generated first, as in AWP's reference) and `after_step` removes it, so the
    optimizer step is taken with the gradient at the perturbed weights: w <- w - lr * g(w + v).
    Two-model methods (LBGAT, D2R): only the target is perturbed, on the method's own loss (an
    extension: none of the references combines AWP with a guide model).

    `label_smoothing` (0.1 in Wang et al. 2023, arXiv:2302.04638) smooths the cross-entropy
    terms of each method's loss (which ones: each loss function says), never an attack's
    objective.

    The attack budget: a method's constructor takes the four options `eps`, `step_size`,
    `steps`, `norm` (the config keys `method.eps`, ...: the signature is the schema), keeps them
    as one `self.budget` (attacks.Budget) and builds its attack from it; code that holds a
    Budget builds the method with `with_budget`."""

    uses_guide: ClassVar[bool] = False

    @classmethod
    def with_budget(cls, budget: Budget, *models: nn.Module, **options: Any) -> Method:
        """The method with its attack budget given as one object, e.g.
        `TRADES.with_budget(Budget(eps=8 / 255), model)`; not with any of its four keywords."""
        both = sorted(BUDGET_KEYS & set(options))
        if both:
            given = ", ".join(f"{k}=" for k in both)
            raise TypeError(f"{cls.__name__}: the budget is given; drop {given}")
        return cls(*models, **budget.kwargs(), **options)

    def __init__(
        self,
        target: nn.Module,
        guide: nn.Module | None = None,
        *,
        awp_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.target = target
        if self.uses_guide:
            if guide is None:
                name = type(self).__name__
                raise ValueError(f"method {name} needs a guide model (config 'guide')")
            self.guide = guide
        check_range("awp_gamma", awp_gamma, hint="5e-3 in AWP")
        check_range("label_smoothing", label_smoothing, below=1.0, hint="0.1 in Wang et al. 2023")
        self.awp_gamma, self.label_smoothing = awp_gamma, label_smoothing
        self._awp: Perturbation = []
        self.frozen: tuple[str, ...] = ()  # models kept as loaded (`freeze`)
        self.epoch, self.epochs = 0, 1  # where training is (`start_epoch`)

    def models(self) -> dict[str, nn.Module]:
        """Every model by name, frozen ones included: what a checkpoint holds."""
        return {"target": self.target, **({"guide": self.guide} if self.uses_guide else {})}

    def trained_models(self) -> dict[str, nn.Module]:
        """The models the optimizer updates, in parameter-group order: all but the frozen."""
        return {k: m for k, m in self.models().items() if k not in self.frozen}

    def freeze(self, name: str) -> None:
        """Keep model `name` (a pre-trained guide) exactly as loaded: its parameters take no
        gradient and stay out of the optimizer (`trained_models`), and it stays in eval mode
        whatever `train()` says, so BatchNorm uses and never updates its running statistics
        (adversarial distillation's fixed teacher). It is still checkpointed."""
        self.models()[name].requires_grad_(False)
        self.frozen = (*self.frozen, name)
        self.train(self.training)

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for name in self.frozen:  # a frozen model is always in eval mode
            self.models()[name].eval()
        return self

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the trainer as each epoch starts (0-based `epoch` of `epochs`; at a resume,
        the checkpoint's epoch). A method whose reference schedules an option over epochs
        (FAT's tau, GAIRAT's burn-in) derives it from these two alone, so a resumed run has
        it back with the epoch (docs/methods.md, "Schedules over epochs"). Until the first
        call: epoch 0 of 1."""
        self.epoch, self.epochs = epoch, epochs

    def start_step(self, step: int, lr: float, weight_decay: float) -> None:
        """Called by the trainer before each batch: the 0-based `step` of the run (at a resume,
        the checkpoint's) and the target's lr and weight decay for it. A method that trains a
        model of its own every few steps (LAS-AT's strategy network) or looks one target step
        ahead reads them here; the others ignore them."""

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """The method's own optimizers, by name: those of a model it trains itself (LAS-AT's
        strategy network, which stays out of `trained_models`). Their state goes into the
        run checkpoint beside the trainer's optimizer and comes back on resume. None here."""
        return {}

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        x_adv = self.generate(x, y)
        if self.awp_gamma > 0 and self.training and torch.is_grad_enabled():
            self._perturb_target(x, y, x_adv)
        return self.loss(x, y, x_adv)

    def after_step(self) -> None:
        """Called by the trainer after each optimizer step: removes the AWP perturbation (and a
        method whose reference makes a pass after the step, PGD-AT in train mode, makes it)."""
        self._remove_awp()

    def _remove_awp(self) -> None:
        with torch.no_grad():
            for param, offset in self._awp:
                param.sub_(offset)
        self._awp = []

    def _perturb_target(self, x: Tensor, y: Tensor, x_adv: Tensor) -> None:
        self._remove_awp()  # a forward without a step in between must not stack perturbations
        # BatchNorm saves its running statistics for backward: restore them after the gradient.
        with frozen_buffers(*self.models().values()):
            loss = self.loss(x, y, x_adv)["loss"]
            self._awp = awp_perturbation(self.target, loss, self.awp_gamma)
        with torch.no_grad():
            for param, offset in self._awp:
                param.add_(offset)
