"""Every figure d2r needs from a lent GPU, in one command of at most 8 minutes on one H100/H200.

    PYTHONPATH=src python benchmarks/gpu_check.py --out gpu-check          # on the GPU
    PYTHONPATH=src python benchmarks/gpu_check.py --out /tmp/s --smoke     # any CPU, about 1 min
    ... --only epoch,autoattack --budget epoch=300                         # a rerun of some parts

Writes OUT/results.json (everything) and OUT/results.md (GPU, torch, CUDA, date, and each
figure with how it was measured). The parts, in this order (priority: the correctness tests,
then the speed goal): env; cuda_tests (`pytest -m cuda`); step_fp32 and step_fast
(benchmarks/step_overhead.py and memory.py for WRN-34-10 + ResNet-18 at batch 128, fast path
off and on); epoch (one epoch of D2R-CAG on 50,000 synthetic CIFAR-10 images, batch 128: the
goal is <= 90 s on one H100); pgd (PGD-20 on 1,000 synthetic test images); vs_naive
(benchmarks/vs_naive.py on synthetic CIFAR-10); step_bf16_eager (bf16 + channels_last, not
compiled); autoattack (AutoAttack standard on 1,000 images).

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

ROOT = Path(__file__).resolve().parents[1]
GOAL_EPOCH_S = 90  # issue 17: one epoch of D2R-CAG WRN-34-10 + ResNet-18 on one H100
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
        "time between the first and last step lines of metrics.jsonl (log_every 20)",
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
]


@dataclass(frozen=True)
class Context:
    """What every part is told: its device, the smoke size or not, a scratch directory."""

    device: str
    smoke: bool
    work: Path

    @property
    def like(self) -> str:
        """The real set the synthetic data mimics: CIFAR-10, or 1x8x8 digits for the smoke."""
        return "digits" if self.smoke else "cifar10"


class Skip(Exception):
    """A part that cannot run here (e.g. an optional package is missing)."""


# ----------------------------------------------------------------------------------------------
# the parent: children with budgets, results written after each


def main() -> int:
    args = parse_args()
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


def parse_args() -> argparse.Namespace:
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
    return args


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
    if args.device.startswith("cuda") and not _has_cuda():
        parser.error("no CUDA GPU here (torch.cuda.is_available() is False); use --smoke")


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
    pytest = [sys.executable, "-m", "pytest", "-m", "cuda", tests, "-v", "-rfEs"]
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
    from d2r.checkpoint import atomic_write_text  # temp file + rename: never a torn file

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


def _figures_text(figures: dict) -> str:
    scalars = [(k, v) for k, v in figures.items() if isinstance(v, (int, float, str, bool))]
    return ", ".join(f"{k} {v}" for k, v in scalars).replace("|", "/")


# ----------------------------------------------------------------------------------------------
# the parts (each runs in a child process: `--part NAME`)


def part_env(ctx: Context) -> dict:
    import torch

    from common import machine
    from d2r.runs import environment
    from d2r.trainer import pick_device

    device = pick_device(ctx.device)
    info = {k: v for k, v in environment(device).items() if k not in ("argv", "started")}
    info |= machine(device)  # the CPU's model name too, not only platform.processor()
    info.update(cuda=torch.version.cuda, cpus=os.cpu_count())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        nccl = torch.cuda.nccl.version()
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
            driver=_driver(),
        )
    return info


def _driver() -> str | None:
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def _step_part(ctx: Context, amp: str, channels_last: str, compile: str) -> dict:
    import memory
    import step_overhead
    from common import add_model_args, build, sync, training_step

    parser = argparse.ArgumentParser()
    add_model_args(parser, batch=128, shape="3,32,32")
    size = ["small_cnn", "tiny_cnn", "8", "3,8,8"] if ctx.smoke else ["wrn34_10", "resnet18"]
    argv = ["--target", size[0], "--guide", size[1], "--device", ctx.device]
    argv += ["--batch", size[2], "--shape", size[3]] if ctx.smoke else []
    flags = ["--amp", amp, "--channels-last", channels_last, "--compile", compile]
    args = parser.parse_args([*argv, *flags])
    method, x, y, fast = build(args)
    start = time.perf_counter()
    training_step(method, fast, x, y)()  # compiles, when compile is on
    sync(x.device)
    first = time.perf_counter() - start
    figures = step_overhead.measure(method, x, y, fast, *((1, 1) if ctx.smoke else (5, 1)))
    figures |= memory.peak_memory(training_step(method, fast, x, y), x.device)
    params = sum(p.numel() for p in method.parameters())
    return {
        **figures,
        "images_per_s": round(args.batch / figures["step_ms"] * 1e3, 1),
        "first_step_s": round(first, 2),
        **{"target": args.target, "guide": args.guide, "batch": args.batch},
        "parameters_m": round(params / 1e6, 2),
        **fast.describe(),
    }


def part_epoch(ctx: Context) -> dict:
    import d2r
    from d2r.data.synthetic import SPLIT_SIZES

    sets = {"data.name": "synthetic", "data.like": ctx.like, "train.epochs": 1}
    sets |= {"train.device": ctx.device, "train.checkpoint_minutes": 0, "train.log_every": 20}
    sets |= {"eval.subset": 128, "eval.batch_size": 128}
    if ctx.smoke:
        sets |= {"target.name": "small_cnn", "guide.name": "tiny_cnn", "method.steps": 2}
        sets |= {"data.train_subset": 64, "data.batch_size": 32, "train.log_every": 1}
        sets |= {"eval.subset": 32, "eval.batch_size": 32}
    out = ctx.work / "epoch"
    clock = StepClock(out / "metrics.jsonl")
    start = time.perf_counter()
    with clock:
        run = d2r.train(ROOT / "configs/cifar10/d2r_cag.yaml", out=out, overrides=sets, quiet=True)
    final, env = run.final, json.loads((out / "env.json").read_text())
    steady = clock.seconds_per_step()
    images = run.config.data.train_subset or SPLIT_SIZES[ctx.like][0]
    return {
        "epoch_s": round(final["seconds"], 1),
        "steady_epoch_s": round(steady * final["step"], 1) if steady else None,
        "goal_s": GOAL_EPOCH_S,
        "steps": final["step"],
        "images": images,
        "run_wall_s": round(time.perf_counter() - start, 1),
        **{k: round(final[k], 4) for k in ("loss", "clean_acc", "robust_acc") if k in final},
        **{"target": run.config.target["name"], "guide": run.config.guide["name"]},
        **env["fast_path"],
    }


class StepClock:
    """Notes when each step line appears in metrics.jsonl (polled by a thread every 20 ms), so
    the steady step time excludes the first steps' compilation."""

    def __init__(self, path: Path) -> None:
        import threading

        self.path, self.seen = path, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> StepClock:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            try:
                lines = self.path.read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                if '"kind": "step"' in line and line.endswith("}"):
                    step = json.loads(line)["step"]
                    self.seen.setdefault(step, time.perf_counter())

    def seconds_per_step(self) -> float | None:
        if len(self.seen) < 2:
            return None
        (s0, t0), (s1, t1) = min(self.seen.items()), max(self.seen.items())
        return (t1 - t0) / (s1 - s0)


def _eval_part(ctx: Context, attack: str, n: int) -> dict:
    import torch

    import d2r
    from d2r import data
    from d2r.attacks import AutoAttack, from_name
    from d2r.models import MODELS
    from d2r.runs import load_run

    run_dir = ctx.work / "epoch"
    if (run_dir / "last.safetensors").is_file():
        model, source = load_run(run_dir)[1].target, "the epoch part's model (one epoch)"
    else:
        torch.manual_seed(0)
        arch = "small_cnn" if ctx.smoke else "wrn34_10"
        channels = data.info("synthetic", ctx.like).channels
        model = MODELS.create(arch, num_classes=10, in_channels=channels).eval()
        source = "random init"
    x, y = data.load("synthetic", "", "test", like=ctx.like)
    suite = {attack: from_name(attack, 8 / 255)}
    if ctx.smoke and attack == "aa":  # APGD-CE alone: the adapter's path in a second, not 20
        suite[attack] = AutoAttack(8 / 255, version="custom", attacks=("apgd-ce",))
    try:
        result = d2r.evaluate(
            model.to(ctx.device), x[:n], y[:n], attacks=suite, eps=8 / 255,
            batch_size=min(n, 500), device=ctx.device, checks=False,
        )  # fmt: skip
    except ImportError as error:  # AutoAttack's optional package
        raise Skip(str(error)) from None
    seconds = result["seconds"][attack]
    return {
        "seconds": round(seconds, 2),
        "images": n,
        "images_per_s": round(n / seconds, 1),
        "clean": round(result["clean"], 4),
        attack: round(result[attack], 4),
        "eps": "8/255",
        "model": source,
    }


def part_vs_naive(ctx: Context) -> dict:
    from vs_naive import compare

    sets = [
        "data.name=synthetic",
        f"data.like={ctx.like}",
        "method.eps=0.031",
        "method.step_size=0.007",
    ]
    if ctx.smoke:
        sets += ["data.train_subset=64", "data.batch_size=32", "method.steps=2"]
        return compare(sets, ctx.device, epochs=1, workers=0)
    sets += ["data.train_subset=1280", "target.name=wrn34_10", "guide.name=resnet18"]
    return compare(sets, ctx.device, epochs=1, workers=min(8, os.cpu_count() or 1))


PART_FUNCTIONS = {
    "env": part_env,
    "step_fp32": lambda ctx: _step_part(ctx, "off", "off", "off"),
    "step_fast": lambda ctx: _step_part(ctx, "auto", "auto", "auto"),
    "step_bf16_eager": lambda ctx: _step_part(ctx, "bf16", "on", "off"),
    "epoch": part_epoch,
    "pgd": lambda ctx: _eval_part(ctx, "pgd20", 32 if ctx.smoke else 1000),
    "autoattack": lambda ctx: _eval_part(ctx, "aa", 8 if ctx.smoke else 1000),
    "vs_naive": part_vs_naive,
}
assert set(PART_FUNCTIONS) | {"cuda_tests"} == {p.name for p in PARTS}


if __name__ == "__main__":
    sys.exit(main())
