"""Attacks through one loop, in the L-inf or the L2 norm: PGD (CE or CW margin), FGSM, the
TRADES KL attack, CAG and FAT's early-stopped PGD (the loop's per-sample step rules also
count GAIRAT's geometry values); plus an adapter to the original AutoAttack (the optional
`pyautoattack` package), which runs both norms.

Contract (docs/architecture.md): `attack(model, x, y, **ref) -> x_adv` in the eps-ball of its `norm`
and [0, 1].
An attack never changes a model's train/eval mode (the caller sets it: the references differ)
and never writes parameter `.grad` (it differentiates with torch.autograd.grad on the input).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2r.losses import kl_elem
from d2r.registry import (
    NameTaken,
    OptionError,
    View,
    check_choice,
    check_range,
    current_origin,
    failed_plugins_hint,
    track,
)


class EvaluationWarning(UserWarning):
    """An evaluation whose number may not be trusted (train mode, masked gradients, ...)."""


# (B, C) logits -> (B,) per-sample objective to maximize
Objective = Callable[[Tensor], Tensor]


# The threat models: config value -> how eval.json, eval.md and the model card write it (the
# spelling of AutoAttack and RobustBench).
NORMS = {"linf": "Linf", "l2": "L2"}


def norm_label(norm: str) -> str:
    """'linf' -> 'Linf', 'l2' -> 'L2' (a label is returned as it is)."""
    return NORMS.get(norm, norm)


def check_budget(eps: float, step_size: float = 0.0, steps: int = 1, norm: str = "linf") -> None:
    """Refuse a negative or non-finite eps or step size, fewer than one step, or an unknown
    norm."""
    check_range("eps", eps, hint="e.g. 8/255 in linf, 0.5 in l2")
    check_range("step_size", step_size)
    check_range("steps", steps, positive=True)
    check_choice("norm", norm, tuple(NORMS))
    if norm == "linf" and eps > 1:  # pixels are in [0, 1]: a larger ball is the whole cube
        raise OptionError("eps", eps, "must be <= 1 in linf: images are in [0, 1] (e.g. 8/255)")


def check_radius(eps: float, norm: str, shape: tuple[int, ...]) -> None:
    """Refuse an L2 eps above the diameter of the image cube [0, 1]^d, sqrt(d) for d = C*H*W
    values (no two images are farther apart); L-inf is bounded by 1 in `check_budget`."""
    if norm == "l2" and eps > math.sqrt(math.prod(shape)):
        bound = math.sqrt(math.prod(shape))
        rule = f"must be <= sqrt(C*H*W) = {bound:.4g} in l2 for {'x'.join(map(str, shape))} images"
        raise OptionError("eps", eps, rule)


@dataclass(frozen=True)
class Budget:
    """A training attack's budget: `steps` steps of `step_size` inside the eps-ball of `norm`.
    The defaults are the references' CIFAR budget (eps 0.031, step 0.007, 10 steps;
    docs/method.md, "CAG"). Checked on construction (`check_budget`: the same errors as each
    option's)."""

    eps: float = 0.031
    step_size: float = 0.007
    steps: int = 10
    norm: str = "linf"

    def __post_init__(self) -> None:
        check_budget(self.eps, self.step_size, self.steps, self.norm)

    def kwargs(self) -> dict[str, Any]:
        """{"eps", "step_size", "steps", "norm"}: the keywords of PGD, KLAttack and cag."""
        return asdict(self)


@dataclass(frozen=True, eq=False)
class SampleBudget:
    """One budget per sample (LAS-AT's strategy network picks one for each example): `eps`,
    `step_size` (B,) floats and `steps` (B,) whole numbers >= 1. `attack_loop` runs max(steps)
    iterations and sample i moves in its first steps[i] only; every iterate is projected onto
    each sample's own eps-ball (a no-op for a sample that no longer moves)."""

    eps: Tensor
    step_size: Tensor
    steps: Tensor
    norm: str = "linf"
    bound: int | None = None  # the most steps any sample may take: what runs on meta tensors

    def __post_init__(self) -> None:
        check_choice("norm", self.norm, tuple(NORMS))
        shape = self.eps.shape
        if len(shape) != 1 or self.step_size.shape != shape or self.steps.shape != shape:
            raise ValueError("SampleBudget: eps, step_size and steps must be (B,) tensors")
        if self.steps.is_meta:  # `d2r plan` counting FLOPs: no values to check
            return
        if self.steps.is_floating_point() or bool((self.steps < 1).any()):
            raise OptionError("steps", self.steps.tolist(), "must be whole numbers >= 1")
        for name in ("eps", "step_size"):
            value = getattr(self, name)
            if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise OptionError(name, value.tolist(), "must be finite numbers >= 0")

    @property
    def most_steps(self) -> int:
        """The iterations to run: the largest sample's steps; on meta tensors (no values, when
        `d2r plan` counts FLOPs) `bound`, so the count is an upper bound."""
        if self.steps.is_meta:
            if self.bound is None:
                raise ValueError("SampleBudget on meta tensors needs its bound (the most steps)")
            return self.bound
        return int(self.steps.max()) if len(self.steps) else 0


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    # (B,) -> (B, 1, 1, 1): broadcasts over each sample of `like`
    return values.view(-1, *[1] * (like.dim() - 1))


def _l2(delta: Tensor) -> Tensor:
    return delta.flatten(1).norm(dim=1)  # (B,)


def project(x_adv: Tensor, x: Tensor, eps: float | Tensor, norm: str = "linf") -> Tensor:
    """Project onto the eps-ball around x (L-inf: clip each pixel; L2: scale each sample's
    perturbation down to length eps when longer), then clip to the image range [0, 1]. In L2
    the clip only shortens the perturbation (x is in [0, 1]), so the result stays in the ball.
    `eps` may be a (B,) tensor: one radius per sample (`SampleBudget`)."""
    if norm == "linf":
        if isinstance(eps, Tensor):  # (B,): each sample's own radius
            eps = _per_sample(eps, x)
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    delta = x_adv - x
    scale = (eps / _l2(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta * _per_sample(scale, x)).clamp(0.0, 1.0)


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent step of unit size in `norm`: sign(g) in L-inf, g / ||g||_2 per
    sample in L2 (zero where the gradient is zero)."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample(_l2(grad).clamp_min(1e-12), grad)


def random_start(x: Tensor, eps: float, norm: str = "linf") -> Tensor:
    """A start drawn uniformly from the eps-ball around x, then clipped to [0, 1]. L2: a
    uniform direction (a normalized Gaussian) at radius eps * U^(1/d), d = pixels per sample,
    which is uniform in the ball's volume (so in high dimension most starts lie near its
    surface, as the volume does)."""
    if norm == "linf":
        return project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    direction = torch.randn_like(x)
    direction = direction / _per_sample(_l2(direction).clamp_min(1e-12), x)
    radius = eps * torch.rand(len(x), device=x.device, dtype=x.dtype) ** (1.0 / x[0].numel())
    return project(x + direction * _per_sample(radius, x), x, eps, norm)


# (logits at the iterate, its ascent step) -> the step taken: what a sample does at each step
# of the loop, e.g. stop (PGD's early stop, FAT's), or only be counted (GAIRAT's geometry).
StepRule = Callable[[Tensor, Tensor], Tensor]


def stop_when_wrong(y: Tensor) -> StepRule:
    """PGD's per-sample early stop: a sample stops moving once the model misclassifies it."""

    def rule(logits: Tensor, step: Tensor) -> Tensor:
        still_right = logits.argmax(1) == y  # (B,)
        return step * _per_sample(still_right, step)

    return rule


def attack_loop(
    model: nn.Module,
    x: Tensor,
    x_start: Tensor,
    objective: Objective,
    budget: Budget | SampleBudget,
    *,
    y_stop: Tensor | None = None,
    step_rule: StepRule | None = None,
) -> Tensor:
    """The one gradient-ascent loop: each of the budget's steps moves `step_size` along
    `ascent_direction` (the gradient's sign in L-inf, the per-sample normalized gradient in
    L2), then projects onto the eps-ball of its norm and [0, 1]. With `y_stop`, a sample stops
    moving once the model misclassifies it (per-sample early stop, docs/method.md, "Evaluation
    protocol"): the rule `stop_when_wrong(y_stop)`. A `step_rule` sees each iterate's logits
    and returns the step to take instead (FAT's early stop, GAIRAT's geometry count). With a
    `SampleBudget`, each sample has its own eps, step size and number of steps."""
    if y_stop is not None and step_rule is not None:
        raise ValueError("attack_loop: give y_stop or step_rule, not both")
    rule = stop_when_wrong(y_stop) if y_stop is not None else step_rule
    eps, step_size, norm = budget.eps, budget.step_size, budget.norm
    per_sample = isinstance(budget, SampleBudget)
    steps = budget.most_steps if per_sample else budget.steps
    x_adv = x_start.detach()
    for i in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        grad = torch.autograd.grad(objective(logits).sum(), x_adv)[0]
        if per_sample:  # its own step size, and none after its own steps
            sizes = step_size * (i < budget.steps).to(step_size.dtype)
            step = _per_sample(sizes.to(grad.dtype), grad) * ascent_direction(grad, norm)
        else:
            step = step_size * ascent_direction(grad, norm)
        if rule is not None:
            step = rule(logits.detach(), step)
        x_adv = project(x_adv.detach() + step, x, eps, norm)
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


@dataclass(frozen=True)
class PGD:
    """Projected gradient descent, Madry et al. 2018 (arXiv:1706.06083): uniform start in the
    eps-ball, `steps` ascent steps on `loss` ("ce", or "cw" for the Carlini & Wagner 2017
    margin: CW-inf, or CW-L2 in the same loop), projection to the ball and [0, 1], per-sample
    early stop when `early_stop`. `norm="l2"`: steps along the normalized gradient and the L2
    ball (PGD-L2). With `restarts` > 1, samples still correct are attacked again from a new
    random start."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 20
    loss: str = "ce"
    random_start: bool = True
    early_stop: bool = True
    restarts: int = 1
    norm: str = "linf"

    def __post_init__(self) -> None:
        check_budget(self.eps, self.step_size, self.steps, self.norm)
        check_choice("loss", self.loss, tuple(_OBJECTIVES))
        check_range("restarts", self.restarts, positive=True)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        x_adv = self._run(model, x, y)
        for _ in range(self.restarts - 1):
            # Restart only the samples no earlier restart broke: each keeps its first success.
            with torch.no_grad():
                left = (model(x_adv).argmax(1) == y).nonzero().squeeze(1)
            if len(left) == 0:
                break
            x_adv[left] = self._run(model, x[left], y[left])
        return x_adv

    def _run(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        start = random_start(x, self.eps, self.norm) if self.random_start else x
        return attack_loop(
            model,
            x,
            start,
            _OBJECTIVES[self.loss](y),
            Budget(self.eps, self.step_size, self.steps, self.norm),
            y_stop=y if self.early_stop else None,
        )


@dataclass(frozen=True)
class FGSM:
    """Fast gradient sign method, Goodfellow et al. 2015 (arXiv:1412.6572): one signed-gradient
    step of size eps on CE from the clean input (no random start), then [0, 1]. In L2 the one
    step is along the normalized gradient (the fast gradient method of the same paper)."""

    eps: float = 8 / 255
    norm: str = "linf"

    def __post_init__(self) -> None:
        check_budget(self.eps, norm=self.norm)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        budget = Budget(self.eps, step_size=self.eps, steps=1, norm=self.norm)
        return attack_loop(model, x, x, ce_objective(y), budget)


@dataclass(frozen=True)
class KLAttack:
    """The TRADES attack (Zhang et al. 2019, arXiv:1901.08573): maximize KL(q || p(x')) from
    x + 0.001 * N(0, I) (not clipped before the first step). `q` defaults to the model's own
    clean softmax (TRADES, LBGAT); CAG passes the guide's. `norm="l2"`: normalized-gradient
    steps and the L2 ball, from the same start (as the TRADES code's L2 branch)."""

    eps: float = 0.031
    step_size: float = 0.007
    steps: int = 10
    init_std: float = 0.001
    norm: str = "linf"

    def __post_init__(self) -> None:
        check_budget(self.eps, self.step_size, self.steps, self.norm)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor | None = None,
        *,
        ref_probs: Tensor | None = None,
    ) -> Tensor:
        if ref_probs is None:
            with torch.no_grad():
                ref_probs = F.softmax(model(x), 1)
        start = x + self.init_std * torch.randn_like(x)
        return attack_loop(
            model,
            x,
            start,
            kl_objective(ref_probs),
            Budget(self.eps, self.step_size, self.steps, self.norm),
        )


class FriendlyStop:
    """FAT's early stop (Zhang et al. ICML 2020, arXiv:2002.11242, Alg. 1; the released code's
    `earlystop`), as a step rule: at each step a sample the model misclassifies uses one of its
    `tau` further steps, and with none left it stops for good (its friendly adversarial
    example is the iterate at which it stopped); a sample classified correctly always moves.
    tau = 0 stops at the first misclassified iterate. `omega` adds omega * N(0, I) to every
    step taken (the released code's exploration noise). `taken` counts each sample's steps."""

    def __init__(self, y: Tensor, tau: int, omega: float = 0.0) -> None:
        self.y, self.omega = y, omega
        self.left = torch.full_like(y, tau)  # the steps each sample may still take while wrong
        self.stopped = torch.zeros_like(y, dtype=torch.bool)
        self.taken = torch.zeros_like(y)

    def __call__(self, logits: Tensor, step: Tensor) -> Tensor:
        wrong = (logits.argmax(1) != self.y) & ~self.stopped
        self.stopped |= wrong & (self.left == 0)
        self.left -= (wrong & ~self.stopped).long()
        self.taken += (~self.stopped).long()
        if self.omega > 0:
            step = step + self.omega * torch.randn_like(step)
        return step * _per_sample(~self.stopped, step)


class Geometry:
    """GAIRAT's geometry value (Zhang et al. ICLR 2021, arXiv:2010.01736; the released code's
    `GA_PGD`), as a step rule that moves nothing: `kappa` counts, per sample, the iterates of
    the loop (the start and the first K - 1 steps' results) that the model classifies
    correctly, so K for a sample never misclassified and 0 for one misclassified at the
    start. It is the step of the first misclassification while a sample, once misclassified,
    stays so."""

    def __init__(self, y: Tensor) -> None:
        self.y = y
        self.kappa = torch.zeros_like(y)

    def __call__(self, logits: Tensor, step: Tensor) -> Tensor:
        self.kappa += (logits.argmax(1) == self.y).long()
        return step


FAT_STARTS = ("uniform", "normal")
FAT_LOSSES = ("ce", "kl")


@dataclass(frozen=True)
class EarlyStoppedPGD:
    """FAT's early-stopped PGD-K-tau (Zhang et al. ICML 2020, arXiv:2002.11242): PGD whose
    samples stop `tau` misclassified steps after the first (`FriendlyStop`). `start`:
    "uniform" in the eps-ball (FAT.py's uniform_randominit) or "normal", x + 0.001 N(0, I)
    clipped to [0, 1] (FAT_for_TRADES.py); `loss`: "ce" on the labels (FAT) or "kl",
    KL(p(x) || p(x')) with p(x) computed once (FAT for TRADES). `omega`: noise per step."""

    eps: float = 0.031
    step_size: float = 0.007
    steps: int = 10
    tau: int = 0
    omega: float = 0.0
    start: str = "uniform"
    loss: str = "ce"
    norm: str = "linf"

    def __post_init__(self) -> None:
        check_budget(self.eps, self.step_size, self.steps, self.norm)
        check_steps("tau", self.tau)
        check_range("omega", self.omega, hint="0.001 in FAT's code")
        check_choice("start", self.start, FAT_STARTS)
        check_choice("loss", self.loss, FAT_LOSSES)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.start == "uniform":
            start = random_start(x, self.eps, self.norm)
        else:
            start = (x + 0.001 * torch.randn_like(x)).clamp(0.0, 1.0)
        if self.loss == "ce":
            objective = ce_objective(y)
        else:
            with torch.no_grad():
                objective = kl_objective(F.softmax(model(x), 1))
        budget = Budget(self.eps, self.step_size, self.steps, self.norm)
        rule = FriendlyStop(y, self.tau, self.omega)
        return attack_loop(model, x, start, objective, budget, step_rule=rule)


def check_steps(option: str, value: int) -> None:
    """A whole number of steps >= 0 (FAT's tau)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError(option, value, "must be a whole number >= 0")


def cag(
    target: nn.Module,
    guide: nn.Module,
    x: Tensor,
    *,
    eps: float = 0.031,
    step_size: float = 0.007,
    steps: int = 10,
    norm: str = "linf",
) -> Tensor:
    """Collaborative Adversarial Generation (D2R paper; docs/method.md, "CAG"): the KL attack on the
    target with the guide's clean softmax as reference, computed once (no grad). The caller puts
    both models in eval mode first, as the reference does."""
    with torch.no_grad():
        guide_probs = F.softmax(guide(x), 1)  # (B, C), fixed for all steps
    attack = KLAttack(eps=eps, step_size=step_size, steps=steps, norm=norm)
    return attack(target, x, ref_probs=guide_probs)


# Evaluation attacks by name ------------------------------------------------------------------
# One registry: each entry's names, constructor, label, Table 1 columns and help text feed
# from_name, the names `d2r eval --attacks` takes, eval.md's and `d2r report`'s columns, the
# labels of tables and plots (`label`), `d2r list` and the CLI help.


@dataclass(frozen=True)
class EvalAttack:
    """One kind of evaluation attack, as `d2r eval --attacks` names it.

    `pattern`: a regex the whole name must match; its named groups are counts (digits, read
    as ints; a name with a count below 1 is no attack), e.g. "pgd(?P<steps>[0-9]+)".
    `build(eps, step_size=, seed=, norm=, **counts) -> attack`: the attack of a name, with the
    counts that matched (`step_size` None: the attack's own default).
    `label`: how tables, logs and plots name it: a format of the name's groups ("PGD-{steps}")
    or a function of them (each group's text, None where an optional one did not match).
    `columns`: names that are fixed table columns (Table 1's, shown even where not run), each
    with its heading, which is also its label. `help`: its names as `d2r list` and the CLI's
    help write them."""

    name: str
    pattern: str
    build: Callable[..., Any]
    label: str | Callable[..., str]
    help: str
    columns: Mapping[str, str] = field(default_factory=dict)

    def match(self, name: str) -> dict[str, str | None] | None:
        """The groups of `name` (each count's text), or None when it is not one of its names."""
        found = re.fullmatch(self.pattern, name)
        if found is None or any(v is not None and int(v) < 1 for v in found.groupdict().values()):
            return None
        return found.groupdict()

    def label_of(self, name: str, groups: dict[str, str | None]) -> str:
        if name in self.columns:
            return self.columns[name]
        return self.label.format(**groups) if isinstance(self.label, str) else self.label(**groups)


class EvalAttacks:
    """The registry of evaluation attacks (entries in registration order, which is the order
    of `help` and of the table columns)."""

    def __init__(self) -> None:
        self._entries: dict[str, EvalAttack] = {}
        self._origins: dict[str, str] = {}  # name -> the plugin that registered it
        track(self)

    def register(self, entry: EvalAttack) -> EvalAttack:
        if entry.name in self._entries:
            taken = self._origins.get(entry.name, "d2r")
            raise NameTaken(f"evaluation attack {entry.name!r} is registered twice (by {taken})")
        self._entries[entry.name] = entry
        if current_origin():
            self._origins[entry.name] = current_origin()
        return entry

    def unregister(self, name: str) -> None:
        del self._entries[name]
        self._origins.pop(name, None)

    def origin(self, name: str) -> str | None:
        """The package of the plugin that registered entry `name`; None for d2r's."""
        return self._origins.get(name)

    def drop_origin(self, origin: str) -> None:
        """Remove every entry `origin` registered (a plugin refused part-way)."""
        for name in [n for n, o in self._origins.items() if o == origin]:
            self.unregister(name)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return self.find(name) is not None

    def find(self, name: str) -> tuple[EvalAttack, dict[str, str | None]] | None:
        """The entry whose pattern `name` matches, with its groups; None for no attack."""
        for entry in self._entries.values():
            groups = entry.match(name)
            if groups is not None:
                return entry, groups
        return None

    def create(self, name: str, eps: float, **options: Any) -> Any:
        """The attack `name` at `eps`; options: step_size, seed, norm (ValueError for a name
        no entry takes, listing the names that are)."""
        found = self.find(name)
        if found is None:
            raise ValueError(
                f"attack {name!r} unknown; use one of {self.help()}{failed_plugins_hint()}"
            )
        entry, groups = found
        counts = {k: int(v) for k, v in groups.items() if v is not None}
        return entry.build(eps, **options, **counts)

    def label(self, name: str) -> str:
        found = self.find(name)
        return name if found is None else found[0].label_of(name, found[1])

    def columns(self) -> dict[str, str]:
        """{name: heading} of every entry's fixed table columns, in registration order."""
        return {k: v for entry in self._entries.values() for k, v in entry.columns.items()}

    def help(self) -> str:
        """Each entry's help, a plugin's with its package: "mine (plugin from pkg 1.0)"."""
        tagged = (
            e.help + (f" (plugin from {self._origins[e.name]})" if e.name in self._origins else "")
            for e in self._entries.values()
        )
        return ", ".join(tagged)


EVAL_ATTACKS = EvalAttacks()


def _pgd_label(text: str) -> Callable[..., str]:
    def named(steps: str, restarts: str | None = None) -> str:
        return text + steps + (f" x{restarts} restarts" if restarts else "")

    return named


def _pgd_build(loss: str) -> Callable[..., PGD]:
    """PGD with `steps` and `restarts` on `loss`; step size eps/4 unless given (2/255 at
    8/255; docs/method.md, "Evaluation protocol")."""

    def build(
        eps: float,
        step_size: float | None = None,
        norm: str = "linf",
        steps: int = 20,
        restarts: int = 1,
        **_: Any,
    ) -> PGD:
        step = eps / 4 if step_size is None else step_size
        return PGD(eps=eps, step_size=step, steps=steps, loss=loss, restarts=restarts, norm=norm)

    return build


def _fgsm_build(eps: float, norm: str = "linf", **_: Any) -> FGSM:
    return FGSM(eps=eps, norm=norm)


def _autoattack(name: str, text: str, column: bool = False) -> EvalAttack:
    """The entry of AutoAttack's version AA_VERSIONS[name], seeded with `seed`."""

    def build(eps: float, seed: int = 0, norm: str = "linf", **_: Any) -> AutoAttack:
        return AutoAttack(eps=eps, version=AA_VERSIONS[name], seed=seed, norm=norm)

    return EvalAttack(name, re.escape(name), build, text, name, {name: text} if column else {})


_COUNTS = r"(?P<steps>\d+)(?:r(?P<restarts>\d+))?"  # K steps, optionally rR restarts
AA_VERSIONS = {"aa": "standard", "aa_plus": "plus", "aa_rand": "rand"}  # name -> version
EVAL_ATTACKS.register(
    EvalAttack(
        "pgd",
        "pgd" + _COUNTS,
        _pgd_build("ce"),
        _pgd_label("PGD-"),
        "pgdK (K >= 1 steps, e.g. pgd20; pgd20r5 = 5 restarts)",
        columns={"pgd20": "PGD-20", "pgd50": "PGD-50"},
    )
)
EVAL_ATTACKS.register(
    EvalAttack(
        "cw",
        "cw" + _COUNTS,
        _pgd_build("cw"),
        _pgd_label("C&W-"),
        "cwK (the CW margin, e.g. cw20; cw20r5 = 5 restarts)",
        columns={"cw20": "C&W"},
    )
)
EVAL_ATTACKS.register(EvalAttack("fgsm", "fgsm", _fgsm_build, "FGSM", "fgsm"))
EVAL_ATTACKS.register(_autoattack("aa", "AA", column=True))  # Table 1's AA
EVAL_ATTACKS.register(_autoattack("aa_plus", "AA+"))
EVAL_ATTACKS.register(_autoattack("aa_rand", "AA-rand"))

# Table 1's attack columns, by the names from_name takes: a view of EVAL_ATTACKS.
PAPER_ATTACKS: Mapping[str, str] = View(EVAL_ATTACKS.columns)


def __getattr__(name: str) -> Any:
    if name == "EVAL_NAMES":  # the names from_name takes, as EVAL_ATTACKS has them now
        return EVAL_ATTACKS.help()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def label(name: str) -> str:
    """How tables, logs and plots name an evaluation attack: Table 1's column for its attacks
    (pgd20 -> PGD-20, cw20 -> C&W), else e.g. cw30 -> C&W-30, pgd10r5 -> PGD-10 x5 restarts,
    aa_plus -> AA+; a name that is no attack is returned as it is."""
    return EVAL_ATTACKS.label(name)


def from_name(
    name: str, eps: float, step_size: float | None = None, seed: int = 0, norm: str = "linf"
) -> PGD | FGSM | AutoAttack:
    """'pgd20' -> PGD-20 on CE, 'cw20' -> the CW margin with 20 steps (step size eps/4, 2/255
    at 8/255), 'pgd20r5' -> with 5 restarts, 'fgsm', and 'aa' / 'aa_plus' / 'aa_rand' ->
    AutoAttack's standard / plus / rand version seeded with `seed`; each in `norm` ("linf" or
    "l2": PGD-L2, CW-L2, the one-step fast gradient method, AutoAttack at norm L2). Any other
    entry of EVAL_ATTACKS likewise."""
    return EVAL_ATTACKS.create(name, eps, step_size=step_size, seed=seed, norm=norm)


AA_INSTALL = 'AutoAttack needs the optional package: pip install "d2r-robust[autoattack]"'


def require_autoattack() -> Any:
    try:
        import pyautoattack
    except ImportError:
        raise ImportError(AA_INSTALL) from None
    return pyautoattack


@dataclass(frozen=True)
class AutoAttack:
    """AutoAttack, Croce & Hein 2020 (arXiv:2003.01690), run by its authors' own code (PyPI
    `pyautoattack`). version "standard": APGD-CE, APGD-T (9 targets), FAB-T, Square (5000
    queries); "plus": + APGD-DLR, FAB, 5 restarts; "rand": APGD-CE/DLR with EOT 20.
    `attacks` (version "custom") restricts the list, e.g. ("apgd-ce",) for fast tests. The
    package seeds torch itself with `seed`, so a rerun gives the same examples. `norm`: "linf"
    or "l2" (the package's "Linf" / "L2", with the same attack lists)."""

    eps: float = 8 / 255
    version: str = "standard"
    seed: int = 0
    attacks: tuple[str, ...] | None = None
    norm: str = "linf"

    def __post_init__(self) -> None:
        check_budget(self.eps, norm=self.norm)
        check_choice("version", self.version, ("standard", "plus", "rand", "custom"))
        if (self.version == "custom") != (self.attacks is not None):
            raise OptionError("attacks", self.attacks, "give it exactly when version='custom'")

    def build(self, model: nn.Module, device: torch.device | str = "cpu") -> Any:
        """The package's AutoAttack object (its `attacks_to_run` is the list that will run)."""
        aa = require_autoattack()
        attacks = list(self.attacks) if self.attacks is not None else None
        return aa.AutoAttack(
            model,
            attacks=attacks,
            device=device,
            eps=self.eps,
            norm=NORMS[self.norm],
            seed=self.seed,
            version=self.version,
        )

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        adversary = self.build(model, x.device)
        devices = [x.device] if x.device.type == "cuda" else []
        # The package reseeds torch's global RNG and FAB calls .backward(): fork the RNG and
        # freeze the parameters so the caller's RNG and parameter .grad stay untouched.
        with torch.random.fork_rng(devices=devices), _frozen(model), _aa_log() as messages:
            x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=len(x))
        for message in dict.fromkeys(messages):  # once each, in order
            warnings.warn(f"AutoAttack: {message}", EvaluationWarning, stacklevel=2)
        return project(x_adv.detach(), x, self.eps, self.norm)  # a no-op up to float rounding


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _aa_log() -> Iterator[list[str]]:
    """Collect the package's own sanity-check warnings (it logs them on 'auto-attack')."""
    logger, handler = logging.getLogger("auto-attack"), _ListHandler()
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False  # ours re-emits them as warnings
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
