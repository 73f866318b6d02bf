"""A researcher's own architecture and method (issue 25): a model module written into a
temporary directory (the working directory: on the path as for `python -m`) trains, resumes,
evaluates, exports and reloads in fresh processes and runs in a two-cell sweep; a method by
import path trains; `normalize` leaves the state_dict keys alone and is recorded; timm and
torchvision targets take a training step (skipped, with the reason, without the extra);
`d2r eval --weights` reads an export's card or takes --model-opt / --normalize; each bad input
is one line before anything is written."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import d2r
from d2r import sweep
from d2r.cli import main
from d2r.evaluate.command import model_spec
from d2r.models import MODELS, add_normalization
from d2r.registry import Registry

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["data.train_subset=128", "method.steps=2", "eval.subset=30", "eval.attack=pgd3"]
TINY += ["train.epochs=1", "method.name=pgd_at", "data.batch_size=64"]

MODULE = '''
from torch import nn
from d2r.methods import PGDAT

def net(num_classes, in_channels, width=8):
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    )

def anything(**options):
    return net(options["num_classes"], options["in_channels"])

def wrong_shape(num_classes, in_channels):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, num_classes + 1))

def broken(num_classes, in_channels):
    return nn.Sequential(nn.Flatten(), nn.Linear(3, num_classes))

def not_a_module(num_classes, in_channels):
    return 42

class SlowAT(PGDAT):
    """PGD-AT with one more option, to show a method by import path."""
    def __init__(self, target, *, scale=1.0, **options):
        super().__init__(target, **options)
        self.scale = scale

    def loss(self, x, y, x_adv):
        out = super().loss(x, y, x_adv)
        return {**out, "loss": out["loss"] * self.scale}

NOT_A_METHOD = 3
'''


@pytest.fixture
def own(tmp_path, monkeypatch):
    """A working directory holding `ownnet.py`, as a researcher's project would."""
    (tmp_path / "ownnet.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("ownnet", None)


def train(out, *sets):
    args = ["train", "-q", "--out", str(out)]
    for item in [*TINY, *sets]:
        args += ["--set", item]
    return main(args)


def fresh(*args, cwd):
    """`python -P -m d2r ARGS` in a fresh process: -P keeps the working directory off the
    path, so the registry's own rule must find ownnet.py there."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-P", "-m", "d2r", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


NORMALIZE = "target.normalize={mean: [0.5], std: [0.25]}"


def test_an_own_model_trains_resumes_evaluates_exports_and_reloads(own):
    run = own / "run"
    assert train(run, "target.name=ownnet:net", "target.width=4", NORMALIZE) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["target"] == {
        "name": "ownnet:net",
        "width": 4,
        "normalize": {"mean": [0.5], "std": [0.25]},
    }
    env = json.loads((run / "env.json").read_text())
    assert env["sources"]["target"]["spec"] == "ownnet:net"
    assert env["sources"]["target"]["file"] == str(own / "ownnet.py")
    fresh("train", "-q", "--resume", "run", "--set", "train.epochs=2", cwd=own)
    assert json.loads((run / "last.json").read_text())["epoch"] == 2
    fresh("eval", "run", "--attacks", "pgd3", "--n", "30", "--no-checks", "-q", cwd=own)
    assert (run / "eval.json").is_file()
    fresh("export", "run", "--out", "own.safetensors", cwd=own)
    card = json.loads((own / "own.json").read_text())
    assert card["architecture"]["normalize"] == {"mean": [0.5], "std": [0.25]}
    assert card["architecture"]["source"]["module"] == "ownnet"
    assert "inside the model" in card["normalization"]
    code = "import d2r, torch; m = d2r.load_model('own.safetensors'); "
    code += "print(tuple(m(torch.rand(2, 1, 8, 8)).shape), m.d2r_normalize)"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=own, env=env, capture_output=True, text=True
    )
    assert "(2, 10)" in out.stdout, out.stderr
    # the card names architecture, options, normalization and data set: no --model, --data
    fresh("eval", "--weights", "own.safetensors", "--attacks", "pgd3", "--n", "30", "-q", cwd=own)
    assert (own / "own-eval" / "eval.json").is_file()
    # the report reads it as any run
    assert main(["report", str(run), "--out", str(own / "report.md")]) == 0


def test_normalize_keeps_the_state_dict_keys_and_runs_in_front(own):
    plain = MODELS.create("ownnet:net", num_classes=10, in_channels=3)
    wrapped = add_normalization(
        MODELS.create("ownnet:net", num_classes=10, in_channels=3),
        {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]},
    )
    assert list(plain.state_dict()) == list(wrapped.state_dict())
    wrapped.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    plain.eval(), wrapped.eval()
    torch.testing.assert_close(wrapped(x), plain((x - mean) / 0.2))


def test_a_method_by_import_path_trains(own):
    run = own / "run"
    sets = ("method.name=ownnet:SlowAT", "method.scale=0.5", "target.name=ownnet:anything")
    assert train(run, *sets) == 0
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["method"]["name"] == "ownnet:SlowAT" and cfg["method"]["scale"] == 0.5
    env = json.loads((run / "env.json").read_text())
    assert set(env["sources"]) == {"method", "target"}


def test_a_two_cell_sweep_runs_an_own_model(own):
    spec = {
        "set": {"train.epochs": 1, "data.train_subset": 128, "method.steps": 2,
                "eval.subset": 30, "eval.attack": "pgd3", "target.name": "ownnet:net"},
        "grid": {"seed": [0, 1]},
        "eval": {"attacks": ["pgd3"], "eps": 0.1, "n": 30},
    }  # fmt: skip
    (own / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    cells = sweep.run(own / "spec.yaml", own / "out")
    assert [c.state for c in cells] == ["done", "done"]


@pytest.mark.parametrize(
    ("sets", "expected"),
    [
        (["target.name=nowhere:net"], "cannot import module 'nowhere'"),
        (["target.name=ownnet:nope"], "ownnet.py defines no 'nope'"),
        (["target.name=ownnet:not_a_module"], "returned 'int', not a torch.nn.Module"),
        (["target.name=ownnet:wrong_shape"], "returns (2, 11)"),
        (["target.name=ownnet:broken"], "fails on a batch of 2 images"),
        (["target.name=ownnet:net", "target.depth=3"], "has no option 'depth'"),
        (["method.name=ownnet:NOT_A_METHOD"], "'NOT_A_METHOD' is a int, not a callable"),
        (["method.name=ownnet:net"], "is not a subclass of d2r.methods.Method"),
        (["target.name=ownnet:net", "target.normalize={mean: [1, 2], std: [1]}"], "2 values"),
        (["target.name=ownnet:net", "target.normalize={mean: [0], std: [0]}"], "must be > 0"),
        (["target.name=ownnet:net", "target.normalize=3"], "expected {mean: [...], std"),
    ],
)
def test_bad_input_is_one_line_and_nothing_is_written(own, capsys, sets, expected):
    assert train(own / "run", *sets) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("d2r: error:") and "\n" not in err, err
    assert expected in err
    assert not (own / "run").exists()


def test_the_registry_resolves_prefixes_and_import_paths(own):
    reg = Registry("thing")
    reg.add_resolver("pre", lambda name: lambda **kw: ("pre", name, kw))
    assert reg.get("pre:x")(a=1) == ("pre", "x", {"a": 1})
    assert reg.get("ownnet:net").__name__ == "net"
    assert reg.provenance("ownnet:net")["distribution"] is None
    with pytest.raises(ValueError, match="MODULE:CALLABLE"):
        reg.get("plain")
    with pytest.raises(ValueError, match="added twice"):
        reg.add_resolver("pre", str)


def test_eval_model_options_and_normalize_make_one_spec():
    spec = model_spec("wrn", ["depth=28", "widen_factor=10"], "0.5,0.4,0.3,0.2,0.2,0.2")
    assert spec == {
        "name": "wrn",
        "depth": 28,
        "widen_factor": 10,
        "normalize": {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]},
    }
    assert model_spec(None, [], None) is None
    for bad in (("wrn", ["depth"], None), ("wrn", [], "0.5"), (None, ["a=1"], None)):
        with pytest.raises(ValueError):
            model_spec(*bad)


def test_eval_weights_with_model_options(own, capsys):
    model = MODELS.create("ownnet:net", num_classes=10, in_channels=1, width=4)
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(own / "w.safetensors"))
    args = ["eval", "--weights", "w.safetensors", "--model", "ownnet:net", "--data", "digits"]
    args += ["--attacks", "pgd3", "--n", "20", "--no-checks", "-q"]
    assert main([*args, "--model-opt", "width=4", "--normalize", "0.5,0.25"]) == 0
    stored = json.loads((own / "w-eval" / "eval.json").read_text())
    assert "model_spec" in json.dumps(stored)
    capsys.readouterr()
    assert main([*args, "--out", "other"]) == 2  # width 8 by default: the weights do not fit
    assert "shape mismatches" in capsys.readouterr().err


# timm and torchvision ------------------------------------------------------------------------
SYNTH = ["data.name=synthetic", "data.like=cifar10", "data.train_subset=64", "data.batch_size=32"]


def test_a_timm_target_takes_a_training_step(own):
    pytest.importorskip("timm", reason="the [timm] extra is not installed")
    run = own / "run"
    assert train(run, *SYNTH, "target.name=timm:resnet18", "target.drop_rate=0.1") == 0
    env = json.loads((run / "env.json").read_text())
    assert env["sources"]["target"]["distribution"] == "timm"
    assert d2r.load_model(run)(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_a_torchvision_target_takes_a_training_step(own):
    pytest.importorskip("torchvision", reason="the [torchvision] extra is not installed")
    assert train(own / "run", *SYNTH, "target.name=torchvision:resnet18") == 0


def test_timm_bad_names_and_offline_weights_are_one_line(own, monkeypatch):
    timm = pytest.importorskip("timm", reason="the [timm] extra is not installed")
    with pytest.raises(ValueError, match="timm has no model 'nope'"):
        MODELS.get("timm:nope")

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ValueError, match="pretrained weights could not be fetched"):
        MODELS.create("timm:resnet18", num_classes=10, pretrained=True)


def test_a_missing_extra_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'd2r-robust\[timm\]'"):
        MODELS.get("timm:resnet18")
