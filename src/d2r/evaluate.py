"""Robust accuracy users can trust: per-sample flags for each attack and their worst case
(RobustBench style: a sample is robust only if every attack in the suite failed on it), with
the settings beside every number and the sanity checks of `d2r.sanity`. `evaluate` takes a
model and images (no files); `evaluate_run` is `d2r eval RUN`: a run's checkpoints, each result
kept in the run's eval.json store (d2r.evalstore), resumable batch by batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from d2r import attacks as attacks_mod
from d2r.attacks import AutoAttack, EvaluationWarning, norm_label
from d2r.config import format_eps, parse_number
from d2r.evalstore import (
    CLEAN,
    TARGET,
    Ledger,
    Store,
    StoreLedger,
    commit,
    images_id,
    result_key,
)
from d2r.files import check_writable, describe, new_temp_dir
from d2r.guard import Preempted, SignalGuard
from d2r.methods import eval_mode
from d2r.tables import PAPER_COLUMNS, markdown

__all__ = [
    "EvaluationStopped",
    "EvaluationWarning",
    "ResultsNotWritten",
    "attack_plan",
    "batch_flags",
    "correct_flags",
    "evaluate",
    "evaluate_models",
    "evaluate_run",
    "evaluate_weights",
    "markdown_table",
    "suite_flags",
]

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


DEFAULT_NORM = "Linf"  # the norm of an attack that does not name its own


def attack_norm(attack: Attack) -> str:
    """The threat model's norm as results record it ("Linf", "L2"): what the attack states; a
    plain callable states nothing and counts as L-inf."""
    return norm_label(getattr(attack, "norm", "linf"))


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch `index` of an attack: a resumed evaluation draws the random starts a
    straight one draws, whichever batch it starts from."""
    digest = hashlib.sha256(f"d2r-eval|{seed}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def batch_flags(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    seed: int | None = None,
    first: int = 0,
) -> Iterator[Tensor]:
    """(B,) bool on the CPU per batch from batch `first` on: is each sample classified correctly
    (after `attack`, if given)? With `seed`, batch i is seeded from (seed, i) (`batch_seed`);
    without, it draws from the caller's RNG."""
    device = torch.device(device) if device is not None else _device_of(model)
    for index in range(first, -(-len(x) // batch_size)):
        start = index * batch_size
        xb = as_float(x[start : start + batch_size].to(device))
        yb = y[start : start + batch_size].to(device)
        if attack is not None:
            with seeded(batch_seed(seed, index), device) if seed is not None else nullcontext():
                xb = attack(model, xb, yb)
        with torch.no_grad():
            yield (model(xb).argmax(1) == yb).cpu()


def correct_flags(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    attack: Attack | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> Tensor:
    """(N,) bool on the CPU: is sample i classified correctly (after `attack`, if given)?
    Random starts come from the caller's RNG."""
    flags = list(batch_flags(model, x, y, attack, batch_size=batch_size, device=device))
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def as_float(x: Tensor) -> Tensor:
    # data sets are held as uint8; models take fp32 in [0, 1] (no bf16 in evaluation)
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.zeros(0)).device


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
    ledger: Ledger | None = None,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Per-sample correct flags for "clean" and each attack, and the seconds each took. Batch i
    of every attack is seeded from (seed, i), so a rerun, an attack alone, or an evaluation
    resumed from `ledger` (d2r.evalstore: stored results and partial state; the default keeps
    nothing) gives the same flags; a different batch_size draws other random starts."""
    device = torch.device(device) if device is not None else _device_of(model)
    ledger = ledger or Ledger()
    options = {"seed": seed, "batch_size": batch_size, "device": device}
    total = -(-len(x) // batch_size) * (1 + len(suite))
    flags, seconds = {}, {}
    with tqdm(total=total, desc="eval", unit="batch", disable=not progress) as bar:
        for name, attack in {CLEAN: None, **suite}.items():
            bar.set_postfix_str(name)
            flags[name], seconds[name] = _attack_flags(
                model, x, y, name, attack, ledger, bar, options
            )
    return flags, seconds


def _attack_flags(model, x, y, name, attack, ledger: Ledger, bar: tqdm, options) -> tuple:
    """One attack's flags, batch by batch from where `ledger` left it, each batch saved."""
    batches = -(-len(x) // options["batch_size"])
    cached = ledger.cached(name)
    if cached is not None:
        bar.update(batches)
        return cached
    done, before = ledger.resume(name)  # whole batches only
    first = -(-len(done) // options["batch_size"])
    bar.update(first)
    parts, start, seconds = [done], time.perf_counter(), before
    for index, flags in enumerate(batch_flags(model, x, y, attack, first=first, **options)):
        parts.append(flags)
        bar.update(1)
        seconds = before + time.perf_counter() - start
        ledger.save(name, torch.cat(parts), seconds, first + index + 1)
    flags = torch.cat(parts)
    ledger.finish(name, flags, seconds)
    return flags, seconds


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
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
    _check_inputs(x, y)
    suite = build_suite(attacks, eps, seed, norm)
    norm = suite_norm(suite, norm)
    device = torch.device(device) if device is not None else _device_of(model)
    options = {"seed": seed, "batch_size": batch_size, "device": device, "norm": norm}
    messages: list[str] = []
    run = {"checks": checks, "progress": progress, "ledger": ledger}
    flags, seconds = _checked_flags(model, x, y, suite, eps, options, messages, **run)
    result: dict[str, Any] = {name: f.float().mean().item() for name, f in flags.items()}
    result["worst_case"] = worst_case(flags).float().mean().item()
    result["worst_case_over"] = list(flags)
    settings = _settings(model, suite, (eps, norm), len(y), seed, batch_size, device, checks)
    return {**result, "settings": settings, "seconds": seconds, "warnings": messages}


def _checked_flags(model, x, y, suite, eps, options, messages, *, checks, progress, ledger):
    """suite_flags with the sanity checks around it, every warning recorded in `messages`."""
    from d2r import sanity  # it builds on this module's helpers

    device = options["device"]
    with sanity.recorded(messages):
        sanity.check_mode(model)
        with eval_mode(model), torch.autocast(device.type, enabled=False):
            n = min(options["batch_size"], sanity.CHECK_N)
            sanity.check_outputs(model, as_float(x[:n].to(device)))
            sizes = {k: v for k, v in options.items() if k != "norm"}
            flags, seconds = suite_flags(
                model, x, y, suite, **sizes, progress=progress, ledger=ledger
            )
            sanity.check_suite(flags, suite)
            if checks:
                seed, norm = options["seed"], options["norm"]
                sanity.cheap_checks(model, x, y, flags[CLEAN], eps, seed, device, norm)
    return flags, seconds


def _check_inputs(x: Tensor, y: Tensor) -> None:
    if len(x) != len(y) or y.dim() != 1:
        raise ValueError(f"x has {len(x)} samples but y has shape {tuple(y.shape)}; need (N,)")
    if x.dtype != torch.uint8 and len(x) and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"inputs must be floats in [0, 1] or uint8 (got [{x.min():.3g}, {x.max():.3g}]); "
            "a model that wants mean/std normalization must carry it as its first layer"
        )


def _settings(model, suite, budget, n, seed, batch_size, device, checks) -> dict[str, Any]:
    eps, norm = budget
    return {
        "eps": eps,
        "eps_text": format_eps(eps),
        "norm": norm_label(norm),  # the suite's, as AutoAttack and RobustBench write it
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


# eval.md ------------------------------------------------------------------------------------


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per checkpoint (or model) at one eps and norm: the paper's columns (— where not
    run), any other attack, the worst case and which results it covers, n / eps / seed beside
    the numbers; every attack's settings and every warning below."""
    run = [k for r in results.values() for k in r["settings"]["attacks"]]
    extra = [k for k in run if k not in PAPER_COLUMNS]
    names = [*PAPER_COLUMNS, *dict.fromkeys(extra), "worst_case"]
    labels = [PAPER_COLUMNS.get(k) or attacks_mod.label(k) for k in names[:-1]]
    norms = "/".join(dict.fromkeys(str(r["settings"]["norm"]) for r in results.values()))
    head = ["checkpoint", "n", f"eps ({norms})", "seed", *labels, "Worst case", "worst case over"]
    rows = []
    for row, r in results.items():
        s = r["settings"]
        cells = [f"{100 * r[k]:.2f}" if k in r else "—" for k in names]
        over = ", ".join(PAPER_COLUMNS.get(k) or attacks_mod.label(k) for k in r["worst_case_over"])
        rows.append([row, str(s["n"]), s["eps_text"], str(s["seed"]), *cells, over])
    lines = markdown(head, rows)
    lines += [
        "",
        "Accuracies in %; worst case = robust against every result it covers (per sample).",
    ]
    described = [
        f"- {attacks_mod.label(k)}: {_describe(a)}"
        for r in results.values()
        for k, a in r["settings"]["attacks"].items()
    ]
    lines += ["", *dict.fromkeys(described)]
    warned = [f"- **warning** ({row}): {w}" for row, r in results.items() for w in r["warnings"]]
    return "\n".join(lines + (["", *warned] if warned else [])) + "\n"


def _describe(settings: Mapping[str, Any]) -> str:
    skip = {"type"}
    body = ", ".join(f"{k}={_fmt(v)}" for k, v in settings.items() if k not in skip)
    return f"{settings.get('type', '')}({body})"


def _fmt(value: Any) -> str:
    return format_eps(value) if isinstance(value, float) else str(value)


# Run directories and weights files: what `d2r eval` calls ----------------------------------


def attack_plan(
    attacks: Sequence[str] | str, eps: float | Sequence[float], norm: str | None = None
) -> dict[float, list[str]]:
    """Which attacks run at which eps: a plain name ('pgd20') at every eps of `eps`, a name
    with its own eps ('aa@0.031') only at that one: `pgd20,cw20,aa@0.031` with eps 8/255 is
    the reference protocol. Without attacks, clean accuracy only. Bad names fail here."""
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    radii = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if not radii:
        raise ValueError("no eps given; give one or more, e.g. --eps 8/255,0.031")
    plan: dict[float, list[str]] = {}
    for item in attacks:
        name, at, text = item.partition("@")
        for e in [_own_eps(item, text)] if at else radii:
            plan.setdefault(e, [])
            plan[e] += [] if name in plan[e] else [name]
    plan = plan or {e: [] for e in radii}
    for e, names in plan.items():
        build_suite(names, e, norm=norm)  # unknown names, a bad eps or norm, no AutoAttack: now
    return plan


def _own_eps(item: str, text: str) -> float:
    try:
        return parse_number(text)
    except ValueError:
        raise ValueError(f"attack {item!r}: write NAME@EPS, e.g. aa@0.031 or pgd20@8/255") from None


def evaluate_run(
    run_dir: str | Path,
    attacks: Sequence[str] = ("pgd20", "cw20"),
    eps: float | Sequence[float] = 8 / 255,
    *,
    checkpoint: str | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`d2r eval RUN`: the run's target at each checkpoint ("last", "best", "ema" (the EMA
    weights of last.safetensors), "both" for last and best; default: every one the run holds),
    on its data set's test split, with `attacks` at each eps (see `attack_plan`). Results go
    into the store in `out` (default: the run directory; see `evaluate_models`); returns
    eval.json's content. `options`: n, seed, batch_size, device, norm, checks, progress, force."""
    from d2r.checkpoint import load_run, run_checkpoints

    attack_plan(attacks, eps, options.get("norm"))  # bad names or eps fail before loading
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    out = check_writable(out or run_dir, "eval output directory (--out)")  # not after hours
    keys = {None: run_checkpoints(run_dir), "both": ["last", "best"]}.get(checkpoint)
    models = {}
    for key in keys or [checkpoint]:
        cfg, method = load_run(run_dir, key)
        models[key] = (method.target, *_describe_checkpoint(run_dir, key))
    data_spec = (cfg.data.name, cfg.data.root, cfg.data.verify, cfg.data.like)
    return evaluate_models(models, data_spec, attacks, eps, out, fallback=run_dir, **options)


def _describe_checkpoint(run_dir: Path, key: str) -> tuple[str, dict[str, Any]]:
    """A checkpoint's row label and what identifies it: its file's sha256 and which weights of
    it were evaluated (the target's, or its EMA)."""
    from d2r.checkpoint import checkpoint_path, stored_sha256, target_weights

    path = checkpoint_path(run_dir, key)
    sidecar = _sidecar(path.with_suffix(".json"))
    epoch, weights = sidecar.get("epoch"), target_weights(sidecar, key)
    parts = [] if epoch is None else [f"epoch {epoch}"]
    if weights == "ema" and key != "ema":
        parts.append("EMA")  # best of a run with an EMA: the weights its check picked
    label = f"{key} ({', '.join(parts)})" if parts else key
    # the content sha256 load_run just verified, read from the header (no rehashing)
    extra = {"checkpoint": key, "epoch": epoch, "sha256": stored_sha256(path), "weights": weights}
    return label, extra


def evaluate_weights(
    model_name: str,
    weights: str | Path,
    attacks: Sequence[str] = ("pgd20", "cw20"),
    eps: float | Sequence[float] = 8 / 255,
    *,
    data: str = "cifar10",
    root: str | Path = "data",
    num_classes: int | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`d2r eval --model ARCH --weights FILE`: a registered architecture with a foreign state
    dict (loaded strictly after key mapping) on `data`'s test split; results go into the store
    in `out` (default: WEIGHTS_STEM-eval/ beside the file), keyed by the file's sha256."""
    from d2r import data as data_mod
    from d2r.models import MODELS
    from d2r.weights import load_foreign

    attack_plan(attacks, eps, options.get("norm"))
    out = check_writable(out or weights_eval_dir(weights), "eval output directory (--out)")
    info = data_mod.info(data)
    model = MODELS.create(
        model_name, num_classes=num_classes or info.num_classes, in_channels=info.channels
    )
    load_foreign(model, weights)
    weights = Path(weights)
    extra = {"checkpoint": weights.name, "model": model_name, "sha256": file_sha256(weights)}
    # a freshly built model is in train mode; evaluate() would warn about it
    models = {weights.name: (model.eval(), weights.name, extra)}
    options = {"fallback": weights_eval_dir(weights), **options}
    return evaluate_models(models, (data, root, True, None), attacks, eps, out, **options)


class EvaluationStopped(Preempted):
    """SIGINT/SIGTERM during `d2r eval`: the batch finished and every finished batch is saved;
    the same command continues it. The CLI exits with 128 + the signal (130 / 143)."""

    def __init__(self, signum: int, message: str) -> None:
        Exception.__init__(self, message)
        self.signum = signum


def evaluate_models(
    models: Mapping[str, tuple[nn.Module, str, dict[str, Any]]],
    data_spec: tuple[str, str | Path, bool, str | None],
    attacks: Sequence[str],
    eps: float | Sequence[float],
    out: Path,
    *,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "auto",
    norm: str | None = None,
    checks: bool = True,
    progress: bool = False,
    force: bool = False,
    fallback: Path | None = None,
) -> dict[str, Any]:
    """Each model ({key: (model, row label, identity incl. "sha256")}) on the first `n` test
    images of `data_spec` (name, root, verify, like), `attacks` at each eps (`attack_plan`);
    each result goes into the store in `out` as its attack finishes (stored keys reused unless
    `force`; a stopped run resumes; SIGINT/SIGTERM: EvaluationStopped after the batch). A
    result `out` refuses goes to `fallback` or a temp dir (ResultsNotWritten)."""
    from d2r.trainer import pick_device

    plan = attack_plan(attacks, eps, norm)
    x, y = _test_images(*data_spec, n)
    device = pick_device(device)
    meta = {"batch_size": batch_size, "device": str(device), "dtype": "float32", "checks": checks}
    guard = SignalGuard(action="finishing the batch and saving the evaluation's progress")
    images = images_id(data_spec[0], x, y)
    jobs = _jobs(models, plan, out, images, (seed, norm), meta, guard, force)  # partials checked
    commit(out, checkpoints=(checkpoints := [{**e, "label": lb} for _, lb, e in models.values()]))
    options = {"seed": seed, "batch_size": batch_size, "device": device, "norm": norm}
    with guard:
        try:
            for job in jobs:
                _run_job(job, x, y, data_spec[0], options, checks=checks, progress=progress)
        except OSError as err:  # a result the store refused is kept elsewhere, never dropped
            raise save_elsewhere(Store(checkpoints), jobs, out, err, fallback) from None
    return commit(out).content()


class ResultsNotWritten(OSError):
    """Results could not be written to `out` (a disk filled, a mount went away); `place` is
    where they were written instead (None: nowhere), `store` those results. The CLI prints
    their table before the error line."""

    def __init__(self, out: Path, err: OSError, place: Path | None, store: Store) -> None:
        self.out, self.place, self.store = out, place, store
        saved = f"written to {place} instead" if place else "not written anywhere else"
        super().__init__(
            f"could not write results to {str(out)!r} ({describe(err)}); the results computed "
            f"are {saved} and printed above; rerun once {str(out)!r} is writable to go on"
        )


def save_elsewhere(
    unsaved: Store, jobs: list[tuple], out: Path, err: OSError, fallback: Path | None
) -> OSError:
    """The results the jobs' ledgers could not write (none: `err` itself, nothing is lost) into
    the store in `fallback` (the run directory; beside the weights) or a new temp directory:
    results that took hours are never dropped. Returns the error to raise."""
    unsaved.results = [entry for *_, ledger in jobs for entry in ledger.unsaved]
    if not unsaved.results:
        return err
    for place in [fallback, None]:
        if place is not None and Path(place).resolve() == Path(out).resolve():
            continue
        try:
            place = Path(place) if place is not None else new_temp_dir("d2r-eval-")
            commit(place, unsaved.checkpoints, unsaved.results)
        except (OSError, ValueError):  # unwritable, or a foreign eval.json there
            continue
        return ResultsNotWritten(out, err, place, unsaved)
    return ResultsNotWritten(out, err, None, unsaved)


def _run_job(job: tuple, x: Tensor, y: Tensor, data: str, options: dict, **flags: bool) -> None:
    """One model at one eps: nothing when the store holds every key, else `evaluate` through
    the job's ledger, then the evaluation's warnings onto its results."""
    model, label, eps, suite, ledger = job
    where = f"{label} at eps {format_eps(eps)} on {data} ({len(y)} test images"
    if all(ledger.cached(name) is not None for name in [CLEAN, *suite]):
        print(f"{where}): already in {ledger.out / 'eval.json'} (--force reruns)", file=sys.stderr)
        return
    print(f"evaluating {where}, {options['device']})", file=sys.stderr)
    model = model.to(options["device"])
    result = evaluate(model, x, y, suite, eps, **options, **flags, ledger=ledger)
    ledger.add_warnings(result["warnings"])


def _jobs(models, plan, out, images, seeding, meta, guard, force) -> list[tuple]:
    """(model, label, eps, suite, ledger) for each model and eps of the plan; building each
    ledger checks its partial state, so a refusal comes before any work."""
    redone: set[str] = set()  # with `force`: the keys computed again in this call
    seed, norm = seeding
    jobs = []
    for model, label, extra in models.values():
        for e, names in plan.items():
            suite = build_suite(names, e, seed, norm)
            weights = extra.get("weights", TARGET)
            keys = suite_keys(extra["sha256"], suite, model, images, seed, weights)
            stop = _stopper(guard, label, e, out)
            ledger = StoreLedger(out, keys, meta, force=force, redone=redone, stop=stop)
            jobs.append((model, label, e, suite, ledger))
    return jobs


def suite_keys(
    sha256: str,
    suite: Mapping[str, Attack],
    model: nn.Module,
    images: Mapping[str, Any],
    seed: int,
    weights: str = TARGET,
) -> dict[str, dict[str, Any]]:
    """The store key of clean accuracy and of each attack of `suite` (d2r.evalstore), for the
    `weights` ("target" or "ema") of the file with content `sha256`."""
    keys = {CLEAN: result_key(sha256, CLEAN, {}, None, None, images, seed, weights)}
    for name, attack in suite.items():
        settings = attack_settings(attack, model)
        norm = attack_norm(attack)
        keys[name] = result_key(sha256, name, settings, attack.eps, norm, images, seed, weights)
    return keys


def _stopper(
    guard: SignalGuard, label: str, eps: float, out: Path
) -> Callable[[str, int | None], None]:
    """After each saved batch (batches=None: after a stored result): stop if a signal came."""

    def stop(name: str, batches: int | None) -> None:
        if guard.signum is None:
            return
        where = f"{name} finished" if batches is None else f"batch {batches} of {name}"
        raise EvaluationStopped(
            guard.signum,
            f"stopped by {signal.Signals(guard.signum).name} after {where} at eps "
            f"{format_eps(eps)} on {label}; every finished batch is saved in {out} (results "
            "in eval.json, progress in eval-partial-*.json); run the same d2r eval command "
            "again to continue from there",
        )

    return stop


def weights_eval_dir(weights: str | Path) -> Path:
    """Where eval.json goes for a weights file by default: WEIGHTS_STEM-eval/ beside it."""
    return Path(weights).parent / f"{Path(weights).stem}-eval"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _sidecar(path: Path) -> dict[str, Any]:
    """A checkpoint's metadata from its JSON copy ({} when unreadable)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _test_images(name: str, root: str | Path, verify: bool, like: str | None, n: int | None):
    from d2r import data

    x, y = data.load(name, root, "test", verify=verify, like=like)
    return (x[:n], y[:n]) if n else (x, y)
