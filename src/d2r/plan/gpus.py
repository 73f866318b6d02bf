"""The GPUs a plan prices: their dense bf16 peaks (with the datasheet each comes from), the
measured model-FLOP utilization where one exists, and the hours at both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
