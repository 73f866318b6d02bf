"""L-inf attacks through one loop: PGD (CE or CW margin), FGSM, the TRADES KL attack and CAG;
plus an adapter to the original AutoAttack (the optional `pyautoattack` package).

Contract (DESIGN.md): `attack(model, x, y, **ref) -> x_adv` inside the eps-ball and [0, 1].
An attack never changes a model's train/eval mode (the caller sets it: the references differ)
and never writes parameter `.grad` (it differentiates with torch.autograd.grad on the input).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2r.losses import kl_elem
from d2r.registry import OptionError, check_choice, check_range


class EvaluationWarning(UserWarning):
    """An evaluation whose number may not be trusted (train mode, masked gradients, ...)."""


# (B, C) logits -> (B,) per-sample objective to maximize
Objective = Callable[[Tensor], Tensor]


def check_budget(eps: float, step_size: float = 0.0, steps: int = 1) -> None:
    """Refuse a negative or non-finite eps or step size, or fewer than one step."""
    check_range("eps", eps, hint="e.g. 8/255")
    check_range("step_size", step_size)
    check_range("steps", steps, positive=True)


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Clip to the L-inf eps-ball around x, then to the image range [0, 1]."""
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def attack_loop(
    model: nn.Module,
    x: Tensor,
    x_start: Tensor,
    objective: Objective,
    *,
    eps: float,
    step_size: float,
    steps: int,
    y_stop: Tensor | None = None,
) -> Tensor:
    """The one sign-gradient ascent loop. With `y_stop`, a sample stops moving once the model
    misclassifies it (per-sample early stop, the evaluation protocol of SPEC section 7)."""
    x_adv = x_start.detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        grad = torch.autograd.grad(objective(logits).sum(), x_adv)[0]
        step = step_size * grad.sign()
        if y_stop is not None:  # freeze samples already misclassified
            still_right = logits.argmax(1) == y_stop  # (B,)
            step = step * still_right.view(-1, *[1] * (x.dim() - 1))
        x_adv = project(x_adv.detach() + step, x, eps)
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
    eps-ball, `steps` signed-gradient steps on `loss` ("ce", or "cw" for CW-inf, Carlini &
    Wagner 2017), projection to the ball and [0, 1], per-sample early stop when `early_stop`.
    With `restarts` > 1, samples still correct are attacked again from a new random start."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 20
    loss: str = "ce"
    random_start: bool = True
    early_stop: bool = True
    restarts: int = 1

    def __post_init__(self) -> None:
        check_budget(self.eps, self.step_size, self.steps)
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
        start = x
        if self.random_start:
            start = project(x + torch.empty_like(x).uniform_(-self.eps, self.eps), x, self.eps)
        return attack_loop(
            model,
            x,
            start,
            _OBJECTIVES[self.loss](y),
            eps=self.eps,
            step_size=self.step_size,
            steps=self.steps,
            y_stop=y if self.early_stop else None,
        )


@dataclass(frozen=True)
class FGSM:
    """Fast gradient sign method, Goodfellow et al. 2015 (arXiv:1412.6572): one signed-gradient
    step of size eps on CE from the clean input (no random start), then [0, 1]."""

    eps: float = 8 / 255

    def __post_init__(self) -> None:
        check_budget(self.eps)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return attack_loop(model, x, x, ce_objective(y), eps=self.eps, step_size=self.eps, steps=1)


@dataclass(frozen=True)
class KLAttack:
    """The TRADES attack (Zhang et al. 2019, arXiv:1901.08573): maximize KL(q || p(x')) from
    x + 0.001 * N(0, I) (not clipped before the first step). `q` defaults to the model's own
    clean softmax (TRADES, LBGAT); CAG passes the guide's."""

    eps: float = 0.031
    step_size: float = 0.007
    steps: int = 10
    init_std: float = 0.001

    def __post_init__(self) -> None:
        check_budget(self.eps, self.step_size, self.steps)

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
            eps=self.eps,
            step_size=self.step_size,
            steps=self.steps,
        )


def cag(
    target: nn.Module,
    guide: nn.Module,
    x: Tensor,
    *,
    eps: float = 0.031,
    step_size: float = 0.007,
    steps: int = 10,
) -> Tensor:
    """Collaborative Adversarial Generation (D2R paper, SPEC section 3): the KL attack on the
    target with the guide's clean softmax as reference, computed once (no grad). The caller puts
    both models in eval mode first, as the reference does."""
    with torch.no_grad():
        guide_probs = F.softmax(guide(x), 1)  # (B, C), fixed for all steps
    attack = KLAttack(eps=eps, step_size=step_size, steps=steps)
    return attack(target, x, ref_probs=guide_probs)


_NAMED = re.compile(r"^(pgd|cw)(\d+)(?:r(\d+))?$")
AA_VERSIONS = {"aa": "standard", "aa_plus": "plus", "aa_rand": "rand"}
EVAL_NAMES = "pgdK, cwK (K >= 1 steps, e.g. pgd20, cw20; pgd20r5 = 5 restarts), fgsm, " + ", ".join(
    AA_VERSIONS
)


# Table 1's attack columns, by the names from_name takes.
PAPER_ATTACKS = {"pgd20": "PGD-20", "pgd50": "PGD-50", "cw20": "C&W", "aa": "AA"}
_OTHER_LABELS = {"fgsm": "FGSM", "aa_plus": "AA+", "aa_rand": "AA-rand"}


def label(name: str) -> str:
    """How tables, logs and plots name an evaluation attack: Table 1's column for its attacks
    (pgd20 -> PGD-20, cw20 -> C&W), else e.g. cw30 -> C&W-30, pgd10r5 -> PGD-10 x5 restarts,
    aa_plus -> AA+; a name that is no attack is returned as it is."""
    if name in PAPER_ATTACKS:
        return PAPER_ATTACKS[name]
    match = _NAMED.match(name)
    if match:
        kind, steps, restarts = match.groups()
        text = ("PGD-" if kind == "pgd" else "C&W-") + steps
        return text + (f" x{restarts} restarts" if restarts else "")
    return _OTHER_LABELS.get(name, name)


def from_name(
    name: str, eps: float, step_size: float | None = None, seed: int = 0
) -> PGD | FGSM | AutoAttack:
    """'pgd20' -> PGD-20 on CE, 'cw20' -> CW-inf with 20 steps (step size eps/4, 2/255 at 8/255),
    'pgd20r5' -> with 5 restarts, 'fgsm', and 'aa' / 'aa_plus' / 'aa_rand' -> AutoAttack's
    standard / plus / rand version seeded with `seed`."""
    if name == "fgsm":
        return FGSM(eps=eps)
    if name in AA_VERSIONS:
        return AutoAttack(eps=eps, version=AA_VERSIONS[name], seed=seed)
    match = _NAMED.match(name)
    if not match or int(match.group(2)) < 1 or (match.group(3) and int(match.group(3)) < 1):
        raise ValueError(f"attack {name!r} unknown; use one of {EVAL_NAMES}")
    loss = "ce" if match.group(1) == "pgd" else "cw"
    step = eps / 4 if step_size is None else step_size
    restarts = int(match.group(3) or 1)
    return PGD(eps=eps, step_size=step, steps=int(match.group(2)), loss=loss, restarts=restarts)


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
    package seeds torch itself with `seed`, so a rerun gives the same examples."""

    eps: float = 8 / 255
    version: str = "standard"
    seed: int = 0
    attacks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_budget(self.eps)
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
            norm="Linf",
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
        return project(x_adv.detach(), x, self.eps)  # a no-op up to float rounding


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
