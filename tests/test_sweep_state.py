"""A study's cells and their states (issue 29): an empty grid or a study of no cell is refused
in one line with nothing written; a cell is done when its eval.json store holds every result
its spec asks for, so a stopped evaluation and an attack added to the spec complete on the
rerun; a second sweep on one --out is refused naming the first, and a killed sweep leaves no
process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SWEEP_PGD_AT, SWEEP_TINY, cli_error, write_spec
from d2r import sweep
from d2r.attacks import PGD
from d2r.checkpoint import load
from d2r.evalstore import CLEAN, Store
from d2r.evaluate import evaluate_run
from d2r.files import Lock
from d2r.logs import read_metrics


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "is empty; give a grid"),
        ({"grid": {}}, "no grid; a study needs one"),
        ({"set": {"train.epochs": 1}}, "no grid; a study needs one"),
        ({"parts": []}, "parts must be a non-empty list"),
        ({"parts": [{"name": "a", "grid": {"seed": [0]}}, {"name": "b"}]}, "part 2: no grid"),
    ],
    ids=["empty-file", "empty-grid", "no-grid", "no-parts", "a-part-without-grid"],
)
def test_a_study_of_no_cell_is_refused_in_one_line_writing_nothing(
    tmp_path, capsys, spec, expected
):
    path, out = write_spec(tmp_path / "spec.yaml", **spec), tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        assert expected in cli_error(capsys, "sweep", str(path), "--out", str(out), *extra)
    assert not out.exists()


# A cell is done when its store holds every result its spec asks for ------------------------------
ROOT = Path(__file__).resolve().parents[1]
TINY = SWEEP_TINY  # seconds per cell (conftest)
PGD_AT = SWEEP_PGD_AT
EVAL = {"attacks": ["pgd3"], "eps": 0.1, "n": 30, "batch_size": 10}


def test_a_stopped_evaluation_and_an_added_attack_complete_on_the_rerun(tmp_path, monkeypatch):
    spec = {"set": TINY, "grid": {"method": {"pgd_at": PGD_AT}}}
    out, run = tmp_path / "out", tmp_path / "out" / "pgd_at"
    assert [c.state for c in sweep.run(write_spec(tmp_path / "train.yaml", **spec), out)] == [
        "done"
    ]  # no evaluation asked
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}

    # the cell's evaluation stopped after its first batch of PGD: eval.json exists already
    path = write_spec(tmp_path / "spec.yaml", **spec, eval=EVAL)
    calls, original = [], PGD.__call__

    def stop_at_the_second_batch(attack, model, x, y):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(attack, model, x, y)

    monkeypatch.setattr(PGD, "__call__", stop_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, ["pgd3"], 0.1, checkpoint="last", seed=0, n=30, batch_size=10)
    monkeypatch.setattr(PGD, "__call__", original)
    assert (run / "eval.json").is_file() and list(run.glob("eval-partial-*.json"))
    [cell] = sweep.cells(path)
    assert sweep.cell_state(run, cell) == "trained"
    assert [c.state for c in sweep.run(path, out)] == ["done"]
    assert {r["key"]["attack"] for r in Store.read(run).results} == {CLEAN, "pgd3"}
    assert not list(run.glob("eval-partial-*.json"))  # resumed from it, then removed
    before = {r["key"]["attack"]: r for r in Store.read(run).results}

    # an attack added to the spec's eval: only it runs
    path = write_spec(tmp_path / "spec.yaml", **spec, eval={**EVAL, "attacks": ["pgd3", "fgsm"]})
    [cell] = sweep.cells(path)
    assert sweep.cell_state(run, cell) == "trained"
    assert [c.state for c in sweep.run(path, out)] == ["done"]
    after = {r["key"]["attack"]: r for r in Store.read(run).results}
    assert set(after) == {CLEAN, "pgd3", "fgsm"}
    assert all(after[k]["seconds"] == before[k]["seconds"] for k in before)  # kept, not redone
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}  # no training


# One sweep per study, one trainer per run, no cell without its sweep -----------------------------
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
# 4 steps an epoch, each logged and checkpointed (as tests/test_sweep.py's RESUMABLE)
STEPS = {
    **TINY,
    "data.train_subset": 256,
    "data.batch_size": 64,
    "train.log_every": 1,
    "train.checkpoint_minutes": 0.00001,
}


def start_sweep(path: Path, out: Path, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "d2r", "sweep", str(path), "--out", str(out), "-q", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def steps(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").is_file():
        return []
    return [r["step"] for r in read_metrics(run, "step")]


def wait_until(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def holder_pid(lock: Path) -> int:
    return int(lock.read_text().split()[1])


def test_a_second_sweep_on_one_out_is_refused_or_waits_and_each_cell_trains_once(tmp_path, capsys):
    path = write_spec(tmp_path / "spec.yaml", set={**STEPS, "train.epochs": 3}, grid={"seed": [0]})
    out, run = tmp_path / "out", tmp_path / "out" / "seed-0"
    first = start_sweep(path, out)
    second = None
    try:
        wait_until(lambda: len(steps(run)) >= 2, "the first sweep's cell training")
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*") if "seed-0" not in p.parts)
        err = cli_error(capsys, "sweep", str(path), "--out", str(out))
        assert f"study directory {str(out)!r} is in use by pid {first.pid} " in err
        assert "--wait" in err
        after = sorted(str(p.relative_to(out)) for p in out.rglob("*") if "seed-0" not in p.parts)
        assert after == before  # nothing written by the refusal
        # the first sweep paused (its trainer goes on) so that it cannot end before the second
        # reaches the lock, however loaded the machine is
        os.kill(first.pid, signal.SIGSTOP)
        said = tmp_path / "second.err"
        with open(said, "w") as err_file:
            cmd = [sys.executable, "-m", "d2r", "sweep", str(path), "--out", str(out), "-q"]
            second = subprocess.Popen([*cmd, "--wait"], env=ENV, stderr=err_file, text=True)
        waiting = f"waiting for pid {first.pid} "
        wait_until(lambda: waiting in said.read_text(), "the second sweep waiting")
        os.kill(first.pid, signal.SIGCONT)
        assert first.wait(timeout=300) == 0, first.communicate()
        assert second.wait(timeout=300) == 0, said.read_text()
    finally:
        for proc in (first, second):
            if proc is not None:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
                proc.communicate()
    assert steps(run) == list(range(1, 13))  # every step trained once, logged once


def test_a_killed_sweep_leaves_no_process_and_its_run_directory_free(tmp_path, capsys):
    # 50 epochs: minutes alone; the cell must stop within seconds of its sweep's death
    spec = {"set": {**STEPS, "train.epochs": 50}, "grid": {"seed": [0]}}
    path = write_spec(tmp_path / "spec.yaml", **spec)
    out, run = tmp_path / "out", tmp_path / "out" / "seed-0"
    proc, trainer = start_sweep(path, out), None
    try:
        wait_until(lambda: len(steps(run)) >= 2, "the cell training")
        trainer = holder_pid(run / ".run.lock")
        assert trainer != proc.pid and alive(trainer)
        # a second trainer on the run directory is refused in one line naming the first
        err = cli_error(capsys, "train", "-q", "--resume", str(run))
        assert f"run directory {str(run)!r} is in use by pid {trainer} " in err
        proc.kill()  # SIGKILL: the sweep runs no handler
        proc.communicate()
        wait_until(lambda: not alive(trainer), "the cell's trainer ending", timeout=60)
    finally:
        proc.kill()
        proc.communicate()
        if trainer is not None and alive(trainer):
            os.kill(trainer, signal.SIGKILL)
    assert "SIGTERM" in (run / "train.log").read_text()  # it stopped as a stopped cell does
    _, meta = load(run / "last.safetensors")
    assert meta["step"] < 200  # not trained on to the end
    with Lock(run / ".run.lock", wait=False):  # free again: a rerun resumes it
        pass
