"""The run's state and the per-epoch check: one home for the state (checkpoint.py), every
generator seeded, the check's eps following the method's unless eval.eps is given."""

from __future__ import annotations

import pytest
import torch

from d2r import checkpoint
from d2r.config import resolve
from d2r.runs import eval_eps
from d2r.trainer import Trainer

# one epoch of 2 batches, a 2-step attack, a 50-image check: a second or two on a CPU
FAST = [
    "train.epochs=1",
    "data.train_subset=128",
    "data.batch_size=64",
    "method.steps=2",
    "eval.subset=50",
    "eval.attack=pgd5",
]


def _train(tmp_path, name, *sets):
    cfg = resolve(overrides=[*FAST, *sets])
    return Trainer(cfg, tmp_path / name, progress=False).fit()


@pytest.mark.parametrize(
    "sets,expected",
    [
        (["method.eps=0.3"], 0.3),  # the check attacks at the training eps
        (["method.eps=0.3", "eval.eps=0.05"], 0.05),  # an explicit eval.eps wins
        (["method.name=trades", "guide=null", "method.eps=0.2"], 0.2),
        (["method.name=trades", "guide=null", "method={name: trades}"], 0.031),  # its default
    ],
)
def test_the_checks_eps_defaults_to_the_methods(sets, expected):
    assert eval_eps(resolve(overrides=[*FAST, *sets])) == pytest.approx(expected)


def test_the_check_runs_and_records_at_the_methods_eps(tmp_path):
    run = _train(tmp_path, "run", "method.eps=0.3")
    assert run.final["check_eps"] == pytest.approx(0.3)
    assert run.final["check_n"] == 50


def test_two_runs_with_one_seed_write_the_same_checkpoint(tmp_path):
    """Every generator (torch, numpy, random) is seeded from `seed`: the whole saved state is
    reproducible, not only the weights (numpy's and random's states differed before)."""
    a, b = (_train(tmp_path, name, "seed=3") for name in ("a", "b"))
    ta, ma = checkpoint.load(a.dir / "last.safetensors")
    tb, mb = checkpoint.load(b.dir / "last.safetensors")
    assert set(ta) == set(tb)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    assert ma["train_state"]["rng"] == mb["train_state"]["rng"]
    c = _train(tmp_path, "c", "seed=4")
    tc, _ = checkpoint.load(c.dir / "last.safetensors")
    assert not torch.equal(ta["state.rng.numpy"], tc["state.rng.numpy"])
    assert not torch.equal(ta["state.rng.python"], tc["state.rng.python"])


def test_the_checkpoint_names_its_models_and_weights_come_by_name(tmp_path):
    """No key prefix is hard-coded: a run checkpoint lists its models, and weights files give
    a d2r checkpoint's target by that list."""
    from d2r.weights import read_state_dict

    run = _train(tmp_path, "run")
    _, meta = checkpoint.load(run.dir / "last.safetensors")
    assert meta["models"] == ["target", "guide"]
    target = read_state_dict(run.dir / "last.safetensors")
    assert set(target) == set(run.method.target.state_dict())
    assert checkpoint.is_run_checkpoint(run.dir / "last.safetensors")


def test_a_checkpoint_written_to_two_places_is_one_file_twice(tmp_path):
    """best.safetensors is last.safetensors' bytes (serialized and hashed once), sidecar too."""
    tensors, meta = {"w": torch.arange(6.0).reshape(2, 3)}, {"epoch": 3}
    last, best = tmp_path / "last.safetensors", tmp_path / "best.safetensors"
    checkpoint.save(last, tensors, meta, also=[best])
    assert last.read_bytes() == best.read_bytes()
    assert last.with_suffix(".json").read_text() == best.with_suffix(".json").read_text()
    loaded, read_meta = checkpoint.load(best)  # verified against its content hash
    assert torch.equal(loaded["w"], tensors["w"]) and read_meta["epoch"] == 3
    with pytest.raises(ValueError, match=r"could not write checkpoint.*missing.*intact"):
        checkpoint.save(last, tensors, meta, also=[tmp_path / "missing" / "best.safetensors"])
