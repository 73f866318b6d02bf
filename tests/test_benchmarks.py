"""Each benchmark runs at a tiny size and prints one JSON line with its figures. Nothing here
asserts a time: figures are read, never judged (machines are noisy)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "data_pipeline.py": (["--batches", "3", "--repeats", "1", "--size", "768", "--workers", "0"],
                         ["device_loader_batches_per_s", "pil_dataloader_batches_per_s",
                          "speedup"]),
    "step_overhead.py": (["--batch", "8", "--repeats", "1", "--warmup", "1"],
                         ["ratio", "step_ms", "bare_ms"]),
    "vs_naive.py": (["--epochs", "1", "--set", "data.train_subset=64", "--set", "method.steps=2"],
                    ["speedup", "ours_epochs_per_hour", "naive_epochs_per_hour"]),
    "memory.py": (["--target", "small_cnn", "--guide", "tiny_cnn", "--shape", "1,8,8",
                   "--batch", "8"], ["peak_rss_growth_mib", "parameters_m"]),
}  # fmt: skip


@pytest.mark.parametrize("script", sorted(SMALL))
def test_benchmark_prints_one_json_line_of_figures(script):
    args, keys = SMALL[script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True, text=True, timeout=300, env=env, check=True,
    )  # fmt: skip
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["benchmark"] == script.removesuffix(".py")
    for key in keys:  # a tiny step may not raise the process's peak memory: >= 0, not > 0
        assert isinstance(line[key], (int, float)) and line[key] >= 0, key
    assert line[keys[0]] > 0 or script == "memory.py"
