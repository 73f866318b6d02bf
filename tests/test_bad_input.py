"""Bad input and guards: damaged or foreign checkpoints are refused with a message and leave
the previous good files untouched; a code-carrying pickle never runs; a NaN loss stops the run
(or is skipped and counted); write failures name the file; config files name themselves."""

import errno
import math
import os
import pickle
import shutil

import pytest
import torch

from d2r import checkpoint, files, guard, speed, weights
from d2r.cli import main
from d2r.config import resolve
from d2r.guard import NonFiniteLossError
from d2r.methods import METHODS
from d2r.models import MODELS
from d2r.trainer import Trainer
from tiny_runs import plain_run

# 4 steps of 64, a checkpoint after every step (checkpoint_minutes tiny), one epoch.
TINY = [
    "train.epochs=1",
    "data.train_subset=256",
    "data.batch_size=64",
    "eval.subset=50",
    "method.steps=2",
    "eval.attack=pgd2",
    "train.log_every=1",
    "train.checkpoint_minutes=0.00001",
]


@pytest.fixture
def run(tmp_path_factory, tmp_path):
    """A private copy of a finished tiny run (shared, so it must not be modified in place)."""
    copy = tmp_path / "run"
    shutil.copytree(plain_run(tmp_path_factory), copy)
    return copy


def resume_refused(run, capsys, message: str) -> None:
    """`d2r train --resume` exits 2 with `message` and writes nothing."""
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and "last.safetensors" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, -1])
def test_truncated_checkpoint_is_refused(run, capsys, keep):
    path = run / "last.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(keep * len(data)) if isinstance(keep, float) else keep])
    resume_refused(run, capsys, "truncated or not a safetensors file")


@pytest.mark.parametrize("where", ["tensor", "metadata"])
def test_bit_flipped_checkpoint_is_refused(run, capsys, where):
    path = run / "last.safetensors"
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    # a flip in a tensor's bytes, or in a digit of the (escaped) JSON metadata: still JSON
    index = len(data) - 5 if where == "tensor" else data.index(b'\\"step\\": ', 0, header) + 10
    data[index] ^= 0x01
    path.write_bytes(bytes(data))
    resume_refused(run, capsys, "is corrupted (its sha256 does not match")


def test_checkpoint_of_another_architecture_is_refused(run, capsys):
    tensors, meta = checkpoint.load(run / "last.safetensors")
    other = MODELS.create("tiny_cnn", num_classes=10, in_channels=1).state_dict()
    tensors = {k: v for k, v in tensors.items() if not k.startswith("target.")}
    tensors.update(checkpoint.prefixed("target", other))
    checkpoint.save(run / "last.safetensors", tensors, meta)
    resume_refused(run, capsys, "do not fit the model")


class _Payload:
    """Unpickling this would create `marker`: the side effect must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_renamed_safetensors_never_runs(run, capsys, tmp_path):
    marker = tmp_path / "pwned"
    (run / "last.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    resume_refused(run, capsys, "truncated or not a safetensors file")
    with pytest.raises(ValueError):
        weights.read_state_dict(run / "last.safetensors")
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused"):
        weights.read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.safetensors"
    checkpoint.save(path, {"w": torch.ones(3)}, {"epoch": 1})
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)  # atomic_write's fsync
    with pytest.raises(ValueError, match=r"could not write checkpoint .*last\.safetensors.*intact"):
        checkpoint.save(path, {"w": torch.zeros(3)}, {"epoch": 2})
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == [
        "last.json",
        "last.safetensors",
    ]


def test_an_unwritable_run_directory_fails_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    assert main(["train", "--out", str(tmp_path / "file" / "run"), "-q"]) == 2
    assert "cannot write to run directory" in capsys.readouterr().err


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: two}\n")
    with pytest.raises(ValueError, match=r"c\.yaml.*'train.epochs': expected a number"):
        resolve(path)
    path.write_text("train: {epoch: 2}\n")
    with pytest.raises(ValueError, match=r"c\.yaml.*unknown config key 'train.epoch'"):
        resolve(path)


def inject_nan(monkeypatch, *at_calls: int, attr: str = "forward") -> None:
    """D2R's `attr` (forward, or loss: which AWP calls too) returns a NaN loss on its
    `at_calls`-th training calls (1-based)."""
    cls = METHODS.get("d2r")
    original, calls = getattr(cls, attr), []

    def poisoned(self, *args):
        out = original(self, *args)
        calls.append(1)
        if len(calls) in at_calls:
            out = {**out, "loss": out["loss"] * math.nan}
        return out

    monkeypatch.setattr(cls, attr, poisoned)


def test_nan_loss_stops_the_run_naming_step_terms_and_checkpoint(tmp_path, monkeypatch, capsys):
    inject_nan(monkeypatch, 3)
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "-q"] + [a for kv in TINY for a in ("--set", kv)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at epoch 1 step 3 (loss=nan, ce=" in err and err.count("\n") == 1
    assert f"{out / 'last.safetensors'} (step 2)" in err and "train.nonfinite=skip" in err
    tensors, meta = checkpoint.load(out / "last.safetensors")
    assert meta["step"] == 2 and all(
        torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()
    )
    with pytest.raises(NonFiniteLossError):  # the Python API raises the ValueError subclass
        inject_nan(monkeypatch, 1)
        Trainer(resolve(overrides=TINY), tmp_path / "api", progress=False).fit()


IMPLS = ["fused", "foreach"] if speed.fused_sgd_available("cpu") else ["foreach"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("awp", ["0", "5e-3"])
def test_nan_loss_with_skip_changes_nothing_and_counts(tmp_path, monkeypatch, impl, awp):
    """The skipped batch leaves weights and momentum exactly as they were (fused
    SGD skips it in its kernel, the others on the host); training goes on. With AWP the NaN is
    in the loss AWP perturbs the weights with too (its 2 calls in step 2)."""
    if awp == "0":
        inject_nan(monkeypatch, 2)
    else:
        inject_nan(monkeypatch, 3, 4, attr="loss")
    sets = [f"train.optimizer_impl={impl}", f"method.awp_gamma={awp}", "train.nonfinite=skip"]
    trainer = Trainer(resolve(overrides=[*TINY, *sets]), tmp_path / "run", progress=False)
    between_steps, states = trainer._between_steps, []

    def record() -> None:  # after each step (and AWP's restore)
        momentum = [s["momentum_buffer"].clone() for s in trainer.optimizer.state.values()]
        # parameters only: the batch's forward did update BatchNorm's running statistics
        states.append(([p.detach().clone() for p in trainer.method.parameters()], momentum))
        between_steps()

    trainer._between_steps = record
    run = trainer.fit()
    assert run.final["skipped_batches"] == 1 and math.isfinite(run.final["loss"])
    (weights1, momentum1), (weights2, momentum2), (weights3, _) = states[:3]
    assert all(torch.equal(a, b) for a, b in zip(weights1, weights2, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(momentum1, momentum2, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(weights2, weights3, strict=True))
    assert all(torch.isfinite(p).all() for p in run.method.parameters())


@pytest.mark.skipif("fused" not in IMPLS, reason="this torch has no CPU fused SGD")
def test_with_fused_sgd_the_host_reads_the_step_flags_after_the_update(tmp_path, monkeypatch):
    """No host read between the forward and the update (on a GPU it would drain the queue):
    fused SGD gets the non-finite flag as a device tensor."""
    events = []
    values = guard.DeviceFlags.values
    monkeypatch.setattr(guard.DeviceFlags, "values", lambda f: events.append("read") or values(f))
    cfg = resolve(overrides=[*TINY, "train.optimizer_impl=fused", "train.epochs=1"])
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    step = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda: events.append("step") or step())
    trainer._train_epoch(0)
    assert events[:4] == ["step", "read", "step", "read"]


@pytest.mark.skipif("fused" not in IMPLS, reason="this torch has no CPU fused SGD")
def test_a_skipped_first_step_leaves_fused_sgd_exact(tmp_path, monkeypatch):
    """torch's fused SGD allocates momentum buffers uninitialized just before its first
    kernel call; if that call skips (a NaN at the first batch), the next step would use
    garbage. Fused and foreach SGD must end the same run with the same weights."""
    weights = {}
    for impl in ("fused", "foreach"):
        inject_nan(monkeypatch, 1)
        sets = [f"train.optimizer_impl={impl}", "train.nonfinite=skip"]
        run = Trainer(resolve(overrides=[*TINY, *sets]), tmp_path / impl, progress=False).fit()
        assert run.final["skipped_batches"] == 1
        weights[impl] = run.method.state_dict()
    for k, v in weights["foreach"].items():
        torch.testing.assert_close(weights["fused"][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["eval", "run", "--norm", "l3"], ["invalid choice: 'l3'", "see `d2r eval -h`"]),
        (["frobnicate"], ["invalid choice: 'frobnicate'", "see `d2r -h`"]),
        (["train", "--set"], ["--set: expected one argument", "see `d2r train -h`"]),
    ],
)
def test_a_bad_flag_is_one_line_not_the_usage(argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith("d2r: error: ") and all(w in err for w in words), err
