"""SAT: adversarial training whose difficulty grows over the epochs (a curriculum), derived
from `Method.start_epoch`'s (epoch, epochs) alone, as FAT's and GAIRAT's schedules."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from d2r.attacks import PGD, Budget
from d2r.losses import sat_loss
from d2r.methods.base import METHODS, Method, eval_mode
from d2r.registry import check_choice, check_range

SAT_CURRICULA = ("eps", "lambda")


@METHODS.register("sat")
class SAT(Method):
    """Smooth adversarial training: Sitawarin, Chakraborty, Wagner, "SAT: Improving adversarial
    training via curriculum-based loss smoothing", AISec 2021 (arXiv:2003.09347). Training
    starts easy and ramps its difficulty up, which smooths the adversarial loss landscape
    (lowers the top Hessian eigenvalue) early on. x' = PGD on CE from a uniform start in the
    eps-ball, in eval mode (PGD-AT's convention here).

    `curriculum="eps"` (eps-SAT): the attack's eps and step size are c * eps, c * step_size,
    loss CE(z(x'), y). `curriculum="lambda"` (lambda-SAT): the full attack, loss `sat_loss`,
    (1 - c) CE(z(x), y) + c CE(z(x'), y). The difficulty c rises linearly over the epochs,
    c = min(1, (epoch + 1) / R) with R = round(ramp_at * epochs), and stays 1 after (at
    ramp_at = 0 it is always 1: PGD-AT). No released code was found: the curriculum is from
    the paper's formulation, and `ramp_at` = 0.5 is d2r's default (docs/methods.md, "SAT").
    The loss reports c as the term "difficulty"."""

    def __init__(
        self,
        target: nn.Module,
        *,
        curriculum: str = "eps",
        ramp_at: float = 0.5,
        eps: float = 0.031,
        step_size: float = 0.007,
        steps: int = 10,
        norm: str = "linf",
        awp_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(target, awp_gamma=awp_gamma, label_smoothing=label_smoothing)
        check_choice("curriculum", curriculum, SAT_CURRICULA)
        check_range("ramp_at", ramp_at, below=1.0, hint="a fraction of the epochs; 0.5")
        self.curriculum, self.ramp_at = curriculum, ramp_at
        self.budget = Budget(eps, step_size, steps, norm)

    def difficulty(self) -> float:
        """The epoch's c in (0, 1]: (epoch + 1) / round(ramp_at * epochs), at most 1."""
        ramp = round(self.ramp_at * self.epochs)
        return 1.0 if ramp == 0 else min(1.0, (self.epoch + 1) / ramp)

    def current_budget(self) -> Budget:
        """The epoch's attack budget: eps and step size scaled by c under the eps curriculum."""
        if self.curriculum != "eps":
            return self.budget
        c, b = self.difficulty(), self.budget
        return Budget(b.eps * c, b.step_size * c, b.steps, b.norm)

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        with eval_mode(self.target):
            return PGD(**self.current_budget().kwargs(), early_stop=False)(self.target, x, y)

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        smoothing, c = self.label_smoothing, self.difficulty()
        if self.curriculum == "eps":
            ce = F.cross_entropy(self.target(x_adv), y, label_smoothing=smoothing)
            out = {"loss": ce, "ce": ce.detach()}
        else:
            logits_clean = self.target(x)  # clean, then adversarial: MART's order
            logits_adv = self.target(x_adv)
            out = sat_loss(logits_adv, logits_clean, y, lam=c, label_smoothing=smoothing)
        return {**out, "difficulty": out["loss"].new_tensor(c).detach()}
