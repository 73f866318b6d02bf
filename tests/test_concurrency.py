"""Concurrent d2r processes on one place (issue 29): eight processes committing to one eval.json
at once keep every result; the lock a killed holder had never blocks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d2r import checkpoint
from d2r.evalstore import Store
from d2r.evaluate import evaluate_run
from d2r.files import Busy, locked
from d2r.runs import own_run_dir, training_now

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def start_together(code: str, n: int, tmp_path: Path, *args: str) -> list[subprocess.Popen]:
    """`n` Python processes running `code` (which gets `go`, a barrier to wait on, and its
    index as sys.argv[2]), released together once every one is ready."""
    ready, go = tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    barrier = (
        "import sys, time, pathlib\n"
        "def go():\n"
        f"    pathlib.Path({str(ready)!r}, sys.argv[2]).touch()\n"
        f"    while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.001)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", barrier + code, "-", str(i), *args], env=ENV)
        for i in range(n)
    ]
    try:
        deadline = time.monotonic() + 300
        while len(list(ready.iterdir())) < n:
            assert all(p.poll() is None for p in procs), "a process ended before the barrier"
            assert time.monotonic() < deadline, "the processes never got ready"
            time.sleep(0.01)
        go.touch()
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    return procs


COMMIT = """
import torch
from d2r.evalstore import commit, make_entry, result_key
out, i = sys.argv[3], int(sys.argv[2])
images = {"data": "digits", "split": "test", "n": 8, "sha256": "x"}
flags = torch.ones(8, dtype=torch.bool)
entries = [
    make_entry(result_key("s", f"attack{i}-{j}", {}, 0.1, "Linf", images, 0), flags, 1.0)
    for j in range(4)
]
go()
for entry in entries:
    commit(out, results=[entry])
"""


def test_eight_processes_committing_at_once_keep_every_result(tmp_path):
    out = tmp_path / "out"
    procs = start_together(COMMIT, 8, tmp_path, str(out))
    assert [p.wait(timeout=300) for p in procs] == [0] * 8
    stored = {r["key"]["attack"] for r in Store.read(out).results}
    assert stored == {f"attack{i}-{j}" for i in range(8) for j in range(4)}


def test_a_lock_refuses_naming_its_holder_and_a_killed_holder_never_blocks(tmp_path):
    lock = tmp_path / "lock"
    hold = "import sys\nfrom d2r.files import locked\n"
    hold += f"with locked({str(lock)!r}, what='the thing'):\n    print('held', flush=True)\n"
    hold += "    sys.stdin.read()\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", hold], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout.readline() == b"held\n"
        with pytest.raises(Busy) as busy, locked(lock, wait=False, what="the thing"):
            pass
        message = str(busy.value)
        assert f"the thing is in use by pid {proc.pid} on " in message and "\n" not in message
        proc.kill()  # SIGKILL: no handler runs, the kernel drops the lock
        proc.wait()
        with locked(lock, wait=False, what="the thing"):
            assert f"pid {os.getpid()} " in lock.read_text()
    finally:
        proc.kill()
        proc.wait()


# An evaluation while the trainer writes the run ---------------------------------------------


@pytest.fixture()
def run_copy(tmp_path_factory, tmp_path):
    from tiny_runs import plain_run

    copy = tmp_path / "run"
    shutil.copytree(plain_run(tmp_path_factory), copy)
    return copy


def test_a_checkpoint_renamed_between_load_and_hash_cannot_mislabel(run_copy, monkeypatch):
    """The trainer renames its next checkpoint into place right after the evaluation read the
    file: the result keeps the hash and epoch of the bytes it measured."""
    _, meta = checkpoint.load(run_copy / "last.safetensors")
    real_load = checkpoint.load

    def load_then_the_trainer_saves(path):
        tensors, loaded = real_load(path)
        newer = {k: v for k, v in loaded.items() if k not in ("format", "format_version")}
        checkpoint.save(path, tensors, {**newer, "epoch": 99})  # the next epoch lands
        return tensors, loaded

    monkeypatch.setattr(checkpoint, "load", load_then_the_trainer_saves)
    evaluate_run(run_copy, ["pgd1"], 0.1, checkpoint="last", n=8, checks=False)
    monkeypatch.undo()
    assert checkpoint.load(run_copy / "last.safetensors")[1]["epoch"] == 99  # it did land
    store = Store.read(run_copy)
    assert {r["key"]["sha256"] for r in store.results} == {meta["sha256"]}
    assert [(c["sha256"], c["epoch"]) for c in store.checkpoints] == [(meta["sha256"], 1)]


def test_evaluating_a_run_still_training_says_so_in_one_line(run_copy, capsys):
    assert training_now(run_copy) is None
    with own_run_dir(run_copy):  # a trainer holds the run
        assert f"pid {os.getpid()} " in training_now(run_copy)
        evaluate_run(run_copy, ["pgd1"], 0.1, checkpoint="last", n=8, checks=False)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is still training (pid" in err, err
    assert "labelled with the epoch it holds" in err
    assert training_now(run_copy) is None and not (run_copy / ".run.lock").exists()


def test_a_second_trainer_waits_when_asked_then_goes_on(run_copy, tmp_path):
    said = tmp_path / "second.err"
    with own_run_dir(run_copy):  # the first trainer
        cmd = [sys.executable, "-m", "d2r", "train", "--resume", str(run_copy), "-q", "--wait"]
        with open(said, "w") as err:
            second = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 120
            while "d2r train: waiting for pid" not in said.read_text():
                assert second.poll() is None, said.read_text()  # it waited, not refused
                assert time.monotonic() < deadline, "the second trainer never said it waits"
                time.sleep(0.05)
            assert f"pid {os.getpid()} " in said.read_text() and second.poll() is None
        except BaseException:
            second.kill()
            raise
    out, _ = second.communicate(timeout=120)  # the first ended: the second goes on
    assert second.returncode == 0 and "already finished its 1 epochs" in out, said.read_text()
