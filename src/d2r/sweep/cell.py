"""One cell of a study: its state read from its run directory, and running what is left of it
(train or resume, then evaluate) as `python -m d2r` commands; both executors use this."""

from __future__ import annotations

import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2r import data
from d2r.attacks import AutoAttack
from d2r.checkpoint import (
    checkpoint_path,
    read_sidecar,
    run_checkpoints,
    stored_sha256,
    target_weights,
)
from d2r.config import Config, changed_keys, resolve, to_dict
from d2r.evalstore import EVAL_JSON, Store, images_id, key_id, markdown
from d2r.evaluate import attack_plan, build_suite, evaluate_run, suite_keys
from d2r.guard import Preempted
from d2r.runs import load_run, resolved_config

# exit codes of a run stopped by a signal (d2r.guard.Preempted: 128 + SIGINT/SIGUSR1/SIGTERM)
STOPPED = {128 + s: signal.Signals(s).name for s in (2, 10, 15)}
SWEEP_JSON = "sweep.json"  # DIR/sweep.json: the cells and their states
SWEEP_LOCK = ".sweep.lock"  # DIR/.sweep.lock: held by the sweep running the study


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


# A cell's state, read from its run directory ----------------------------------------------------
def cell_state(run_dir: Path, cell: Cell) -> str:
    """pending (nothing to resume), interrupted (a checkpoint short of the last epoch),
    trained (all epochs, a result of its evaluation not yet in its eval.json store: never
    started, stopped part-way, or an attack added to the spec since) or done."""
    sidecar = run_dir / "last.json"
    if not (run_dir / "last.safetensors").is_file() or not sidecar.is_file():
        return "pending"
    epoch = json.loads(sidecar.read_text()).get("epoch", 0)
    if epoch < cell.config.train.epochs:
        return "interrupted"
    if cell.eval is not None and missing_results(run_dir, cell):
        return "trained"
    return "done"


def missing_results(run_dir: Path, cell: Cell) -> list[dict[str, Any]]:
    """The store keys (d2r.evalstore) of the results the cell's evaluation asks for that its
    eval.json lacks: the keys `d2r eval` computes, from each checkpoint's sha256, the suite at
    each eps and the test images' sha256."""
    if not (run_dir / EVAL_JSON).is_file():
        return [{"eval": "all"}]  # nothing evaluated yet: no need to read the test images
    ev, stored = cell.eval or {}, {key_id(r["key"]) for r in Store.read(run_dir).results}
    which = {None: run_checkpoints(run_dir), "both": ["last", "best"]}.get(ev["checkpoint"])
    d = cell.config.data
    images = _images(d.name, str(d.root), d.verify, d.like, ev.get("n"), d.image_size, d.channels)
    missing = []
    for key in which or [ev["checkpoint"]]:
        sha256 = stored_sha256(checkpoint_path(run_dir, key))
        if sha256 is None:
            return [{"checkpoint": key}]  # `d2r eval` says what is wrong with it
        weights = target_weights(read_sidecar(run_dir, key), key)
        for eps, names in attack_plan(ev["attacks"], ev["eps"]).items():
            suite = build_suite(names, eps, int(ev["seed"]))
            # AutoAttack's settings name the attacks its package runs on the model
            aa = any(isinstance(a, AutoAttack) for a in suite.values())
            model = load_run(run_dir, key)[1].target if aa else None
            keys = suite_keys(sha256, suite, model, images, int(ev["seed"]), weights)
            missing += [k for k in keys.values() if key_id(k) not in stored]
    return missing


@functools.lru_cache(maxsize=4)
def _images(
    name: str,
    root: str,
    verify: bool,
    like: str | None,
    n: int | None,
    image_size: int | None = None,
    channels: int | None = None,
) -> dict:
    """What identifies the test images `d2r eval --n N` reads (d2r.evalstore.images_id); kept,
    so that the cells of a study (and the Slurm executor's polls) read them once."""
    files = {"image_size": image_size, "channels": channels}
    x, y = data.load(name, root, "test", verify=verify, like=like, **files)
    return images_id(name, *((x[:n], y[:n]) if n else (x, y)))


def check_unchanged(run_dir: Path, cell: Cell) -> None:
    """A cell directory from an earlier run of the spec must hold this cell's config: a spec
    edited since then would otherwise resume one run into another."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    # both resolved (every option at its value), as a run records its config
    old, new = (to_dict(resolved_config(c)) for c in (resolve(saved), cell.config))
    changed = changed_keys(old, new)
    if changed:
        raise ValueError(
            f"cell {cell.name!r}: {str(run_dir)!r} holds a run of another config "
            f"({', '.join(changed)} differ); the spec changed since it ran: give another --out, "
            "or move that directory away"
        )


def set_aside(run_dir: Path) -> Path | None:
    """A run killed before its first checkpoint has nothing to resume; its directory (logs
    only) moves to DIR/aborted/ (kept, and out of `d2r report DIR`'s way) and the cell starts
    again. Returns where it went."""
    if not (run_dir / "config.yaml").is_file() or (run_dir / "last.safetensors").is_file():
        return None
    target = run_dir.parent / "aborted" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(exist_ok=True)
    run_dir.rename(target)
    return target


def read_status(path: Path) -> dict[str, dict[str, Any]]:
    """An earlier sweep.json's cells by name ({} when there is none)."""
    try:
        return {c["name"]: c for c in json.loads(path.read_text())["cells"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


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


def evaluate_cell(run_dir: Path, ev: dict[str, Any], log: Path) -> int:
    """The cell's evaluation (`ev`, as `eval_args` gives it to `d2r eval`) in this process,
    through d2r.evaluate.evaluate_run, its output appended to `log`. Returns the exit status
    `d2r eval` gives: 0, 2 for bad input (its one line in the log), 128 + signal when stopped."""
    sizes = {k: ev[k] for k in ("n", "batch_size") if ev.get(k) is not None}
    with open(log, "a") as f, redirect_stdout(f), redirect_stderr(f):
        try:
            evaluate_run(
                run_dir, ev["attacks"], ev["eps"], checkpoint=ev["checkpoint"],
                seed=ev["seed"], progress=False, **sizes,
            )  # fmt: skip
        except Preempted as err:
            print(f"d2r: {err}")
            return err.exit_code
        except (ValueError, FileNotFoundError) as err:
            print(" ".join(f"d2r: error: {err}".split()))  # last_error reads this line
            return 2
        print(markdown(Store.read(run_dir)))
    return 0


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
            # 128 + signal: the trainer checkpointed; any other end while the sweep is being
            # stopped (a process killed before its handlers were set, `d2r eval`) is a stop too
            if code in STOPPED or (code != 0 and stopped()):
                raise Stopped(STOPPED.get(code) or stopped() or "SIGTERM")
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
