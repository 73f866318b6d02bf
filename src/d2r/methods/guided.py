"""The two-model methods, a guide beside the target: LBGAT and D2R (the paper's method)."""

from __future__ import annotations

from torch import Tensor, nn

from d2r import distributed
from d2r.attacks import Budget, KLAttack, cag
from d2r.losses import KL_REDUCTIONS, SYM_RULES, d2r_loss, lbgat_loss
from d2r.methods.base import METHODS, Method, eval_mode
from d2r.registry import check_choice, check_range


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
        self.budget = Budget(eps, step_size, steps, norm)
        self.kl_attack = KLAttack(**self.budget.kwargs())

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
    Generation (CAG) examples (the D2R paper; docs/method.md, "The D2R loss", "CAG").

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
        self.lam, self.alpha, self.beta = lam, alpha, beta
        self.attack, self.sym_rule, self.kl_reduction = attack, sym_rule, kl_reduction
        self.budget = Budget(eps, step_size, steps, norm)

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        # Both models in eval mode for the attack, as the released code does.
        with eval_mode(self.target, self.guide):
            if self.attack == "cag":
                return cag(self.target, self.guide, x, **self.budget.kwargs())
            return KLAttack(**self.budget.kwargs())(self.target, x)

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
