"""Robust accuracy users can trust, on a model and images (no files): per-sample flags for each
attack and their worst case (RobustBench style: a sample is robust only if every attack in the
suite failed on it), with the settings beside every number and the sanity checks of
`d2r.sanity`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from d2r import attacks as attacks_mod
from d2r import sanity
from d2r.attacks import AutoAttack, norm_label
from d2r.config import format_eps
from d2r.evalstore import (
    CLEAN,
    Ledger,
)
from d2r.measure import Attack, as_float, batch_flags, device_of
from d2r.methods import eval_mode

DEFAULT_NORM = "Linf"  # the norm of an attack that does not name its own


def attack_norm(attack: Attack) -> str:
    """The threat model's norm as results record it ("Linf", "L2"): what the attack states; a
    plain callable states nothing and counts as L-inf."""
    return norm_label(getattr(attack, "norm", "linf"))


def build_suite(
    attacks: Sequence[str] | Mapping[str, Attack],
    eps: float,
    seed: int = 0,
    norm: str | None = None,
) -> dict[str, Attack]:
    """Names ('pgd20', 'cw20', 'aa', ...) -> attacks at `eps` in `norm` (default "linf"); a
    mapping is taken as given (its attacks carry their own norm)."""
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    if isinstance(attacks, Mapping):
        suite = dict(attacks)
    else:
        made = {"seed": seed, "norm": norm or "linf"}
        suite = {name: attacks_mod.from_name(name, eps, **made) for name in attacks}
    suite_norm(suite, norm)  # one threat model per suite
    if any(isinstance(a, AutoAttack) for a in suite.values()):
        attacks_mod.require_autoattack()  # fail now, not after an hour of PGD
    return suite


def suite_norm(suite: Mapping[str, Attack], norm: str | None = None) -> str:
    """The one norm of a suite ("linf" or "l2"): what its attacks' `norm` fields say (a plain
    callable says nothing), which `norm`, when given, must match; "linf" when nothing says.
    A worst case over attacks of different threat models would mean nothing: ValueError."""
    attacks_mod.check_budget(0.0, norm=norm or "linf")
    declared = {a.norm for a in suite.values() if hasattr(a, "norm")}
    if norm is not None:
        declared.add(norm)
    if len(declared) > 1:
        raise ValueError(
            f"the suite mixes norms ({', '.join(sorted(declared))}); evaluate each norm "
            "separately (d2r eval --norm linf|l2)"
        )
    return declared.pop() if declared else "linf"


@dataclass(frozen=True)
class EvalOptions:
    """How an evaluation runs, the same for each model, eps and attack of it: built once from
    the keywords of `evaluate`, `evaluate_run` and `evaluate_weights` (whose defaults these
    are) and passed down.

    n: the first n test images (None: all; files-level only). seed: batch i of every attack is
    seeded from (seed, i). batch_size. device: None is the model's own device (`evaluate`),
    "auto" CUDA where there is one (the files-level default). norm: "linf" or "l2", None: what
    the suite's attacks say, else "linf". checks: the cheap sanity checks. progress: a
    progress bar (and the files-level status lines). force: evaluate again what the store
    holds (files-level only)."""

    n: int | None = None
    seed: int = 0
    batch_size: int = 256
    device: torch.device | str | None = None
    norm: str | None = None
    checks: bool = True
    progress: bool = False
    force: bool = False


def suite_flags(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    suite: Mapping[str, Attack],
    options: EvalOptions | None = None,
    *,
    ledger: Ledger | None = None,
    **keywords: Any,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per-sample correct flags for "clean" and each attack, and the seconds each took, with
    `options` (its seed, batch_size, device and progress count here; `keywords` such as
    seed=1, batch_size=64 replace its fields). Batch i of every attack is seeded from
    (seed, i), so a rerun, an attack alone, or an evaluation resumed from `ledger`
    (d2r.evalstore: stored results and partial state; the default keeps nothing) gives the
    same flags; a different batch_size draws other random starts."""
    options = dataclasses.replace(options or EvalOptions(), **keywords)
    device = _device(options.device, model)
    ledger = ledger or Ledger()
    sizes = {"seed": options.seed, "batch_size": options.batch_size, "device": device}
    total = -(-len(x) // options.batch_size) * (1 + len(suite))
    flags, seconds = {}, {}
    with tqdm(total=total, desc="eval", unit="batch", disable=not options.progress) as bar:
        for name, attack in {CLEAN: None, **suite}.items():
            bar.set_postfix_str(name)
            flags[name], seconds[name] = _attack_flags(
                model, x, y, name, attack, ledger, bar, sizes
            )
    return flags, seconds


def _device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    """The device an option names; None: the model's own."""
    return torch.device(device) if device is not None else device_of(model)


def _attack_flags(model, x, y, name, attack, ledger: Ledger, bar: tqdm, sizes) -> tuple:
    """One attack's flags, batch by batch from where `ledger` left it, each batch saved."""
    batches = -(-len(x) // sizes["batch_size"])
    cached = ledger.cached(name)
    if cached is not None:
        bar.update(batches)
        return cached
    done, before = ledger.resume(name)  # whole batches only
    first = -(-len(done) // sizes["batch_size"])
    bar.update(first)
    parts, start, seconds = [done], time.perf_counter(), before
    for index, flags in enumerate(batch_flags(model, x, y, attack, first=first, **sizes)):
        parts.append(flags)
        bar.update(1)
        seconds = before + time.perf_counter() - start
        ledger.save(name, torch.cat(parts), seconds, first + index + 1)
    flags = torch.cat(parts)
    ledger.finish(name, flags, seconds)
    return flags, seconds


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
    ledger: Ledger | None = None,
    norm: str | None = None,
) -> dict[str, Any]:
    """Clean, per-attack and worst-case accuracy (fractions in [0, 1]) of `model` on (x, y), in
    eval mode and fp32, for any nn.Module taking [0, 1] inputs (x float in [0, 1] or uint8), in
    `norm` "linf" (default) or "l2" (eps an L2 radius; a mapping of attacks brings its own).

    Returns {"clean", <each attack>, "worst_case", "worst_case_over", "settings", "seconds",
    "warnings"}; every warning is also raised as an `EvaluationWarning`. `checks=True` adds the
    cheap sanity checks on up to 64 samples (large eps, more steps, smaller step, zero
    gradient). `ledger`: where flags are kept and resumed from (see `suite_flags`)."""
    options = EvalOptions(
        seed=seed, batch_size=batch_size, device=device, norm=norm, checks=checks, progress=progress
    )
    return evaluate_with(model, x, y, attacks, eps, options, ledger=ledger)


def evaluate_with(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attacks: Sequence[str] | Mapping[str, Attack],
    eps: float,
    options: EvalOptions,
    *,
    ledger: Ledger | None = None,
) -> dict[str, Any]:
    """`evaluate` with its options as one `EvalOptions` (n and force are not used here): what
    `evaluate_run` and `evaluate_weights` run for each model and eps."""
    _check_inputs(x, y)
    suite = build_suite(attacks, eps, options.seed, options.norm)
    options = dataclasses.replace(
        options, norm=suite_norm(suite, options.norm), device=_device(options.device, model)
    )
    flags, seconds, messages = _checked_flags(model, x, y, suite, eps, options, ledger)
    result: dict[str, Any] = {name: f.float().mean().item() for name, f in flags.items()}
    result["worst_case"] = worst_case(flags).float().mean().item()
    result["worst_case_over"] = list(flags)
    settings = _settings(model, suite, eps, len(y), options)
    return {**result, "settings": settings, "seconds": seconds, "warnings": messages}


def _checked_flags(model, x, y, suite, eps, options: EvalOptions, ledger) -> tuple:
    """suite_flags with the sanity checks around it: (flags, seconds, every warning)."""
    device, messages = options.device, []
    with sanity.recorded(messages):
        sanity.check_mode(model)
        with eval_mode(model), torch.autocast(device.type, enabled=False):
            n = min(options.batch_size, sanity.CHECK_N)
            sanity.check_outputs(model, as_float(x[:n].to(device)))
            flags, seconds = suite_flags(model, x, y, suite, options, ledger=ledger)
            sanity.check_suite(flags, suite)
            if options.checks:
                clean, seed, norm = flags[CLEAN], options.seed, options.norm
                sanity.cheap_checks(model, x, y, clean, eps, seed, device, norm)
    return flags, seconds, messages


def _check_inputs(x: Tensor, y: Tensor) -> None:
    if len(x) != len(y) or y.dim() != 1:
        raise ValueError(f"x has {len(x)} samples but y has shape {tuple(y.shape)}; need (N,)")
    if x.dtype != torch.uint8 and len(x) and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"inputs must be floats in [0, 1] or uint8 (got [{x.min():.3g}, {x.max():.3g}]); "
            "a model that wants mean/std normalization must carry it as its first layer"
        )


def _settings(model, suite, eps: float, n: int, options: EvalOptions) -> dict[str, Any]:
    return {
        "eps": eps,
        "eps_text": format_eps(eps),
        "norm": norm_label(options.norm),  # the suite's, as AutoAttack and RobustBench write it
        "n": n,
        "seed": options.seed,
        "batch_size": options.batch_size,
        "dtype": "float32",
        "device": str(options.device),
        "checks": options.checks,
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
