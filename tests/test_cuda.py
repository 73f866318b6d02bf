"""What only a CUDA GPU can check: the fast path's numerics (bf16, channels_last, compile), no
recompilation, fused SGD's on-device skip, the pinned read-back of the step's flags, evaluation
and checkpoints across devices, and DDP on NCCL under torchrun. `pytest -m cuda` selects them;
without CUDA each is skipped with the reason. `benchmarks/gpu_check.py` runs them first.

Models are the small ones on synthetic CIFAR-10-shaped data (3x32x32), so the whole file should
take about two minutes on one H100, most of it compiling (an estimate: no GPU has run it yet);
the compiled tests come last. Comparisons that claim fp32 agreement turn
TF32 off (the `fp32` fixture): cuDNN convolutions default to TF32 on Ampere and later GPUs."""

import copy
import json
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F

import d2r
from d2r import data, guard, speed
from d2r.attacks import PGD
from d2r.cli import main
from d2r.config import resolve
from d2r.data import DeviceLoader, synthetic
from d2r.logs import read_metrics
from d2r.models import MODELS
from d2r.runs import build_method
from test_ddp import _set_args, _worker_env, torchrun_worker

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine",
    ),
]
CUDA = torch.device("cuda")
# synthetic CIFAR-10 shape, small models, the paper's CIFAR attack budget
SMALL = [
    "data.name=synthetic",
    "data.like=cifar10",
    "target.name=small_cnn",
    "guide.name=tiny_cnn",
    "method.eps=8/255",
    "method.step_size=2/255",
    "train.checkpoint_minutes=0",
]


@pytest.fixture
def fp32():
    """True fp32 for comparisons: no TF32 in cuDNN convolutions or matmuls."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def fast_path(amp="off", channels_last="off", compile="off", optimizer_impl="auto"):
    flags = [f"train.amp={amp}", f"train.channels_last={channels_last}"]
    flags += [f"train.compile={compile}", f"train.optimizer_impl={optimizer_impl}"]
    return speed.resolve(resolve(None, flags).train, CUDA)


def batch(n=64, split="train"):
    x, y = synthetic.generate("cifar10", split, n=n)
    return torch.from_numpy(x).to(CUDA).float() / 255, torch.from_numpy(y).to(CUDA)


def make_method(*sets):
    """D2R-CAG (10 CAG steps) on small_cnn + tiny_cnn, seeded (the same weights for any
    `sets` that leave the models alone), on the GPU."""
    torch.manual_seed(0)
    cfg = resolve(None, [*SMALL, *sets])
    return build_method(cfg, data.info("synthetic", "cifar10")).to(CUDA)


@pytest.fixture(scope="module")
def method():
    return make_method()


def step(method, fast, x, y, backward=False):
    """A copy of `method` under `fast`: the loss dict of one D2R-CAG forward (same CAG start
    noise every call), and with `backward` the gradients of both models."""
    method = copy.deepcopy(method)
    fast.prepare(method.models().values())
    method.train()
    torch.manual_seed(1)
    with fast.autocast():
        out = method(fast.batch(x), y)
    grads = None
    if backward:
        out["loss"].backward()
        grads = torch.cat([p.grad.flatten() for p in method.parameters()])
    return {k: v.detach().float() for k, v in out.items()}, grads


# ---------------------------------------------------------------------------------------------
# the fast path's numerics


def test_bf16_autocast_step_is_finite_and_close_to_fp32(method, fp32):
    x, y = batch()
    ref, ref_grad = step(method, fast_path(), x, y, backward=True)
    out, grad = step(method, fast_path(amp="bf16"), x, y, backward=True)
    assert all(torch.isfinite(v) for v in out.values()) and torch.isfinite(grad).all()
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=0.03)
    assert out["ce"].item() == pytest.approx(ref["ce"].item(), rel=0.03)
    assert F.cosine_similarity(grad, ref_grad, dim=0) > 0.9  # the same direction of descent


# ---------------------------------------------------------------------------------------------
# the step's update and flags


class _GivenLoss:
    """In the method's place in the trainer's step: returns the given loss, has no AWP."""

    def __init__(self, loss):
        self.loss = loss

    def __call__(self, x, y):
        return {"loss": self.loss}

    def after_step(self):
        pass


def _update(fast, optimizer, loss):
    """The trainer's update (d2r.trainer.train_step): backward and SGD step, skipped when the
    loss is not finite (fused SGD is told through found_inf and skips on the device)."""
    from d2r.guard import StepGuard
    from d2r.trainer import train_step

    method, x = _GivenLoss(loss), torch.zeros(1, device=loss.device)
    train_step(method, method, optimizer, fast, StepGuard(loss.device, "skip"), x, None)


def _state(model, optimizer):
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    return params, buffers


def _same(a, b):
    return all(torch.equal(u, v) for u, v in zip(a[0] + a[1], b[0] + b[1], strict=True))


def test_fused_sgd_skips_a_non_finite_step_leaving_weights_and_momentum_exactly():
    fast = fast_path(optimizer_impl="fused")
    assert fast.skips_on_device
    torch.manual_seed(0)
    model = MODELS.create("small_cnn", num_classes=10, in_channels=3).to(CUDA)
    reference = copy.deepcopy(model)
    optimizer = fast.sgd(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = batch()

    def loss(net, scale):
        return F.cross_entropy(net(x), y) * scale

    start = _state(model, optimizer)
    _update(fast, optimizer, loss(model, float("nan")))  # the very first step: skipped
    assert _same(_state(model, optimizer), start)  # momentum still exactly zero
    _update(fast, optimizer, loss(model, 1.0))
    ref_optimizer = fast.sgd(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    _update(fast, ref_optimizer, loss(reference, 1.0))  # as if the NaN step never happened
    for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    moved = _state(model, optimizer)
    assert not _same(moved, start)
    _update(fast, optimizer, loss(model, float("inf")))  # a later step: skipped too
    assert _same(_state(model, optimizer), moved)
    _update(fast, optimizer, loss(model, 1.0))
    assert not _same(_state(model, optimizer), moved)


def test_step_flags_are_read_back_through_pinned_memory_without_waiting_for_later_work():
    """The host reads the flags from pinned memory once their copy is done, not after the
    work queued behind them (here a ~0.5 s spin kernel, in place of the backward pass)."""
    loss = torch.tensor(float("nan"), device=CUDA) * torch.ones((), device=CUDA)
    bad = (~torch.isfinite(loss)).float()
    flags = guard.DeviceFlags(torch.stack([bad, bad.new_full((), 15.0)]))
    assert flags._host.is_pinned()
    torch.cuda._sleep(1_000_000_000)  # ~0.5 s at ~2 GHz, queued after the flags' copy
    start = time.perf_counter()
    values = flags.values()
    read = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    assert values == [1.0, 15.0]
    assert total > 0.05 and read < total / 2, (read, total)


def test_device_loader_gives_the_same_batches_on_cuda_and_cpu_and_resumes_across():
    x, y = (torch.from_numpy(a) for a in synthetic.generate("cifar10", "train", n=300))
    options = {"crop_padding": 4, "flip": True, "seed": 3}
    on_gpu = DeviceLoader(x, y, 64, device=CUDA, **options)
    on_cpu = DeviceLoader(x, y, 64, device="cpu", **options)
    for (xg, yg), (xc, yc) in zip(on_gpu, on_cpu, strict=True):
        assert torch.equal(xg.cpu(), xc) and torch.equal(yg.cpu(), yc)
    iterator = iter(on_gpu)
    next(iterator)  # one batch of the second epoch, then resume on the CPU
    resumed = DeviceLoader(x, y, 64, device="cpu", **options)
    resumed.load_state_dict(on_gpu.state_dict())
    for (xg, _), (xc, _) in zip(iterator, resumed, strict=True):
        assert torch.equal(xg.cpu(), xc)


# ---------------------------------------------------------------------------------------------
# evaluation and checkpoints across devices


def _dict(sets):
    return dict(item.split("=", 1) for item in sets)


DIGITS = [  # a small model that learns something in one CPU epoch (43 % clean on a CPU)
    "data.name=synthetic",
    "data.like=digits",
    "data.test_subset=300",
    "method.steps=3",
    "train.epochs=1",
    "train.warmup_factor=1.0",
    "eval.attack=pgd5",
    "train.checkpoint_minutes=0",
]


def test_evaluate_on_cuda_matches_cpu(tmp_path, fp32):
    """d2r.evaluate of one fixed model on 300 images: the same clean accuracy, and each attack
    (deterministic starts) within one image."""
    sets = _dict([*DIGITS, "train.device=cpu"])
    run = d2r.train(out=tmp_path / "run", overrides=sets, quiet=True)
    x, y = data.load("synthetic", "", "test", like="digits")
    eps = 0.1
    suite = {
        "pgd20": PGD(eps=eps, step_size=eps / 4, steps=20, random_start=False),
        "cw20": PGD(eps=eps, step_size=eps / 4, steps=20, loss="cw", random_start=False),
    }
    target = run.method.target.eval()
    results = {}
    for device in ("cpu", "cuda"):
        model = copy.deepcopy(target).to(device)
        results[device] = d2r.evaluate(model, x, y, suite, eps=eps, device=device, checks=False)
    cpu, gpu = results["cpu"], results["cuda"]
    assert 0.2 < cpu["clean"] == gpu["clean"], (cpu["clean"], gpu["clean"])
    for name in ("pgd20", "cw20", "worst_case"):
        assert abs(cpu[name] - gpu[name]) * len(y) <= 1 + 1e-6, (name, cpu[name], gpu[name])


@pytest.mark.parametrize(("first", "then"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_written_on_one_device_resumes_on_the_other(tmp_path, fp32, first, then):
    """One epoch on `first`, resumed for a second on `then`: the resumed epoch sees the same
    batches from the same weights and momentum as an uninterrupted run on `first`, so its mean
    loss agrees to 2 % (fp32; only the CAG start noise comes from another generator)."""
    sets = [*DIGITS, "train.amp=off", "train.channels_last=off", "train.compile=off"]
    whole = tmp_path / "whole"
    whole_sets = _dict([*sets, "train.epochs=2", f"train.device={first}"])
    d2r.train(out=whole, overrides=whole_sets, quiet=True)
    out = tmp_path / "run"
    d2r.train(out=out, overrides=_dict([*sets, f"train.device={first}"]), quiet=True)
    args = ["train", "--resume", str(out), "--set", "train.epochs=2", "-q"]
    assert main([*args, "--set", f"train.device={then}"]) == 0
    epochs = read_metrics(out, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert json.loads((out / "env.json").read_text())["resumes"][0]["device"].startswith(then)
    want = read_metrics(whole, "epoch")[1]
    assert epochs[1]["loss"] == pytest.approx(want["loss"], rel=0.02), (epochs[1], want)
    assert 0 <= epochs[1]["clean_acc"] <= 1


# ---------------------------------------------------------------------------------------------
# DDP on NCCL


def test_torchrun_one_process_on_nccl_with_sync_batchnorm_matches_a_plain_run(tmp_path):
    """`torchrun --nproc_per_node=1` (all one GPU allows): NCCL, DDP and torch's SyncBatchNorm,
    with the same step losses as a plain process (eps=0, so the attack noise plays no part)."""
    sets = [*SMALL, "data.train_subset=256", "data.batch_size=64", "train.epochs=1"]
    sets += ["train.log_every=1", "eval.subset=64", "eval.attack=pgd2", "method.eps=0"]
    sets += ["train.sync_bn=true", "train.device=cuda", "train.compile=off"]
    plain, launched = tmp_path / "plain", tmp_path / "launched"
    assert main(["train", "-q", "--out", str(plain), *_set_args(sets)]) == 0
    done = subprocess.run(
        torchrun_worker(launched, sets), env=_worker_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    wrapped = json.loads((launched / "wrapped.json").read_text())
    assert wrapped == {
        "model": "DistributedDataParallel",
        "backend": "nccl",
        "norms": ["SyncBatchNorm"],
    }
    keys = ("loss", "ce", "mse", "kl_adv")
    ref = [{k: r[k] for k in keys} for r in read_metrics(plain, "step")]
    got = [{k: r[k] for k in keys} for r in read_metrics(launched, "step")]
    assert len(ref) == len(got) == 4
    for r, g in zip(ref, got, strict=True):
        assert g == pytest.approx(r, rel=1e-3, abs=1e-5)


# ---------------------------------------------------------------------------------------------
# compiled (last: most of this file's time is inductor compiling)


def test_channels_last_and_compile_match_eager(method, fp32):
    """channels_last, and compiled (inductor) with channels_last, against eager NCHW: eval-mode
    logits to 1e-4 and the training loss without attack (eps=0) to 1e-4; with the 10-step CAG
    attack to 1e-2, because a rounding difference in an input gradient near zero flips its sign
    and moves that pixel by two steps (on a CPU, channels_last alone: logits equal to 2e-8, the
    loss 3e-4 apart). CUDA's default (every flag on, bf16): within bf16's 3 %."""
    x, y = batch()
    no_attack = make_method("method.eps=0")
    ref, ref_no_attack = step(method, fast_path(), x, y)[0], step(no_attack, fast_path(), x, y)[0]
    target = copy.deepcopy(method.target).eval()
    with torch.no_grad():
        ref_logits = target(x)
    variants = {  # (compile alone: the same graphs in the other memory format, not worth it)
        "channels_last": fast_path(channels_last="on"),
        "channels_last+compile": fast_path(channels_last="on", compile="on"),
    }
    for name, fast in variants.items():
        out = step(no_attack, fast, x, y)[0]
        assert out["loss"].item() == pytest.approx(ref_no_attack["loss"].item(), rel=1e-4), name
        out = step(method, fast, x, y)[0]
        assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=1e-2), name
        model = copy.deepcopy(method.target).eval()
        fast.prepare([model])
        with torch.no_grad():
            logits = model(fast.batch(x))
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4, msg=name)
    auto = speed.resolve(resolve(None, []).train, CUDA)
    assert (auto.amp, auto.channels_last, auto.compile) == (True, True, True)
    out, _ = step(method, auto, x, y)
    assert torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(ref["loss"].item(), rel=0.03)


def test_compiled_training_does_not_recompile_after_its_first_batches(tmp_path):
    """Every step runs both models in eval mode (attack) and train mode (loss), and each epoch
    ends with an fp32 evaluation. Two runs of d2r.train, 4 and 8 batches of the same size, must
    compile the same number of graphs: batches 5 to 8 compile nothing."""
    import torch._dynamo

    graphs = {}
    for batches in (4, 8):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        sets = [*SMALL, f"data.train_subset={64 * batches}", "data.batch_size=64"]
        sets += ["train.epochs=1", "train.compile=on", "eval.subset=64", "eval.batch_size=64"]
        sets += ["eval.attack=pgd5", "train.device=cuda"]
        run = d2r.train(out=tmp_path / str(batches), overrides=_dict(sets), quiet=True)
        assert torch.isfinite(torch.tensor(run.final["loss"]))
        graphs[batches] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert graphs[4] > 0 and graphs[8] == graphs[4], graphs
