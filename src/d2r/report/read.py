"""Reading runs: one `RunResult` per run directory, its numbers from eval.json at one eps or
from the last per-epoch check of metrics.jsonl."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from d2r.attacks import label as attack_label
from d2r.attacks import norm_label
from d2r.checkpoint import checkpoint_path, stored_sha256
from d2r.config import Config, format_eps
from d2r.data.sources import DEFAULT_LIKE, SYNTHETIC
from d2r.evalstore import Store, row_entries, summary, unpack_flags
from d2r.experiments import (
    flat_config,
)
from d2r.logs import read_metrics, robust_overfit
from d2r.runs import read_config

WORST = "worst_case"
EVAL_JSON = "eval.json"
EPOCH_CHECK = "per-epoch check"  # the source label of the metrics.jsonl fallback
NO_RESULT = "no result at this eps"
# Keys a table shows in its own columns (Data, Model, Method), so never in a row's label.
_SHOWN = frozenset({"data.name", "data.like", "target.name", "method.name", "guide", "guide.name"})


@dataclass
class RunResult:
    """One run's row before grouping; `metrics` are fractions in [0, 1] by attack name, `config`
    its resolved config flattened to dotted keys (NOT_RECORDED where config.yaml lacks a key)."""

    run_dir: str
    data: str
    model: str
    method: str
    seed: int | str
    eps: float | None
    source: str  # "eval.json", "per-epoch check", "no result at this eps" or "not evaluated"
    detail: str  # which checkpoint / attack / how many test images
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    not_recorded: list[str] = field(default_factory=list)
    norm: str = "Linf"  # eps's norm: eval.json's settings, or the per-epoch check's
    n: int | None = None  # the images its numbers were measured on (None: not recorded)
    # the per-epoch check's best and last robust accuracy (d2r.logs.robust_overfit), or None
    overfit: dict[str, Any] | None = None
    # training and evaluation seconds, the devices used, device-hours (`device_time`)
    device: dict[str, Any] = field(default_factory=dict)


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories among `paths`, each once (`runs/*` and `runs/a` name runs/a twice); a
    directory that is not a run but holds runs (e.g. runs/) stands for all of them."""
    runs = []
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            runs.append(path)
            continue
        inner = sorted(p.parent for p in path.glob("*/config.yaml")) if path.is_dir() else []
        if not inner:
            raise FileNotFoundError(
                f"{str(path)!r} is not a run directory (no config.yaml) and "
                "holds none; pass directories written by `d2r train`"
            )
        runs += inner
    unique: dict[Path, Path] = {}
    for run in runs:
        unique.setdefault(run.resolve(), run)
    return list(unique.values())


def read_run(run_dir: str | Path, checkpoint: str = "last", eps: float | None = None) -> RunResult:
    """The run's identity from config.yaml (resolved; keys it lacks are NOT_RECORDED) and its
    numbers at `eps` (default: its training eps, method.eps) from eval.json (the `checkpoint`
    entry, of the file there now), else the last per-epoch check if it was at that eps."""
    run_dir = Path(run_dir)
    cfg, missing = read_config(run_dir)
    config = flat_config(cfg, missing)
    base = {
        "run_dir": str(run_dir),
        "data": _data_label(cfg),
        "model": cfg.target["name"],
        "method": _method_label(cfg),
        "seed": config["seed"],
        "config": config,
        "not_recorded": missing,
        "overfit": robust_overfit(_epochs(run_dir)),
    }
    wanted = eps if eps is not None else cfg.method.get("eps")
    found = _from_eval_json(run_dir, cfg, checkpoint, wanted) or _from_epoch_check(run_dir, cfg)
    if found["source"] == "not evaluated":
        elsewhere = (run_dir / EVAL_JSON).is_file()  # evaluated, at other eps only
    else:
        elsewhere = eps is not None and not _same(found["eps"], eps)
    if elsewhere:
        found = {"eps": wanted, "source": NO_RESULT, "detail": f"at eps {format_eps(wanted)}"}
    found["device"] = device_time(run_dir, found.pop("eval_seconds", 0.0))
    return RunResult(**base, **found)


def _epochs(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir, "epoch") if (run_dir / "metrics.jsonl").is_file() else []


def device_time(run_dir: Path, eval_seconds: float) -> dict[str, Any]:
    """Training seconds (the epochs' own, from metrics.jsonl) times the processes (one device
    each, env.json's world_size), plus the evaluation's seconds (eval.json's results of the
    reported row, one device), in device-hours; the device's name from env.json."""
    env_path = run_dir / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    train = sum(float(r.get("seconds", 0.0)) for r in _epochs(run_dir))
    devices = int(env.get("world_size", 1))
    name = env.get("device_name") or env.get("device") or "unknown device"
    return {
        "train_seconds": train,
        "eval_seconds": eval_seconds,
        "devices": devices,
        "device_name": name,
        "device_hours": (train * devices + eval_seconds) / 3600,
    }


def _data_label(cfg: Config) -> str:
    """The Data column: the set's name; synthetic data says which real set it imitates."""
    if cfg.data.name == SYNTHETIC:
        return f"{SYNTHETIC} (like {cfg.data.like or DEFAULT_LIKE})"
    return cfg.data.name


def _same(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-9 * max(1.0, abs(b))


def _method_label(cfg: Config) -> str:
    # the guide architecture changes the result, so it is part of the method's name (a resolved
    # config has no guide for a method that trains none)
    name, guide = cfg.method["name"], cfg.guide
    return f"{name} (guide {guide['name']})" if guide else name


def _from_eval_json(
    run_dir: Path, cfg: Config, checkpoint: str, eps: float | None
) -> dict[str, Any] | None:
    """The stored results of `checkpoint` at `eps` and the training norm, with their worst
    case; only those of the checkpoint file there now, when there is one."""
    found = _eval_row(run_dir, cfg, checkpoint, eps)
    if found is None:
        return None
    row, entries = found
    norm = row["norm"]
    metrics = {k: float(row[k]) for k in [*row["worst_case_over"], WORST]}
    over = ", ".join(map(column_label, row["worst_case_over"]))
    detail = f"{checkpoint}, n={row['settings']['n']}, worst case of {over}"
    budget = {"eps": row["eps"], "norm": norm, "n": row["settings"]["n"]}
    seconds = sum(float(e.get("seconds", 0.0)) for e in entries.values())
    found = {"source": EVAL_JSON, "detail": detail, "metrics": metrics, "eval_seconds": seconds}
    return {**budget, **found}


def _eval_row(
    run_dir: Path, cfg: Config, checkpoint: str, eps: float | None
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """eval.json's row of `checkpoint` at `eps` and the training norm (d2r.evalstore.summary)
    and the stored results it is made of; only those of the checkpoint file there now."""
    store = Store.read(run_dir)  # a file it cannot read is an error naming it
    if eps is None or not store.results:
        return None
    norm = norm_label(cfg.method.get("norm", "linf"))  # as results record it: Linf, L2
    sha256 = stored_sha256(checkpoint_path(run_dir, checkpoint))  # ema: last's file
    row = summary(store, checkpoint, eps, norm, sha256)
    return None if row is None else (row, row_entries(store, row))


def run_flags(
    run_dir: str | Path, checkpoint: str, eps: float | None
) -> tuple[str, dict[str, Tensor]] | None:
    """The per-image correct flags behind a run's eval.json numbers at `eps` (default: its
    training eps), by attack with the worst case, and the sha256 of the test images they are
    of; None where the run has no eval.json result there."""
    cfg, _ = read_config(run_dir)
    wanted = eps if eps is not None else cfg.method.get("eps")
    found = _eval_row(Path(run_dir), cfg, checkpoint, wanted)
    if found is None:
        return None
    row, entries = found
    flags = {name: unpack_flags(e["correct"], e["n"]) for name, e in entries.items()}
    worst = None
    for value in flags.values():
        worst = value if worst is None else worst & value
    return row["settings"]["images_sha256"], {**flags, WORST: worst}


def _from_epoch_check(run_dir: Path, cfg: Config) -> dict[str, Any]:
    evaluated = [r for r in read_metrics(run_dir, "epoch") if "clean_acc" in r]
    if not evaluated:
        return {"eps": None, "source": "not evaluated", "detail": "no eval.json, no epoch check"}
    last, attack = evaluated[-1], cfg.eval.attack
    # the images actually evaluated, never eval.subset (it may exceed the test split)
    n = f"n={last['check_n']}" if "check_n" in last else "n not recorded"
    split = last.get("check_split", "test")  # older logs: the check read the test split
    weights = ", EMA weights" if last.get("check_model") == "ema" else ""
    detail = f"{attack} on {split}, epoch {last['epoch']}, {n}{weights}"
    metrics = {"clean": last["clean_acc"], attack: last["robust_acc"]}
    eps = last.get("check_eps", cfg.eval.eps)  # older logs: the config's eval.eps
    budget = {"eps": eps, "norm": last.get("check_norm", "Linf")}  # older logs: Linf only
    budget["n"] = last.get("check_n")
    return {**budget, "source": EPOCH_CHECK, "detail": detail, "metrics": metrics}


def column_label(key: str) -> str:
    """A result key's column head: Clean, an attack's label (PGD-20, AA), Worst case."""
    return {"clean": "Clean", WORST: "Worst case"}.get(key) or attack_label(key)
