"""Robust accuracy users can trust: per-sample flags for each attack and their worst case
(RobustBench style: a sample is robust only if every attack in the suite failed on it), with
the settings beside every number and the sanity checks of `d2r.sanity`. `evaluate` takes a
model and images; `evaluate_run` is `d2r eval RUN`: a run's checkpoints, eval.json and eval.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from d2r import attacks as attacks_mod
from d2r.attacks import AutoAttack, EvaluationWarning
from d2r.config import format_eps
from d2r.methods import eval_mode
from d2r.tables import PAPER_COLUMNS, markdown

__all__ = [
    "EvaluationWarning",
    "correct_flags",
    "evaluate",
    "evaluate_run",
    "evaluate_weights",
    "markdown_table",
    "suite_flags",
]

Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


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
        xb = as_float(x[start : start + batch_size].to(device))
        yb = y[start : start + batch_size].to(device)
        if attack is not None:
            xb = attack(model, xb, yb)
        with torch.no_grad():
            flags.append((model(xb).argmax(1) == yb).cpu())
        if bar is not None:
            bar.update(1)
    return torch.cat(flags) if flags else torch.zeros(0, dtype=torch.bool)


def as_float(x: Tensor) -> Tensor:
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
            with seeded(seed, device):
                flags[name] = correct_flags(
                    model, x, y, attack, batch_size=batch_size, device=device, bar=bar
                )
            seconds[name] = time.perf_counter() - start
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
) -> dict[str, Any]:
    """Clean, per-attack and worst-case accuracy (fractions in [0, 1]) of `model` on (x, y), in
    eval mode and fp32, for any nn.Module taking [0, 1] inputs (x float in [0, 1] or uint8).

    Returns {"clean", <each attack>, "worst_case", "settings", "seconds", "warnings"}; every
    warning is also raised as an `EvaluationWarning`. `checks=True` adds the cheap sanity
    checks on up to 64 samples (large eps, more steps, smaller step, zero gradient)."""
    from d2r import sanity  # it builds on this module's helpers

    _check_inputs(x, y)
    suite = build_suite(attacks, eps, seed)
    device = torch.device(device) if device is not None else _device_of(model)
    messages: list[str] = []
    with sanity.recorded(messages):
        sanity.check_mode(model)
        with eval_mode(model), torch.autocast(device.type, enabled=False):
            sanity.check_outputs(model, as_float(x[: min(batch_size, sanity.CHECK_N)].to(device)))
            options = {"seed": seed, "batch_size": batch_size, "device": device}
            flags, seconds = suite_flags(model, x, y, suite, **options, progress=progress)
            sanity.check_suite(flags, suite)
            if checks:
                sanity.cheap_checks(model, x, y, flags["clean"], eps, seed, device)
    result: dict[str, Any] = {name: f.float().mean().item() for name, f in flags.items()}
    result["worst_case"] = worst_case(flags).float().mean().item()
    settings = _settings(model, suite, eps, len(y), seed, batch_size, device, checks)
    return {**result, "settings": settings, "seconds": seconds, "warnings": messages}


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


# eval.md ------------------------------------------------------------------------------------


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per checkpoint (or model): the paper's columns (— where not run), any other
    attack, the worst case, and n / eps / seed beside the numbers; settings and warnings below."""
    run = [k for r in results.values() for k in r["settings"]["attacks"]]
    extra = [k for k in run if k not in PAPER_COLUMNS]
    names = [*PAPER_COLUMNS, *dict.fromkeys(extra), "worst_case"]
    labels = [PAPER_COLUMNS.get(k) or attacks_mod.label(k) for k in names[:-1]]
    head = ["checkpoint", "n", "eps (Linf)", "seed", *labels, "Worst case"]
    rows = []
    for row, r in results.items():
        s = r["settings"]
        cells = [f"{100 * r[k]:.2f}" if k in r else "—" for k in names]
        rows.append([row, str(s["n"]), s["eps_text"], str(s["seed"]), *cells])
    lines = markdown(head, rows)
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


# Run directories and weights files: what `d2r eval` calls ----------------------------------


def evaluate_run(
    run_dir: str | Path,
    attacks: Sequence[str] = ("pgd20", "cw20"),
    eps: float = 8 / 255,
    *,
    checkpoint: str | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`d2r eval RUN`: the run's target at each checkpoint ("last", "best", "ema" (the EMA
    weights of last.safetensors), "both" for last and best; default: every one the run holds),
    on its data set's test split; writes eval.json and eval.md to `out` (default: the run
    directory) and returns eval.json's content. `options`: n, seed, batch_size, device,
    checks, progress (see `evaluate_models`)."""
    from d2r.checkpoint import load_run, run_checkpoints

    build_suite(attacks, eps, options.get("seed", 0))  # bad names or eps fail before loading
    run_dir = Path(run_dir)
    keys = {None: run_checkpoints(run_dir), "both": ["last", "best"]}.get(checkpoint)
    models = {}
    for key in keys or [checkpoint]:
        cfg, method = load_run(run_dir, key)
        models[key] = (method.target, *_describe_checkpoint(run_dir, key))
    data_spec = (cfg.data.name, cfg.data.root, cfg.data.verify)
    return evaluate_models(models, data_spec, attacks, eps, Path(out or run_dir), **options)


def _describe_checkpoint(run_dir: Path, key: str) -> tuple[str, dict[str, Any]]:
    """A checkpoint's row label and what identifies it: its file's sha256 and which weights of
    it were evaluated (the target's, or its EMA)."""
    from d2r.checkpoint import checkpoint_path, target_weights

    path = checkpoint_path(run_dir, key)
    sidecar = _sidecar(path.with_suffix(".json"))
    epoch, weights = sidecar.get("epoch"), target_weights(sidecar, key)
    parts = [] if epoch is None else [f"epoch {epoch}"]
    if weights == "ema" and key != "ema":
        parts.append("EMA")  # best of a run with an EMA: the weights its check picked
    label = f"{key} ({', '.join(parts)})" if parts else key
    extra = {"checkpoint": key, "epoch": epoch, "sha256": file_sha256(path), "weights": weights}
    return label, extra


def evaluate_weights(
    model_name: str,
    weights: str | Path,
    attacks: Sequence[str] = ("pgd20", "cw20"),
    eps: float = 8 / 255,
    *,
    data: str = "cifar10",
    root: str | Path = "data",
    num_classes: int | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`d2r eval --model ARCH --weights FILE`: a registered architecture with a foreign state
    dict (loaded strictly after key mapping) on `data`'s test split; writes eval.json and
    eval.md to `out` (default: WEIGHTS_STEM-eval/ beside the file)."""
    from d2r import data as data_mod
    from d2r.models import MODELS
    from d2r.weights import load_foreign

    build_suite(attacks, eps, options.get("seed", 0))
    info = data_mod.info(data)
    model = MODELS.create(
        model_name, num_classes=num_classes or info.num_classes, in_channels=info.channels
    )
    load_foreign(model, weights)
    weights = Path(weights)
    extra = {"checkpoint": str(weights), "model": model_name, "sha256": file_sha256(weights)}
    out = Path(out) if out else weights_eval_dir(weights)
    # a freshly built model is in train mode; evaluate() would warn about it
    models = {weights.name: (model.eval(), weights.name, extra)}
    return evaluate_models(models, (data, root, True), attacks, eps, out, **options)


def evaluate_models(
    models: Mapping[str, tuple[nn.Module, str, dict[str, Any]]],
    data_spec: tuple[str, str | Path, bool],
    attacks: Sequence[str],
    eps: float,
    out: Path,
    *,
    n: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "auto",
    checks: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate each model ({key: (model, its row label, what identifies it, with its file's
    sha256)}) on the first `n` test images of `data_spec` (name, root, verify); a file whose
    sha256 was already evaluated (best is often last) reuses its numbers. Writes eval.json
    (by key) and eval.md (by label)."""
    from d2r.trainer import pick_device

    name, root, verify = data_spec
    x, y = _test_images(name, root, verify, n)
    device = pick_device(device)
    results: dict[str, dict[str, Any]] = {}
    for key, (model, label, extra) in models.items():
        identity = (extra["sha256"], extra.get("weights"))
        same = [r for r in results.values() if (r["sha256"], r.get("weights")) == identity]
        if same:  # the same bytes (and the same weights of them), the same numbers
            results[key] = {**same[0], **extra, "label": label}
            continue
        print(f"evaluating {label} on {name} ({len(y)} test images, {device})", file=sys.stderr)
        result = evaluate(
            model.to(device), x, y, attacks, eps, seed, batch_size, device,
            checks=checks, progress=progress,
        )  # fmt: skip
        record = {"label": label, "data": name, "split": "test", "argv": sys.argv[1:]}
        results[key] = {**extra, **record, **result}
    return write_results(results, out)


def write_results(results: Mapping[str, dict[str, Any]], out: Path) -> dict[str, Any]:
    """eval.json (one entry per checkpoint, then every warning) and eval.md, atomically."""
    from d2r.checkpoint import atomic_write_text

    warned = [f"{key}: {w}" for key, r in results.items() for w in r["warnings"]]
    report = {**results, "warnings": warned}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "eval.json", json.dumps(report, indent=2))
    atomic_write_text(out / "eval.md", markdown_table({r["label"]: r for r in results.values()}))
    return report


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


def _test_images(name: str, root: str | Path, verify: bool, n: int | None):
    from d2r import data

    x, y = data.load(name, root, "test", verify=verify)
    return (x[:n], y[:n]) if n else (x, y)
