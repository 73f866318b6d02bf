"""Overhead of the D2R-CAG training step over its bare model passes. Prints one JSON line.

    PYTHONPATH=src python benchmarks/step_overhead.py                      # small CPU default
    PYTHONPATH=src python benchmarks/step_overhead.py --target wrn34_10 --guide resnet18 \\
        --shape 3,32,32 --batch 128 --device cuda                          # the paper's models

ratio = (one full trainer step: CAG attack, loss, backward, optimizer step) / (the same model
passes alone: 1 guide forward without grad and 10 target forward+input-gradient passes in eval
mode, then target(x'), target(x), guide(x) in train mode and one backward of their sum), in the
same precision and memory format, alternated in one run. Target: <= 1.10.
"""

from __future__ import annotations

import argparse

import torch

from common import add_model_args, build, interleaved_median, print_figures, training_step


def measure(method, x, y, fast, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """The full step and its bare passes, alternated: medians over `repeats` after `warmup`."""
    target, guide, steps = method.target, method.guide, method.budget.steps
    full_step = training_step(method, fast, x, y)  # as Trainer._train_epoch

    def bare_passes() -> None:
        with fast.autocast():
            target.eval(), guide.eval()
            with torch.no_grad():
                guide(x)
            x_adv = x.clone()
            for _ in range(steps):
                x_adv.requires_grad_(True)
                torch.autograd.grad(target(x_adv).sum(), x_adv)
                x_adv = x_adv.detach()
            target.train(), guide.train()
            total = target(x_adv).sum() + target(x).sum() + guide(x).sum()
        total.backward()

    fns = {"step": full_step, "bare": bare_passes}
    interleaved_median(fns, warmup, x.device)
    median = interleaved_median(fns, repeats, x.device)
    return {
        "ratio": round(median["step"] / median["bare"], 4),
        "step_ms": round(1e3 * median["step"], 3),
        "bare_ms": round(1e3 * median["bare"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, batch=128, shape="1,8,8")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    method, x, y, fast = build(args)
    figures = measure(method, x, y, fast, args.repeats, args.warmup)
    print_figures("step_overhead", figures, args, fast, x.device)


if __name__ == "__main__":
    main()
