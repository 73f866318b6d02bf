"""RAT(TRADES): TRADES whose attack sees randomly perturbed weights and whose loss adds the
first- and second-order Taylor terms of that perturbation (`losses.rat_trades_loss`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2r.attacks import Budget, KLAttack
from d2r.losses import rat_trades_loss
from d2r.methods.base import METHODS, Method, bn_only_pass, eval_mode
from d2r.methods.single import BN_PASSES
from d2r.registry import OptionError, check_choice, check_range

# The released code's smoothing mass of the soft labels, by number of classes (its reg_gap).
RAT_CC = {10: 0.8, 100: 0.98}


def conv_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of the model's nn.Conv2d layers, in `named_parameters` order: the
    released code's `'conv' in name` for its WideResNet, whose convolutions are all named so."""
    ids = {id(p) for m in model.modules() if isinstance(m, nn.Conv2d) for p in m.parameters(False)}
    return [p for _, p in model.named_parameters() if id(p) in ids]


@contextmanager
def weight_noise(params: list[nn.Parameter], std: float) -> Iterator[None]:
    """Add std * N(0, I) to each parameter (drawn in order, from torch's seeded RNG) and put the
    exact saved values back on exit: the code's noisy deepcopy `model2`, without the copy."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(std * torch.randn_like(p))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)


def head_name(model: nn.Module) -> str:
    """The name of the model's last nn.Linear (the code's `fc`): its gradient feeds the Taylor
    terms. A model without one is refused."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(
            f"method rat_trades needs a model whose classifier is an nn.Linear; "
            f"{type(model).__name__} has none"
        )
    return names[-1]


@METHODS.register("rat_trades")
class RATTRADES(Method):
    """Randomized adversarial training on TRADES: Jin, Yi, Wu, Mu, Huang, "Randomized
    adversarial training via Taylor expansion", CVPR 2023 (arXiv:2303.10653; code
    github.com/Alexkael/Randomized-Adversarial-Training, TRADES_first_second/). x' is the
    TRADES KL attack from x + 0.001 N(0, I), in eval mode, on the target with `noise_std` *
    N(0, I) added to every convolution's weights (removed again after the attack); loss
    `rat_trades_loss`: (1 - alpha) CE + alpha * first + alpha / 2 * second + beta * KL, the
    Taylor terms approximated from the last linear layer's CE gradients (the paper's Appendix
    D). Defaults are the code's: beta 6, alpha 0.2, noise 1e-4 (hard-coded there), `cc` 0.8
    for 10 classes and 0.98 for 100 (None: by the head's classes; another count needs it).

    `bn_passes="reference"` (default) makes the code's eight train-mode passes in its order:
    z(x), z(x') for the head gradients, then z(x'), z(x) (KL), z(x'), z(x) (first order),
    z(x'), z(x) (second order); all at the same weights, so the same logits, and d2r feeds the
    first two to every term and runs the other six for their BatchNorm update alone.
    `"minimal"`: z(x), z(x') only (the same gradients, other running statistics)."""

    def __init__(
        self,
        target: nn.Module,
        *,
        beta: float = 6.0,
        alpha: float = 0.2,
        noise_std: float = 1e-4,
        cc: float | None = None,
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
        check_range("alpha", alpha, hint="0.2 in RAT's code")
        check_range("noise_std", noise_std, hint="1e-4 in RAT's code")
        check_choice("bn_passes", bn_passes, BN_PASSES)
        self.head = head_name(target)
        classes = target.get_submodule(self.head).out_features
        if cc is None and classes not in RAT_CC:
            rule = f"give it for {classes} classes (RAT's code: 0.8 for 10, 0.98 for 100)"
            raise OptionError("cc", cc, rule)
        cc = RAT_CC[classes] if cc is None else cc
        check_range("cc", cc, below=1.0, hint="0.8 for 10 classes in RAT's code")
        self.beta, self.alpha, self.noise_std, self.cc = beta, alpha, noise_std, cc
        self.bn_passes = bn_passes
        self.budget = Budget(eps, step_size, steps, norm)
        self.kl_attack = KLAttack(**self.budget.kwargs())

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        # The code: a noisy copy of the model, in eval mode, attacks; model.train() for the loss.
        with eval_mode(self.target), weight_noise(conv_parameters(self.target), self.noise_std):
            return self.kl_attack(self.target, x)

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        logits_clean = self.target(x)  # the code's order: z(x), then z(x')
        logits_adv = self.target(x_adv)
        weight = self.target.get_submodule(self.head).weight
        grads = []
        for logits in (logits_adv, logits_clean):
            ce = F.cross_entropy(logits, y)  # the code's plain CE: label_smoothing is the loss's
            grads.append(torch.autograd.grad(ce, weight, retain_graph=True)[0].sum(1))
        if self.bn_passes == "reference":
            for batch in (x_adv, x) * 3:  # the code's KL, first- and second-order passes
                bn_only_pass(self.target, batch)
        return rat_trades_loss(
            logits_adv,
            logits_clean,
            y,
            (grads[0], grads[1]),
            beta=self.beta,
            alpha=self.alpha,
            cc=self.cc,
            label_smoothing=self.label_smoothing,
        )
