"""The FLOPs of one run: a training step per image (the method's forward with its attack, the
backward, the optimizer step: `trainer.train_step` itself, counted by `d2r.flops` on the meta
device at batch COUNT_BATCH and scaled linearly), the per-epoch checks and the evaluation."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from d2r import data, speed
from d2r.attacks import AutoAttack, from_name
from d2r.config import Config
from d2r.data.synthetic import SPLIT_SIZES
from d2r.flops import Count, count
from d2r.guard import DeviceFlags, StepGuard
from d2r.measure import seeded
from d2r.methods import eval_mode
from d2r.plan.gpus import hours
from d2r.runs import build_method, eval_eps, eval_norm
from d2r.trainer import train_step

COUNT_BATCH = 2  # every counted op's FLOPs are linear in the batch: count small, scale up


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
