"""`d2r sweep --executor slurm` against a real Slurm (the one-node cluster of
scripts/slurm_local.sh, which .ci/run starts): a 2 x 2 digits sweep runs as a job array and ends
evaluated; a job requeued mid-training (`scontrol requeue`) resumes from its checkpoint and ends
with the weights of an uninterrupted run; cells whose target is a model by import path or a
plugin's train and evaluate as jobs."""

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from d2r import plugins, sweep
from d2r.checkpoint import load
from d2r.cli import main
from d2r.evalstore import Store, summary
from d2r.logs import read_metrics
from d2r.models import MODELS
from d2r.sweep import slurm
from test_plugins import GOOD, install

ROOT = Path(__file__).resolve().parents[1]
HOW = (
    "no Slurm cluster here: start the test one with `bash scripts/slurm_local.sh start` "
    "(as root, after apt-get install -y slurm-wlm munge)"
)


def _cluster_up() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


def _skip_reason() -> str | None:
    if importlib.util.find_spec("submitit") is None:
        return 'submitit is missing: pip install "d2r-robust[slurm]"'
    return None if _cluster_up() else HOW


SKIP = _skip_reason()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")
TINY = {"train.epochs": 1, "data.train_subset": 192, "method.steps": 3, "eval.subset": 50}
JOB = {"cpus_per_task": 1, "mem_gb": 1, "time_min": 10}


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(slurm, "POLL_S", 1.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs get this environment (sbatch)


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_a_two_by_two_digits_sweep_runs_as_slurm_jobs_and_ends_evaluated(tmp_path):
    grid = {
        "method": {
            "pgd_at": {"name": "pgd_at", "eps": 0.1, "step_size": 0.025, "steps": 3},
            "d2r": {"name": "d2r", "eps": 0.1, "step_size": 0.025, "steps": 3},
        },
        "seed": [0, 1],
    }
    evaluation = {"attacks": ["pgd5", "cw5"], "eps": 0.1, "n": 20}
    path = write_spec(tmp_path / "spec.yaml", set=TINY, grid=grid, eval=evaluation, slurm=JOB)
    out = tmp_path / "out"
    cells = sweep.run(path, out, executor="slurm")
    assert [c.state for c in cells] == ["done"] * 4, [c.error for c in cells]
    status = json.loads((out / "sweep.json").read_text())
    jobs = [c["job_id"] for c in status["cells"]]
    assert len({j.split("_")[0] for j in jobs}) == 1  # one job array
    for c in cells:
        entry = summary(Store.read(out / c.name), "last", 0.1)
        assert set(entry["settings"]["attacks"]) == {"pgd5", "cw5"}
    assert "| 0, 1 |" in sweep.table(out, cells)


OWN_MODEL = """
from torch import nn

def net(num_classes, in_channels, width=8):
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )
"""


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """The test plugin package `mypkg` (model `mynet`) on the path of this process and of the
    jobs (sbatch passes the environment on), loaded here too: the sweep checks its cells."""
    site = tmp_path / "site"
    install(site, "mypkg", "1.2", "mynet = mypkg.d2r_plugin", GOOD)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(ROOT / "src")]))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    plugins.load()
    yield site
    MODELS.drop_origin("mypkg 1.2")
    plugins.PLUGINS.pop("mynet", None)


def test_an_own_model_and_a_plugins_run_as_slurm_jobs(tmp_path, monkeypatch, plugin_site):
    (tmp_path / "ownnet.py").write_text(OWN_MODEL)
    monkeypatch.chdir(tmp_path)  # the jobs start here too: the module is on their path
    grid = {"target.name": ["ownnet:net", "mynet"]}
    sets = {**TINY, "method.name": "pgd_at", "method.eps": 0.1, "method.step_size": 0.025}
    evaluation = {"attacks": ["pgd5"], "n": 20}  # at each run's own eps, 0.1
    path = write_spec(tmp_path / "spec.yaml", set=sets, grid=grid, eval=evaluation, slurm=JOB)
    cells = sweep.run(path, tmp_path / "out", executor="slurm")
    assert [c.state for c in cells] == ["done", "done"], [c.error for c in cells]
    for cell, module in zip(cells, ("ownnet", "mypkg.d2r_plugin"), strict=True):
        env = json.loads((tmp_path / "out" / cell.name / "env.json").read_text())
        assert env["sources"]["target"]["module"] == module
        assert set(summary(Store.read(tmp_path / "out" / cell.name), "last", 0.1)) >= {"pgd5"}


def weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load(run / "last.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("target.", "guide."))}


def steps_logged(run: Path) -> int:
    """The last step in metrics.jsonl (0 before the first; a torn last line is skipped)."""
    if not (run / "metrics.jsonl").is_file():
        return 0
    return max((r["step"] for r in read_metrics(run, "step")), default=0)


def squeue(job: str) -> str:
    cmd = ["squeue", "-h", "-r", "-t", "all", "-o", "%T|%r", "-j", job.split("_")[0]]
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()


def test_a_job_requeued_mid_training_resumes_to_the_uninterrupted_weights(tmp_path):
    # 3 epochs of 8 steps, logged and checkpointed after every step
    sets = {
        **TINY,
        "train.epochs": 3,
        "data.train_subset": 512,
        "data.batch_size": 64,
        "train.log_every": 1,
        "train.checkpoint_minutes": 0.00001,
    }
    path = write_spec(tmp_path / "spec.yaml", set=sets, grid={"seed": [0]}, slurm=JOB)
    out, run = tmp_path / "out", tmp_path / "out" / "seed-0"
    result: dict = {}
    driver = threading.Thread(
        target=lambda: result.update(cells=sweep.run(path, out, executor="slurm")), daemon=True
    )
    driver.start()
    deadline = time.monotonic() + 240
    while steps_logged(run) < 4:
        assert time.monotonic() < deadline and driver.is_alive(), "training did not start"
        time.sleep(0.01)
    job = json.loads((out / "sweep.json").read_text())["cells"][0]["job_id"]
    subprocess.run(["scontrol", "requeue", job], check=True)
    # Slurm holds a requeued job back for a while (BeginTime): let it start again now
    while driver.is_alive() and time.monotonic() < deadline:
        if "BeginTime" in squeue(job):
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
        driver.join(1.0)
    assert not driver.is_alive(), f"the sweep did not end: {squeue(job)}"
    assert result["cells"][0].state == "done", result["cells"][0].error
    env = json.loads((run / "env.json").read_text())
    assert len(env.get("resumes", [])) == 1  # it was stopped and resumed, not restarted
    reference = tmp_path / "reference"
    config = str(out / "configs" / "seed-0.yaml")
    assert main(["train", "-q", "-c", config, "--out", str(reference)]) == 0
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert [r["step"] for r in read_metrics(run, "step")] == list(range(1, 25))
    # the stopped job says so in one line, not in a traceback
    logs = "".join(p.read_text() for p in (out / "slurm").rglob("*.err"))
    assert "Traceback" not in logs and "d2r sweep: seed-0: sweep stopped by SIGTERM" in logs
