"""What a config or a study costs before the first GPU hour: the FLOPs of one whole training
step per image (the method's forward with its attack, the backward, the optimizer step;
`trainer.train_step` itself, counted by `d2r.flops` on the meta device at batch COUNT_BATCH and
scaled linearly to the config's batch), of the per-epoch checks, and of a study's evaluation
suite (PGD/CW exactly; AutoAttack as the upper bound its iteration counts give); then the time
they take at a GPU's dense bf16 peak, and at a measured model-FLOP utilization where one exists.
No data set is read: only its split sizes.

`count` the FLOPs of a run, `gpus` the peaks and MFU, `text` the table; here a config's or a
study's plan and `d2r plan`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from d2r.config import apply_overrides, from_dict, load_yaml, resolve, to_dict
from d2r.plan import count
from d2r.plan.count import (
    attack_count,
    epoch_flops,
    forward_count,
    gradient_count,
    run_plan,
    step_count,
)
from d2r.plan.gpus import MEASURED_MFU, NO_MFU, PEAK_FLOPS, gpu_key, measured_mfu, peak_for_gpu
from d2r.plan.text import text
from d2r.sweep.spec import cells

__all__ = [
    "MEASURED_MFU",
    "PEAK_FLOPS",
    "attack_count",
    "epoch_flops",
    "forward_count",
    "gpu_key",
    "gradient_count",
    "is_study",
    "peak_for_gpu",
    "plan",
    "step_count",
    "study_total",
    "text",
]


# A config or a study ----------------------------------------------------------------------------
def plan(
    path: str | Path,
    device: str = "h100",
    overrides: list[str] | None = None,
    gpu_check: str | Path | None = None,
) -> dict[str, Any]:
    """The plan of a config (YAML) or a study (a sweep spec: one entry per cell, and their
    total), with `overrides` (`--set KEY=VALUE`) on each config; `gpu_check`: a results.json of
    benchmarks/gpu_check.py whose epoch MFU gives the expected hours on its GPU."""
    if device not in PEAK_FLOPS:
        raise ValueError(f"--device {device!r}: choose one of {', '.join(PEAK_FLOPS)}")
    mfu = measured_mfu(device, gpu_check)
    head = {
        "device": device,
        "peak_flops": PEAK_FLOPS[device][0],
        "peak_source": PEAK_FLOPS[device][1],
        "count": f"torch's per-op FLOP formulas at batch {count.COUNT_BATCH} on the meta device, "
        "scaled linearly to each config's batch",
        "mfu": mfu and {"value": mfu[0], "source": mfu[1]},
        "mfu_missing": None if mfu else NO_MFU.format(device=device),
    }
    if not is_study(path):
        return {
            "config": str(path),
            **head,
            **run_plan(resolve(path, overrides), None, device, mfu),
        }
    plans, seen = [], {}
    for cell in cells(path):
        cfg = from_dict(apply_overrides(to_dict(cell.config), overrides or []))
        key = json.dumps([{**to_dict(cfg), "seed": 0}, cell.eval], sort_keys=True, default=str)
        if key not in seen:  # a seed changes no FLOP: its cells are counted once
            seen[key] = run_plan(cfg, cell.eval, device, mfu)
        plans.append({"name": cell.name, **seen[key]})
    return {"study": str(path), **head, "cells": plans, "total": study_total(plans)}


def is_study(path: str | Path) -> bool:
    """A sweep spec has a grid, parts or a base; a config has none of them."""
    return any(key in load_yaml(path) for key in ("grid", "parts", "base"))


def study_total(plans: list[dict[str, Any]]) -> dict[str, Any]:
    """The sums over the study's cells (every seed a run of its own)."""
    keys = ["train_flops_total", "check_flops_total", "flops_total", "limit_hours_total"]
    total: dict[str, Any] = {"runs": len(plans), **{k: sum(p[k] for p in plans) for k in keys}}
    total["eval_flops_total"] = sum(p["eval"]["flops_total"] for p in plans if p["eval"])
    expected = [p["expected_hours_total"] for p in plans]
    total["expected_hours_total"] = sum(expected) if None not in expected else None
    return total


# Command line -----------------------------------------------------------------------------------
def add_command(sub: Any) -> None:
    """`d2r plan CONFIG_OR_STUDY [--device D] [--set KEY=VALUE ...] [--format text|json]`."""
    p = sub.add_parser(
        "plan",
        help="FLOPs of a config or a study and its time at a GPU's peak, before running it",
        description="Count the FLOPs of a config's training step (attack, backward, optimizer "
        "step), its per-epoch checks and a study's evaluation on the CPU's meta device (no data "
        "is read), and give the hours they take at the GPU's dense bf16 peak and, where one has "
        "been measured, at its model-FLOP utilization.",
    )
    p.add_argument("path", metavar="CONFIG_OR_STUDY")
    p.add_argument("--device", default="h100", help=f"one of {', '.join(PEAK_FLOPS)}")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (of every cell of a study)",
    )
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument(
        "--gpu-check",
        metavar="RESULTS.json",
        help="benchmarks/gpu_check.py's results: its epoch MFU gives expected h",
    )
    p.set_defaults(func=_command)


def _command(args: Any) -> int:
    result = plan(args.path, args.device, args.set, args.gpu_check)
    print(json.dumps(result, indent=2) if args.format == "json" else text(result), end="")
    return 0
