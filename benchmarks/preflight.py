"""gpu_check.py's first step, before any part: the versions found and whether each package and
torch feature the parts use is there, printed and recorded in results.json, so that a lent
GPU's minutes are never spent on an import error (the GPU machine has Python 3.12 and torch
2.11.0, without pyautoattack or submitit).

Feature tests only (an import, hasattr, a signature), never a version string parsed. Nothing
here initializes CUDA: the parts are forked from this process, and a forked child could not
initialize it again.

    PYTHONPATH=src python benchmarks/preflight.py      # the same report alone, exit 1 if fatal
"""

from __future__ import annotations

import importlib
import inspect
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from typing import Any

# distribution name -> (what needs it, fatal when missing)
PACKAGES: dict[str, tuple[str, bool]] = {
    "torch": ("everything", True),
    "numpy": ("everything", True),
    "safetensors": ("checkpoints", True),
    "pyyaml": ("configs", True),
    "tqdm": ("progress bars", True),
    "scikit-learn": ("the digits set (--smoke)", False),
    "matplotlib": ("curves.png at a run's end (epoch)", False),
    "pytest": ("cuda_tests", False),
    "pytest-xdist": ("cuda_tests (the project's pytest options name -n)", False),
    "hypothesis": ("cuda_tests' conftest", False),
    "pyautoattack": ("autoattack (skipped without)", False),
    "submitit": ("no part (d2r sweep --executor slurm)", False),
    "tensorboard": ("no part (train.tensorboard)", False),
}
# imported once by gpu_check's parent before the parts fork: any failure here fails every part
MODULES = ("d2r", "d2r.trainer", "d2r.evaluate", "common", "memory", "step_overhead", "vs_naive")


def _torch_features() -> list[tuple[str, str, Callable[[], bool]]]:
    """(feature, the parts or code that need it, its test). Each test is a feature test; the
    comment names the torch versions where it is known to differ."""
    import torch
    import torch.distributed as dist
    from torch import nn

    from d2r import speed

    return [
        # nn.Module.compile (in place, checkpoint keys kept): torch >= 2.2
        ("nn.Module.compile", "step_fast, epoch (train.compile)",
         lambda: hasattr(nn.Module, "compile")),
        ("torch.autocast bf16", "step_fast, epoch, step_bf16_eager (train.amp)",
         lambda: hasattr(torch, "autocast") and hasattr(torch, "bfloat16")),
        # SGD(fused=True): not in torch 2.2.2 (seen by this preflight), on CUDA in 2.11 and
        # 2.14.1 (on the CPU from 2.4: d2r.speed tries a step)
        ("fused SGD (CUDA)", "train.optimizer_impl=auto picks foreach without it",
         lambda: speed.fused_sgd_available("cuda")),
        # a bf16 cast cached under no_grad keeps the weight's gradient: not in 2.2.2 and 2.8.0
        # (d2r.speed then runs autocast without its cache); asked of the CPU, never CUDA here
        ("autocast cache keeps gradients (CPU)", "train.amp's cache (off where not)",
         lambda: speed.autocast_cache_keeps_grad("cpu")),
        ("torch._foreach_mul_/_add_", "train.ema_decay (d2r.ema)",
         lambda: hasattr(torch, "_foreach_mul_") and hasattr(torch, "_foreach_add_")),
        ("torch.distributed + NCCL", "cuda_tests' torchrun tests (N-GPU path)",
         lambda: dist.is_available() and dist.is_nccl_available()),
        ("nn.SyncBatchNorm", "train.sync_bn on CUDA", lambda: hasattr(nn, "SyncBatchNorm")),
        ("torch.load(weights_only=)", "d2r.weights (.pt files)",
         lambda: "weights_only" in inspect.signature(torch.load).parameters),
        ("torch.random.fork_rng(devices=)", "pgd, autoattack (d2r.evaluate)",
         lambda: "devices" in inspect.signature(torch.random.fork_rng).parameters),
        ("torch.get_float32_matmul_precision", "eval.json's tf32 field",
         lambda: hasattr(torch, "get_float32_matmul_precision")),
        ("torch.cuda.OutOfMemoryError", "the CLI's out-of-memory message",
         lambda: hasattr(torch.cuda, "OutOfMemoryError")),
    ]  # fmt: skip


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _check(test: Callable[[], bool]) -> bool:
    try:
        return bool(test())
    except Exception:  # a feature whose test itself breaks is not there
        return False


def report() -> dict[str, Any]:
    """{"python", "packages": {name: version or None}, "modules": {name: error or None},
    "features": {name: bool}, "fatal": [what stops every part]}."""
    packages = {name: _version(name) for name in PACKAGES}
    modules: dict[str, str | None] = {}
    for name in MODULES:
        try:
            importlib.import_module(name)
            modules[name] = None
        except Exception as error:  # an ImportError, or an AttributeError of an older torch
            modules[name] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    features: dict[str, bool] = {}
    needs: dict[str, str] = {}
    if packages["torch"] and modules.get("d2r") is None:
        for name, need, test in _torch_features():
            features[name], needs[name] = _check(test), need
    fatal = [f"{n} is not installed ({PACKAGES[n][0]})" for n, v in packages.items() if
             v is None and PACKAGES[n][1]]  # fmt: skip
    fatal += [f"import {n}: {e}" for n, e in modules.items() if e]
    info: dict[str, Any] = {"python": platform.python_version(), "packages": packages}
    if packages["torch"]:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
    info |= {"modules": modules, "features": features, "needed_by": needs, "fatal": fatal}
    return info


def lines(info: dict[str, Any]) -> list[str]:
    """The report as gpu_check prints it: versions first, then each missing piece."""
    found = [f"Python {info['python']}"]
    if info.get("torch"):
        found.append(f"torch {info['torch']} (CUDA {info.get('torch_cuda') or 'none'})")
    found += [f"{n} {v}" for n, v in info["packages"].items() if v and n != "torch"]
    out = ["preflight: " + ", ".join(found)]
    missing = [n for n, v in info["packages"].items() if v is None]
    if missing:
        out.append("preflight: not installed: " + "; ".join(
            f"{n} ({PACKAGES[n][0]})" for n in missing))  # fmt: skip
    for name, present in info["features"].items():
        out.append(f"preflight: {'yes' if present else 'NO '} {name}: {info['needed_by'][name]}")
    out += [f"preflight: FATAL {line}" for line in info["fatal"]]
    return out


def main() -> int:
    info = report()
    for line in lines(info):
        print(line)
    return 1 if info["fatal"] else 0


if __name__ == "__main__":
    sys.exit(main())
