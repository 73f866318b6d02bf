"""What a config or a study costs before the first GPU hour: the FLOPs of one whole training
step per image (the method's forward with its attack, the backward, the optimizer step;
`trainer.train_step` itself, counted by `d2r.flops` on the meta device at batch COUNT_BATCH and
scaled linearly to the config's batch), of the per-epoch checks, and of a study's evaluation
suite (PGD/CW exactly; AutoAttack as the upper bound its iteration counts give); then the time
they take at a GPU's dense bf16 peak, and at a measured model-FLOP utilization where one exists.
No data set is read: only its split sizes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2r import data, speed
from d2r.attacks import AutoAttack, from_name
from d2r.config import Config, apply_overrides, from_dict, load_yaml, resolve, to_dict
from d2r.data.synthetic import SPLIT_SIZES
from d2r.flops import Count, count
from d2r.guard import DeviceFlags, StepGuard
from d2r.measure import seeded
from d2r.methods import eval_mode
from d2r.runs import build_method, eval_eps, eval_norm
from d2r.sweep.spec import cells
from d2r.tables import markdown
from d2r.trainer import train_step

COUNT_BATCH = 2  # every counted op's FLOPs are linear in the batch: count small, scale up

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, and where each figure comes from.
PEAK_FLOPS: dict[str, tuple[float, str]] = {
    "h100": (989e12, "NVIDIA H100 SXM datasheet: BF16 tensor core 1,979 TFLOPS with sparsity"),
    "h200": (989e12, "NVIDIA H200 SXM datasheet: BF16 tensor core 1,979 TFLOPS with sparsity"),
    "a100": (312e12, "NVIDIA A100 datasheet: BF16 tensor core 312 TFLOPS (624 with sparsity)"),
    "l40s": (362e12, "NVIDIA L40S datasheet: BF16 tensor core 362.05 TFLOPS (733 with sparsity)"),
    "rtx4090": (165e12, "NVIDIA Ada Lovelace whitepaper, RTX 4090: BF16 tensor, FP32 accumulate"),
}
GPU_NAMES = {"H100": "h100", "H200": "h200", "A100": "a100", "L40S": "l40s", "4090": "rtx4090"}

# Measured MFU of the epoch figure per device, (fraction, source), from benchmarks/RESULTS.md.
# Empty: no GPU figure has been measured yet (`--gpu-check RESULTS.json` reads a new one).
MEASURED_MFU: dict[str, tuple[float, str]] = {}
NO_MFU = "no measured MFU for {device}: benchmarks/RESULTS.md has no GPU figure yet"


# Counting ---------------------------------------------------------------------------------------
class _Unread(StepGuard):
    """The step's guard without its host read (a meta tensor has no value): a finite loss."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"), "stop")

    def flags(self, loss: Tensor | None) -> DeviceFlags:
        return DeviceFlags(torch.zeros(2))


def _meta_method(cfg: Config) -> tuple[nn.Module, data.DatasetInfo]:
    info = data.section_info(cfg.data)
    with torch.device("meta"):  # no weights file is read: the shapes are all that count
        return build_method(cfg, info, initial_weights=False), info


def _batch(info: data.DatasetInfo) -> tuple[Tensor, Tensor]:
    x = torch.rand(COUNT_BATCH, info.channels, info.size, info.size, device="meta")
    return x, torch.zeros(COUNT_BATCH, dtype=torch.long, device="meta")


def step_count(cfg: Config) -> Count:
    """FLOPs of one training step per image: `trainer.train_step` on the meta device, fp32
    eager (bf16, channels_last and compile change no model FLOP), foreach SGD."""
    method, info = _meta_method(cfg)
    fast = speed.FastPath(
        "cpu", amp=False, channels_last=False, compile=False, optimizer_impl="foreach"
    )
    t = cfg.train
    params = [p for p in method.parameters() if p.requires_grad]
    hyper = {"momentum": t.momentum, "weight_decay": t.weight_decay, "nesterov": t.nesterov}
    optimizer = fast.sgd(params, lr=t.lr, **hyper)
    x, y = _batch(info)
    method.train()
    return count(lambda: train_step(method, method, optimizer, fast, _Unread(), x, y)).times(
        1 / COUNT_BATCH
    )


def attack_count(model: nn.Module, attack: Any, info: data.DatasetInfo) -> tuple[Count, bool]:
    """FLOPs per image of `attack` and the forward that reads its flags (model in eval mode),
    and whether the figure is an upper bound (AutoAttack's)."""
    x, y = _batch(info)
    if isinstance(attack, AutoAttack):
        return _autoattack_bound(model, attack, x, y, info.num_classes), True

    def run() -> None:
        with seeded(0, x.device):
            x_adv = attack(model, x, y)
        with torch.no_grad():
            model(x_adv)

    with eval_mode(model):
        return count(run).times(1 / COUNT_BATCH), False


def forward_count(model: nn.Module, x: Tensor) -> Count:
    with torch.no_grad():
        return count(lambda: model(x)).times(1 / len(x))


def gradient_count(model: nn.Module, x: Tensor, y: Tensor) -> Count:
    """A forward and the input's gradient (an attack step's passes), per image."""

    def run() -> None:
        x_in = x.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(x_in), y)
        torch.autograd.grad(loss, x_in)

    return count(run).times(1 / len(x))


def _autoattack_bound(model: nn.Module, attack: AutoAttack, x: Tensor, y: Tensor, classes: int):
    """Every image through every attack of the package's list at its full iteration counts
    (the package attacks only what is still robust, so this bounds it): APGD (n_iter + 1)
    gradient passes per restart and target, FAB-T one forward and one gradient per iteration,
    FAB (untargeted) a gradient per class, Square a forward per query; a forward after each
    attack, one for the clean check and one for d2r's flags."""
    with eval_mode(model):
        f, g = forward_count(model, x), gradient_count(model, x, y)
    b = Count(g.flops - f.flops, g.uncounted)  # the backward to the input alone
    aa = attack.build(nn.Identity())  # only its settings are read
    apgd, targeted, fab, square = aa.apgd, aa.apgd_targeted, aa.fab, aa.square
    passes = {
        "apgd-ce": g.times(apgd.n_restarts * apgd.eot_iter * (apgd.n_iter + 1)),
        "apgd-dlr": g.times(apgd.n_restarts * apgd.eot_iter * (apgd.n_iter + 1)),
        "apgd-t": g.times(targeted.n_target_classes * targeted.n_restarts * (targeted.n_iter + 1)),
        "fab-t": (g + f).times(fab.n_target_classes * fab.n_restarts * (fab.n_iter + 1)),
        "fab": (f + f + b.times(classes)).times(fab.n_restarts * (fab.n_iter + 1)),
        "square": f.times(square.n_restarts * (square.n_queries + 1)),
    }
    total = f.times(2)
    for name in aa.attacks_to_run:
        total = total + passes[name] + f
    return total


# One run ----------------------------------------------------------------------------------------
def train_images(cfg: Config) -> int:
    """Images the training split keeps: its size (d2r.data.synthetic.SPLIT_SIZES, the real sets'
    sizes) less data.val_size, then data.train_subset of them."""
    name = (
        data.sources.resolve_like(cfg.data.like) if cfg.data.name == "synthetic" else cfg.data.name
    )
    n = SPLIT_SIZES[name][0] - (cfg.data.val_size or 0)
    return min(n, cfg.data.train_subset or n)


def test_images(cfg: Config, n: int | None) -> int:
    name = (
        data.sources.resolve_like(cfg.data.like) if cfg.data.name == "synthetic" else cfg.data.name
    )
    total = SPLIT_SIZES[name][1]
    return min(total, n or total)


def epoch_images(cfg: Config) -> tuple[int, int]:
    """(steps per epoch, images per epoch) as DeviceLoader draws them: ceil(N / batch) steps,
    each of batch - extra real images and the rest generated (data.extra)."""
    n, batch = train_images(cfg), cfg.data.batch_size
    steps = math.ceil(n / batch)
    extra = int(batch * cfg.data.extra_fraction) if cfg.data.extra else 0
    return steps, min(n, steps * (batch - extra)) + steps * extra


def epoch_flops(cfg: Config) -> int:
    """The FLOPs of one epoch's training steps (what benchmarks/gpu_check.py's MFU divides)."""
    return step_count(cfg).flops * epoch_images(cfg)[1]


def checks_flops(cfg: Config, method: nn.Module, info: data.DatasetInfo) -> Count:
    """The per-epoch checks over the run: clean and eval.attack flags of the target and the
    guide's clean flags on eval.subset held-out images (the test split's without
    data.val_size), every eval.every epochs and at the last (trainer._validate)."""
    e, epochs = cfg.eval, cfg.train.epochs
    checks = sum((i + 1) % e.every == 0 or i + 1 == epochs for i in range(epochs))
    held = cfg.data.val_size or test_images(cfg, cfg.data.test_subset)
    n = min(held, e.subset or held)
    attack = from_name(e.attack, eval_eps(cfg), norm=eval_norm(cfg))
    x, _ = _batch(info)
    models = [method.target, *([method.guide] if method.uses_guide else [])]
    with eval_mode(*models):
        per_image = attack_count(method.target, attack, info)[0]
        for model in models:
            per_image = per_image + forward_count(model, x)
    return per_image.times(n * checks)


def eval_flops(cfg: Config, ev: dict[str, Any], method: nn.Module, info: data.DatasetInfo):
    """A study's evaluation of one run (`ev`: its eval settings): the clean forward and each
    attack on the test images, for each checkpoint it evaluates. d2r eval's sanity checks (a
    few attacks on 64 images) are left out."""
    target, (x, _) = method.target, _batch(info)
    images = test_images(cfg, ev.get("n"))
    checkpoints = {"both": 2, None: 2 + (cfg.train.ema_decay > 0)}.get(ev.get("checkpoint"), 1)
    with eval_mode(target):
        total = forward_count(target, x)
    attacks = {}
    for name in ev["attacks"]:
        attack = from_name(name, ev["eps"], seed=int(ev.get("seed", 0)))
        per_image, bound = attack_count(target, attack, info)
        attacks[name] = {"flops_per_image": per_image.flops, "upper_bound": bound}
        total = total + per_image
    body = {"images": images, "checkpoints": checkpoints, "attacks": attacks}
    return body, total.times(images * checkpoints)


def run_plan(cfg: Config, ev: dict[str, Any] | None, device: str, mfu: tuple | None) -> dict:
    """The plan of one run (see the module doc): its FLOPs, and its hours on `device`."""
    method, info = _meta_method(cfg)
    step = step_count(cfg)
    steps, images = epoch_images(cfg)
    per_epoch = step.flops * images
    checks = checks_flops(cfg, method, info)
    evaluation, eval_count = eval_flops(cfg, ev, method, info) if ev else (None, Count())
    total = per_epoch * cfg.train.epochs + checks.flops + eval_count.flops
    uncounted = (step + checks + eval_count).uncounted
    body = {
        "train_images": train_images(cfg),
        "batch_size": cfg.data.batch_size,
        "epochs": cfg.train.epochs,
        "steps_per_epoch": steps,
        "train_flops_per_image_step": step.flops,
        "train_flops_per_epoch": per_epoch,
        "train_flops_total": per_epoch * cfg.train.epochs,
        "check_flops_total": checks.flops,
        "eval": evaluation and {**evaluation, "flops_total": eval_count.flops},
        "flops_total": total,
        "uncounted_ops": uncounted,
    }
    return body | hours(body, device, mfu)


def hours(body: dict[str, Any], device: str, mfu: tuple | None) -> dict[str, Any]:
    """The limit at the device's peak (per epoch: training steps alone; total: everything),
    and the expected hours at the measured MFU (None without one)."""
    peak = PEAK_FLOPS[device][0]
    limit_hours = body["flops_total"] / peak / 3600
    return {
        "peak_flops": peak,
        "limit_seconds_per_epoch": body["train_flops_per_epoch"] / peak,
        "limit_hours_total": limit_hours,
        "expected_hours_total": limit_hours / mfu[0] if mfu else None,
    }


# A config or a study ----------------------------------------------------------------------------
def plan(
    path: str | Path,
    device: str = "h100",
    overrides: list[str] | None = None,
    gpu_check: str | Path | None = None,
) -> dict[str, Any]:
    """The plan of a config (YAML) or a study (a sweep spec: one entry per cell, and their
    total), with `overrides` (`--set KEY=VALUE`) on each config; `gpu_check`: a results.json of
    benchmarks/gpu_check.py whose epoch MFU gives the expected hours on its GPU."""
    if device not in PEAK_FLOPS:
        raise ValueError(f"--device {device!r}: choose one of {', '.join(PEAK_FLOPS)}")
    mfu = measured_mfu(device, gpu_check)
    head = {
        "device": device,
        "peak_flops": PEAK_FLOPS[device][0],
        "peak_source": PEAK_FLOPS[device][1],
        "count": f"torch's per-op FLOP formulas at batch {COUNT_BATCH} on the meta device, "
        "scaled linearly to each config's batch",
        "mfu": mfu and {"value": mfu[0], "source": mfu[1]},
        "mfu_missing": None if mfu else NO_MFU.format(device=device),
    }
    if not is_study(path):
        return {
            "config": str(path),
            **head,
            **run_plan(resolve(path, overrides), None, device, mfu),
        }
    plans, seen = [], {}
    for cell in cells(path):
        cfg = from_dict(apply_overrides(to_dict(cell.config), overrides or []))
        key = json.dumps([{**to_dict(cfg), "seed": 0}, cell.eval], sort_keys=True, default=str)
        if key not in seen:  # a seed changes no FLOP: its cells are counted once
            seen[key] = run_plan(cfg, cell.eval, device, mfu)
        plans.append({"name": cell.name, **seen[key]})
    return {"study": str(path), **head, "cells": plans, "total": study_total(plans)}


def is_study(path: str | Path) -> bool:
    """A sweep spec has a grid, parts or a base; a config has none of them."""
    return any(key in load_yaml(path) for key in ("grid", "parts", "base"))


def study_total(plans: list[dict[str, Any]]) -> dict[str, Any]:
    """The sums over the study's cells (every seed a run of its own)."""
    keys = ["train_flops_total", "check_flops_total", "flops_total", "limit_hours_total"]
    total: dict[str, Any] = {"runs": len(plans), **{k: sum(p[k] for p in plans) for k in keys}}
    total["eval_flops_total"] = sum(p["eval"]["flops_total"] for p in plans if p["eval"])
    expected = [p["expected_hours_total"] for p in plans]
    total["expected_hours_total"] = sum(expected) if None not in expected else None
    return total


def measured_mfu(device: str, gpu_check: str | Path | None) -> tuple[float, str] | None:
    """(MFU, its source) for `device`: the epoch part of a gpu_check results.json when it ran
    on that GPU, else MEASURED_MFU's figure, else None."""
    if gpu_check is None:
        return MEASURED_MFU.get(device)
    path = Path(gpu_check)
    if not path.is_file():
        raise FileNotFoundError(f"--gpu-check {str(path)!r} not found; give a results.json")
    try:
        results = json.loads(path.read_text())
        gpu = results["machine"].get("gpu", "")
        epoch = next(p for p in results["parts"] if p["name"] == "epoch")
        mfu = epoch["figures"]["mfu"]
    except (ValueError, KeyError, TypeError, StopIteration, AttributeError):
        raise ValueError(
            f"--gpu-check {str(path)!r}: no epoch MFU in it; give the results.json of a "
            "benchmarks/gpu_check.py run whose epoch part finished"
        ) from None
    if gpu_key(gpu) != device:
        raise ValueError(f"--gpu-check {str(path)!r} measured a {gpu or 'machine'}, not a {device}")
    return float(mfu), f"{path} (epoch part, {gpu}, {results.get('started', '?')})"


def gpu_key(name: str) -> str | None:
    """PEAK_FLOPS's key for a GPU's name as torch reports it ("NVIDIA H100 80GB HBM3")."""
    return next((key for part, key in GPU_NAMES.items() if part in name.upper()), None)


def peak_for_gpu(name: str) -> float | None:
    """The dense bf16 peak of a GPU named as torch names it; None for one not in PEAK_FLOPS."""
    key = gpu_key(name)
    return PEAK_FLOPS[key][0] if key else None


# Text -------------------------------------------------------------------------------------------
HEAD = ["run", "runs", "images x epochs", "steps/epoch", "GFLOP/image-step", "PFLOP/epoch",
        "eval PFLOP", "limit s/epoch", "limit h", "expected h"]  # fmt: skip


def text(result: dict[str, Any]) -> str:
    """A short table a person reads at a glance (cells of equal cost, a study's seeds, on one
    row: hours per run), and the notes that qualify it."""
    rows = result.get("cells") or [{"name": Path(result["config"]).stem, **result}]
    table = _grouped([_row(p) for p in rows])
    if "total" in result:
        t = result["total"]
        hours = [_num(t["limit_hours_total"], 1), _num(t["expected_hours_total"], 1)]
        ev = _num(t["eval_flops_total"] / 1e15, 1)
        table.append(["total", str(t["runs"]), *[""] * 4, ev, "", *hours])
    mfu = result["mfu"]
    lines = [
        f"{result.get('study') or result['config']} on {result['device']}: "
        f"{result['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16 ({result['peak_source']})",
        f"FLOPs: {result['count']}; limit = FLOPs / peak, per run (per-epoch checks and the "
        "evaluation included in limit h, not in limit s/epoch)",
        "",
        *markdown(HEAD, table),
        "",
        f"expected h = limit h / MFU {mfu['value']:.3f} ({mfu['source']})"
        if mfu
        else f"expected h: {result['mfu_missing']}",
    ]
    lines += _uncounted_lines(rows)
    return "\n".join(lines) + "\n"


def _grouped(table: list[list[str]]) -> list[list[str]]:
    """Rows equal but for their name on one row: the first name and how many runs."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, _, *rest in table:
        groups.setdefault(tuple(rest), []).append(name)
    return [[names[0], str(len(names)), *rest] for rest, names in groups.items()]


def _row(p: dict[str, Any]) -> list[str]:
    ev = p["eval"]["flops_total"] / 1e15 if p["eval"] else None
    return [
        p["name"],
        "1",
        f"{p['train_images']:,} x {p['epochs']}",
        str(p["steps_per_epoch"]),
        _num(p["train_flops_per_image_step"] / 1e9, 1),
        _num(p["train_flops_per_epoch"] / 1e15, 2),
        _num(ev, 1),
        _num(p["limit_seconds_per_epoch"], 1),
        _num(p["limit_hours_total"], 1),
        _num(p["expected_hours_total"], 1),
    ]


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _uncounted_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for p in rows:
        if p["uncounted_ops"]:
            ops = ", ".join(f"{op} ({n} calls)" for op, n in sorted(p["uncounted_ops"].items()))
            lines.append(f"{p['name']}: not counted (no FLOP formula), the rest is: {ops}")
    if any(
        p["eval"] and any(a["upper_bound"] for a in p["eval"]["attacks"].values()) for p in rows
    ):
        lines.append(
            "AutoAttack: an upper bound (every image through every attack at its full "
            "iteration counts; the package attacks only what is still robust)"
        )
    return lines


# Command line -----------------------------------------------------------------------------------
def add_command(sub: Any) -> None:
    """`d2r plan CONFIG_OR_STUDY [--device D] [--set KEY=VALUE ...] [--format text|json]`."""
    p = sub.add_parser(
        "plan",
        help="FLOPs of a config or a study and its time at a GPU's peak, before running it",
        description="Count the FLOPs of a config's training step (attack, backward, optimizer "
        "step), its per-epoch checks and a study's evaluation on the CPU's meta device (no data "
        "is read), and give the hours they take at the GPU's dense bf16 peak and, where one has "
        "been measured, at its model-FLOP utilization.",
    )
    p.add_argument("path", metavar="CONFIG_OR_STUDY")
    p.add_argument("--device", default="h100", help=f"one of {', '.join(PEAK_FLOPS)}")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (of every cell of a study)",
    )
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument(
        "--gpu-check",
        metavar="RESULTS.json",
        help="benchmarks/gpu_check.py's results: its epoch MFU gives expected h",
    )
    p.set_defaults(func=_command)


def _command(args: Any) -> int:
    result = plan(args.path, args.device, args.set, args.gpu_check)
    print(json.dumps(result, indent=2) if args.format == "json" else text(result), end="")
    return 0
