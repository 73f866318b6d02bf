"""Plugins (issue 25): a package installed with a `d2r.plugins` entry point registers its names
in every fresh d2r process; `d2r list` names each plugin name's package; `d2r train` builds a
plugin's model by its name; a plugin that fails to import, or takes a name already registered,
is one warning line, none of its names stay, and the rest of d2r works."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2r.models import MODELS
from d2r.registry import NameTaken, Registry, registering_for

SRC = Path(__file__).resolve().parents[1] / "src"

GOOD = """
from torch import nn
from d2r.models import MODELS

@MODELS.register("mynet")
def mynet(num_classes=10, in_channels=1, width=8):
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )
"""

BROKEN = "import a_module_nobody_installed\n"

# registers one free name, then takes a built-in one: refused, and neither name stays
CLASH = """
from d2r.models import MODELS

def register():
    MODELS.register("clash_free")(lambda num_classes=10, in_channels=1: None)
    MODELS.register("small_cnn")(lambda num_classes=10, in_channels=1: None)
"""


# an evaluation attack "mine" (FGSM's entry under another name), and a plugin that registers one
# and then fails: its attack must go with it
ATTACK = """
from d2r.attacks import EVAL_ATTACKS, EvalAttack, FGSM

EVAL_ATTACKS.register(EvalAttack("mine", "mine", lambda eps, **_: FGSM(eps=eps), "MINE", "mine"))
"""
HALF_ATTACK = """
from d2r.attacks import EVAL_ATTACKS, EvalAttack, FGSM

EVAL_ATTACKS.register(
    EvalAttack("halfway", "halfway", lambda eps, **_: FGSM(eps=eps), "HALF", "halfway")
)
raise RuntimeError("the plugin breaks after registering")
"""


def install(site: Path, package: str, version: str, entry: str, module: str) -> None:
    """A package as pip leaves it: its module and its dist-info with the entry point."""
    info = site / f"{package}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[d2r.plugins]\n{entry}\n")
    (site / package).mkdir()
    (site / package / "__init__.py").write_text("")
    (site / package / "d2r_plugin.py").write_text(module)


def d2r(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(SRC)])}
    return subprocess.run(
        [sys.executable, "-m", "d2r", *args], env=env, cwd=cwd, capture_output=True, text=True
    )


@pytest.fixture
def site(tmp_path):
    site = tmp_path / "site"
    install(site, "mypkg", "1.2", "mynet = mypkg.d2r_plugin", GOOD)
    return site


def test_list_in_a_fresh_process_shows_the_plugins_model_with_its_package(site, tmp_path):
    out = d2r(site, "list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    models = next(line for line in out.stdout.splitlines() if line.startswith("models:"))
    assert "mynet (plugin from mypkg 1.2)" in models
    assert "small_cnn," in models and "small_cnn (" not in models  # d2r's own: no origin
    assert "plugin mynet (mypkg.d2r_plugin) from mypkg 1.2: loaded" in out.stdout
    assert out.stderr == ""


def test_a_config_naming_a_plugins_model_trains_in_a_fresh_process(site, tmp_path):
    sets = ["target.name=mynet", "train.epochs=1", "data.train_subset=64", "method.steps=1"]
    sets += ["eval.subset=20"]
    args = ["train", "-q", "--out", str(tmp_path / "run")]
    for item in sets:
        args += ["--set", item]
    out = d2r(site, *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "run" / "last.safetensors").exists()
    assert "name: mynet" in (tmp_path / "run" / "config.yaml").read_text()
    source = json.loads((tmp_path / "run" / "env.json").read_text())["sources"]["target"]
    assert source["plugin"] == "mypkg 1.2" and source["module"] == "mypkg.d2r_plugin"


def test_a_broken_or_clashing_plugin_is_one_warning_line_and_d2r_works(site, tmp_path):
    install(site, "brokenpkg", "0.1", "broken = brokenpkg.d2r_plugin", BROKEN)
    install(site, "clashpkg", "3.0", "clash = clashpkg.d2r_plugin:register", CLASH)
    out = d2r(site, "list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    warnings = out.stderr.splitlines()
    assert len(warnings) == 2, out.stderr
    broken = next(w for w in warnings if "'broken'" in w)
    assert broken.startswith("d2r: warning: plugin 'broken'") and "from brokenpkg 0.1" in broken
    assert "a_module_nobody_installed" in broken and "Traceback" not in out.stderr
    clash = next(w for w in warnings if "'clash'" in w)
    assert "from clashpkg 3.0 refused" in clash and "'small_cnn'" in clash and "by d2r" in clash
    assert "mynet (plugin from mypkg 1.2)" in out.stdout  # the good plugin still loads
    assert "clash_free" not in out.stdout.split("evaluation attacks")[0]  # rolled back
    assert "plugin broken (brokenpkg.d2r_plugin) from brokenpkg 0.1: not loaded" in out.stdout


def test_a_broken_plugin_is_silent_under_q_and_on_import_and_named_by_unknown_names(site, tmp_path):
    install(site, "brokenpkg", "0.1", "broken = brokenpkg.d2r_plugin", BROKEN)
    quiet = d2r(site, "-q", "list", cwd=tmp_path)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert "plugin broken (brokenpkg.d2r_plugin) from brokenpkg 0.1: not loaded" in quiet.stdout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(SRC)])}
    code = "import d2r; from d2r.models import MODELS; MODELS.get('brokennet')"
    lib = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert "d2r: warning" not in lib.stderr  # a library import prints nothing
    last = lib.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError: unknown model 'brokennet'")
    assert "plugin 'broken' from brokenpkg 0.1 failed to load (`d2r list` says why)" in last


def test_a_plugins_evaluation_attack_is_tagged_and_leaves_with_it_when_it_fails(site, tmp_path):
    install(site, "atkpkg", "0.3", "atk = atkpkg.d2r_plugin", ATTACK)
    install(site, "halfpkg", "0.4", "half = halfpkg.d2r_plugin", HALF_ATTACK)
    out = d2r(site, "list", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    attacks = out.stdout.split("evaluation attacks")[1].splitlines()[0]
    assert "mine (plugin from atkpkg 0.3)" in attacks
    assert "halfway" not in attacks  # registered, then its plugin failed: removed
    assert "plugin 'half' (halfpkg.d2r_plugin) from halfpkg 0.4 failed" in out.stderr


def test_names_registered_for_a_plugin_record_it_and_leave_with_it_when_it_fails():
    registry = Registry("thing")
    with registering_for("pkg 1.0"):
        registry.register("a")(int)
    assert registry.origin("a") == "pkg 1.0" and registry.names() == ["a"]
    taken = r"'a' is already registered \(by pkg 1.0\)"
    with pytest.raises(NameTaken, match=taken), registering_for("other 2.0"):
        registry.register("b")(int)
        registry.register("a")(int)
    assert registry.names() == ["a"] and registry.origin("b") is None
    assert MODELS.origin("small_cnn") is None
