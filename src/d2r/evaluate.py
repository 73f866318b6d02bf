"""Robust accuracy users can trust: per-sample flags for each attack and their worst case
(RobustBench style: a sample is robust only if every attack in the suite failed on it), with
the settings beside every number and sanity checks that warn loudly (`EvaluationWarning`).

Warning thresholds, and why (docs/evaluation.md explains each check):
- masking: AutoAttack more than 5 points below the best PGD/CW of the suite (and >= 3 samples).
  In the paper's Table 1 the gap between C&W and AA is at most 2.3 points on every data set;
  gradient masking typically opens gaps of tens of points.
- more steps: PGD with more steps (same start, same step) may not keep more samples: with the
  per-sample early stop it is exactly monotone, so any rise beyond device noise (0.5% of n,
  at least 2 samples) is a bug or a randomized model.
- smaller step: 40 steps of eps/16 should not keep 5 points (and >= 2 samples) more than 10
  steps of eps/4.
- large eps: PGD-20 (CW margin, step 1/8) with eps = 1 can reach any image, so every sample
  must fall.
- zero gradient: an exactly zero input gradient of the margin loss means the model hides its
  gradient (a rounding layer, a saturating non-linearity): gradient attacks see nothing.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from d2r import attacks as attacks_mod
from d2r.attacks import PGD, AutoAttack, EvaluationWarning, cw_objective
from d2r.config import format_eps
from d2r.methods import eval_mode

__all__ = ["EvaluationWarning", "correct_flags", "evaluate", "markdown_table", "suite_flags"]

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]

MASKING_GAP = 0.05  # AA this far below the best gradient attack -> masking warning
MASKING_MIN_SAMPLES = 3
CHECK_N = 64  # samples for the cheap checks (`checks=True`)
LARGE_EPS = 1.0  # the whole [0, 1] box: every sample must be broken


def correct_flags(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    bar: tqdm | None = None,
) -> Tensor:
    """(N,) bool on the CPU: is sample i classified correctly (after `attack`, if given)?"""
    device = device or _device_of(model)
    flags = []
    for start in range(0, len(x), batch_size):
        xb = _as_float(x[start : start + batch_size].to(device))
        yb = y[start : start + batch_size].to(device)
        if attack is not None:
            xb = attack(model, xb, yb)
        with torch.no_grad():
            flags.append((model(xb).argmax(1) == yb).cpu())
        if bar is not None:
            bar.update(1)
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def _as_float(x: Tensor) -> Tensor:
    # data sets are held as uint8; models take fp32 in [0, 1] (no bf16 in evaluation)
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.zeros(0)).device


def build_suite(
    attacks: Sequence[str] | Mapping[str, Attack], eps: float, seed: int = 0
) -> dict[str, Attack]:
    """Names ('pgd20', 'cw20', 'aa', ...) -> attacks at `eps`; a mapping is taken as given."""
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    if isinstance(attacks, Mapping):
        suite = dict(attacks)
    else:
        suite = {name: attacks_mod.from_name(name, eps, seed=seed) for name in attacks}
    if any(isinstance(a, AutoAttack) for a in suite.values()):
        attacks_mod.require_autoattack()  # fail now, not after an hour of PGD
    return suite


def suite_flags(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    suite: Mapping[str, Attack],
    *,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per-sample correct flags for "clean" and each attack, and the seconds each took. Each
    attack starts from `seed` so a rerun (or an attack alone) gives the same flags."""
    device = torch.device(device) if device is not None else _device_of(model)
    total = -(-len(x) // batch_size) * (1 + len(suite))
    flags, seconds = {}, {}
    with tqdm(total=total, desc="eval", unit="batch", disable=not progress) as bar:
        for name, attack in {"clean": None, **suite}.items():
            bar.set_postfix_str(name)
            start = time.perf_counter()
            with _seeded(seed, device):
                flags[name] = correct_flags(
                    model, x, y, attack, batch_size=batch_size, device=device, bar=bar
                )
            seconds[name] = time.perf_counter() - start
    return flags, seconds


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for one attack without disturbing the caller's RNG streams."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def worst_case(flags: Mapping[str, Tensor]) -> Tensor:
    """(N,) bool: correct on the clean input and after every attack."""
    return torch.stack(list(flags.values())).all(0)


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[str] | Mapping[str, Attack] = ("pgd20", "cw20"),
    eps: float = 8 / 255,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    *,
    checks: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Clean, per-attack and worst-case accuracy (fractions in [0, 1]) of `model` on (x, y), in
    eval mode and fp32, for any nn.Module taking [0, 1] inputs (x float in [0, 1] or uint8).

    Returns {"clean", <each attack>, "worst_case", "settings", "seconds", "warnings"}; every
    warning is also raised as an `EvaluationWarning`. `checks=True` adds the cheap sanity
    checks on up to 64 samples (large eps, more steps, smaller step, zero gradient)."""
    _check_inputs(x, y)
    suite = build_suite(attacks, eps, seed)
    device = torch.device(device) if device is not None else _device_of(model)
    messages: list[str] = []
    with _recorded(messages):
        check_mode(model)
        with eval_mode(model), torch.autocast(device.type, enabled=False):
            check_outputs(model, _as_float(x[: min(batch_size, CHECK_N)].to(device)))
            flags, seconds = suite_flags(
                model,
                x,
                y,
                suite,
                seed=seed,
                batch_size=batch_size,
                device=device,
                progress=progress,
            )
            check_suite(flags, suite)
            if checks:
                cheap_checks(model, x, y, flags["clean"], eps, seed, device)
    result: dict[str, Any] = {name: f.float().mean().item() for name, f in flags.items()}
    result["worst_case"] = worst_case(flags).float().mean().item()
    result["settings"] = _settings(model, suite, eps, len(y), seed, batch_size, device, checks)
    result["seconds"] = seconds
    result["warnings"] = messages
    return result


def _check_inputs(x: Tensor, y: Tensor) -> None:
    if len(x) != len(y) or y.dim() != 1:
        raise ValueError(f"x has {len(x)} samples but y has shape {tuple(y.shape)}; need (N,)")
    if x.dtype != torch.uint8 and len(x) and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"inputs must be floats in [0, 1] or uint8 (got [{x.min():.3g}, {x.max():.3g}]); "
            "a model that wants mean/std normalization must carry it as its first layer"
        )


def _settings(model, suite, eps, n, seed, batch_size, device, checks) -> dict[str, Any]:
    return {
        "eps": eps,
        "eps_text": format_eps(eps),
        "norm": "Linf",
        "n": n,
        "seed": seed,
        "batch_size": batch_size,
        "dtype": "float32",
        "device": str(device),
        "checks": checks,
        "model": type(model).__name__,
        "attacks": {name: attack_settings(a, model) for name, a in suite.items()},
    }


def attack_settings(attack: Attack, model: nn.Module | None = None) -> dict[str, Any]:
    """What an attack ran with: its dataclass fields, and for AutoAttack the package's list."""
    info: dict[str, Any] = {"type": type(attack).__name__}
    if dataclasses.is_dataclass(attack):
        info.update(dataclasses.asdict(attack))
    if isinstance(attack, AutoAttack) and model is not None:
        package = attacks_mod.require_autoattack()
        info["runs"] = list(attack.build(model).attacks_to_run)
        info["package"] = f"pyautoattack {package.__version__}"
    return info


# Sanity checks ------------------------------------------------------------------------------


@contextmanager
def _recorded(messages: list[str]) -> Iterator[None]:
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
) -> None:
    """Checks on up to CHECK_N clean-correct samples: zero gradients, PGD at eps = 1, and
    PGD with more steps / a smaller step size than PGD-10."""
    index = clean.nonzero().squeeze(1)[:CHECK_N]
    if len(index) == 0:
        return
    xs, ys = _as_float(x[index].to(device)), y[index].to(device)
    check_zero_gradient(model, xs, ys)
    with _seeded(seed, device):
        # CW margin, not CE: CE's gradient vanishes where a confident softmax saturates in fp32
        big = PGD(eps=LARGE_EPS, step_size=LARGE_EPS / 8, steps=20, loss="cw")
        survivors = correct_flags(model, xs, ys, big, device=device)
    if survivors.any():
        _warn(
            f"{int(survivors.sum())} of {len(ys)} samples survive PGD-20 at eps={LARGE_EPS} "
            "(any image is reachable): the gradient is masked or the model is constant"
        )
    _check_step_variants(model, xs, ys, eps, seed, device)


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


def _check_step_variants(model, x, y, eps, seed, device) -> None:
    variants = {
        "PGD-10 (step eps/4)": PGD(eps=eps, step_size=eps / 4, steps=10),
        "PGD-40 (step eps/4)": PGD(eps=eps, step_size=eps / 4, steps=40),
        "PGD-40 (step eps/16)": PGD(eps=eps, step_size=eps / 16, steps=40),
    }
    flags = {}
    for name, attack in variants.items():
        with _seeded(seed, device):
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


# Report -------------------------------------------------------------------------------------

# The paper's Table 1 columns; other attacks of the suite follow them.
PAPER_COLUMNS = attacks_mod.PAPER_ATTACKS


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per checkpoint (or model): the paper's columns (— where not run), any other
    attack, the worst case, and n / eps / seed beside the numbers; settings and warnings below."""
    run = [k for r in results.values() for k in r["settings"]["attacks"]]
    extra = [k for k in run if k not in PAPER_COLUMNS]
    names = ["clean", *PAPER_COLUMNS, *dict.fromkeys(extra), "worst_case"]
    labels = ["Clean", *(attacks_mod.label(k) for k in names[1:-1]), "Worst case"]
    lines = [
        "| checkpoint | n | eps (Linf) | seed | " + " | ".join(labels) + " |",
        "|---" * (4 + len(names)) + "|",
    ]
    for row, r in results.items():
        s = r["settings"]
        cells = [f"{100 * r[k]:.2f}" if k in r else "—" for k in names]
        head = f"| {row} | {s['n']} | {s['eps_text']} | {s['seed']} | "
        lines.append(head + " | ".join(cells) + " |")
    lines += ["", "Accuracies in %; worst case = robust against every attack run (per sample).", ""]
    first = next(iter(results.values()), None)
    if first is not None:
        lines += [
            f"- {attacks_mod.label(k)}: {_describe(a)}"
            for k, a in first["settings"]["attacks"].items()
        ]
    warned = [f"- **warning** ({row}): {w}" for row, r in results.items() for w in r["warnings"]]
    return "\n".join(lines + (["", *warned] if warned else [])) + "\n"


def _describe(settings: Mapping[str, Any]) -> str:
    skip = {"type"}
    body = ", ".join(f"{k}={_fmt(v)}" for k, v in settings.items() if k not in skip)
    return f"{settings['type']}({body})"


def _fmt(value: Any) -> str:
    return format_eps(value) if isinstance(value, float) else str(value)
