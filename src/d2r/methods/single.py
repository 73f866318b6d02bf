"""The single-model methods: PGD-AT, TRADES and MART."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2r.attacks import PGD, Budget, KLAttack, attack_loop, ce_objective
from d2r.losses import mart_loss, trades_loss
from d2r.methods.base import METHODS, Method, bn_only_pass, eval_mode
from d2r.registry import check_choice, check_range

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
        self.budget = Budget(eps, step_size, steps, norm)
        self.pgd = PGD(**self.budget.kwargs(), early_stop=False)
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
        self.budget = Budget(eps, step_size, steps, norm)
        self.kl_attack = KLAttack(**self.budget.kwargs())

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
        return trades_loss(logits_adv, logits_clean, y, beta=self.beta, label_smoothing=smoothing)


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
        self.beta, self.start = beta, start
        self.budget = Budget(eps, step_size, steps, norm)

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        # The MART code: model.eval() for the attack, model.train() for the loss.
        with eval_mode(self.target):
            if self.start == "uniform":
                return PGD(**self.budget.kwargs(), early_stop=False)(self.target, x, y)
            start = x + 0.001 * torch.randn_like(x)
            return attack_loop(self.target, x, start, ce_objective(y), self.budget)

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        logits_clean = self.target(x)  # the reference's order: clean, then adversarial
        logits_adv = self.target(x_adv)
        smoothing = self.label_smoothing
        return mart_loss(logits_adv, logits_clean, y, beta=self.beta, label_smoothing=smoothing)
