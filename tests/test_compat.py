"""The torch versions the project declares, tests and pins (issues 29 and 30): pyproject.toml's
floor is the oldest version docs/compatibility.md (and README, where it says) names as tested,
with no upper bound; CI pins a tested version through constraints/ci.txt before any pip
install; and gpu_check's preflight names the versions found, each feature, and stops before
any part when the code cannot import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
# the line docs/compatibility.md (and README.md, if it has one) lists the tested versions on
TESTED = re.compile(r"^Tested with torch (?P<versions>\d[\w.+]*(?:, \d[\w.+]*)*)(?: \(|\.|$)", re.M)


def _torch_requirement() -> Requirement:
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S).group(1)
    (line,) = [r for r in re.findall(r'"([^"]+)"', deps) if Requirement(r).name == "torch"]
    return Requirement(line)


def _tested(text: str) -> list[Version]:
    matches = TESTED.findall(text)
    assert len(matches) <= 1, "one 'Tested with torch' line"
    return [Version(v) for v in matches[0].split(", ")] if matches else []


def test_the_declared_floor_is_the_oldest_torch_tested_and_there_is_no_upper_bound():
    spec = _torch_requirement().specifier
    (floor,) = [s for s in spec if s.operator == ">="]
    assert len(spec) == 1, f"torch{spec}: a floor only, so a user's newer torch is kept"
    tested = _tested((ROOT / "docs" / "compatibility.md").read_text())
    assert tested, "docs/compatibility.md says 'Tested with torch X, Y ...'"
    oldest = min(tested)
    assert Version(floor.version) == Version(oldest.base_version), (floor, tested)
    readme = _tested((ROOT / "README.md").read_text())
    assert not readme or readme == tested, "README and docs/compatibility.md name one list"


def test_ci_pins_a_tested_torch_before_its_first_pip_install():
    pins = (ROOT / "constraints" / "ci.txt").read_text()
    (pinned,) = re.findall(r"^torch==(\S+)$", pins, re.M)
    tested = _tested((ROOT / "docs" / "compatibility.md").read_text())
    assert Version(pinned) in tested and Version(pinned) in _torch_requirement().specifier
    ci = (ROOT / ".ci" / "run").read_text()
    export = ci.index('export PIP_CONSTRAINT="$PWD/constraints/ci.txt"')
    assert export < ci.index("pip install")
    # the README's two commands stay verbatim
    assert 'pip install -e ".[dev]" && pytest' in ci and "pip install . && d2r train" in ci


def test_preflight_finds_this_torch_and_every_feature(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as gpu_check.py runs it
    import torch

    import preflight

    info = preflight.report()
    assert info["fatal"] == [] and info["torch"] == torch.__version__
    # every feature is there on the torch versions tested but these, which d2r works around
    missing = {name for name, present in info["features"].items() if not present}
    assert missing <= {"fused SGD (CUDA)", "autocast cache keeps gradients (CPU)"}, missing
    first = preflight.lines(info)[0]
    assert first.startswith(f"preflight: Python {info['python']}, torch {torch.__version__}")


def test_gpu_check_stops_before_any_part_when_a_module_cannot_import(tmp_path):
    """As on a machine without a package d2r needs: exit 2 after the preflight's lines, with
    results.json saying why, and no part started."""
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import preflight;"
        "preflight.MODULES += ('d2r_no_such_module',); import gpu_check;"
        f"sys.argv = ['gpu_check.py', '--smoke', '--out', {str(tmp_path / 'c')!r}];"
        "sys.exit(gpu_check.main())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "gpu_check: preflight: Python" in done.stderr.splitlines()[0]
    assert "FATAL import d2r_no_such_module: ModuleNotFoundError" in done.stderr
    assert "gpu_check: env" not in done.stderr  # no part began
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert "parts" not in results and results["preflight"]["fatal"]


def test_the_steps_autocast_keeps_gradients_after_a_no_grad_pass():
    """The step's autocast region holds no-grad passes and passes that train. torch 2.2.2 and
    2.8.0's autocast cache reused a weight's bf16 copy cast under no_grad, so the weight got no
    gradient (no learning under bf16; DDP's "parameters that were not used"): d2r.speed turns
    the cache off where its feature test finds that."""
    import torch
    from torch import nn

    from d2r import speed

    fast = speed.FastPath("cpu", amp=True, channels_last=False, compile=False,
                          optimizer_impl="foreach")  # fmt: skip
    linear, x = nn.Linear(4, 4), torch.ones(2, 4)
    with fast.autocast():
        with torch.no_grad():
            linear(x)
        out = linear(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
