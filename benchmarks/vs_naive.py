"""Training epochs per hour of d2r's Trainer against a plain loop in the reference code's style,
same models, data and D2R-CAG settings, in one run. Prints one JSON line.

    PYTHONPATH=src python benchmarks/vs_naive.py [--epochs 1] [--device cuda]

The plain loop: torch DataLoader over a Dataset doing per-image pad + crop + flip (Pillow, as
torchvision does), the guide's softmax recomputed in every one of the 10 attack steps (as the
released D2R code does), fp32, SGD's per-parameter loop, `.item()` on every batch. Ours: the
Trainer's `_train_epoch` with its defaults (device-resident data, guide softmax once, fast path
as resolved for the device). Evaluation is left out of both. Target: >= 2x on a CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common import machine
from d2r import data
from d2r.config import resolve
from d2r.losses import d2r_loss, kl_elem
from d2r.trainer import Trainer
from data_pipeline import PILCropFlip


def naive_epoch(trainer: Trainer, loader: DataLoader, device: torch.device) -> float:
    """One epoch of the reference-style loop on a trainer's models (built with the fast path
    off: fp32, NCHW, not compiled); seconds."""
    method = trainer.method
    target, guide, budget = method.target, method.guide, method.budget
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9, foreach=False)
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        target.eval(), guide.eval()
        x_adv = x + 0.001 * torch.randn_like(x)
        for _ in range(budget.steps):
            x_adv.requires_grad_(True)
            probs = F.softmax(guide(x), 1)  # recomputed every step, as the reference does
            objective = kl_elem(F.log_softmax(target(x_adv), 1), probs).sum()
            grad = torch.autograd.grad(objective, x_adv)[0]
            x_adv = x_adv.detach() + budget.step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - budget.eps), x + budget.eps).clamp(0, 1)
        target.train(), guide.train()
        out = d2r_loss(target(x_adv), target(x), guide(x), y)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        out["loss"].item()  # the reference logs every batch
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=1, help="timed epochs of each (after one warm-up epoch each)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (naive)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for both, e.g. data.name=cifar10 "
        "target.name=wrn34_10 guide.name=resnet18",
    )
    args = parser.parse_args()
    print(json.dumps(compare(args.set, args.device, args.epochs, args.workers)))


def compare(sets: list[str], device: str = "auto", epochs: int = 1, workers: int = 0) -> dict:
    """Our Trainer and the plain loop on the config `sets`, alternated epoch by epoch."""
    cfg_args = [f"train.device={device}", "train.checkpoint_minutes=0", *sets]
    cfg = resolve(None, cfg_args)
    plain = [f"train.{flag}=off" for flag in ("amp", "channels_last", "compile")]
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as out2:
        trainer = Trainer(cfg, out, progress=False)
        # the same models and init (same seed), but as the reference runs them
        reference = Trainer(resolve(None, [*cfg_args, *plain]), out2, progress=False)
        return measure(trainer, reference, cfg, argparse.Namespace(epochs=epochs, workers=workers))


def measure(trainer: Trainer, reference: Trainer, cfg, args: argparse.Namespace) -> dict:
    loader = trainer.loader
    dataset = PILCropFlip(loader.x.cpu(), loader.y.cpu(), data.info(cfg.data.name).crop_padding)
    naive = DataLoader(
        dataset, batch_size=cfg.data.batch_size, shuffle=True, num_workers=args.workers
    )
    ours_s, naive_s = [], []
    for epoch in range(args.epochs + 1):  # alternate; epoch 0 warms up both
        ours_s.append(trainer._train_epoch(epoch)["seconds"])
        naive_s.append(naive_epoch(reference, naive, reference.device))
    ours, plain = min(ours_s[1:]), min(naive_s[1:])
    return {
        "benchmark": "vs_naive",
        "speedup": round(plain / ours, 3),
        "ours_epochs_per_hour": round(3600 / ours, 1),
        "warmup_epoch_s": {"ours": round(ours_s[0], 2), "naive": round(naive_s[0], 2)},
        "naive_epochs_per_hour": round(3600 / plain, 1),
        "data": cfg.data.name,
        "train_images": len(loader.x),
        "batch": cfg.data.batch_size,
        "target": cfg.target["name"],
        "guide": cfg.guide["name"],
        **trainer.fast.describe(),
        **machine(trainer.device),
    }


if __name__ == "__main__":
    main()
