"""Grouping runs into rows: one row per experiment (equal resolved configs but for the seed and
NON_RESULT_KEYS), mean and sample std over its seeds."""

from __future__ import annotations

import statistics
from typing import Any

from d2r.config import format_eps
from d2r.experiments import (
    check_group_by,
    check_seeds,
    distinguishing,
    experiment_key,
    label,
    result_keys,
)
from d2r.report.read import _SHOWN, WORST, RunResult
from d2r.stats import t_interval, wilson
from d2r.tables import PAPER_COLUMNS


def columns_of(results: list[RunResult]) -> list[str]:
    """The paper's columns, then any other attack that was run, then the worst case."""
    seen = {k for r in results for k in r.metrics}
    extra = sorted(seen - set(PAPER_COLUMNS) - {WORST})
    return [*PAPER_COLUMNS, *extra, WORST]


def summarize(values: list[float], images: list[int | None] | None = None) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; 0 for one run) of fractions, `n_seeds` and
    `n` (the images each run was measured on: one number, a list where they differ, None
    where not recorded), and `ci95`: Student's t interval over the seeds, or for one run
    Wilson's interval on its n images (None where n is not recorded), both within [0, 1]."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    known = list(dict.fromkeys(images or [None]))
    n = known[0] if len(known) == 1 else known
    if len(values) > 1:  # an accuracy's interval stays in [0, 1]
        low, high = t_interval(values)
        ci = [max(0.0, low), min(1.0, high)]
    else:
        ci = wilson(round(values[0] * n), n) if isinstance(n, int) else None
    return {
        "mean": statistics.fmean(values),
        "std": std,
        "ci95": ci,
        "n_seeds": len(values),
        "n": n,
        "values": values,
    }


def overfitting(runs: list[RunResult]) -> dict[str, Any]:
    """Each run's best and last per-epoch robust accuracy, and their mean gap in points."""
    each = [{"run": r.run_dir, **r.overfit} for r in runs if r.overfit is not None]
    gap = statistics.fmean(e["gap"] for e in each) if each else None
    return {"robust_overfitting": each, "overfit_gap": gap}


def device_hours(runs: list[RunResult]) -> dict[str, Any]:
    """The row's training and evaluation seconds and device-hours, summed over its runs."""
    total = {k: sum(r.device.get(k, 0.0) for r in runs) for k in _SECONDS}
    names = dict.fromkeys(_device_text(r.device) for r in runs if r.device)
    return {**total, "devices": list(names)}


_SECONDS = ("train_seconds", "eval_seconds", "device_hours")


def _device_text(device: dict[str, Any]) -> str:
    count = device.get("devices", 1)
    return f"{count} x {device['device_name']}" if count > 1 else device["device_name"]


def group_key(result: RunResult, by: list[str] | None = None) -> tuple:
    """Runs share a row when their experiment_key, eps, norm and source are equal: an
    eval.json number is never averaged with a per-epoch check, nor across eps or norms."""
    return (result.eps, result.norm, result.source, experiment_key(result.config, by))


def group(results: list[RunResult], by: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per experiment (group_key), in first-seen order, each labelled by what tells it
    apart from the other rows of its method; ValueError if a row would hold a seed twice."""
    if by is not None:
        check_group_by([r.config for r in results], by)
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault(group_key(r, by), []).append(r)
    rows = [_row(runs) for runs in groups.values()]
    _label(rows)
    return rows


def _row(runs: list[RunResult]) -> dict[str, Any]:
    check_seeds([(r.seed, r.run_dir) for r in runs])
    keys = dict.fromkeys(k for r in runs for k in r.metrics)
    first = runs[0].config
    common = {k: v for k, v in first.items() if all(r.config.get(k, ...) == v for r in runs)}
    varies = [k for k in result_keys({k: 0 for r in runs for k in r.config}) if k not in common]
    return {
        "data": _joined(r.data for r in runs),
        "model": _joined(r.model for r in runs),
        "method": _joined(r.method for r in runs),
        "label": "",
        "setting": {},
        "eps": runs[0].eps,
        "norm": runs[0].norm,
        "eps_text": format_eps(runs[0].eps),
        "source": runs[0].source,
        "details": [r.detail for r in runs],
        "seeds": [r.seed for r in runs],
        "runs": [r.run_dir for r in runs],
        "metrics": {k: _summary(runs, k) for k in keys},
        "config": common,  # the keys all its runs agree on
        "varies": varies,  # result keys its runs differ in (only with group_by)
        "not_recorded": {r.run_dir: r.not_recorded for r in runs if r.not_recorded},
        **overfitting(runs),
        "device_hours": device_hours(runs),
    }


def _summary(runs: list[RunResult], key: str) -> dict[str, Any]:
    having = [r for r in runs if key in r.metrics]
    return summarize([r.metrics[key] for r in having], [r.n for r in having])


def _joined(values: Any) -> str:
    return " / ".join(dict.fromkeys(values))


def _label(rows: list[dict[str, Any]]) -> None:
    """Set each row's `setting` and `label`: the result keys whose values differ between the
    rows of the same data, model and method (e.g. "alpha=30, beta=20, attack=cag")."""
    peers: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        peers.setdefault((row["data"], row["model"], row["method"]), []).append(row)
    for same in peers.values():
        settings = distinguishing([row["config"] for row in same], skip=_SHOWN)
        for row, setting in zip(same, settings, strict=True):
            row["setting"], row["label"] = setting, label(setting)
