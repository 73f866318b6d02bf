"""End to end on the embedded digits: `d2r train`, the run directory, `d2r eval`, CLI errors."""

import json

import pytest
import yaml

from d2r.checkpoint import load
from d2r.cli import main
from d2r.evalstore import Store, summary
from d2r.trainer import lr_factor

RUN_FILES = [
    "config.yaml",
    "env.json",
    "metrics.jsonl",
    "last.safetensors",
    "last.json",
    "best.safetensors",
    "best.json",
    "curves.png",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "demo"
    rc = main(
        ["train", "--set", "train.epochs=2", "--set", "eval.subset=200", "--out", str(out), "-q"]
    )
    assert rc == 0
    return out


def test_quiet_prints_the_run_directory_alone_and_loud_the_header_and_table(tmp_path, capsys):
    tiny = [
        a
        for kv in ("train.epochs=1", "data.train_subset=64", "eval.subset=32")
        for a in ("--set", kv)
    ]
    assert main(["train", "-q", "--out", str(tmp_path / "quiet"), *tiny]) == 0
    assert capsys.readouterr().out == f"run directory: {tmp_path / 'quiet'}\n"
    assert main(["train", "--out", str(tmp_path / "loud"), *tiny]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("training d2r on digits (") and lines[-3].startswith("| last | 1 |")
    assert lines[-1] == f"run directory: {tmp_path / 'loud'}"


def test_two_epoch_demo_learns_and_writes_every_file(demo_run):
    for name in RUN_FILES:
        assert (demo_run / name).is_file(), name
    epochs = [json.loads(line) for line in (demo_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert epochs[-1]["clean_acc"] > 0.3  # chance is 0.1 on digits
    assert all(0 <= r["robust_acc"] <= 1 for r in epochs)
    cfg = yaml.safe_load((demo_run / "config.yaml").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["method"]["name"] == "d2r"


def test_checkpoint_holds_both_models(demo_run):
    tensors, meta = load(demo_run / "last.safetensors")
    assert any(k.startswith("target.") for k in tensors)
    assert any(k.startswith("guide.") for k in tensors)
    assert meta["epoch"] == 2 and meta["models"] == ["target", "guide"]


def test_eval_gives_robust_at_most_clean(demo_run, capsys):
    rc = main(["eval", str(demo_run), "--attacks", "pgd20", "--eps", "0.1", "--n", "100"])
    assert rc == 0
    result = summary(Store.read(demo_run), "last", 0.1)
    assert result["pgd20"] <= result["clean"] and result["settings"]["n"] == 100


def test_refuses_to_overwrite_an_existing_run(demo_run, capsys):
    before = (demo_run / "last.safetensors").read_bytes()
    rc = main(["train", "--set", "train.epochs=1", "--out", str(demo_run), "-q"])
    assert rc == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (demo_run / "last.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epoch=2", "unknown config key 'train.epoch'"),
        ("method.eps=-1", "'method.eps': must be >= 0"),
        ("method.steps=0", "'method.steps': must be > 0"),
        ("train.lr=0", "'train.lr': must be > 0"),
        ("method.name=nope", "unknown method 'nope'; valid choices: "),
        ("target.name=resnet99", "unknown model 'resnet99'; valid choices: "),
        ("method.gamma=3", "method 'd2r' has no option 'gamma'"),
        ("method.sym_rule=max", "'method.sym_rule': choose one of abs, sign, got 'max'"),
        ("method.alpha=abc", "'method.alpha': expected a number"),
        ("method.alpha=null", "'method.alpha': expected float, got null"),
        ("data.name=imagenet22k", "unknown data set 'imagenet22k'"),
    ],
)
def test_bad_keys_give_one_line_error_and_write_nothing(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    rc = main(["train", "--set", override, "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.startswith("d2r: error: ") and err.count("\n") == 1
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "-c", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_list_names_every_registry(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for word in ("wrn34_10", "resnet18", "d2r", "pgd", "digits"):
        assert word in text


@pytest.mark.parametrize(
    "epoch,factor", [(0, 0.2), (1, 1.0), (74, 1.0), (75, 0.1), (89, 0.1), (90, 0.01), (99, 0.01)]
)
def test_reference_schedule_at_100_epochs(epoch, factor):
    assert lr_factor(epoch, 100, 0.2, [0.75, 0.9]) == pytest.approx(factor)


def test_schedule_scales_to_short_runs():
    factors = [lr_factor(e, 20, 0.2, [0.75, 0.9]) for e in range(20)]
    assert factors[0] == 0.2 and factors[1:15] == [1.0] * 14
    assert factors[15:18] == pytest.approx([0.1] * 3) and factors[18:] == pytest.approx([0.01] * 2)


def test_resuming_a_finished_run_succeeds_and_changes_nothing(demo_run, capsys):
    """A requeued job resuming a run that is done: nothing to do is a success (exit 0)."""
    before = {p.name: p.read_bytes() for p in demo_run.iterdir() if p.is_file()}
    assert main(["train", "--resume", str(demo_run), "-q"]) == 0
    out = capsys.readouterr().out
    assert "already finished its 2 epochs; nothing to do" in out and "train.epochs=N" in out
    assert {p.name: p.read_bytes() for p in demo_run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["--eps", "-1"], "eps=-1.0 invalid"),
        (["--attacks", "pgd0"], "attack 'pgd0' unknown"),
        (["--attacks", "pgdx"], "attack 'pgdx' unknown"),
    ],
)
def test_eval_refuses_bad_settings_before_any_work(demo_run, capsys, args, message):
    before = (demo_run / "eval.json").read_bytes() if (demo_run / "eval.json").exists() else None
    assert main(["eval", str(demo_run), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "evaluating" not in err
    after = (demo_run / "eval.json").read_bytes() if (demo_run / "eval.json").exists() else None
    assert after == before
