"""Sanity checks of an evaluation (RobustBench / AutoAttack practice): each warns loudly with an
`EvaluationWarning` when a robust accuracy may not be trusted. docs/evaluation.md explains each.

Warning thresholds, and why (docs/evaluation.md explains each check):
- masking: AutoAttack more than 5 points below the best PGD/CW of the suite (and >= 3 samples).
  In the paper's Table 1 the gap between C&W and AA is at most 2.3 points on every data set;
  gradient masking typically opens gaps of tens of points.
- more steps: PGD with more steps (same start, same step) may not keep more samples: with the
  per-sample early stop it is exactly monotone, so any rise beyond device noise (0.5% of n,
  at least 2 samples) is a bug or a randomized model.
- smaller step: 40 steps of eps/16 should not keep 5 points (and >= 2 samples) more than 10
  steps of eps/4.
- large eps: PGD-20 (CW margin, step eps/8) with an eps that can reach any image (`large_eps`:
  1 in L-inf; sqrt(d) in L2, the diagonal of the [0, 1] box), so every sample must fall.
- zero gradient: an exactly zero input gradient of the margin loss means the model hides its
  gradient (a rounding layer, a saturating non-linearity): gradient attacks see nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from d2r.attacks import PGD, AutoAttack, EvaluationWarning, cw_objective, norm_label
from d2r.measure import Attack, as_float, correct_flags, seeded

MASKING_GAP = 0.05  # AA this far below the best gradient attack -> masking warning
MASKING_MIN_SAMPLES = 3
CHECK_N = 64  # samples for the cheap checks (`checks=True`)
LARGE_EPS = 1.0  # L-inf: the whole [0, 1] box: every sample must be broken


def large_eps(x: Tensor, norm: str = "linf") -> float:
    """A radius whose ball around any image in [0, 1]^d holds the whole box, so any image is
    reachable: 1 in L-inf (LARGE_EPS); in L2 the box's diagonal sqrt(d), d = values per
    sample (the farthest two images of the box can be: 55.4 for 3x32x32)."""
    return LARGE_EPS if norm == "linf" else math.sqrt(x[0].numel())


@contextmanager
def recorded(messages: list[str]) -> Iterator[None]:
    """Collect EvaluationWarnings raised inside (ours and the AutoAttack package's), then raise
    every caught warning again for the caller."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if issubclass(w.category, EvaluationWarning) and str(w.message) not in messages:
            messages.append(str(w.message))  # once each: AutoAttack repeats its own per batch
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _warn(message: str) -> None:
    warnings.warn(message, EvaluationWarning, stacklevel=3)


def check_mode(model: nn.Module) -> None:
    """Warn if the model comes in train mode (evaluate runs it in eval mode anyway: in train
    mode BatchNorm uses the batch's statistics and dropout is on, so the number is wrong)."""
    training = sum(m.training for m in model.modules())
    if training:
        _warn(
            f"model passed in train mode ({training} module(s) training); evaluated in eval "
            "mode and restored after. Call model.eval() before evaluating it yourself"
        )


def check_outputs(model: nn.Module, xb: Tensor) -> None:
    """Two forward passes on the same batch must agree, and outputs must be logits."""
    with torch.no_grad():
        a, b = model(xb), model(xb)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        _warn(
            "non-deterministic outputs: two forward passes on the same batch differ "
            f"(max {float((a - b).abs().max()):.3g}); a randomized model needs aa_rand (EOT)"
        )
    if len(a) and (a >= 0).all() and torch.allclose(a.sum(1), torch.ones(len(a)).to(a), atol=1e-4):
        _warn(
            "outputs look like probabilities (rows >= 0 summing to 1): attacks need logits; "
            "remove the final softmax"
        )


def check_suite(flags: Mapping[str, Tensor], suite: Mapping[str, Attack]) -> None:
    """Checks on the suite's own results: more PGD steps, and AutoAttack far below PGD/CW."""
    n = len(flags["clean"])
    pgds = {k: a for k, a in suite.items() if isinstance(a, PGD)}
    for few, many in _step_pairs(pgds):
        if _rises(flags[few], flags[many], max(1, 0.005 * n)):
            _warn(
                f"robust accuracy rises with more steps: {many} {_pct(flags[many])} > "
                f"{few} {_pct(flags[few])}; the attack or the model is unreliable"
            )
    aas = [k for k, a in suite.items() if isinstance(a, AutoAttack)]
    if pgds and aas:
        best = min(pgds, key=lambda k: int(flags[k].sum()))
        for aa in aas:
            _check_gap(best, flags[best], aa, flags[aa])


def _step_pairs(pgds: Mapping[str, PGD]) -> list[tuple[str, str]]:
    """Names of consecutive PGD attacks (by steps) that differ only in their number of steps."""
    groups: dict[PGD, list[str]] = {}
    for name, a in pgds.items():
        groups.setdefault(dataclasses.replace(a, steps=1), []).append(name)
    pairs = []
    for members in groups.values():
        members.sort(key=lambda k: pgds[k].steps)
        pairs += list(itertools.pairwise(members))
    return pairs


def _rises(before: Tensor, after: Tensor, tolerance: float) -> bool:
    return int(after.sum()) - int(before.sum()) > tolerance


def _pct(flags: Tensor) -> str:
    return f"{100 * flags.float().mean().item():.2f}%"


def _check_gap(name: str, grad_flags: Tensor, aa: str, aa_flags: Tensor) -> None:
    gap = grad_flags.float().mean().item() - aa_flags.float().mean().item()
    if gap > MASKING_GAP and int(grad_flags.sum()) - int(aa_flags.sum()) >= MASKING_MIN_SAMPLES:
        _warn(
            f"possible gradient masking: {name} {_pct(grad_flags)} is {100 * gap:.1f} points "
            f"above {aa} {_pct(aa_flags)} (threshold {100 * MASKING_GAP:.0f}); trust {aa}, "
            "not the gradient attacks"
        )


def cheap_checks(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    clean: Tensor,
    eps: float,
    seed: int,
    device: torch.device,
    norm: str = "linf",
) -> None:
    """Checks on up to CHECK_N clean-correct samples: zero gradients, PGD at an eps that can
    reach any image (`large_eps`), and PGD with more steps / a smaller step size than PGD-10,
    all in `norm`."""
    index = clean.nonzero().squeeze(1)[:CHECK_N]
    if len(index) == 0:
        return
    xs, ys = as_float(x[index].to(device)), y[index].to(device)
    check_zero_gradient(model, xs, ys)
    big_eps = large_eps(xs, norm)
    with seeded(seed, device):
        # CW margin, not CE: CE's gradient vanishes where a confident softmax saturates in fp32
        big = PGD(eps=big_eps, step_size=big_eps / 8, steps=20, loss="cw", norm=norm)
        survivors = correct_flags(model, xs, ys, big, device=device)
    if survivors.any():
        _warn(
            f"{int(survivors.sum())} of {len(ys)} samples survive PGD-20 at "
            f"eps={round(big_eps, 4)} ({norm_label(norm)}: any image is reachable): the "
            "gradient is masked or the model is constant"
        )
    _check_step_variants(model, xs, ys, (eps, norm), seed, device)


def check_zero_gradient(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """The CW margin's input gradient is zero only where the model hides it (CE would also be
    zero where softmax saturates in fp32, which is not masking)."""
    x = x.detach().requires_grad_(True)
    grad = torch.autograd.grad(cw_objective(y)(model(x)).sum(), x)[0]
    zero = grad.flatten(1).abs().amax(1) == 0  # (B,)
    if zero.any():
        _warn(
            f"gradient masking: {int(zero.sum())} of {len(y)} samples have an exactly zero "
            "input gradient (a non-differentiable layer?); gradient attacks (PGD, CW, APGD) "
            "cannot be trusted on this model, only gradient-free ones (Square in aa)"
        )


def _check_step_variants(model, x, y, budget, seed, device) -> None:
    eps, norm = budget
    variants = {
        "PGD-10 (step eps/4)": PGD(eps=eps, step_size=eps / 4, steps=10, norm=norm),
        "PGD-40 (step eps/4)": PGD(eps=eps, step_size=eps / 4, steps=40, norm=norm),
        "PGD-40 (step eps/16)": PGD(eps=eps, step_size=eps / 16, steps=40, norm=norm),
    }
    flags = {}
    for name, attack in variants.items():
        with seeded(seed, device):
            flags[name] = correct_flags(model, x, y, attack, device=device)
    base, more, small = flags.values()
    n = len(y)
    if _rises(base, more, max(1, 0.005 * n)):
        _warn(
            f"robust accuracy rises with more PGD steps ({_pct(base)} -> {_pct(more)} on "
            f"{n} samples): the attack or the model is unreliable"
        )
    if _rises(base, small, max(2, 0.05 * n)):
        _warn(
            f"robust accuracy rises with a smaller PGD step size ({_pct(base)} -> "
            f"{_pct(small)} on {n} samples): the loss surface may be masked"
        )
