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
    "generated_data.py": (["--batches", "3", "--repeats", "1", "--size", "768",
                           "--extra-size", "512"],
                          ["with_generated_batches_per_s", "real_only_batches_per_s", "ratio",
                           "read_ms_per_batch"]),
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


GPU_PARTS = ["env", "cuda_tests", "step_fp32", "step_fast", "epoch", "pgd", "vs_naive",
             "step_bf16_eager", "autoattack", "generated_data"]  # fmt: skip


def gpu_check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def test_gpu_check_smoke_runs_every_part_and_writes_both_files(tmp_path):
    """Every part at its tiny CPU size (about a minute of CPU time): each one ok, the CUDA
    tests collected and skipped here, figures in results.json, a row each in results.md."""
    out = tmp_path / "check"
    done = gpu_check("--out", str(out), "--smoke")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    parts = {p["name"]: p for p in results["parts"]}
    assert list(parts) == GPU_PARTS and results["mode"] == "smoke"
    assert {n: p["status"] for n, p in parts.items()} == dict.fromkeys(GPU_PARTS, "ok"), {
        n: p.get("error") for n, p in parts.items()
    }
    tests = parts["cuda_tests"]["figures"]
    assert tests["skipped"] == len(tests["tests"]) >= 10 and "passed" not in tests
    assert all("needs a CUDA GPU" in line for line in tests["skip_reasons"])
    for name in ("step_fp32", "step_fast", "step_bf16_eager"):
        figures = parts[name]["figures"]
        assert figures["step_ms"] > 0 and figures["ratio"] > 0 and figures["batch"] == 8
    assert parts["step_bf16_eager"]["figures"]["amp"] == "bf16"
    epoch = parts["epoch"]["figures"]
    # steady_epoch_s: from the step lines' times; with 2 tiny steps it can round to 0
    assert epoch["steps"] == 2 and epoch["epoch_s"] > 0 and epoch["steady_epoch_s"] >= 0
    # d2r plan's count of the epoch; no MFU on a CPU (no peak in d2r.plan.PEAK_FLOPS)
    assert epoch["flops_per_epoch"] > 0 and epoch["mfu"] is None and epoch["peak_flops"] is None
    assert parts["pgd"]["figures"]["images"] == 32 and 0 <= parts["pgd"]["figures"]["pgd20"] <= 1
    assert parts["pgd"]["figures"]["model"].startswith("the epoch part's model")
    assert parts["vs_naive"]["figures"]["speedup"] > 0
    assert results["machine"]["device"] == "cpu"
    table = (out / "results.md").read_text()
    assert "smoke mode" in table and all(f"| {name} | ok |" in table for name in GPU_PARTS)


def test_gpu_check_marks_parts_over_budget_or_without_time_and_refuses_bad_input(tmp_path):
    done = gpu_check("--out", str(tmp_path / "a"), "--smoke", "--only", "pgd", "--budget=pgd=0.01")
    assert done.returncode == 0, done.stderr[-2000:]
    (part,) = json.loads((tmp_path / "a" / "results.json").read_text())["parts"]
    assert (part["status"], part["budget_s"]) == ("over budget", 0.01)
    assert "| pgd | over budget |" in (tmp_path / "a" / "results.md").read_text()
    done = gpu_check("--out", str(tmp_path / "b"), "--smoke", "--only", "env,pgd", "--total", "5")
    parts = json.loads((tmp_path / "b" / "results.json").read_text())["parts"]
    assert [p["status"] for p in parts] == ["no time", "no time"]
    for bad, message in [
        (["--only", "nope"], "unknown part 'nope'"),
        (["--budget", "epoch=-1"], "SECONDS > 0"),
        ([], "already holds results.json"),  # tmp_path/b was written above
    ]:
        done = gpu_check("--out", str(tmp_path / "b"), "--smoke", *bad)
        assert done.returncode == 2 and message in done.stderr.splitlines()[-1], done.stderr
