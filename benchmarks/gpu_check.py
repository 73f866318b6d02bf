"""Every figure d2r needs from a lent GPU, in one command of at most 8 minutes on one H100/H200.

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu-check          # on the GPU
    PYTHONPATH=src python benchmarks/gpu_check.py --out /tmp/s --smoke     # any CPU, about 1 min
    ... --only epoch,autoattack --budget epoch=300                         # a rerun of some parts

First, in seconds, a preflight (benchmarks/preflight.py) prints the Python, torch and package
versions found and whether each torch feature the parts use is there; a missing core package or
a d2r module that fails to import stops the check there (exit 2), before any part. Then it
writes OUT/results.json (everything) and OUT/results.md (GPU, torch, CUDA, date, and each
figure with how it was measured). The parts, in this order (priority: the correctness tests,
then the speed goal): env; cuda_tests (`pytest -m cuda`); step_fp32 and step_fast
(benchmarks/step_overhead.py and memory.py for WRN-34-10 + ResNet-18 at batch 128, fast path
off and on); epoch (one epoch of D2R-CAG on 50,000 synthetic CIFAR-10 images, batch 128: the
goal is <= 90 s on one H100); pgd (PGD-20 on 1,000 synthetic test images); vs_naive
(benchmarks/vs_naive.py on synthetic CIFAR-10); step_bf16_eager (bf16 + channels_last, not
compiled); autoattack (AutoAttack standard on 1,000 images); generated_data (the loader with
70 % generated images from a memory-mapped .npz against the real set alone, last: it runs only
if time is left).

Each part runs in a child process with a time budget (forked from this one, which imports torch
and d2r once; the CUDA tests in a pytest process): past the budget the child's process group is
killed and the part marked "over budget"; a failing part is marked "error" with its traceback;
once --total seconds are spent no part starts ("no time"). Both files are rewritten after every
part, so a check cut short still leaves them. --smoke runs every part at a tiny size on the CPU
(small_cnn + tiny_cnn on 1x8x8 or 3x8x8 images, a few of them): it tests this script, not a
GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import preflight
from gpu_parts import PART_FUNCTIONS, ROOT, Context, Skip

MIN_START_S = 10  # a part is not started with less time than this left


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float
    how: str


PARTS = [
    Part("env", 60, "torch's device properties and versions, nvidia-smi for the driver"),
    Part(
        "cuda_tests",
        150,
        "`pytest -m cuda tests/test_cuda.py -v` in a child process; each test's outcome",
    ),
    Part(
        "step_fp32",
        45,
        "benchmarks/step_overhead.py (median of 5 alternated runs after 1, CUDA-synchronized) "
        "and memory.py (torch.cuda.max_memory_allocated of a second step), WRN-34-10 + "
        "ResNet-18, batch 128, fast path off (fp32: cuDNN's default TF32 convolutions; NCHW; "
        "eager; fused SGD)",
    ),
    Part(
        "step_fast",
        150,
        "as step_fp32 with the CUDA defaults: bf16 autocast, channels_last, torch.compile "
        "(inductor), fused SGD; first_step_s includes compilation",
    ),
    Part(
        "epoch",
        180,
        "d2r.train(configs/cifar10/d2r_cag.yaml) on data.name=synthetic (50,000 CIFAR-10-"
        "shaped images, batch 128, 391 steps), one epoch, CUDA defaults: epoch_s is the "
        "trainer's epoch time (compilation included), steady_epoch_s = 391 x the mean step "
        "time between the first and last step lines of metrics.jsonl (log_every 20); mfu "
        "(mfu_epoch_s) = `d2r plan`'s FLOPs of the epoch's steps / (steady_epoch_s (epoch_s) x "
        "the GPU's dense bf16 peak)",
    ),
    Part(
        "pgd",
        45,
        "d2r.evaluate with PGD-20 (eps 8/255, step 2/255) on the first 1,000 synthetic test "
        "images, batch 500, fp32; the epoch part's model, or a random one if it left none",
    ),
    Part(
        "vs_naive",
        90,
        "benchmarks/vs_naive.py: one timed epoch each (after one warm-up epoch each) of "
        "d2r's trainer and a reference-style loop, WRN-34-10 + ResNet-18, 1,280 synthetic "
        "CIFAR-10 images, batch 128, 8 DataLoader workers for the plain loop",
    ),
    Part("step_bf16_eager", 45, "as step_fp32 with bf16 autocast and channels_last, no compile"),
    Part(
        "autoattack",
        120,
        "d2r.evaluate with AutoAttack standard (eps 8/255, pyautoattack) on the first 1,000 "
        "synthetic test images, the model of the pgd part",
    ),
    Part(
        "generated_data",
        30,
        "benchmarks/generated_data.py: batches/s of the loader with 70 % generated images "
        "(50,000 in a memory-mapped .npz on the machine's disk, read one batch ahead into "
        "pinned memory) over the real set alone (20,000 in GPU memory), batch 128, best of 3",
    ),
]
assert {p.name for p in PARTS} == {*PART_FUNCTIONS, "cuda_tests"}


# ----------------------------------------------------------------------------------------------
# the parent: children with budgets, results written after each


def main() -> int:
    parser, args = parse_args()
    # first, in seconds: the versions found and each feature the parts need (benchmarks/
    # preflight.py), so that a missing package stops the check here, not a part later
    info = preflight.report()
    for line in preflight.lines(info):
        print(f"gpu_check: {line}", file=sys.stderr, flush=True)
    if info["fatal"]:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)  # no d2r needed to say why nothing ran
        failed = {"check": "d2r benchmarks/gpu_check.py", "argv": sys.argv[1:], "preflight": info}
        (out / "results.json").write_text(json.dumps(failed, indent=2))
        print(f"gpu_check: stopped before any part; see {out / 'results.json'}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not _has_cuda():
        parser.error("no CUDA GPU here (torch.cuda.is_available() is False); use --smoke")
    budgets = {p.name: p.budget_s for p in PARTS} | dict(args.budget)
    parts = [p for p in PARTS if not args.only or p.name in args.only]
    out, work = Path(args.out), Path(args.work or tempfile.mkdtemp(prefix="d2r-gpu-check-"))
    results = {
        "check": "d2r benchmarks/gpu_check.py",
        "mode": "smoke" if args.smoke else "full",
        "argv": sys.argv[1:],
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "total_budget_s": args.total,
        "machine": {},
        "preflight": info,
        "parts": [],
    }
    start = time.monotonic()
    write_results(out, results)  # from the start: a check killed early still leaves both files
    preload()
    # SIGTERM (a job's time limit): end the running part's child and keep what was written
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    context = Context(args.device, args.smoke, work)
    try:
        for part in parts:
            left = args.total - (time.monotonic() - start)
            record = run_part(part, min(budgets[part.name], left), left, context)
            results["parts"].append(record)
            if part.name == "env" and record["status"] == "ok":
                results["machine"] = record["figures"]
            results["seconds"] = round(time.monotonic() - start, 1)
            write_results(out, results)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def preload() -> None:
    """Import what the parts use once, here: each part's child is forked from this process and
    starts with it loaded (seconds saved per part). Nothing here touches CUDA, which a forked
    child could not initialize again."""
    import common  # noqa: F401  (torch, d2r.speed, d2r.trainer)
    import d2r.evaluate  # noqa: F401
    import memory  # noqa: F401
    import step_overhead  # noqa: F401
    import vs_naive  # noqa: F401


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="directory for results.json and results.md")
    parser.add_argument("--smoke", action="store_true", help="every part, tiny, on the CPU")
    parser.add_argument("--only", type=lambda s: s.split(","), help="comma-separated parts")
    parser.add_argument("--budget", action="append", default=[], type=_budget, metavar="PART=S")
    parser.add_argument("--total", type=float, default=470, help="seconds for all parts")
    parser.add_argument("--device", help="default: cuda (cpu with --smoke)")
    parser.add_argument("--work", help="scratch directory for runs (default: a temp dir)")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    check_args(parser, args)
    return parser, args


def _budget(text: str) -> tuple[str, float]:
    name, sep, seconds = text.partition("=")
    try:
        return name, float(seconds) if sep else float("nan")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected PART=SECONDS, got {text!r}") from None


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Bad input fails here, in one line, before any work (argparse exits with 2)."""
    names = [p.name for p in PARTS]
    for name in [*(args.only or []), *(n for n, _ in args.budget)]:
        if name not in names:
            parser.error(f"unknown part {name!r}; the parts are {', '.join(names)}")
    if any(not s > 0 for _, s in args.budget):
        parser.error("--budget takes PART=SECONDS with SECONDS > 0, e.g. epoch=300")
    if not args.out:
        parser.error("--out DIR is required: where results.json and results.md go")
    if (Path(args.out) / "results.json").exists():
        parser.error(f"{args.out} already holds results.json; choose another --out")


def _has_cuda() -> bool:
    # asked in a child: this process forks the parts and must never initialize CUDA itself
    ask = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([sys.executable, "-c", ask], timeout=300).returncode == 0


def run_part(part: Part, budget: float, left: float, context: Context) -> dict:
    record = {"name": part.name, "budget_s": round(budget, 2), "how": part.how}
    if left < MIN_START_S:
        return {**record, "status": "no time", "error": f"{left:.0f} s of --total left"}
    print(f"gpu_check: {part.name} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
    start, cpu = time.monotonic(), _children_cpu_s()
    if part.name == "cuda_tests":
        rc, output, timed_out = run_with_budget(pytest_command(), budget)
        outcome = read_pytest(output, rc, timed_out)
    else:
        outcome = fork_with_budget(part.name, context, budget)
    record["seconds"] = round(time.monotonic() - start, 1)
    record["cpu_s"] = round(_children_cpu_s() - cpu, 1)  # CPU time of the child and its own
    return {**record, **outcome}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fork_with_budget(name: str, context: Context, budget: float) -> dict:
    """Run part `name` in a forked child in its own process group; past `budget` seconds kill
    the whole group (inductor's compile workers, DataLoader workers too)."""
    forked = multiprocessing.get_context("fork")
    receive, send = forked.Pipe(duplex=False)
    child = forked.Process(target=_child, args=(name, context, send))
    child.start()
    send.close()
    try:
        if not receive.poll(budget):
            _kill_group(child.pid)
            return {"status": "over budget", "error": f"killed at its budget ({budget:.0f} s)"}
        payload = receive.recv()
    except EOFError:  # the child died without a word: a crash in native code, a kill
        child.join()
        return {"status": "error", "error": f"the child died (exit code {child.exitcode})"}
    except BaseException:  # an interrupted check leaves no child behind
        _kill_group(child.pid)
        raise
    child.join()
    return payload


def _child(name: str, context: Context, send) -> None:
    os.setsid()  # a process group of its own, to be killed whole
    try:
        payload = {"status": "ok", "figures": PART_FUNCTIONS[name](context)}
    except Skip as skip:
        payload = {"status": "skipped", "error": str(skip)}
    except BaseException as error:
        last = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        payload = {"status": "error", "error": last, "tail": traceback.format_exc()[-4000:]}
    send.send(payload)


def _kill_group(pid: int) -> None:
    """SIGKILL to the child's process group, and to the child itself in case it was killed
    before its setsid()."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)


def pytest_command() -> list[str]:
    tests = str(ROOT / "tests" / "test_cuda.py")
    # -n 0: in this process, not xdist's workers (the project's addopts), so -v reads as parsed
    pytest = [sys.executable, "-m", "pytest", "-m", "cuda", tests, "-v", "-rfEs", "-n", "0"]
    return [*pytest, "-p", "no:cacheprovider"]


def run_with_budget(command: list[str], budget: float) -> tuple[int, str, bool]:
    """Run `command` in its own process group; kill the whole group past `budget` seconds
    (pytest's torchrun workers and inductor's compile workers too)."""
    paths = [str(ROOT / "src"), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=budget)
        return proc.returncode, output, False
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        output, _ = proc.communicate()
        return proc.returncode, output, True
    except BaseException:  # an interrupted check leaves no child behind
        _kill_group(proc.pid)
        raise


_OUTCOME = re.compile(r"^\S+::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)


def read_pytest(output: str, rc: int, timed_out: bool) -> dict:
    """Each test's outcome from pytest -v's lines, the counts, and the failure lines."""
    tests = dict(_OUTCOME.findall(output))
    counts = {o.lower(): list(tests.values()).count(o) for o in sorted(set(tests.values()))}
    problems = [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    skips = [line for line in output.splitlines() if line.startswith("SKIPPED [")]
    figures = {**counts, "tests": tests, "failures": problems, "skip_reasons": skips}
    status = "over budget" if timed_out else {0: "ok", 1: "failed"}.get(rc, "error")
    record = {"status": status, "figures": figures}
    if status != "ok":
        record["tail"] = output[-4000:]
        record["error"] = (problems or [f"pytest exit code {rc}"])[0][:300]
    return record


# ----------------------------------------------------------------------------------------------
# results.json and results.md


def write_results(out: Path, results: dict) -> None:
    from d2r.files import atomic_write_text  # temp file + rename: never a torn file

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    atomic_write_text(out / "results.md", markdown(results))


def markdown(results: dict) -> str:
    m = results["machine"]
    where = m.get("gpu") or m.get("device_name") or "machine not recorded (no env part)"
    versions = f"torch {m.get('torch', '?')}, CUDA {m.get('cuda') or 'none'}"
    lines = [
        "# d2r GPU check",
        "",
        f"{where}; {versions}; cuDNN {m.get('cudnn', '-')}; driver {m.get('driver', '-')}; "
        f"{results['started']}; {results['mode']} mode; {results.get('seconds', 0):.0f} s of "
        f"{results['total_budget_s']:.0f} s. Command: `benchmarks/gpu_check.py "
        f"{' '.join(results['argv'])}`",
        "",
        *_preflight_lines(results.get("preflight")),
        "| part | status | seconds (budget) | figures |",
        "|---|---|---|---|",
    ]
    for r in results["parts"]:
        text = _figures_text(r.get("figures", {})) if r["status"] == "ok" else r.get("error", "")
        if r["name"] == "cuda_tests" and r["status"] != "ok":
            text = f"{_figures_text(r.get('figures', {}))}; {text}"
        seconds = f"{r.get('seconds', 0):.0f} ({r['budget_s']:.0f})"
        lines.append(f"| {r['name']} | {r['status']} | {seconds} | {text} |")
    lines += ["", "How each part measures:", ""]
    lines += [f"- **{r['name']}**: {r['how']}" for r in results["parts"]]
    return "\n".join(lines) + "\n"


def _preflight_lines(info: dict | None) -> list[str]:
    """What the preflight found missing, if anything (its versions are in results.json)."""
    if not info:
        return []
    missing = [n for n, v in info["packages"].items() if v is None]
    missing += [n for n, present in info["features"].items() if not present]
    return [f"Preflight (Python {info['python']}): missing {', '.join(missing) or 'nothing'}", ""]


def _figures_text(figures: dict) -> str:
    scalars = [(k, v) for k, v in figures.items() if isinstance(v, (int, float, str, bool))]
    return ", ".join(f"{k} {v}" for k, v in scalars).replace("|", "/")


if __name__ == "__main__":
    sys.exit(main())
