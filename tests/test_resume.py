"""Exact resume and preemption: a training subprocess killed (SIGKILL) or stopped (SIGTERM,
SIGUSR1) at a random step, then `d2r train --resume`, ends with weights bit-identical to an
uninterrupted run; metrics.jsonl holds each step once; config changes on resume need an
explicit --set."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from d2r.checkpoint import load
from d2r.cli import main
from d2r.logs import read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")
# 256 images in batches of 64: 4 steps an epoch, 12 in all; log and checkpoint after every step
# (checkpoint_minutes tiny) so that a kill can land anywhere, mid-epoch included.
TINY = [
    "train.epochs=3",
    "data.train_subset=256",
    "data.batch_size=64",
    "eval.subset=100",
    "method.steps=3",
    "eval.attack=pgd3",
    "train.log_every=1",
    "train.checkpoint_minutes=0.00001",
]
ARGS = [a for kv in TINY for a in ("--set", kv)] + ["-q"]
STEPS = 12


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "--out", str(out), *ARGS]) == 0
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    tensors, _ = load(run / "last.safetensors")
    return {k: v for k, v in tensors.items() if k.startswith(("target.", "guide."))}


def assert_same_weights(run: Path, reference: Path) -> None:
    got, want = weights(run), weights(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), "resumed weights differ"


def steps_logged(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run, "step")]  # a torn last line is skipped


def start(out: Path) -> subprocess.Popen:
    # One thread, as conftest sets for this process: CPU results are bit-exact only between
    # runs with the same number of intra-op threads (reductions split differently).
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "d2r", "train", "--out", str(out), *ARGS]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc: subprocess.Popen, out: Path, k: int, timeout: float = 120) -> None:
    """Poll metrics.jsonl (the files, not a test hook) until step k is logged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended before step {k}: {proc.communicate()}"
        if (out / "metrics.jsonl").is_file() and max(steps_logged(out), default=0) >= k:
            return
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"step {k} not reached in {timeout} s")


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, reference):
    k = random.randint(2, STEPS - 3)  # any step; the run must still be going when killed
    out = tmp_path / "run"
    proc = start(out)
    wait_for_step(proc, out, k)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert main(["train", "--resume", str(out), "-q"]) == 0, f"killed after step {k}"
    assert_same_weights(out, reference)
    assert steps_logged(out) == list(range(1, STEPS + 1))  # no step lost, none twice
    assert not list(out.glob(".*.tmp"))


# SIGUSR1: Slurm's warning before a time limit or preemption (sbatch --signal=USR1@120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_signal_checkpoints_exits_128_plus_it_and_says_how_to_resume(tmp_path, reference, sig):
    out = tmp_path / "run"
    proc = start(out)
    wait_for_step(proc, out, 5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert f"d2r train --resume {out}" in err and sig.name in err
    _, meta = load(out / "last.safetensors")
    assert meta["step"] == max(steps_logged(out)) < STEPS  # the checkpoint is the last step
    assert main(["train", "--resume", str(out), "-q"]) == 0
    assert_same_weights(out, reference)
    env = json.loads((out / "env.json").read_text())
    assert len(env["resumes"]) == 1
    # the loss terms summed before the stop come back in the method's order, not sorted
    assert [list(r) for r in read_metrics(out)] == [list(r) for r in read_metrics(reference)]


def test_resume_refuses_a_changed_config_unless_set_explicitly(tmp_path, reference, capsys):
    before = (reference / "last.safetensors").read_bytes()
    changed = tmp_path / "c.yaml"
    changed.write_text("train: {lr: 0.05, epochs: 3}\n")
    assert main(["train", "--resume", str(reference), "-c", str(changed), "-q"]) == 2
    err = capsys.readouterr().err
    assert "differs from the run's" in err and "train.lr" in err and "--set" in err
    assert (reference / "last.safetensors").read_bytes() == before


def test_resume_with_explicit_set_extends_the_run(tmp_path, reference):
    run = tmp_path / "run"
    run.mkdir()
    for f in reference.iterdir():
        (run / f.name).write_bytes(f.read_bytes())
    # config.yaml records every method option; a -c file that leaves them at their defaults
    # is the same config: both sides of the comparison are resolved alike
    saved = yaml.safe_load((reference / "config.yaml").read_text())
    assert saved["method"]["alpha"] == 30.0 and saved["method"]["sym_rule"] == "abs"
    saved["method"] = {k: saved["method"][k] for k in ("name", "eps", "step_size", "steps")}
    given = tmp_path / "given.yaml"
    given.write_text(yaml.safe_dump(saved))
    args = ["train", "--resume", str(run), "-c", str(given), "--set", "train.epochs=4", "-q"]
    assert main(args) == 0
    assert [r["epoch"] for r in read_metrics(run, "epoch")] == [1, 2, 3, 4]
    assert load(run / "last.safetensors")[1]["epoch"] == 4


def test_resume_needs_a_run_directory(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "-q"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_a_second_sigint_exits_at_once_and_the_checkpoint_stays_whole(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert main(["train", "--resume", str(out), "-q"]) == 0
    assert_same_weights(out, reference)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_restored_momentum_takes_the_parameters_memory_format(impl):
    """The file holds contiguous (NCHW) buffers; a channels_last model's fused SGD reads its
    parameter and momentum buffer as flat memory, so a buffer left NCHW gives wrong steps."""
    from d2r.checkpoint import load_optimizer_state, optimizer_state
    from d2r.speed import fused_sgd_available

    if impl == "fused" and not fused_sgd_available("cpu"):
        pytest.skip("this torch has no CPU fused SGD")
    options = {"fused": True} if impl == "fused" else {"foreach": True}

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, **options)

    def step(model, optimizer):
        torch.manual_seed(1)
        x = torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()

    model, optimizer = model_and_optimizer()
    step(model, optimizer)
    tensors, meta = optimizer_state(optimizer, {"m": model})
    tensors = {k: v.contiguous() for k, v in tensors.items()}  # as safetensors stores them
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    step(model, optimizer)

    again, optimizer2 = model_and_optimizer()
    again.load_state_dict(saved)
    load_optimizer_state(optimizer2, {"m": again}, tensors, meta, "test")
    buffer = optimizer2.state[again.weight]["momentum_buffer"]
    assert buffer.stride() == again.weight.stride()
    step(again, optimizer2)
    assert torch.equal(again.weight, model.weight)
