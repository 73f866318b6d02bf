"""Data-parallel training on CPU (gloo, 2 processes): the loader's shards, the same loss and
weights as one process on the same global batch, and a torchrun run that resumes with another
number of processes. No test here measures time."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from d2r import distributed
from d2r.checkpoint import load
from d2r.cli import main
from d2r.data import DeviceLoader

SRC = str(Path(__file__).resolve().parents[1] / "src")
# eps = 0 makes x_adv = x whatever the attack noise (which differs between ranks); beta = 0 in
# the plain case, the symmetric term has cases of its own below.
EXACT = [
    "data.train_subset=128",
    "data.batch_size=32",
    "train.epochs=1",
    "train.log_every=1",
    "eval.subset=32",
    "eval.attack=pgd2",
    "method.eps=0",
    "method.beta=0",
    "target.name=bn_free",
    "guide.name=bn_free",
    "train.checkpoint_minutes=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BNFree(nn.Module):
    """conv - ReLU - pool - linear: no BatchNorm, whose batch statistics would differ per shard
    (torch's SyncBatchNorm, the cure, has no CPU kernel)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.linear = nn.Linear(8 * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(nn.functional.adaptive_avg_pool2d(self.conv(x).relu(), 4).flatten(1))


def _train_worker(rank: int, world: int, port: int, out: str, extra: list[str]) -> None:
    """One rank of a run (or the single process when world = 1), in a fresh interpreter."""
    from d2r.config import resolve
    from d2r.models import MODELS
    from d2r.trainer import Trainer

    torch.set_num_threads(1)
    MODELS.register("bn_free")(BNFree)  # only in this child: the test registry stays unchanged
    if world > 1:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    try:
        Trainer(resolve(None, [*EXACT, *extra]), out, progress=False).fit()
    finally:
        distributed.cleanup()


def _step_losses(run: Path) -> list[dict[str, float]]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [
        {k: r[k] for k in ("loss", "ce", "mse", "kl_adv")} for r in lines if r["kind"] == "step"
    ]


def test_shards_of_each_rank_make_up_the_global_batch():
    x = torch.randint(0, 256, (103, 1, 8, 8), dtype=torch.uint8)
    y = torch.arange(103)
    options = {"crop_padding": 2, "flip": True, "seed": 3}
    whole = list(DeviceLoader(x, y, 10, **options))
    shards = [list(DeviceLoader(x, y, 10, rank=r, world_size=3, **options)) for r in range(3)]
    assert len(whole) == 11 and all(len(s) == 11 for s in shards)  # 103 % 10 = 3 >= 3 ranks
    for i, (xb, yb) in enumerate(whole):
        assert torch.equal(torch.cat([s[i][0] for s in shards]), xb)
        assert torch.equal(torch.cat([s[i][1] for s in shards]), yb)
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(x, y, 10, rank=3, world_size=3)


def test_sync_bn_on_cpu_is_refused_with_a_fix():
    ctx = distributed.Context(rank=0, world_size=2)
    with pytest.raises(ValueError, match="sync_bn=false"):
        distributed.wrap(nn.BatchNorm1d(3), ctx, torch.device("cpu"), sync_bn=True)


# AWP: every rank must add the same perturbation (from the global batch's gradient), or the
# ranks' weights drift apart through weight decay and the step is not the global-batch step.
# beta=20: D2R's |K1 - K2| must be taken of the global batch's gap, not averaged per shard.
@pytest.mark.parametrize(
    "extra",
    [[], ["method.awp_gamma=5e-3"], ["method.beta=20"], ["method.beta=20", "method.sym_rule=sign"]],
    ids=["plain", "awp", "sym-abs", "sym-sign"],
)
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, extra):
    one, two = tmp_path / "one", tmp_path / "two"
    mp.spawn(_train_worker, args=(1, 0, str(one), extra), nprocs=1)
    mp.spawn(_train_worker, args=(2, free_port(), str(two), extra), nprocs=2)
    ref, got = _step_losses(one), _step_losses(two)
    assert len(ref) == len(got) == 4
    for r, g in zip(ref, got, strict=True):
        assert g == pytest.approx(r, rel=1e-4, abs=1e-6)
    want, _ = load(one / "last.safetensors")
    have, _ = load(two / "last.safetensors")
    assert want.keys() == have.keys()  # unwrapped names: no "module." prefix
    for k in [k for k in want if not k.startswith("state.rng.")]:  # ranks' RNGs differ
        torch.testing.assert_close(have[k], want[k], rtol=1e-4, atol=1e-5)
    env = json.loads((two / "env.json").read_text())
    assert env["world_size"] == 2


def test_torchrun_two_processes_then_resume_with_one(tmp_path):
    """`torchrun -m d2r train` with the default (BatchNorm) models, then `--resume` in one
    process: checkpoints hold the unwrapped state, so the number of processes may change."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "d2r",
        "train",
        "-q",
        "--out",
        str(out),
        "--set",
        "train.epochs=1",
        "--set",
        "data.train_subset=256",
        "--set",
        "eval.subset=64",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 2  # rank 0 alone prints (start and end)
    assert main(["train", "--resume", str(out), "--set", "train.epochs=2", "-q"]) == 0
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(0 <= r["robust_acc"] <= 1 for r in epochs)
