"""Training methods: which attack, which function of `losses`, and which model modes.

A Method is an nn.Module owning its model(s); `forward(x, y)` generates the adversarial batch
(`generate`), optionally perturbs the target's weights (AWP, any method with `awp_gamma > 0`) and
returns the dict of a loss function (`loss`: scalar "loss" + detached terms). It knows nothing
about optimizers, devices or checkpoints. Two-model methods hold `self.target` and `self.guide`;
only the target is evaluated. Every method is a row of the same loop: `method.name` picks it.

Attack modes differ between the references, so each `generate` says which it follows; and
each method makes its reference's train-mode passes in their order, since every one of them
moves the BatchNorm running statistics (docs/methods.md, "Train-mode passes").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2r import distributed
from d2r.attacks import PGD, KLAttack, attack_loop, cag, ce_objective, check_budget
from d2r.losses import KL_REDUCTIONS, SYM_RULES, d2r_loss, lbgat_loss, mart_loss, trades_loss
from d2r.registry import Registry, check_choice, check_range

METHODS = Registry("method")

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
    objective."""

    uses_guide: ClassVar[bool] = False

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


ATTACK_MODES = ("eval", "train")


@METHODS.register("pgd_at")
class PGDAT(Method):
    """PGD adversarial training: Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards deep learning
    models resistant to adversarial attacks", ICLR 2018 (arXiv:1706.06083).
    min CE(z(x'), y), x' = PGD on CE from a uniform start in the eps-ball (no early stop).

    `attack_mode="eval"` (default) attacks in eval mode, the convention of the TRADES and MART
    PyTorch code; the loss on x' is the only train-mode pass. `attack_mode="train"` is the
    PyTorch PGD-AT behind Rice, Wong, Kolter, "Overfitting in adversarially robust deep
    learning" (ICML 2020, arXiv:2002.11569) and AWP's AT-AWP: the attack runs in train mode, so
    BatchNorm's running statistics see each of its `steps` passes, then, as there, its restart-
    selection pass on x', the loss pass on x', and after the optimizer step a clean pass (their
    training-accuracy pass): steps + 3 train-mode passes, each kept for its BatchNorm update."""

    def __init__(
        self,
        target: nn.Module,
        *,
        eps: float = 0.031,
        step_size: float = 0.007,
        steps: int = 10,
        attack_mode: str = "eval",
        norm: str = "linf",
        awp_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(target, awp_gamma=awp_gamma, label_smoothing=label_smoothing)
        check_choice("attack_mode", attack_mode, ATTACK_MODES)
        self.attack_mode = attack_mode
        budget = {"eps": eps, "step_size": step_size, "steps": steps, "norm": norm}
        self.pgd = PGD(**budget, early_stop=False)
        self._clean_after_step: Tensor | None = None

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        if self.attack_mode == "eval":
            with eval_mode(self.target):
                return self.pgd(self.target, x, y)
        # Train mode (during training): the model's own mode, as Rice et al.'s and AWP's code.
        x_adv = self.pgd(self.target, x, y)
        if self.target.training:
            bn_only_pass(self.target, x_adv)  # their attack's last pass picks the best restart
            self._clean_after_step = x
        return x_adv

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        ce = F.cross_entropy(self.target(x_adv), y, label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce.detach()}

    def after_step(self) -> None:
        super().after_step()  # AWP removed first: the reference's clean pass is at restored w
        if self._clean_after_step is not None:
            bn_only_pass(self.target, self._clean_after_step)
            self._clean_after_step = None


BN_PASSES = ("reference", "minimal")


@METHODS.register("trades")
class TRADES(Method):
    """TRADES: Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically principled trade-off
    between robustness and accuracy", ICML 2019 (arXiv:1901.08573).
    x' maximizes KL(p(x) || p(x')) from x + 0.001 N(0, I); loss `trades_loss`, beta = 6.

    `bn_passes="reference"` (default) makes the released code's train-mode passes in its order:
    z(x) for the CE, then z(x') and z(x) again for the KL (`trades_loss` of the TRADES code);
    with AWP (`awp_gamma > 0`), AWP's TRADES step: z(x'), z(x) for the KL, z(x) for the CE. The
    repeated z(x) has the same logits, so it changes no gradient, but BatchNorm's running
    statistics see three batches per step instead of two, and they drive the eval-mode attack of
    every later step and the final evaluation. `"minimal"` drops it (z(x), z(x')): the same
    gradients, one forward fewer, other running statistics."""

    def __init__(
        self,
        target: nn.Module,
        *,
        beta: float = 6.0,
        eps: float = 0.031,
        step_size: float = 0.007,
        steps: int = 10,
        bn_passes: str = "reference",
        norm: str = "linf",
        awp_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(target, awp_gamma=awp_gamma, label_smoothing=label_smoothing)
        check_range("beta", beta)
        check_choice("bn_passes", bn_passes, BN_PASSES)
        self.beta, self.bn_passes = beta, bn_passes
        self.kl_attack = KLAttack(eps=eps, step_size=step_size, steps=steps, norm=norm)

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        # The TRADES code: model.eval() for the attack, model.train() for the loss.
        with eval_mode(self.target):
            return self.kl_attack(self.target, x)

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        reference = self.bn_passes == "reference"
        if reference and self.awp_gamma > 0:  # AWP's train_trades_cifar.py order
            logits_adv = self.target(x_adv)
            logits_clean = self.target(x)
        else:  # the TRADES code's order (and the minimal form's)
            logits_clean = self.target(x)
            logits_adv = self.target(x_adv)
        if reference:
            bn_only_pass(self.target, x)  # the released code's second z(x)
        smoothing = self.label_smoothing
        return trades_loss(logits_clean, logits_adv, y, beta=self.beta, label_smoothing=smoothing)


MART_STARTS = ("normal", "uniform")


@METHODS.register("mart")
class MART(Method):
    """MART: Wang, Zou, Yi, Bailey, Ma, Gu, "Improving adversarial robustness requires revisiting
    misclassified examples", ICLR 2020 (openreview.net/forum?id=rklOg6EFwS).
    x' = PGD on CE; loss `mart_loss` (boosted CE + beta * (1 - p_y)-weighted KL), beta = 6.
    `start="normal"` starts from x + 0.001 N(0, I) as the released code does; `"uniform"` is the
    usual PGD start in the eps-ball (of `norm`)."""

    def __init__(
        self,
        target: nn.Module,
        *,
        beta: float = 6.0,
        eps: float = 0.031,
        step_size: float = 0.007,
        steps: int = 10,
        start: str = "normal",
        norm: str = "linf",
        awp_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(target, awp_gamma=awp_gamma, label_smoothing=label_smoothing)
        check_choice("start", start, MART_STARTS)
        check_range("beta", beta)
        check_budget(eps, step_size, steps, norm)
        self.beta, self.start = beta, start
        self.budget = {"eps": eps, "step_size": step_size, "steps": steps, "norm": norm}

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        # The MART code: model.eval() for the attack, model.train() for the loss.
        with eval_mode(self.target):
            if self.start == "uniform":
                return PGD(**self.budget, early_stop=False)(self.target, x, y)
            start = x + 0.001 * torch.randn_like(x)
            return attack_loop(self.target, x, start, ce_objective(y), **self.budget)

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        logits_clean = self.target(x)  # the reference's order: clean, then adversarial
        logits_adv = self.target(x_adv)
        smoothing = self.label_smoothing
        return mart_loss(logits_clean, logits_adv, y, beta=self.beta, label_smoothing=smoothing)


@METHODS.register("lbgat")
class LBGAT(Method):
    """LBGAT: Cui, Liu, Wang, Jia, "Learnable boundary guided adversarial training", ICCV 2021
    (arXiv:2011.11164). The TRADES attack on the target; loss `lbgat_loss`, guide and target
    trained together. beta = 0 ("LBGAT0", the paper's CIFAR-10 row) or 6 ("LBGAT6", its
    CIFAR-100 row); the default is 0."""

    uses_guide = True

    def __init__(
        self,
        target: nn.Module,
        guide: nn.Module,
        *,
        beta: float = 0.0,
        eps: float = 0.031,
        step_size: float = 0.007,
        steps: int = 10,
        norm: str = "linf",
        awp_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(target, guide, awp_gamma=awp_gamma, label_smoothing=label_smoothing)
        check_range("beta", beta)
        self.beta = beta
        self.kl_attack = KLAttack(eps=eps, step_size=step_size, steps=steps, norm=norm)

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        # The LBGAT code: the target alone in eval mode (the guide takes no part in the attack).
        with eval_mode(self.target):
            return self.kl_attack(self.target, x)

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        # The reference's order; z_t(x) is computed even at beta = 0, as there, so the target's
        # BatchNorm running statistics see the clean batch too.
        logits_adv = self.target(x_adv)
        logits_clean = self.target(x)
        logits_guide = self.guide(x)
        terms = (logits_adv, logits_clean, logits_guide, y)
        return lbgat_loss(*terms, beta=self.beta, label_smoothing=self.label_smoothing)


ATTACK_CHOICES = ("cag", "trades")


@METHODS.register("d2r")
class D2R(Method):
    """D2R: Dual Regularization with a guide model, trained on Collaborative Adversarial
    Generation (CAG) examples (the D2R paper; SPEC sections 2-3).

    `attack="trades"` is "D2R without CAG": the TRADES/LBGAT KL attack on the target alone.
    `sym_rule` and `kl_reduction` are passed to `d2r_loss` (see there); `norm` to the attack."""

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
        norm: str = "linf",
        awp_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(target, guide, awp_gamma=awp_gamma, label_smoothing=label_smoothing)
        check_choice("attack", attack, ATTACK_CHOICES)
        check_choice("sym_rule", sym_rule, SYM_RULES)
        check_choice("kl_reduction", kl_reduction, KL_REDUCTIONS)
        for name, value in (("lam", lam), ("alpha", alpha), ("beta", beta)):
            check_range(name, value)
        check_budget(eps, step_size, steps, norm)
        self.lam, self.alpha, self.beta = lam, alpha, beta
        self.attack, self.sym_rule, self.kl_reduction = attack, sym_rule, kl_reduction
        self.budget = {"eps": eps, "step_size": step_size, "steps": steps, "norm": norm}

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        # Both models in eval mode for the attack, as the released code does.
        with eval_mode(self.target, self.guide):
            if self.attack == "cag":
                return cag(self.target, self.guide, x, **self.budget)
            return KLAttack(**self.budget)(self.target, x)

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        # Three separate passes, in the reference's order, so BatchNorm sees each batch alone.
        logits_adv = self.target(x_adv)
        logits_clean = self.target(x)
        logits_guide = self.guide(x)
        options = {"sym_rule": self.sym_rule, "kl_reduction": self.kl_reduction}
        options["label_smoothing"] = self.label_smoothing
        # Under torchrun the symmetric term is taken of the global batch's K1 - K2.
        options["gap_mean"] = distributed.mean_over_ranks
        terms = (logits_adv, logits_clean, logits_guide, y)
        return d2r_loss(*terms, lam=self.lam, alpha=self.alpha, beta=self.beta, **options)
