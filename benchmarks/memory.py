"""Peak memory of one D2R-CAG training step (attack, loss, backward, optimizer step). Prints one
JSON line.

    PYTHONPATH=src python benchmarks/memory.py --device cuda  # WRN-34-10 + ResNet-18, batch 128
    PYTHONPATH=src python benchmarks/memory.py                # CPU: the same models, batch 8

CUDA: torch.cuda.max_memory_allocated over the step (tensors only, not the allocator's cache),
after a warm-up step so the optimizer's momentum buffers already exist, as in training.
CPU: the growth of the process's peak resident set (getrusage ru_maxrss) over the first step:
a coarse figure that includes the allocator's slack and the momentum buffers created then;
there is no CPU equivalent of the CUDA counter.
"""

from __future__ import annotations

import argparse
import resource
from collections.abc import Callable

import torch

from common import add_model_args, build, print_figures, training_step


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory(step: Callable[[], None], device: torch.device) -> dict[str, float | str]:
    """Peak memory of one call of `step` (see the module docstring for what each device
    reports). On CUDA a first call warms up, so the optimizer's buffers already exist."""
    if device.type == "cuda":
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return {
            "peak_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "resident_before_mib": round(before / 2**20, 1),
            "measure": "cuda_max_allocated",
        }
    before = peak_rss_mib()
    step()
    return {
        "peak_rss_growth_mib": round(peak_rss_mib() - before, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "measure": "ru_maxrss_growth",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, batch=0, shape="3,32,32")
    parser.set_defaults(target="wrn34_10", guide="resnet18")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.batch = args.batch or (128 if cuda else 8)
    method, x, y, fast = build(args)
    figures = peak_memory(training_step(method, fast, x, y), x.device)  # as the trainer's step
    params = sum(p.numel() for p in method.parameters())
    print_figures(
        "memory", {**figures, "parameters_m": round(params / 1e6, 2)}, args, fast, x.device
    )


if __name__ == "__main__":
    main()
