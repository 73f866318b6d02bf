"""Shared by the benchmarks: the D2R-CAG method on random data, the trainer's fast path, timing."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from d2r import speed
from d2r.config import TrainConfig
from d2r.distributed import pick_device
from d2r.guard import StepGuard
from d2r.methods import METHODS, Method
from d2r.models import MODELS
from d2r.trainer import train_step


def add_model_args(parser: argparse.ArgumentParser, batch: int, shape: str) -> None:
    """Small CPU defaults; for the paper's GPU sizes pass e.g. --target wrn34_10 --guide resnet18
    --shape 3,32,32 --batch 128 --device cuda."""
    parser.add_argument("--target", default="small_cnn")
    parser.add_argument("--guide", default="tiny_cnn")
    parser.add_argument("--shape", default=shape, help="C,H,W of the random images")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--device", default="auto")
    for flag in ("amp", "channels_last", "compile"):
        parser.add_argument(
            f"--{flag.replace('_', '-')}",
            default="auto",
            help="auto | on | off (amp: auto | bf16 | off), as train.* flags",
        )


def build(args: argparse.Namespace) -> tuple[Method, torch.Tensor, torch.Tensor, speed.FastPath]:
    """D2R-CAG (the paper's defaults: 10 CAG steps) with the fast path resolved as the trainer
    does, and one random batch on the device."""
    device = pick_device(args.device)
    c, h, w = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    sizes = {"num_classes": args.classes, "in_channels": c}
    target = MODELS.create(args.target, **sizes)
    guide = MODELS.create(args.guide, **sizes)
    method = METHODS.create("d2r", target, guide).to(device)
    flags = TrainConfig(amp=args.amp, channels_last=args.channels_last, compile=args.compile)
    fast = speed.resolve(flags, device)
    fast.prepare(method.models().values())
    x = torch.rand(args.batch, c, h, w, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    return method, fast.batch(x), y, fast


def training_step(method: Method, fast: speed.FastPath, x: torch.Tensor, y: torch.Tensor):
    """One full D2R-CAG step as the Trainer takes it (d2r.trainer.train_step: attack, loss,
    the step's flags, backward, SGD), then the flags read (one process)."""
    optimizer = fast.sgd(method.parameters(), lr=0.01, momentum=0.9)
    checks = StepGuard(x.device, nonfinite="stop")

    def step() -> None:
        method.train()
        _, flags = train_step(method, method, optimizer, fast, checks, x, y)
        checks.finite(flags)  # the trainer's one read per step

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_median(fns: dict[str, Callable[[], None]], repeats: int, device) -> dict:
    """Median seconds of each function, run in alternation so that the noise of a shared
    machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine(device: torch.device) -> dict[str, str | int]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def print_figures(
    benchmark: str, figures: dict, args: argparse.Namespace, fast: speed.FastPath, device
) -> None:
    """The one JSON line a benchmark prints: its figures, then the models, flags and machine."""
    models = {"target": args.target, "guide": args.guide, "shape": args.shape, "batch": args.batch}
    line = {"benchmark": benchmark, **figures, **models, **fast.describe(), **machine(device)}
    print(json.dumps(line))
