"""The methods that treat each example by how hard it is to attack: FAT (each adversarial
example stops early, `tau` steps after it first fools the model) and GAIRAT (each example's
CE is weighted by how many PGD steps it withstands). Both schedule an option over epochs,
which they derive from `Method.start_epoch`'s (epoch, epochs) alone."""

from __future__ import annotations

import math
from dataclasses import replace

import torch.nn.functional as F
from torch import Tensor, nn

from d2r.attacks import (
    Budget,
    EarlyStoppedPGD,
    Geometry,
    attack_loop,
    ce_objective,
    check_steps,
    random_start,
)
from d2r.losses import GAIR_FUNCTIONS, gairat_loss
from d2r.methods.base import METHODS, Method, eval_mode
from d2r.registry import OptionError, check_choice, check_range

# FAT.py's adjust_tau (dynamictau): tau = 0 up to epoch 50, 1 up to 90, then 2, of 120 epochs;
# here as fractions of the run, reached as lr_factor reaches its decay_at.
DYNAMIC_TAU_AT = (50 / 120, 90 / 120)


@METHODS.register("fat")
class FAT(Method):
    """Friendly adversarial training: Zhang, Xu, Han, Niu, Cui, Sugiyama, Kankanhalli, "Attacks
    which do not kill training make adversarial learning stronger", ICML 2020
    (arXiv:2002.11242; code github.com/zjfheart/Friendly-Adversarial-Training, FAT.py).
    min CE(z(x~), y), x~ = early-stopped PGD-K-tau on CE (attacks.EarlyStoppedPGD) from a
    uniform start in the eps-ball, in eval mode (the released `earlystop`), each step with
    `omega` * N(0, I) noise: a sample stops `tau` misclassified steps after the first.

    Defaults are FAT.py's: eps 0.031, step 0.007, K = 10, tau = 0, omega = 0.001 and
    `dynamictau=True`, its schedule: tau = 0 for the first 50 of its 120 epochs, 1 until
    epoch 90, then 2, scaled here to the run's epochs (`DYNAMIC_TAU_AT`). With
    `dynamictau=False` tau stays `tau` (with `dynamictau=True` the code ignores --tau; here a
    tau other than 0 is refused). The loss reports the epoch's tau as the term "tau"."""

    def __init__(
        self,
        target: nn.Module,
        *,
        tau: int = 0,
        dynamictau: bool = True,
        omega: float = 0.001,
        eps: float = 0.031,
        step_size: float = 0.007,
        steps: int = 10,
        norm: str = "linf",
        awp_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(target, awp_gamma=awp_gamma, label_smoothing=label_smoothing)
        check_steps("tau", tau)
        check_choice("dynamictau", dynamictau, (True, False))
        if dynamictau and tau != 0:
            raise OptionError("tau", tau, "dynamictau sets it; give dynamictau=false to fix it")
        self.tau, self.dynamictau = tau, dynamictau
        self.budget = Budget(eps, step_size, steps, norm)
        self.pgd = EarlyStoppedPGD(**self.budget.kwargs(), tau=tau, omega=omega)

    def current_tau(self) -> int:
        """The epoch's tau: `tau`, or with `dynamictau` the milestones of DYNAMIC_TAU_AT reached
        (epoch >= round(f * epochs), as the lr schedule's decay_at)."""
        if not self.dynamictau:
            return self.tau
        return sum(self.epoch >= round(f * self.epochs) for f in DYNAMIC_TAU_AT)

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        # FAT.py's earlystop: model.eval() for the attack, model.train() for the loss.
        with eval_mode(self.target):
            return replace(self.pgd, tau=self.current_tau())(self.target, x, y)

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        ce = F.cross_entropy(self.target(x_adv), y, label_smoothing=self.label_smoothing)
        tau = ce.new_tensor(float(self.current_tau()))
        return {"loss": ce, "ce": ce.detach(), "tau": tau}


@METHODS.register("gairat")
class GAIRAT(Method):
    """Geometry-aware instance-reweighted adversarial training: Zhang, Zhu, Niu, Han, Sugiyama,
    Kankanhalli, ICLR 2021 (arXiv:2010.01736; code github.com/zjfheart/Geometry-aware-Instance-
    reweighted-Adversarial-Training, GAIRAT.py). x' = PGD on CE from a uniform start in the
    eps-ball, in eval mode (the released `GA_PGD`, no early stop), which also counts each
    example's geometry value kappa (attacks.Geometry); loss `gairat_loss`: the CE of x'
    weighted by `gair_weights(kappa)`, normalized to sum to the batch size.

    Defaults are GAIRAT.py's: eps 0.031, step 0.007, K = 10, `lam` = -1 (its --Lambda),
    `weight_assignment_function="tanh"` (its Tanh; also sigmoid, discrete) and its burn-in:
    plain CE until --begin_epoch 60 of its 120 epochs, the weights from 1-based epoch 60 on;
    here `begin_at` = 0.5 of the run's epochs (weights once epoch + 1 >= round(0.5 *
    epochs)). The code's --Lambda_schedule is "fixed" by default (lam from epoch 60 on, the
    same epoch); its linear and piecewise schedules are not offered, nor the code's "inf"
    (equal weights: PGD-AT's loss). The attack's x' is PGD's (early_stop=False) for the same
    random state. The loss reports the batch's mean kappa as the term "kappa"."""

    def __init__(
        self,
        target: nn.Module,
        *,
        lam: float = -1.0,
        weight_assignment_function: str = "tanh",
        begin_at: float = 0.5,
        eps: float = 0.031,
        step_size: float = 0.007,
        steps: int = 10,
        norm: str = "linf",
        awp_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(target, awp_gamma=awp_gamma, label_smoothing=label_smoothing)
        if not math.isfinite(lam):  # the code's "inf" (all weights 1) is pgd_at's loss
            raise OptionError("lam", lam, "must be a finite number (-1 in GAIRAT's code)")
        check_choice("weight_assignment_function", weight_assignment_function, GAIR_FUNCTIONS)
        check_range("begin_at", begin_at, below=1.0, hint="a fraction of the epochs; 0.5")
        self.lam, self.function, self.begin_at = lam, weight_assignment_function, begin_at
        self.budget = Budget(eps, step_size, steps, norm)
        self._geometry: tuple[Tensor, Tensor] | None = None  # (x', its kappa) of `generate`

    def reweighting(self) -> bool:
        """Whether this epoch's loss is weighted: from the 1-based epoch round(begin_at *
        epochs) on, as GAIRAT.py's `(epoch + 1) >= args.begin_epoch`."""
        return self.epoch + 1 >= round(self.begin_at * self.epochs)

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        # GA_PGD: model.eval() for the attack (PGD's, counted), model.train() for the loss.
        geometry = Geometry(y)
        with eval_mode(self.target):
            start = random_start(x, self.budget.eps, self.budget.norm)
            x_adv = attack_loop(
                self.target, x, start, ce_objective(y), self.budget, step_rule=geometry
            )
        self._geometry = (x_adv, geometry.kappa)
        return x_adv

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        if self._geometry is None or self._geometry[0] is not x_adv:
            raise ValueError("GAIRAT.loss takes the x_adv of its own generate (and its kappa)")
        logits_adv, kappa = self.target(x_adv), self._geometry[1]
        if not self.reweighting():  # the burn-in: GAIRAT.py's plain mean CE
            ce = F.cross_entropy(logits_adv, y, label_smoothing=self.label_smoothing)
            return {"loss": ce, "ce": ce.detach(), "kappa": kappa.float().mean()}
        return gairat_loss(
            logits_adv,
            y,
            kappa,
            steps=self.budget.steps,
            lam=self.lam,
            weight_assignment_function=self.function,
            label_smoothing=self.label_smoothing,
        )
