"""The parts of benchmarks/gpu_check.py: each takes a Context and returns its figures (a
flat dict), or raises Skip. gpu_check.py runs each in a forked child with a time budget.
Full size: WRN-34-10 + ResNet-18 on synthetic CIFAR-10; smoke size: small_cnn + tiny_cnn on
synthetic digits (1x8x8) or 3x8x8 random images, on the CPU."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_EPOCH_S = 90  # issue 17: one epoch of D2R-CAG WRN-34-10 + ResNet-18 on one H100


@dataclass(frozen=True)
class Context:
    """What every part is told: its device, the smoke size or not, a scratch directory."""

    device: str
    smoke: bool
    work: Path

    @property
    def like(self) -> str:
        """The real set the synthetic data mimics: CIFAR-10, or 1x8x8 digits for the smoke."""
        return "digits" if self.smoke else "cifar10"


class Skip(Exception):
    """A part that cannot run here (e.g. an optional package is missing)."""


def part_env(ctx: Context) -> dict:
    import torch

    from common import machine
    from d2r.distributed import pick_device
    from d2r.runs import environment

    device = pick_device(ctx.device)
    info = {k: v for k, v in environment(device).items() if k not in ("argv", "started")}
    info |= machine(device)  # the CPU's model name too, not only platform.processor()
    info.update(cuda=torch.version.cuda, cpus=os.cpu_count())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        try:
            nccl = torch.cuda.nccl.version()  # a tuple in recent torch, an int in older ones
        except (AttributeError, RuntimeError):  # a build without NCCL
            nccl = None
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
            driver=_driver(),
        )
    return info


def _driver() -> str | None:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def _step_part(ctx: Context, amp: str, channels_last: str, compile: str) -> dict:
    import memory
    import step_overhead
    from common import add_model_args, build, sync, training_step

    parser = argparse.ArgumentParser()
    add_model_args(parser, batch=128, shape="3,32,32")
    size = ["small_cnn", "tiny_cnn", "8", "3,8,8"] if ctx.smoke else ["wrn34_10", "resnet18"]
    argv = ["--target", size[0], "--guide", size[1], "--device", ctx.device]
    argv += ["--batch", size[2], "--shape", size[3]] if ctx.smoke else []
    flags = ["--amp", amp, "--channels-last", channels_last, "--compile", compile]
    args = parser.parse_args([*argv, *flags])
    method, x, y, fast = build(args)
    start = time.perf_counter()
    training_step(method, fast, x, y)()  # compiles, when compile is on
    sync(x.device)
    first = time.perf_counter() - start
    figures = step_overhead.measure(method, x, y, fast, *((1, 1) if ctx.smoke else (5, 1)))
    figures |= memory.peak_memory(training_step(method, fast, x, y), x.device)
    params = sum(p.numel() for p in method.parameters())
    return {
        **figures,
        "images_per_s": round(args.batch / figures["step_ms"] * 1e3, 1),
        "first_step_s": round(first, 2),
        **{"target": args.target, "guide": args.guide, "batch": args.batch},
        "parameters_m": round(params / 1e6, 2),
        **fast.describe(),
    }


def part_epoch(ctx: Context) -> dict:
    import d2r
    from d2r.data.synthetic import SPLIT_SIZES

    sets = {"data.name": "synthetic", "data.like": ctx.like, "train.epochs": 1}
    sets |= {"train.device": ctx.device, "train.checkpoint_minutes": 0, "train.log_every": 20}
    sets |= {"eval.subset": 128, "eval.batch_size": 128}
    if ctx.smoke:
        sets |= {"target.name": "small_cnn", "guide.name": "tiny_cnn", "method.steps": 2}
        sets |= {"data.train_subset": 64, "data.batch_size": 32, "train.log_every": 1}
        sets |= {"eval.subset": 32, "eval.batch_size": 32}
    out = ctx.work / "epoch"
    clock = StepClock(out / "metrics.jsonl")
    start = time.perf_counter()
    with clock:
        run = d2r.train(ROOT / "configs/cifar10/d2r_cag.yaml", out=out, overrides=sets, quiet=True)
    final, env = run.final, json.loads((out / "env.json").read_text())
    steady = clock.seconds_per_step()
    images = run.config.data.train_subset or SPLIT_SIZES[ctx.like][0]
    steady_s = steady * final["step"] if steady else None
    seconds = {"mfu": steady_s, "mfu_epoch_s": final["seconds"]}
    return {
        "epoch_s": round(final["seconds"], 3),  # a smoke epoch of 2 steps can take < 0.05 s
        "steady_epoch_s": round(steady_s, 3) if steady_s else None,
        **epoch_mfu(run.config, env["device_name"], seconds),
        "goal_s": GOAL_EPOCH_S,
        "steps": final["step"],
        "images": images,
        "run_wall_s": round(time.perf_counter() - start, 1),
        **{k: round(final[k], 4) for k in ("loss", "clean_acc", "robust_acc") if k in final},
        **{"target": run.config.target["name"], "guide": run.config.guide["name"]},
        **env["fast_path"],
    }


def epoch_mfu(cfg, device_name: str, seconds: dict) -> dict:
    """Model-FLOP utilization of each epoch figure: `d2r plan`'s FLOPs of the epoch's training
    steps / (seconds x the GPU's dense bf16 peak, d2r.plan.PEAK_FLOPS); None for a device
    not in that table (the smoke's CPU). `d2r plan --gpu-check results.json` reads "mfu"."""
    from d2r import plan

    flops, peak = plan.epoch_flops(cfg), plan.peak_for_gpu(device_name)
    out = {"flops_per_epoch": flops, "peak_flops": peak}
    for key, s in seconds.items():
        out[key] = round(flops / (s * peak), 4) if peak and s else None
    return out


class StepClock:
    """Notes when each step line appears in metrics.jsonl (polled by a thread every 20 ms), so
    the steady step time excludes the first steps' compilation."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path, self.seen = path, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> StepClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            try:
                lines = self.path.read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                if '"kind": "step"' in line and line.endswith("}"):
                    step = json.loads(line)["step"]
                    self.seen.setdefault(step, time.perf_counter())

    def seconds_per_step(self) -> float | None:
        if len(self.seen) < 2:
            return None
        (s0, t0), (s1, t1) = min(self.seen.items()), max(self.seen.items())
        return (t1 - t0) / (s1 - s0)


def _eval_part(ctx: Context, attack: str, n: int) -> dict:
    import torch

    import d2r
    from d2r import data
    from d2r.attacks import AutoAttack, from_name
    from d2r.models import MODELS
    from d2r.runs import load_run

    run_dir = ctx.work / "epoch"
    if (run_dir / "last.safetensors").is_file():
        model, source = load_run(run_dir)[1].target, "the epoch part's model (one epoch)"
    else:
        torch.manual_seed(0)
        arch = "small_cnn" if ctx.smoke else "wrn34_10"
        channels = data.info("synthetic", ctx.like).channels
        model = MODELS.create(arch, num_classes=10, in_channels=channels).eval()
        source = "random init"
    x, y = data.load("synthetic", "", "test", like=ctx.like)
    suite = {attack: from_name(attack, 8 / 255)}
    if ctx.smoke and attack == "aa":  # APGD-CE alone: the adapter's path in a second, not 20
        suite[attack] = AutoAttack(8 / 255, version="custom", attacks=("apgd-ce",))
    try:
        result = d2r.evaluate(
            model.to(ctx.device), x[:n], y[:n], attacks=suite, eps=8 / 255,
            batch_size=min(n, 500), device=ctx.device, checks=False,
        )  # fmt: skip
    except ImportError as error:  # AutoAttack's optional package
        raise Skip(str(error)) from None
    seconds = result["seconds"][attack]
    return {
        "seconds": round(seconds, 2),
        "images": n,
        "images_per_s": round(n / seconds, 1),
        "clean": round(result["clean"], 4),
        attack: round(result[attack], 4),
        "eps": "8/255",
        "model": source,
    }


def part_vs_naive(ctx: Context) -> dict:
    from vs_naive import compare

    sets = [
        "data.name=synthetic",
        f"data.like={ctx.like}",
        "method.eps=0.031",
        "method.step_size=0.007",
    ]
    if ctx.smoke:
        sets += ["data.train_subset=64", "data.batch_size=32", "method.steps=2"]
        return compare(sets, ctx.device, epochs=1, workers=0)
    sets += ["data.train_subset=1280", "target.name=wrn34_10", "guide.name=resnet18"]
    return compare(sets, ctx.device, epochs=1, workers=min(8, os.cpu_count() or 1))


def part_generated_data(ctx: Context) -> dict:
    """The loader with 70 % generated images per batch (memory-mapped .npz, read ahead into
    pinned memory, copied asynchronously) against the real set alone, on the GPU."""
    from d2r.distributed import pick_device
    from generated_data import measure

    where = {"device": pick_device(ctx.device), "directory": str(ctx.work)}
    if ctx.smoke:
        return measure(768, 512, batches=3, repeats=1, **where)
    return measure(20000, 50000, batches=100, repeats=3, **where)


PART_FUNCTIONS = {
    "env": part_env,
    "step_fp32": lambda ctx: _step_part(ctx, "off", "off", "off"),
    "step_fast": lambda ctx: _step_part(ctx, "auto", "auto", "auto"),
    "step_bf16_eager": lambda ctx: _step_part(ctx, "bf16", "on", "off"),
    "epoch": part_epoch,
    "pgd": lambda ctx: _eval_part(ctx, "pgd20", 32 if ctx.smoke else 1000),
    "autoattack": lambda ctx: _eval_part(ctx, "aa", 8 if ctx.smoke else 1000),
    "vs_naive": part_vs_naive,
    "generated_data": part_generated_data,
}
