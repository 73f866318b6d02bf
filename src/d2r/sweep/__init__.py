"""Studies: a grid of runs (configs x seeds, then the evaluation) from one spec, on this machine
(`executor="local"`) or as Slurm jobs (`executor="slurm"`, d2r.sweep.slurm through submitit).

A spec (YAML):

    base: configs/cifar10/d2r_cag.yaml   # optional; the default config otherwise
    set: {train.epochs: 100}              # fixed overrides (`--set` keys)
    grid:                                 # every combination is one run (a cell)
      method.alpha: [0, 30]
      seed: [0, 1, 2]
    eval: {attacks: [pgd20, pgd50, cw20, aa], eps: 8/255}   # after training; optional (no eps:
                                                             # each run's own, as d2r eval RUN)
    slurm: {partition: gpu, time_min: 600, gpus_per_node: 1}

A grid axis is a list of values, or a mapping of names to values (the names label the cells:
`method: {trades: {name: trades, beta: 6}, ...}`); the axis `base` takes config files. `parts:`
(a list of {name, base, set, grid, eval}) makes one study of several grids.

Each cell is one `d2r train` run directory DIR/<cell name>; its state is read from its files
(every result its `eval` asks for in its eval.json store, by key: done; a finished last
checkpoint: trained; any checkpoint: interrupted), so a rerun skips what is done, resumes what
was interrupted (`d2r train --resume`, exact; a stopped evaluation from its partial files), and
runs only the attacks added to `eval` since. Cells run as
`python -m d2r train|eval` processes: Ctrl-C, SIGTERM and resume are the trainer's own.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from d2r.config import dump_yaml
from d2r.files import Lock, atomic_write_text, check_writable
from d2r.report import report
from d2r.sweep import slurm
from d2r.sweep.cell import (
    STOPPED,
    SWEEP_JSON,
    SWEEP_LOCK,
    Cell,
    Stopped,
    cell_state,
    check_unchanged,
    config_path,
    last_error,
    python_command,
    read_status,
    run_cell,
)
from d2r.sweep.local import Local, visible_gpus
from d2r.sweep.spec import _text, cells, check_cell, load_spec


def run(
    spec_path: str | Path,
    out: str | Path,
    *,
    executor: str = "local",
    dry_run: bool = False,
    devices: list[str | None] | None = None,
    progress: bool = True,
    wait: bool = False,
) -> list[Cell]:
    """Run the study `spec_path` into `out` (see the module doc); returns its cells with their
    final states. The whole spec is checked first; `dry_run` stops there (the CLI prints the
    cells). `progress`: a line as each cell starts and ends (failures are always said). A
    second sweep on `out` is refused naming the first, or with `wait` waits for it to end.
    Raises Stopped on Ctrl-C/SIGTERM (rerun to continue)."""
    if executor not in ("local", "slurm"):
        raise ValueError(f"--executor {executor!r}: choose local or slurm")
    out, spec = Path(out), load_spec(spec_path)
    todo = cells(spec_path)
    _read_states(out, todo)
    slurm.options(spec.get("slurm") or {})  # checked whatever the executor: the spec is one
    if dry_run:
        return todo
    check_writable(out, "study directory (--out)").mkdir(parents=True, exist_ok=True)
    with own_study(out, wait):
        _read_states(out, todo)  # again: a sweep waited for may have changed them
        _execute(spec, spec_path, out, executor, todo, devices, progress)
    return todo


def _read_states(out: Path, todo: list[Cell]) -> None:
    for cell in todo:
        check_unchanged(out / cell.name, cell)
        cell.state = cell_state(out / cell.name, cell)


def own_study(out: Path, wait: bool = False) -> Lock:
    """The study directory's lock (DIR/.sweep.lock), held for a sweep's life: a second
    `d2r sweep` on one --out would train every cell a second time. Refused naming the sweep
    that holds it, or (`wait`) waited for."""

    def waiting(holder: str) -> None:
        print(f"d2r sweep: waiting for {holder}, which runs the study in {out}", file=sys.stderr)

    return Lock(
        out / SWEEP_LOCK,
        wait=wait,
        what=f"study directory {str(out)!r}",
        fix="wait for it to end (or give --wait), or give another --out",
        waiting=waiting,
    )


def _execute(
    spec: dict[str, Any],
    spec_path: str | Path,
    out: Path,
    executor: str,
    todo: list[Cell],
    devices: list[str | None] | None,
    progress: bool,
) -> None:
    write_configs(out, todo)

    def save() -> None:
        write_status(out, spec_path, executor, todo)

    save()
    pending = [c for c in todo if c.state != "done"]
    try:
        if executor == "local":
            Local(devices or visible_gpus(), progress).run(out, pending, save)
        else:
            slurm.run(out, pending, spec.get("slurm") or {}, save, progress=progress)
    except Stopped as err:
        save()
        again = f"d2r sweep {spec_path} --out {out} --executor {executor}"
        raise Stopped(err.signame, again) from None
    save()


def write_configs(out: Path, todo: list[Cell]) -> None:
    for cell in todo:
        path = config_path(out, cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, dump_yaml(cell.config))


def write_status(out: Path, spec_path: str | Path, executor: str, todo: list[Cell]) -> None:
    """DIR/sweep.json: the cells, their overrides and states (for people and `d2r report`)."""
    body = {
        "format": "d2r-sweep",
        "spec": str(spec_path),
        "executor": executor,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cells": [
            {
                "name": c.name,
                "dir": str(out / c.name),
                "state": c.state,
                "attempts": c.attempts,
                "error": c.error,
                "overrides": c.overrides,
                **c.extra,
            }
            for c in todo
        ],
    }
    atomic_write_text(out / SWEEP_JSON, json.dumps(body, indent=2, default=str))


def table(out: Path, todo: list[Cell]) -> str:
    """The study's table (d2r.report): mean ± std over seeds, written to DIR/report.*."""
    runs = [out / c.name for c in todo if (out / c.name / "config.yaml").is_file()]
    if not runs:
        return "no run to report\n"
    return report(runs, out)["md"]


def dry_run_text(todo: list[Cell], out: Path) -> str:
    lines = [f"{len(todo)} cells -> {out}"]
    for c in todo:
        sets = ", ".join(
            f"{k}={_text(v) if not isinstance(v, dict) else json.dumps(v)}"
            for k, v in c.overrides.items()
        )
        lines.append(f"  {c.name} [{c.state}]: {sets}")
    return "\n".join(lines)


# Command line -----------------------------------------------------------------------------------
def add_command(sub: Any) -> None:
    """`d2r sweep SPEC.yaml --out DIR [--executor local|slurm] [--dry-run]`."""
    p = sub.add_parser(
        "sweep",
        help="a study: a grid of runs (+ evaluation) on this machine or on Slurm",
        description="Train and evaluate every cell of a sweep spec into DIR/<cell>; a rerun skips "
        "finished cells and resumes interrupted ones. Ends with the table (d2r report DIR).",
    )
    p.add_argument("spec", metavar="SPEC.yaml")
    p.add_argument("--out", help="the study's directory (required)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--dry-run", action="store_true", help="check the spec and print the cells")
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another d2r sweep runs into DIR, wait for it to end instead of refusing",
    )
    p.set_defaults(func=_command)


def _command(args: Any) -> int:
    if not args.out:  # checked here, not by argparse: the common flags parse without it
        raise ValueError("give the study's directory: d2r sweep SPEC.yaml --out DIR")
    out = Path(args.out)
    todo = run(
        args.spec,
        out,
        executor=args.executor,
        dry_run=args.dry_run,
        progress=not args.quiet,
        wait=args.wait,
    )
    if args.dry_run:
        print(dry_run_text(todo, out))
        return 0
    print(table(out, todo), end="")
    failed = [c for c in todo if c.state == "failed"]
    for c in failed:
        print(f"d2r sweep: {c.name} failed twice: {c.error}", file=sys.stderr)
    print(f"wrote {out / SWEEP_JSON} and {out / 'report.md'}")
    return 1 if failed else 0


__all__ = [
    "STOPPED",
    "SWEEP_JSON",
    "SWEEP_LOCK",
    "Cell",
    "Stopped",
    "add_command",
    "cell_state",
    "cells",
    "check_cell",
    "check_unchanged",
    "config_path",
    "last_error",
    "load_spec",
    "own_study",
    "python_command",
    "read_status",
    "run",
    "run_cell",
]
