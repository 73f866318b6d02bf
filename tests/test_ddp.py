"""Data-parallel training on CPU (gloo, 2 processes): the loader's shards, the same loss and
weights as one process on the same global batch, and a torchrun run that resumes with another
number of processes. No test here measures time."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from d2r import distributed, speed
from d2r.checkpoint import load
from d2r.cli import main
from d2r.data import DeviceLoader
from d2r.logs import read_metrics

SRC = str(Path(__file__).resolve().parents[1] / "src")
# eps = 0 makes x_adv = x whatever the attack noise (which differs between ranks); beta = 0 in
# the plain case, the symmetric term has cases of its own below.
# amp=off: the steps compared are fp32's. On a CPU with native bf16 (AVX512-BF16 or AMX),
# `train.amp: auto` turns bf16 autocast on (d2r.speed), and at bf16's 8-bit mantissa the
# rounding that differs between one process and two (the halves' gradients summed by gloo,
# GlooSyncBatchNorm's two-pass variance against ATen's BatchNorm, the thread count) is ~1e-3 per
# operation, which these 4 unstable steps (the loss rises from 3.2 to 5.4) grow to 0.2 %: on
# such a CPU every test below failed on torch 2.11.0 and 2.14.1 alike, with or without DDP's
# buckets in play (one process under torchrun too). In fp32 the runs agree to ~1e-6.
EXACT = [
    "train.amp=off",
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
    (the sync_bn case below covers BatchNorm models)."""

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
    if "bn_free" not in MODELS:  # only in this child: the test registry stays unchanged
        MODELS.register("bn_free")(BNFree)
    # dynamo and AOTAutograd as on a GPU, without inductor's minutes of C++ compilation on CPU
    speed.COMPILE_OPTIONS = {"backend": "aot_eager"}
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
    return [{k: r[k] for k in ("loss", "ce", "mse", "kl_adv")} for r in read_metrics(run, "step")]


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


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.BatchNorm1d(16, affine=False),
        nn.Linear(16, 3),
    )


def _bn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 2, 4, 4, generator=g) * 3 + 1, torch.randn(10, 3, generator=g)


def _sync_bn_worker(rank: int, world: int, port: int, out: str, sync: bool) -> None:
    """Rank r runs its half of the batch through the net (BN converted if `sync`) and saves its
    output, input gradient, parameter gradients and running statistics."""
    torch.set_num_threads(1)
    dist_env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.update(dist_env)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        net = _bn_net()
        if sync:
            distributed.convert_gloo_sync_batchnorm(net, torch.distributed.new_group())
        x, w = _bn_batch()
        x = x.chunk(world)[rank].clone().requires_grad_()
        y = net(x)
        (y * w.chunk(world)[rank]).sum().backward()
        grads = {f"grad.{n}": p.grad for n, p in net.named_parameters()}
        torch.save({"y": y.detach(), "dx": x.grad, **grads, **net.state_dict()}, f"{out}/{rank}.pt")
    finally:
        distributed.cleanup()


def _one_process_bn() -> dict[str, torch.Tensor]:
    net = _bn_net()
    x, w = _bn_batch()
    x.requires_grad_()
    y = net(x)
    (y * w).sum().backward()
    grads = {f"grad.{n}": p.grad for n, p in net.named_parameters()}
    return {"y": y.detach(), "dx": x.grad, **grads, **net.state_dict()}


@pytest.mark.parametrize("sync", [True, False], ids=["gloo-sync-bn", "plain-bn"])
def test_gloo_sync_batchnorm_is_one_batchnorm_over_the_global_batch(tmp_path, sync):
    """Outputs, input gradients, summed parameter gradients and running statistics of 2 ranks
    equal one process's on the whole batch; plain BN (the control) does not."""
    mp.spawn(_sync_bn_worker, args=(2, free_port(), str(tmp_path), sync), nprocs=2)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    want = _one_process_bn()
    got = {k: torch.cat([r[k] for r in ranks]) for k in ("y", "dx")}
    got |= {k: ranks[0][k] + ranks[1][k] for k in want if k.startswith("grad.")}
    got |= {k: ranks[0][k] for k in want if k.startswith(("1.", "4.")) and "running" in k}
    close = all(torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-5) for k in got)
    assert close == sync
    if sync:
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
        assert torch.equal(ranks[0]["1.running_var"], ranks[1]["1.running_var"])


def test_gloo_sync_batchnorm_is_batchnorm_in_one_process_and_in_eval():
    net = _bn_net()
    x, _ = _bn_batch()
    want = net(x)
    synced = distributed.convert_gloo_sync_batchnorm(_bn_net())
    assert isinstance(synced[1], distributed.GlooSyncBatchNorm)
    assert synced.state_dict().keys() == net.state_dict().keys()  # checkpoints unchanged
    torch.testing.assert_close(synced(x), want)
    torch.testing.assert_close(synced.eval()(x), net.eval()(x))


# AWP: every rank must add the same perturbation (from the global batch's gradient), or the
# ranks' weights drift apart through weight decay and the step is not the global-batch step.
# beta=20: D2R's |K1 - K2| must be taken of the global batch's gap, not averaged per shard.
VARIANTS = {
    "plain": [],
    "awp": ["method.awp_gamma=5e-3"],
    "sym-abs": ["method.beta=20"],
    "sym-sign": ["method.beta=20", "method.sym_rule=sign"],
    "sync-bn": [
        *["train.sync_bn=true", "target.name=small_cnn", "guide.name=tiny_cnn"],
        "method.beta=20",
    ],
    "compile": ["train.compile=on", "method.beta=20"],
    # every rank keeps the same EMA; each takes its slice of the generated images too
    "ema-generated": [
        *["train.ema_decay=0.9", "data.extra={npz}", "data.extra_fraction=0.5"],
        "method.beta=20",
    ],
}


def _train_variants(rank: int, world: int, ports: list[int], out: str, variants: dict) -> None:
    """Every variant's run, one after another in the same processes (one interpreter start
    for all of them: most of a tiny run's time), each with its own process group."""
    for port, (name, extra) in zip(ports, variants.items(), strict=True):
        _train_worker(rank, world, port, f"{out}/{name}", extra)


@pytest.fixture(scope="module")
def variant_runs(tmp_path_factory) -> Path:
    """one/<variant>: a single process on the whole batch; two/<variant>: 2 ranks on halves."""
    from test_recipe import write_npz

    root = tmp_path_factory.mktemp("ddp")
    npz = write_npz(root / "generated.npz", n=64)
    variants = {k: [item.format(npz=npz) for item in v] for k, v in VARIANTS.items()}
    mp.spawn(_train_variants, args=(1, [0] * len(variants), str(root / "one"), variants))
    ports = [free_port() for _ in variants]
    mp.spawn(_train_variants, args=(2, ports, str(root / "two"), variants), nprocs=2)
    return root


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_processes_match_one_on_the_same_global_batch(variant_runs, variant):
    one, two = variant_runs / "one" / variant, variant_runs / "two" / variant
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
    assert env["fast_path"]["compile"] == (variant == "compile")


def test_torchrun_two_processes_then_resume_with_one(tmp_path):
    """`torchrun -m d2r train` with the default (BatchNorm) models, then `--resume` in one
    process: checkpoints hold the unwrapped state, so the number of processes may change."""
    out = tmp_path / "run"
    sets = ["train.epochs=1", "data.train_subset=256", "eval.subset=64"]
    done = subprocess.run(
        _torchrun(out, sets), env=_worker_env(), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 alone prints (-q: its last line)
    assert main(["train", "--resume", str(out), "--set", "train.epochs=2", "-q"]) == 0
    epochs = read_metrics(out, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert all(0 <= r["robust_acc"] <= 1 for r in epochs)


def test_torchrun_with_one_process_runs_ddp_and_matches_a_plain_process(tmp_path):
    """Under torchrun a single process is distributed too (process group, DDP, SyncBatchNorm):
    all of the N-GPU path that one GPU allows (test_cuda runs it on NCCL). Its steps are a
    plain process's (eps=0; BatchNorm synchronized over one process is BatchNorm)."""
    sets = [*EXACT, "train.sync_bn=true", "target.name=small_cnn", "guide.name=tiny_cnn"]
    sets.append("method.beta=20")
    plain, launched = tmp_path / "plain", tmp_path / "launched"
    assert main(["train", "-q", "--out", str(plain), *_set_args(sets)]) == 0
    done = subprocess.run(
        torchrun_worker(launched, sets), env=_worker_env(), capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    wrapped = json.loads((launched / "wrapped.json").read_text())
    assert wrapped == {
        "model": "DistributedDataParallel",
        "backend": "gloo",
        "norms": ["GlooSyncBatchNorm"],
    }
    ref, got = _step_losses(plain), _step_losses(launched)
    assert len(ref) == len(got) == 4
    for r, g in zip(ref, got, strict=True):
        assert g == pytest.approx(r, rel=1e-4, abs=1e-6)


def torchrun_worker(out: Path, sets: list[str], nproc: int = 1) -> list[str]:
    """The command of tests/torchrun_worker.py under torchrun (records how it was wrapped)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    worker = Path(__file__).with_name("torchrun_worker.py")
    return [*cmd, f"--master_port={free_port()}", str(worker), str(out), *sets]


def _set_args(sets: list[str]) -> list[str]:
    return [a for kv in sets for a in ("--set", kv)]


def _torchrun(out: Path, sets: list[str], nproc: int = 2) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += [f"--master_port={free_port()}", "-m", "d2r", "train", "-q", "--out", str(out)]
    return cmd + _set_args(sets)


def _worker_env() -> dict[str, str]:
    path = SRC + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _logged_steps(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").is_file():
        return []
    return [r["step"] for r in read_metrics(run, "step")]  # a torn last line is skipped


def _worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (from /proc: Linux only)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker with RANK={rank} under pid {torchrun_pid}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("whom", ["torchrun", "rank1"])
def test_sigterm_stops_every_rank_after_the_same_step_and_resumes_exactly(tmp_path, whom):
    """SIGTERM to torchrun (which passes it to each worker, each seeing it at its own moment) or
    to one worker alone: the ranks agree in the step's one all-reduce to stop after the same
    step (a rank stopping alone leaves the others hanging in the next all-reduce), rank 0
    checkpoints it, and a resume in one process ends with the weights of an uninterrupted run
    (BatchNorm models under sync_bn; eps=0, so the ranks' attack noise plays no part)."""
    sets = [
        *[kv for kv in EXACT if not kv.startswith(("target.", "guide.", "train.epochs"))],
        "train.epochs=3",
        "data.train_subset=192",
        "method.beta=20",
        "train.sync_bn=true",
    ]
    reference = tmp_path / "reference"
    assert main(["train", "-q", "--out", str(reference), *_set_args(sets)]) == 0
    out = tmp_path / "run"
    proc = subprocess.Popen(
        _torchrun(out, sets), env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    while max(_logged_steps(out), default=0) < 4:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    os.kill(proc.pid if whom == "torchrun" else _worker_pid(proc.pid, 1), signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode != 0 and f"d2r train --resume {out}" in err, err[-3000:]
    _, meta = load(out / "last.safetensors")
    assert meta["step"] == max(_logged_steps(out)) < 18  # the checkpoint is the last step
    assert main(["train", "--resume", str(out), "-q"]) == 0
    assert _logged_steps(out) == list(range(1, 19))  # each step once
    want, _ = load(reference / "last.safetensors")
    have, _ = load(out / "last.safetensors")
    for k in [k for k in want if k.startswith(("target.", "guide."))]:
        torch.testing.assert_close(have[k], want[k], rtol=1e-3, atol=1e-4)
