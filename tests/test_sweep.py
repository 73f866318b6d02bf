"""`d2r sweep` on this machine: the spec is checked whole before anything starts (one-line errors
naming the cell), cells run to the table, a rerun is idempotent, a failing cell is retried once
and reported, and a SIGTERM to the sweep checkpoints the running cell, which a rerun resumes to
the weights of an uninterrupted run. Every study in studies/ passes the check."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import SWEEP_PGD_AT, SWEEP_TINY, cli_error, write_spec
from d2r import sweep
from d2r.checkpoint import load
from d2r.cli import main
from d2r.config import dump_yaml
from d2r.evalstore import Store, summary
from d2r.logs import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = SWEEP_TINY  # seconds per cell (conftest)
CAG = str(ROOT / "configs" / "cifar10" / "d2r_cag.yaml")  # D2R's options: a TRADES run refuses
PGD_AT = SWEEP_PGD_AT


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"grid": {"seed": [0]}, "evall": {}}, "unknown key 'evall'"),
        ({"grid": {"train.epocs": [1]}}, "cell 'epocs-1': unknown config key 'train.epocs'"),
        ({"grid": {"method.steps": [3, 0]}}, "cell 'steps-0': config key 'method.steps'"),
        ({"base": CAG, "grid": {"method.name": ["trades"]}}, "cell 'method-trades': "),
        ({"grid": {"guide": [None]}}, "cell 'guide-null': method 'd2r' needs a guide"),
        ({"grid": {"seed": [0]}, "eval": {"attacks": ["pgd20", "nope"]}}, "'nope'"),
        ({"grid": {"seed": [0]}, "slurm": {"partiton": "gpu"}}, "unknown key 'partiton'"),
        ({"grid": {"seed": []}}, "grid key 'seed' needs a non-empty list"),
    ],
)
def test_the_spec_is_checked_whole_before_anything_starts(tmp_path, capsys, spec, expected):
    path = write_spec(tmp_path / "spec.yaml", **spec)
    out = tmp_path / "out"
    err = cli_error(capsys, "sweep", str(path), "--out", str(out))
    assert expected in err
    assert not out.exists()  # nothing written, nothing started


def test_dry_run_prints_the_cells_with_stable_readable_names(tmp_path, capsys):
    grid = {"method": {"pgd_at": PGD_AT, "d2r": {"name": "d2r"}}, "seed": [0, 1]}
    path = write_spec(tmp_path / "spec.yaml", set=TINY, grid=grid)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    names = ["pgd_at_seed-0", "pgd_at_seed-1", "d2r_seed-0", "d2r_seed-1"]
    assert [line.split()[0] for line in text.splitlines()[1:]] == names
    assert "4 cells" in text and "[pending]" in text
    assert not (tmp_path / "out").exists()
    cells = sweep.cells(path)
    assert cells[0].config.method["name"] == "pgd_at" and cells[0].config.train.epochs == 1
    assert cells[0].config.method["steps"] == 3  # `set` applies on top of a whole component


def test_parts_make_one_study_of_several_grids(tmp_path):
    parts = [
        {"name": "t1", "grid": {"seed": [0, 1]}},
        {"name": "t2", "set": {"method.alpha": 0.0}, "grid": {"method.beta": [1.0, 20.0]}},
    ]
    path = write_spec(tmp_path / "spec.yaml", set=TINY, parts=parts)
    cells = sweep.cells(path)
    assert [c.name for c in cells] == ["t1-seed-0", "t1-seed-1", "t2-beta-1.0", "t2-beta-20.0"]
    assert cells[3].config.method["alpha"] == 0.0 and cells[3].config.method["beta"] == 20.0


def test_an_eval_without_eps_attacks_each_cell_at_its_own_eps(tmp_path):
    """As `d2r eval RUN` without --eps: the radius the run trained at, not a fixed 8/255."""
    grid = {"method": {"pgd_at": PGD_AT}, "method.eps": [0.1, 0.2]}
    path = write_spec(tmp_path / "spec.yaml", set=TINY, grid=grid, eval={"attacks": ["pgd5"]})
    assert [c.eval["eps"] for c in sweep.cells(path)] == [0.1, 0.2]
    path = write_spec(tmp_path / "spec.yaml", set=TINY, grid=grid, eval={"eps": 0.05})
    assert [c.eval["eps"] for c in sweep.cells(path)] == [0.05, 0.05]  # given: the same for all


def test_a_sweep_runs_to_the_table_and_a_rerun_does_nothing(tmp_path):
    grid = {"method": {"pgd_at": PGD_AT}, "seed": [0, 1]}
    evaluation = {"attacks": ["pgd5", "cw5"], "eps": 0.1, "n": 30}
    path = write_spec(tmp_path / "spec.yaml", set=TINY, grid=grid, eval=evaluation)
    out = tmp_path / "out"
    # two slots, as with two GPUs: each cell gets its own CUDA_VISIBLE_DEVICES
    cells = sweep.run(path, out, devices=["0", "1"])
    assert [c.state for c in cells] == ["done", "done"]
    status = json.loads((out / "sweep.json").read_text())
    assert [c["state"] for c in status["cells"]] == ["done", "done"]
    assert sorted(c["device"] for c in status["cells"]) == ["0", "1"]
    for c in cells:
        entry = summary(Store.read(out / c.name), "last", 0.1)
        assert set(entry["settings"]["attacks"]) == {"pgd5", "cw5"} and entry["settings"]["n"] == 30
    table = sweep.table(out, cells)
    assert "| 0, 1 |" in table and "±" in table  # one row, mean ± std over the two seeds
    assert (out / "report.md").read_text() == table
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = sweep.run(path, out)
    assert [c.state for c in again] == ["done", "done"] and all(c.attempts == 0 for c in again)
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}


@pytest.mark.parametrize("progress", [True, False], ids=["progress", "quiet"])
def test_quiet_sweeps_print_no_cell_lines(tmp_path, capsys, monkeypatch, progress):
    """`d2r sweep -q` (progress=False) drops the line as each cell starts and ends, nothing else."""
    from d2r.sweep import local

    monkeypatch.setattr(local, "run_cell", lambda *args: "done")
    cell = sweep.cells(write_spec(tmp_path / "spec.yaml", set=TINY, grid={"seed": [0]}))[0]
    local.Local([None], progress)._one(tmp_path, cell, None)
    lines = capsys.readouterr().out.splitlines()
    assert lines == (["d2r sweep: seed-0: running", "d2r sweep: seed-0: done"] if progress else [])


def test_a_failing_cell_is_retried_once_and_reported(tmp_path, capsys):
    # passes the check (data files are looked for by the run), fails when the run starts
    sets = {**TINY, "data.name": "mnist", "data.root": str(tmp_path / "nowhere")}
    path = write_spec(tmp_path / "spec.yaml", set=sets, grid={"seed": [0]})
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "seed-0 failed twice: train: d2r: error: mnist:" in err and "missing" in err
    cell = json.loads((out / "sweep.json").read_text())["cells"][0]
    assert cell["state"] == "failed" and cell["attempts"] == 2 and "missing" in cell["error"]


def test_a_changed_spec_is_refused_instead_of_resuming_another_run(tmp_path, capsys):
    path = write_spec(tmp_path / "spec.yaml", set=TINY, grid={"seed": [0]})
    out = tmp_path / "out"
    (out / "seed-0").mkdir(parents=True)
    changed = sweep.cells(path)[0].config
    changed.train.epochs = 2
    (out / "seed-0" / "config.yaml").write_text(dump_yaml(changed))
    err = cli_error(capsys, "sweep", str(path), "--out", str(out))
    assert "cell 'seed-0'" in err and "train.epochs" in err and "another --out" in err


def test_a_cell_killed_before_its_first_checkpoint_starts_again(tmp_path):
    path = write_spec(tmp_path / "spec.yaml", set=TINY, grid={"seed": [0]})
    cell, out = sweep.cells(path)[0], tmp_path / "out"
    (out / "seed-0").mkdir(parents=True)
    (out / "seed-0" / "config.yaml").write_text(dump_yaml(cell.config))
    (out / "seed-0" / "train.log").write_text("killed\n")
    assert sweep.cell_state(out / "seed-0", cell) == "pending"
    [(step, args)] = sweep.cell.commands(out, cell, "pending")
    assert step == "train" and "--out" in args and not (out / "seed-0").exists()
    [aside] = (out / "aborted").iterdir()  # kept, beside nothing `d2r report DIR` reads
    assert aside.name.startswith("seed-0-") and (aside / "train.log").read_text() == "killed\n"


def test_a_process_killed_while_the_sweep_stops_is_a_stop_not_a_failure(tmp_path, capsys):
    # e.g. `d2r eval`, or a trainer still importing, ended by the forwarded SIGTERM (-15)
    path = write_spec(tmp_path / "spec.yaml", set=TINY, grid={"seed": [0]})
    cell = sweep.cells(path)[0]
    with pytest.raises(sweep.Stopped) as stop:
        sweep.run_cell(tmp_path, cell, lambda args, log: -15, lambda: "SIGTERM")
    assert stop.value.exit_code == 143 and cell.attempts == 1 and cell.error is None
    assert "retrying" not in capsys.readouterr().err


# Interrupt and resume --------------------------------------------------------------------------
# 3 epochs of 4 steps, logged and checkpointed after every step (as tests/test_resume.py)
RESUMABLE = {
    **TINY,
    "train.epochs": 3,
    "data.train_subset": 256,
    "data.batch_size": 64,
    "train.log_every": 1,
    "train.checkpoint_minutes": 0.00001,
}


def weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load(run / "last.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("target.", "guide."))}


def wait_for_step(proc: subprocess.Popen, run: Path, k: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"ended before step {k}: {proc.communicate()}"
        steps = (
            [r["step"] for r in read_metrics(run, "step")]
            if (run / "metrics.jsonl").is_file()
            else []
        )
        if max(steps, default=0) >= k:
            return
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"step {k} not reached in {timeout} s")


def test_sigterm_stops_the_sweep_and_a_rerun_resumes_exactly(tmp_path, monkeypatch):
    # one thread everywhere (the cells inherit it): CPU results are bit-exact only between
    # runs with the same number of intra-op threads
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = write_spec(tmp_path / "spec.yaml", set=RESUMABLE, grid={"seed": [0]})
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "d2r", "sweep", str(path), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, out / "seed-0", 5)
    proc.send_signal(signal.SIGTERM)  # to the sweep only: it forwards to the running cell
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"continue with: d2r sweep {path} --out {out}" in err
    cell = json.loads((out / "sweep.json").read_text())["cells"][0]
    assert cell["state"] == "interrupted"
    _, meta = load(out / "seed-0" / "last.safetensors")
    assert 5 <= meta["step"] < 12
    cells = sweep.run(path, out)  # the rerun resumes it
    assert cells[0].state == "done"
    reference = tmp_path / "reference"
    assert (
        main(["train", "-q", "-c", str(out / "configs" / "seed-0.yaml"), "--out", str(reference)])
        == 0
    )
    got, want = weights(out / "seed-0"), weights(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [r["step"] for r in read_metrics(out / "seed-0", "step")] == list(range(1, 13))


# The studies -----------------------------------------------------------------------------------
STUDIES = sorted((ROOT / "studies").glob("*.yaml"))


def test_the_studies_are_there():
    names = {p.stem for p in STUDIES}
    assert {"digits", "mnist", "cifar10_table1", "cifar10_table2"} <= names
    assert {"cifar100_table1", "tiny_imagenet_table1"} <= names


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.stem)
def test_every_study_passes_the_check(study, monkeypatch):
    monkeypatch.chdir(ROOT)  # base configs are named from the repository root
    cells = sweep.cells(study)
    assert cells and len({c.name for c in cells}) == len(cells)
    spec = sweep.load_spec(study)
    if "slurm" in spec:
        from d2r.sweep import slurm

        slurm.options(spec["slurm"])
