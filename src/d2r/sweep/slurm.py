"""The Slurm executor of `d2r sweep`: one job per cell, submitted as a job array through submitit
(`pip install "d2r-robust[slurm]"`), with the spec's `slurm:` options passed through.

Preemption and time limits: Slurm sends SIGUSR1 (`--signal=USR1@<signal_delay_s>`, submitit's
preemption signal, set to USR1 here) or SIGTERM (scancel, `scontrol requeue`, preemption) to
every process of the job step, so the trainer, a child of the submitit process, gets it
directly: it finishes its step, writes last.safetensors and exits. On SIGUSR1 submitit then
requeues the job; a job that starts on a run directory holding a checkpoint resumes it
(`d2r train --resume`, exact). The job's state is read from squeue and the cell's files, so no
accounting database (sacct) is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from d2r.config import resolve
from d2r.sweep.cell import (
    SWEEP_JSON,
    Cell,
    Stopped,
    cell_state,
    config_path,
    evaluate_cell,
    last_error,
    python_command,
    read_status,
    run_cell,
)

# spec key -> submitit AutoExecutor parameter; anything else goes to sbatch as `extra`
OPTIONS = {
    "partition": "slurm_partition",
    "time_min": "timeout_min",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem_gb",
    "nodes": "nodes",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "constraint": "slurm_constraint",
    "array_parallelism": "slurm_array_parallelism",
    "signal_delay_s": "slurm_signal_delay_s",
    "setup": "slurm_setup",  # shell lines run before the job, e.g. `source venv/bin/activate`
    "extra": "slurm_additional_parameters",  # any other sbatch option, e.g. {exclude: node3}
}
SIGNAL = "USR1"  # the trainer traps it (d2r.guard.SignalGuard); submitit's default is USR2
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}
POLL_S = 10.0


def options(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec's `slurm:` mapping as AutoExecutor parameters; ValueError for unknown keys."""
    if not isinstance(spec, dict):
        raise ValueError(f"sweep spec: slurm must be a mapping of options, got {spec!r}")
    unknown = [k for k in spec if k not in OPTIONS]
    if unknown:
        raise ValueError(
            f"sweep spec, slurm: unknown key {unknown[0]!r}; valid keys: {', '.join(OPTIONS)} "
            "(any other sbatch option goes under extra: {name: value})"
        )
    params = {OPTIONS[k]: v for k, v in spec.items()}
    params.setdefault("slurm_signal_delay_s", 120)  # time to finish a step and checkpoint
    params.setdefault("timeout_min", 60 * 24)
    # the job's submitit traps the same signal (it reads this variable when it starts)
    params["slurm_setup"] = [
        *params.get("slurm_setup", []),
        f"export SUBMITIT_PREEMPT_SIGNAL={SIGNAL}",
    ]
    return params


def executor(out: Path, params: dict[str, Any]) -> Any:
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = SIGNAL  # before submitit reads it, at import
    try:
        import submitit
    except ImportError:
        raise ValueError(
            'the Slurm executor needs submitit: pip install "d2r-robust[slurm]"'
        ) from None
    from submitit.slurm.slurm import SlurmJobEnvironment

    if SlurmJobEnvironment.USR_SIG != SIGNAL:
        raise ValueError(
            f"submitit was imported with SUBMITIT_PREEMPT_SIGNAL={SlurmJobEnvironment.USR_SIG}; "
            f"the trainer checkpoints on {SIGNAL}: set SUBMITIT_PREEMPT_SIGNAL={SIGNAL}"
        )
    ex = submitit.AutoExecutor(folder=out / "slurm" / "%j", cluster="slurm")
    ex.update_parameters(name="d2r-sweep", **params)
    return ex


class CellJob:
    """What one Slurm job runs: the cell's remaining steps: train or resume as `python -m d2r
    train ...`, then the evaluation in the job's own process. Plain strings and the cell's
    evaluation settings only, so submitit's pickle of it holds no config or tensor."""

    def __init__(self, out: str, name: str, evaluation: dict[str, Any] | None) -> None:
        self.out, self.name, self.evaluation = out, name, evaluation

    def cell(self) -> Cell:
        out = Path(self.out)
        cfg = resolve(config_path(out, Cell(self.name, None, {})))  # type: ignore[arg-type]
        return Cell(self.name, cfg, {}, self.evaluation)

    def __call__(self) -> str:
        cell = self.cell()
        try:
            state = run_cell(Path(self.out), cell, partial(_spawn, cell=cell), tries=1)
        except Stopped as err:  # requeued or cancelled: checkpointed, a line, not a traceback
            print(f"d2r sweep: {self.name}: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None  # submitit logs an Exception's traceback
        if state == "failed":
            raise RuntimeError(f"cell {self.name} failed: {cell.error}")
        return state

    def checkpoint(self) -> Any:
        """submitit calls this on SIGUSR1, before it requeues the job: the trainer got the
        signal too; wait until it has written its checkpoint and exited."""
        from submitit.helpers import DelayedSubmission

        child = _CHILD.get("thread")
        if child is not None:
            child.join(timeout=600)
        return DelayedSubmission(CellJob(self.out, self.name, self.evaluation))


_CHILD: dict[str, threading.Thread] = {}  # the running command's waiter, in a job process


def _spawn(args: list[str], log: Path, cell: Cell) -> int:
    """The cell's evaluation in this process (one interpreter start less per cell; a signal
    during it loses nothing), `d2r train` as a child: see _spawn_child."""
    if args[0] != "eval" or cell.eval is None:
        return _spawn_child(args, log)
    return evaluate_cell(Path(args[1]), cell.eval, log)


def _spawn_child(args: list[str], log: Path) -> int:
    """Run `python -m d2r ARGS` in the job's process group (Slurm's signals reach it), waited
    for in a thread so that submitit's signal handler can wait for it too. A command stopped
    by a signal raises Stopped in run_cell: the job ends unfinished, and Slurm requeues it
    (`scontrol requeue`, preemption) or the driver resubmits it once; either way it resumes."""
    code: list[int] = []
    with open(log, "a") as f:
        proc = subprocess.Popen(python_command(args), stdout=f, stderr=subprocess.STDOUT)
        thread = threading.Thread(target=lambda: code.append(proc.wait()), daemon=True)
        _CHILD["thread"] = thread
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
    return code[0]


# The driver -------------------------------------------------------------------------------------
def job_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: state} from squeue (one line per array task); a job it no longer lists is
    absent (it ended longer than MinJobAge ago)."""
    if not job_ids:
        return {}
    arrays = sorted({j.split("_")[0] for j in job_ids})
    cmd = ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(arrays)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    states = dict(line.split("|", 1) for line in out.stdout.split() if "|" in line)
    return {j: states[j] for j in job_ids if j in states}


def alive(cell: Cell, states: dict[str, str]) -> bool:
    job = cell.extra.get("job_id")
    return job is not None and job in states and states[job] not in ENDED


def submit(ex: Any, out: Path, cells: list[Cell], progress: bool = True) -> None:
    with ex.batch():
        jobs = [ex.submit(CellJob(str(out), c.name, c.eval)) for c in cells]
    for cell, job in zip(cells, jobs, strict=True):
        cell.extra["job_id"], cell.state = str(job.job_id), "submitted"
        if progress:
            print(f"d2r sweep: {cell.name}: job {job.job_id}")


def run(
    out: Path,
    todo: list[Cell],
    spec: dict[str, Any],
    save: Callable[[], None],
    poll_s: float | None = None,
    progress: bool = True,
) -> None:
    """Submit the cells (not those whose job from an earlier call is still queued or running),
    wait for them, resubmit once a job that ended short of its cell's end (it resumes).
    `progress`: a line per job submitted."""
    ex = executor(out, options(spec))
    previous = read_status(out / SWEEP_JSON)
    for cell in todo:
        cell.extra["job_id"] = previous.get(cell.name, {}).get("job_id")
    states = job_states([c.extra["job_id"] for c in todo if c.extra.get("job_id")])
    submit(ex, out, [c for c in todo if not alive(c, states)], progress)
    save()
    resubmitted: set[str] = set()
    try:
        _wait(ex, out, todo, save, poll_s or POLL_S, resubmitted)
    except KeyboardInterrupt:
        print(
            f"\nd2r sweep: stopped waiting; the jobs go on (squeue); rerun the command to wait for "
            f"them, or d2r report {out}",
            file=sys.stderr,
        )
        raise


def _wait(
    ex: Any, out: Path, todo: list[Cell], save: Callable[[], None], poll_s: float, again: set[str]
) -> None:
    while True:
        states = job_states([c.extra["job_id"] for c in todo])
        ended = []
        for cell in todo:
            files = cell_state(out / cell.name, cell)
            if files == "done" or not alive(cell, states):
                if files != "done":
                    ended.append(cell)
                cell.state = files if files == "done" else "failed"
            else:
                cell.state = states[cell.extra["job_id"]].lower()
        retry = [c for c in ended if c.name not in again]
        for cell in todo:
            ended_state = states.get(cell.extra["job_id"], "ended")
            cell.error = _error(out, cell, ended_state) if cell in ended else None
        if retry:
            print(f"d2r sweep: retrying once: {', '.join(c.name for c in retry)}", file=sys.stderr)
            again.update(c.name for c in retry)
            submit(ex, out, retry)
        save()
        if all(c.state in ("done", "failed") for c in todo):
            return
        time.sleep(poll_s)


def _error(out: Path, cell: Cell, job_state: str) -> str:
    step = "eval" if cell_state(out / cell.name, cell) == "trained" else "train"
    log = out / cell.name / f"{step}.log"
    if log.is_file():
        return f"{step}: {last_error(log)}"
    return f"job {cell.extra['job_id']} {job_state.lower()}; see {out / 'slurm'}"
