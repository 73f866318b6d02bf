"""Studies: a grid of runs (configs x seeds, then the evaluation) from one spec, on this machine
(`executor="local"`) or as Slurm jobs (`executor="slurm"`, d2r.slurm through submitit).

A spec (YAML):

    base: configs/cifar10/d2r_cag.yaml   # optional; the default config otherwise
    set: {train.epochs: 100}              # fixed overrides (`--set` keys)
    grid:                                 # every combination is one run (a cell)
      method.alpha: [0, 30]
      seed: [0, 1, 2]
    eval: {attacks: [pgd20, pgd50, cw20, aa], eps: 8/255}   # after training; optional
    slurm: {partition: gpu, time_min: 600, gpus_per_node: 1}

A grid axis is a list of values, or a mapping of names to values (the names label the cells:
`method: {trades: {name: trades, beta: 6}, ...}`); the axis `base` takes config files. `parts:`
(a list of {name, base, set, grid, eval}) makes one study of several grids.

Each cell is one `d2r train` run directory DIR/<cell name>; its state is read from its files
(eval.json: done; a finished last checkpoint: trained; any checkpoint: interrupted), so a rerun
skips what is done and resumes what was interrupted (`d2r train --resume`, exact). Cells run as
`python -m d2r train|eval` processes: Ctrl-C, SIGTERM and resume are the trainer's own.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2r.checkpoint import atomic_write_text
from d2r.config import (
    Config,
    apply_overrides,
    dump_yaml,
    from_dict,
    load_yaml,
    parse_number,
    resolve,
    to_dict,
)
from d2r.resume import Preempted

SPEC_KEYS = ("base", "set", "grid", "eval", "slurm", "parts")
PART_KEYS = ("name", "base", "set", "grid", "eval")
EVAL_KEYS = ("attacks", "eps", "n", "seed", "batch_size", "checkpoint")
COMPONENTS = ("target", "guide", "method")  # grid keys that replace a whole config section
SWEEP_JSON = "sweep.json"
# exit codes of a run stopped by a signal (d2r.resume.Preempted: 128 + SIGINT/SIGUSR1/SIGTERM)
STOPPED = {128 + s: signal.Signals(s).name for s in (2, 10, 15)}


@dataclass
class Cell:
    """One run of the study: its name (the run directory's), the config it trains with and
    the evaluation after it (None: none)."""

    name: str
    config: Config
    overrides: dict[str, Any]
    eval: dict[str, Any] | None = None
    state: str = "pending"
    attempts: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # executor's notes (device, job id)


class Stopped(Preempted):
    """A cell's process was stopped by a signal (it wrote its checkpoint); the sweep stops. A
    Preempted, so the CLI exits with 128 + the signal number as `d2r train` does."""

    def __init__(self, signame: str, command: str = "") -> None:
        self.signame, self.signum = signame, signal.Signals[signame].value
        Exception.__init__(
            self,
            f"sweep stopped by {signame}; every checkpoint is complete; continue with: "
            f"{command or 'the same d2r sweep command'}",
        )


# The spec ---------------------------------------------------------------------------------------
def load_spec(spec_path: str | Path) -> dict[str, Any]:
    spec = load_yaml(spec_path)
    _only(spec, SPEC_KEYS, f"sweep spec {str(spec_path)!r}")
    if "grid" in spec and "parts" in spec:
        raise ValueError(f"sweep spec {str(spec_path)!r}: give either grid or parts, not both")
    return spec


def _only(mapping: Any, valid: tuple[str, ...], where: str) -> None:
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected a mapping, got {mapping!r}")
    unknown = [k for k in mapping if k not in valid]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")


def cells(spec_path: str | Path) -> list[Cell]:
    """Every cell of the spec, resolved and checked (`check_cell`), in grid order; ValueError
    naming the cell for the first one a run would refuse."""
    spec = load_spec(spec_path)
    parts = spec.get("parts") or [{}]
    if not isinstance(parts, list):
        raise ValueError(f"sweep spec {str(spec_path)!r}: parts must be a list of mappings")
    out: list[Cell] = []
    for i, part in enumerate(parts):
        _only(part, PART_KEYS, f"sweep spec {str(spec_path)!r}, part {i + 1}")
        merged = {**spec, **part, "set": {**(spec.get("set") or {}), **(part.get("set") or {})}}
        prefix = f"{part['name']}-" if part.get("name") else ""
        out += _part_cells(merged, prefix, Path(spec_path))
    names = [c.name for c in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"sweep spec {str(spec_path)!r}: two cells named {twice[0]!r}; name parts")
    return out


def _part_cells(part: dict[str, Any], prefix: str, spec_path: Path) -> list[Cell]:
    axes = _axes(part.get("grid") or {}, str(spec_path))
    evaluation = _eval_settings(part.get("eval"), str(spec_path))
    out = []
    for combo in itertools.product(*(axis for _, axis in axes)):
        choice = {key: value for (key, _), (_, value) in zip(axes, combo, strict=True)}
        name = prefix + ("_".join(label for label, _ in combo) or "run")
        try:
            cfg = cell_config(part, choice, spec_path)
            check_cell(cfg)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"sweep spec {str(spec_path)!r}, cell {name!r}: {err}") from None
        out.append(Cell(name, cfg, choice, evaluation))
    return out


def _axes(grid: Any, where: str) -> list[tuple[str, list[tuple[str, Any]]]]:
    """[(key, [(label, value), ...]), ...]: labels from a mapping's names, a base file's stem,
    or `<short key>-<value>`."""
    if not isinstance(grid, dict):
        raise ValueError(f"sweep spec {where!r}: grid must map keys to lists of values")
    shorts = [_short(k) for k in grid]
    axes = []
    for key, values in grid.items():
        short = _short(key) if shorts.count(_short(key)) == 1 else key
        if isinstance(values, dict):
            axis = [(_safe(str(n)), v) for n, v in values.items()]
        elif isinstance(values, list) and values:
            stem = key == "base"
            axis = [(_safe(Path(v).stem if stem else f"{short}-{_text(v)}"), v) for v in values]
        else:
            raise ValueError(f"sweep spec {where!r}: grid key {key!r} needs a non-empty list")
        axes.append((str(key), axis))
    return axes


def _short(key: str) -> str:
    parts = str(key).split(".")
    return parts[0] if parts[-1] == "name" else parts[-1]  # method.name -> method


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(_text, value))
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+,-]", "_", text)


def _eval_settings(raw: Any, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    _only(raw, EVAL_KEYS, f"sweep spec {where!r}, eval")
    attacks = raw.get("attacks", ["pgd20", "cw20"])
    attacks = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    eps = raw.get("eps", 8 / 255)
    settings = {"checkpoint": "last", "seed": 0, **raw, "attacks": [a.strip() for a in attacks]}
    settings["eps"] = parse_number(eps) if isinstance(eps, str) else float(eps)
    from d2r.evaluate import build_suite

    try:  # bad names or eps fail now, before any training
        build_suite(settings["attacks"], settings["eps"], int(settings["seed"]))
    except ValueError as err:
        raise ValueError(f"sweep spec {where!r}, eval: {err}") from None
    return settings


def cell_config(part: dict[str, Any], choice: dict[str, Any], spec_path: Path) -> Config:
    """base <- whole components from the grid (e.g. method: {...}) <- set <- other grid keys,
    validated as `d2r train` validates."""
    from d2r.api import _as_set

    base = choice.get("base", part.get("base"))
    raw: dict[str, Any] = {}
    if base:
        path = _find(str(base), spec_path)
        resolve(path)  # the file's own errors name it
        raw = load_yaml(path)
    raw.update({k: v for k, v in choice.items() if k in COMPONENTS})
    dotted = {k: v for k, v in choice.items() if k not in COMPONENTS and k != "base"}
    sets = [_as_set(k, v) for k, v in {**(part.get("set") or {}), **dotted}.items()]
    return from_dict(apply_overrides(raw, sets))


def _find(base: str, spec_path: Path) -> Path:
    """A relative base is looked up from the working directory, then beside the spec."""
    for path in (Path(base), spec_path.parent / base):
        if path.is_file():
            return path
    raise FileNotFoundError(f"base config {base!r} not found (from here nor beside the spec)")


def check_cell(cfg: Config) -> None:
    """What `d2r train` refuses before training, without training: the method and its models
    built on the meta device (no memory, no init cost even for WRN-34-10), and the per-epoch
    attack. Raises the trainer's own one-line ValueErrors."""
    import torch

    from d2r import data
    from d2r.attacks import from_name
    from d2r.runs import build_method

    with torch.device("meta"):
        build_method(cfg, data.info(cfg.data.name))
    from_name(cfg.eval.attack, cfg.eval.eps)


# A cell's state, read from its run directory ----------------------------------------------------
def cell_state(run_dir: Path, cell: Cell) -> str:
    """pending (nothing to resume), interrupted (a checkpoint short of the last epoch),
    trained (all epochs, evaluation still to do) or done."""
    sidecar = run_dir / "last.json"
    if not (run_dir / "last.safetensors").is_file() or not sidecar.is_file():
        return "pending"
    epoch = json.loads(sidecar.read_text()).get("epoch", 0)
    if epoch < cell.config.train.epochs:
        return "interrupted"
    if cell.eval is not None and not (run_dir / "eval.json").is_file():
        return "trained"
    return "done"


def check_unchanged(run_dir: Path, cell: Cell) -> None:
    """A cell directory from an earlier run of the spec must hold this cell's config: a spec
    edited since then would otherwise resume one run into another."""
    from d2r.resume import changed_keys

    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    changed = changed_keys(to_dict(resolve(saved)), to_dict(cell.config))
    if changed:
        raise ValueError(
            f"cell {cell.name!r}: {str(run_dir)!r} holds a run of another config "
            f"({', '.join(changed)} differ); the spec changed since it ran: give another --out, "
            "or move that directory away"
        )


def set_aside(run_dir: Path) -> None:
    """A run killed before its first checkpoint has nothing to resume; its directory (logs
    only) is renamed, not deleted, and the cell starts again."""
    if (run_dir / "config.yaml").is_file() and not (run_dir / "last.safetensors").is_file():
        run_dir.rename(
            run_dir.with_name(f"{run_dir.name}.aborted-{time.strftime('%Y%m%d-%H%M%S')}")
        )


# Running one cell (both executors) --------------------------------------------------------------
def commands(out: Path, cell: Cell, state: str) -> list[tuple[str, list[str]]]:
    """What is left to do for `cell` in `state`: train (or resume), then evaluate."""
    run_dir, todo = out / cell.name, []
    if state == "pending":
        set_aside(run_dir)
        todo.append(
            ("train", ["train", "-q", "--out", str(run_dir), "-c", str(config_path(out, cell))])
        )
    elif state == "interrupted":
        todo.append(("train", ["train", "-q", "--resume", str(run_dir)]))
    if state != "done" and cell.eval is not None:
        todo.append(("eval", eval_args(run_dir, cell.eval)))
    return todo


def config_path(out: Path, cell: Cell) -> Path:
    return out / "configs" / f"{cell.name}.yaml"


def eval_args(run_dir: Path, ev: dict[str, Any]) -> list[str]:
    args = ["eval", str(run_dir), "-q", "--attacks", ",".join(ev["attacks"])]
    args += ["--eps", repr(ev["eps"]), "--seed", str(ev["seed"]), "--checkpoint", ev["checkpoint"]]
    for key in ("n", "batch_size"):
        if ev.get(key) is not None:
            args += [f"--{key.replace('_', '-')}", str(ev[key])]
    return args


def run_cell(
    out: Path,
    cell: Cell,
    spawn: Callable[[list[str], Path], int],
    stopped: Callable[[], str | None] = lambda: None,
    tries: int = 2,
) -> str:
    """Train/resume then evaluate `cell`, `tries` times at most (a retry resumes from the
    checkpoint).
    Returns the final state; `spawn(args, log)` runs `python -m d2r ARGS` into a log file and
    returns its exit code; `stopped()` names a signal that stops the sweep, if any. A process
    stopped by a signal (or a signal before the next step) raises Stopped."""
    run_dir = out / cell.name
    for attempt in range(tries):
        cell.attempts += 1
        for step, args in commands(out, cell, cell_state(run_dir, cell)):
            if stopped():
                raise Stopped(stopped() or "SIGINT")
            run_dir.mkdir(parents=True, exist_ok=True)
            code = spawn(args, run_dir / f"{step}.log")
            if code in STOPPED:
                raise Stopped(STOPPED[code])
            if code != 0:
                cell.error = f"{step}: {last_error(run_dir / f'{step}.log')}"
                break
        else:
            cell.error = None
            return cell_state(run_dir, cell)
        if attempt + 1 < tries:
            print(f"d2r sweep: {cell.name} failed ({cell.error}); retrying once", file=sys.stderr)
    return "failed"


def last_error(log: Path) -> str:
    """The `d2r: error: ...` line of a failed command, else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if ln.startswith("d2r: error:")]
    return (errors or lines or ["no output"])[-1]


def python_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "d2r", *args]


# The local executor -----------------------------------------------------------------------------
class Local:
    """Cells one after another, or one per visible GPU in parallel (CUDA_VISIBLE_DEVICES per
    process). Each process has its own session, so a signal reaches it once, forwarded from
    here: the first SIGINT/SIGTERM makes the running cells checkpoint and exit (a second one
    stops them at once), as `d2r train` does alone."""

    def __init__(self, devices: list[str | None]) -> None:
        self.devices = devices
        self.procs: set[subprocess.Popen] = set()
        self.signum: int | None = None

    def spawn(self, args: list[str], log: Path, device: str | None) -> int:
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        with open(log, "a") as f:
            proc = subprocess.Popen(
                python_command(args),
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            self.procs.add(proc)
            try:
                return proc.wait()
            finally:
                self.procs.discard(proc)

    def _forward(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum
        print(
            f"\nd2r sweep: {signal.Signals(signum).name}: stopping the running cells",
            file=sys.stderr,
        )
        for proc in list(self.procs):
            proc.send_signal(signum)

    def stopped(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    @contextmanager
    def forwarding(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread can own handlers (the caller's stay in force)
            return
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def run(self, out: Path, todo: list[Cell], save: Callable[[], None]) -> None:
        free = list(self.devices)
        with self.forwarding(), ThreadPoolExecutor(len(free)) as pool:
            running: dict[Any, str | None] = {}
            queue = list(todo)
            while queue or running:
                while queue and free and self.signum is None:
                    cell, device = queue.pop(0), free.pop(0)
                    cell.state, cell.extra["device"] = "running", device
                    save()
                    running[pool.submit(self._one, out, cell, device)] = device
                done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    free.append(running.pop(fut))
                    fut.result()  # Stopped propagates once the others have been waited for
                    save()
                if self.signum is not None and not running:
                    break

    def _one(self, out: Path, cell: Cell, device: str | None) -> None:
        print(f"d2r sweep: {cell.name}: running" + (f" on GPU {device}" if device else ""))
        try:
            cell.state = run_cell(
                out, cell, lambda a, log: self.spawn(a, log, device), self.stopped
            )
        except Stopped:
            cell.state = "interrupted"
            raise
        print(f"d2r sweep: {cell.name}: {cell.state}" + (f" ({cell.error})" if cell.error else ""))


def visible_gpus() -> list[str | None]:
    """One slot per visible GPU (CUDA_VISIBLE_DEVICES' entries, else 0..N-1); [None] without."""
    import torch

    if not torch.cuda.is_available():
        return [None]
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in listed.split(",") if d.strip()] if listed else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]


# The sweep --------------------------------------------------------------------------------------
def run(
    spec_path: str | Path,
    out: str | Path,
    *,
    executor: str = "local",
    dry_run: bool = False,
    devices: list[str | None] | None = None,
) -> list[Cell]:
    """Run the study `spec_path` into `out` (see the module doc); returns its cells with their
    final states. The whole spec is checked first; `dry_run` stops there (the CLI prints the
    cells). Raises Stopped on Ctrl-C/SIGTERM (rerun to continue)."""
    if executor not in ("local", "slurm"):
        raise ValueError(f"--executor {executor!r}: choose local or slurm")
    out, spec = Path(out), load_spec(spec_path)
    todo = cells(spec_path)
    for cell in todo:
        check_unchanged(out / cell.name, cell)
        cell.state = cell_state(out / cell.name, cell)
    if dry_run:
        return todo
    if executor == "slurm":
        from d2r import slurm

        slurm.options(spec.get("slurm") or {})  # bad options fail before any file is written
    write_configs(out, todo)

    def save() -> None:
        write_status(out, spec_path, executor, todo)

    save()
    pending = [c for c in todo if c.state != "done"]
    try:
        if executor == "local":
            Local(devices or visible_gpus()).run(out, pending, save)
        else:
            slurm.run(out, pending, spec.get("slurm") or {}, save)
    except Stopped as err:
        save()
        again = f"d2r sweep {spec_path} --out {out} --executor {executor}"
        raise Stopped(err.signame, again) from None
    save()
    return todo


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


def read_status(path: Path) -> dict[str, dict[str, Any]]:
    """An earlier sweep.json's cells by name ({} when there is none)."""
    try:
        return {c["name"]: c for c in json.loads(path.read_text())["cells"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def table(out: Path, todo: list[Cell]) -> str:
    """The study's table (d2r.report): mean ± std over seeds, written to DIR/report.*."""
    from d2r.report import report

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
    p.add_argument("--out", required=True, help="the study's directory")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--dry-run", action="store_true", help="check the spec and print the cells")
    p.set_defaults(func=_command)


def _command(args: Any) -> int:
    out = Path(args.out)
    todo = run(args.spec, out, executor=args.executor, dry_run=args.dry_run)
    if args.dry_run:
        print(dry_run_text(todo, out))
        return 0
    print(table(out, todo), end="")
    failed = [c for c in todo if c.state == "failed"]
    for c in failed:
        print(f"d2r sweep: {c.name} failed twice: {c.error}", file=sys.stderr)
    print(f"wrote {out / SWEEP_JSON} and {out / 'report.md'}")
    return 1 if failed else 0


__all__ = ["Cell", "Stopped", "add_command", "cell_state", "cells", "check_cell", "run"]
