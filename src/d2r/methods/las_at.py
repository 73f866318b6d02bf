"""LAS-AT: a strategy network picks each example's attack (eps, steps, step size) and learns,
by REINFORCE, to pick attacks that make the target robust. The strategy network is a second
model of the method (checkpointed and resumed with the target, never evaluated or exported)
that the method trains itself with its own optimizer (`Method.optimizers`)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Categorical

from d2r.attacks import (
    Budget,
    SampleBudget,
    attack_loop,
    ce_objective,
    random_start,
    stop_when_wrong,
)
from d2r.losses import las_at_loss
from d2r.methods.base import METHODS, Method, _mean_over_ranks, eval_mode
from d2r.models import MODELS
from d2r.registry import OptionError, build, check_choice, check_range

# The released LAS_AT_train_cifar10.py's candidates: --epsilon_types range(3, 15) and
# --step_size_types range(1, 5) in 1/255, --attack_iters_types range(3, 14) steps.
EPSILON_TYPES = list(range(3, 15))
ATTACK_ITERS_TYPES = list(range(3, 14))
STEP_SIZE_TYPES = list(range(1, 5))
# --policy_optimizer: SGD lr only; SGD momentum 0.9, weight decay 5e-4; Adam, weight decay 5e-4
POLICY_OPTIMIZERS = ("SGD_without_momentum", "SGD_with_momentum", "Adam_with_momentum")
# The code's policy MultiStepLR: milestones at 99/110 and 104/110 of the run's target steps,
# counted in policy updates (one per `interval_num` steps).
POLICY_DECAY_AT = (99 / 110, 104 / 110)
REWARD_CLIP = 10.0  # Get_reward clamps R1 to [0, 10], R2 and R3 to [-10, 10]
REWARD_RESTARTS = 2  # Get_reward's attack_pgd(..., 10, 2): PGD-10 with two restarts


def _check_types(option: str, values: list[int]) -> tuple[int, ...]:
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise OptionError(option, values, "must be a non-empty list of whole numbers >= 1")
    return tuple(values)


def _in_channels(model: nn.Module) -> int:
    """The image channels `model` reads, its first convolution's: the strategy network's."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError(
        "method las_at: the strategy network reads the images with the channels of the "
        "target's first convolution, and the target has none; use a convolutional target"
    )


@contextmanager
def requiring_grad(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """The strategy network's parameters take a gradient only inside its own update, so the
    trainer's step and DDP (which registers parameters requiring one) never see them."""
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p in params:
            p.requires_grad_(False)


@METHODS.register("las_at")
class LASAT(Method):
    """LAS-AT: Jia, Zhang, Wu, Ma, Wang, Cao, "LAS-AT: Adversarial Training with Learnable
    Attack Strategy", CVPR 2022 (arXiv:2203.06616; code github.com/jiaxiaojunQAQ/LAS-AT,
    LAS_PGD_AT/LAS_AT_train_cifar10.py). The strategy network `strategy` (a registered model,
    the code's ResNet-18 with one output per candidate) maps the clean x to three categorical
    distributions over `epsilon_types`, `attack_iters_types`, `step_size_types` (eps and step
    in 1/255); each example's sampled strategy drives PGD on CE from x + U(-eps0, eps0)
    (eps0 = `eps`, the code's 8/255), target in eval mode (`attacks.SampleBudget`), and the
    target minimizes `las_at_loss` (smoothed labels, `factor`).

    Every `interval_num` steps (the trainer's, `start_step`), before the target's step, the
    strategy network is updated by REINFORCE: loss = sum over the three heads of
    mean_i(-log pi(a_i | x_i) * R), R = R1 + alpha R2 + beta R3 with R1 = CE of the target
    on its sampled attack, R2, R3 the robust (PGD-`steps`, `eps`, `step_size`, 2 restarts)
    and clean accuracy of a copy of the target after one SGD step on that attack; gradient
    norm clipped to `clip_grad_norm`, then its own optimizer's step (`policy_optimizer`,
    `policy_model_lr`). Defaults are the CIFAR-10 script's (alpha, beta: its R2_param,
    R3_param); docs/methods.md, "LAS-AT", lists the sources and what differs."""

    def __init__(
        self,
        target: nn.Module,
        *,
        epsilon_types: list[int] = EPSILON_TYPES,
        attack_iters_types: list[int] = ATTACK_ITERS_TYPES,
        step_size_types: list[int] = STEP_SIZE_TYPES,
        alpha: float = 4.0,
        beta: float = 2.0,
        factor: float = 0.7,
        interval_num: int = 20,
        policy_model_lr: float = 1e-4,
        policy_optimizer: str = "SGD_without_momentum",
        clip_grad_norm: float = 1.0,
        strategy: str = "resnet18_std",
        eps: float = 8 / 255,
        step_size: float = 2 / 255,
        steps: int = 10,
        norm: str = "linf",
        awp_gamma: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(target, awp_gamma=awp_gamma, label_smoothing=label_smoothing)
        check_choice("norm", norm, ("linf",))  # the candidates are L-inf radii in 1/255
        self.types = (
            _check_types("epsilon_types", epsilon_types),
            _check_types("attack_iters_types", attack_iters_types),
            _check_types("step_size_types", step_size_types),
        )
        for name, value in (("alpha", alpha), ("beta", beta), ("clip_grad_norm", clip_grad_norm)):
            check_range(name, value)
        if not 0 < factor <= 1:  # the true class's share of the smoothed label
            raise OptionError("factor", factor, "must be in (0, 1] (0.7 in its CIFAR-10 code)")
        check_range("interval_num", interval_num, positive=True, hint="20 in its code")
        check_range("policy_model_lr", policy_model_lr, hint="1e-4 in its code")
        check_choice("policy_optimizer", policy_optimizer, POLICY_OPTIMIZERS)
        self.alpha, self.beta, self.factor, self.clip = alpha, beta, factor, clip_grad_norm
        self.interval_num, self.policy_model_lr = interval_num, policy_model_lr
        self.budget = Budget(eps, step_size, steps, norm)
        outputs = {"num_classes": sum(map(len, self.types)), "in_channels": _in_channels(target)}
        try:  # a registered model (or an import path), with one output per candidate
            self.strategy = build(MODELS, {"name": strategy, **outputs})
        except ValueError as err:
            raise OptionError("strategy", strategy, str(err)) from None
        self.strategy.requires_grad_(False)  # see `requiring_grad`
        self.policy = _policy_optimizer(policy_optimizer, self.strategy, policy_model_lr)
        self.step, self.lr, self.weight_decay = 0, 0.1, 5e-4  # until the trainer's start_step
        self.last_reward: Tensor | None = None  # R of the latest strategy update
        self._chosen: SampleBudget | None = None

    # -- the method's models and optimizer -------------------------------------------------
    def models(self) -> dict[str, nn.Module]:
        return {"target": self.target, "strategy": self.strategy}

    def trained_models(self) -> dict[str, nn.Module]:
        """The target alone: the strategy network has its own optimizer (`optimizers`)."""
        return {k: m for k, m in super().trained_models().items() if k != "strategy"}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"policy": self.policy}

    def start_step(self, step: int, lr: float, weight_decay: float) -> None:
        self.step, self.lr, self.weight_decay = step, lr, weight_decay

    def policy_due(self) -> bool:
        """Whether this step updates the strategy network: the code's 1-based step counter is
        a multiple of `interval_num`."""
        return (self.step + 1) % self.interval_num == 0

    def policy_lr(self) -> float:
        """`policy_model_lr`, x0.1 at each of the code's milestones (POLICY_DECAY_AT of the
        run's steps, counted in policy updates) reached, at epoch granularity: never within
        the run at `interval_num` > 1, at 99/110 and 104/110 of the epochs at 1."""
        reached = sum(
            self.epoch >= round(f * self.interval_num * self.epochs) for f in POLICY_DECAY_AT
        )
        return self.policy_model_lr * 0.1**reached

    # -- the strategy ----------------------------------------------------------------------
    def distributions(self, x: Tensor) -> list[Categorical]:
        """pi(. | x): one categorical distribution per head (eps, steps, step size)."""
        logits = self.strategy(x).float().split([len(t) for t in self.types], dim=1)
        # softmax gives valid probabilities: no validation (it reads values, which `d2r plan`'s
        # meta tensors have none of)
        return [Categorical(probs=F.softmax(z, dim=-1), validate_args=False) for z in logits]

    def sample_budget(self, actions: Sequence[Tensor]) -> SampleBudget:
        """The per-example budget of sampled candidate indices (eps, steps, step size)."""
        eps_t, iters_t, step_t = (torch.tensor(t, device=actions[0].device) for t in self.types)
        return SampleBudget(
            eps=eps_t[actions[0]].float() / 255,
            step_size=step_t[actions[2]].float() / 255,
            steps=iters_t[actions[1]],
            norm=self.budget.norm,
            bound=max(self.types[1]),
        )

    def strategy_attack(self, x: Tensor, y: Tensor, budget: SampleBudget) -> Tensor:
        """The code's Attack_policy_batch: each example's PGD on CE from x + U(-eps0, eps0)
        (eps0 = `eps`, whatever its own eps), target in eval mode."""
        with eval_mode(self.target):
            start = random_start(x, self.budget.eps, self.budget.norm)
            return attack_loop(self.target, x, start, ce_objective(y), budget)

    # -- the target's step -----------------------------------------------------------------
    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.training and torch.is_grad_enabled() and self.policy_due():
            self.last_reward = self.update_strategy(x, y)
        return super().forward(x, y)

    def generate(self, x: Tensor, y: Tensor) -> Tensor:
        # The code samples the target's strategies with the strategy network in eval mode.
        with eval_mode(self.strategy), torch.no_grad():
            actions = [d.sample() for d in self.distributions(x)]
        self._chosen = self.sample_budget(actions)
        return self.strategy_attack(x, y, self._chosen)

    def loss(self, x: Tensor, y: Tensor, x_adv: Tensor) -> dict[str, Tensor]:
        out = las_at_loss(self.target(x_adv), y, **self._smoothing())
        if self._chosen is not None:  # the batch's mean strategy, eps and step in 1/255
            chosen = self._chosen
            out["eps"] = chosen.eps.mean() * 255
            out["attack_iters"] = chosen.steps.float().mean()
            out["step_size"] = chosen.step_size.mean() * 255
        return out

    def _smoothing(self) -> dict[str, float]:
        return {"factor": self.factor, "label_smoothing": self.label_smoothing}

    # -- the strategy network's update -----------------------------------------------------
    def update_strategy(self, x: Tensor, y: Tensor) -> Tensor:
        """One REINFORCE step of the strategy network on the batch (its train-mode pass
        first, as the code's); returns the reward R."""
        with requiring_grad(self.strategy) as params:
            dists = self.distributions(x)
            actions = [d.sample() for d in dists]
            reward = self.reward(x, y, self.sample_budget(actions))
            pairs = zip(dists, actions, strict=True)
            loss = sum((-d.log_prob(a) * reward).mean() for d, a in pairs)
            grads = _mean_over_ranks(torch.autograd.grad(loss, params, allow_unused=True))
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, self.clip)
            for group in self.policy.param_groups:
                group["lr"] = self.policy_lr()
            self.policy.step()
            self.policy.zero_grad(set_to_none=True)
        return reward

    def reward(self, x: Tensor, y: Tensor, budget: SampleBudget) -> Tensor:
        """The code's Get_reward: R1 + alpha R2 + beta R3 (each clipped), no gradient."""
        x_adv = self.strategy_attack(x, y, budget)
        with eval_mode(self.target), torch.no_grad():
            r1 = F.cross_entropy(self.target(x_adv), y).float().clamp(0, REWARD_CLIP)
        ahead = self.lookahead(x_adv, y)
        x_pgd = self.reward_attack(ahead, x, y)
        with eval_mode(ahead), torch.no_grad():
            robust = (ahead(x_pgd).argmax(1) == y).sum().item()
            clean = (ahead(x).argmax(1) == y).sum().item()
        r2 = torch.tensor(robust / len(y) * self.alpha).clamp(-REWARD_CLIP, REWARD_CLIP)
        r3 = torch.tensor(clean / len(y) * self.beta).clamp(-REWARD_CLIP, REWARD_CLIP)
        return (r1 + r2.to(r1.device) + r3.to(r1.device)).detach()

    def lookahead(self, x_adv: Tensor, y: Tensor) -> nn.Module:
        """A copy of the target after one SGD step on `las_at_loss` of x_adv, in train mode,
        at the target's lr and weight decay (the code's train_target_model: a fresh SGD with
        momentum 0.9, whose first step is the plain one)."""
        ahead = copy.deepcopy(self.target).train()
        params = [p for p in ahead.parameters() if p.requires_grad]
        loss = las_at_loss(ahead(x_adv), y, **self._smoothing())["loss"]
        grads = _mean_over_ranks(torch.autograd.grad(loss, params, allow_unused=True))
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.add_(g.add(p, alpha=self.weight_decay), alpha=-self.lr)
        return ahead

    def reward_attack(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The code's attack_pgd(model, x, y, eps, step_size, steps, 2) on the stepped copy,
        which it leaves in train mode: per-sample early stop, the loop ended once no sample is
        classified correctly, and per sample the restart of the larger final CE."""
        best, best_loss = x, torch.zeros(len(y), device=x.device)
        for _ in range(REWARD_RESTARTS):
            x_adv = random_start(x, self.budget.eps, self.budget.norm)
            rule = _StopTracked(y)
            one = Budget(self.budget.eps, self.budget.step_size, 1, self.budget.norm)
            for _ in range(self.budget.steps):
                x_adv = attack_loop(model, x, x_adv, ce_objective(y), one, step_rule=rule)
                if not rule.any_right:
                    break
            with torch.no_grad():
                loss = F.cross_entropy(model(x_adv), y, reduction="none").float()
            keep = (loss >= best_loss).view(-1, *[1] * (x.dim() - 1))
            best, best_loss = torch.where(keep, x_adv, best), torch.max(best_loss, loss)
        return best


class _StopTracked:
    """`stop_when_wrong`, remembering whether any sample was still classified correctly at
    the latest iterate (the code's `if len(index[0]) == 0: break`)."""

    def __init__(self, y: Tensor) -> None:
        self.rule, self.y, self.any_right = stop_when_wrong(y), y, True

    def __call__(self, logits: Tensor, step: Tensor) -> Tensor:
        self.any_right = bool((logits.argmax(1) == self.y).any())
        return self.rule(logits, step)


def _policy_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The code's --policy_optimizer choices, over the strategy network's parameters."""
    params = list(model.parameters())
    if name == "SGD_without_momentum":
        return torch.optim.SGD(params, lr=lr)
    if name == "SGD_with_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    return torch.optim.Adam(params, lr=lr, weight_decay=5e-4)
