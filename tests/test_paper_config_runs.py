"""A paper config runs as soon as its archive is in data.root: shown with a tiny CIFAR-10
archive in the official layout (issue: `d2r train -c configs/cifar10/d2r_cag.yaml`)."""

import json
from pathlib import Path

from d2r.cli import main
from test_data import make_official, write_cifar10

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "cifar10" / "d2r_cag.yaml")
# The config as given, made CPU-sized: only model size, length, attack steps and the validation
# split (1,000 in the config; the tiny archive has 6 training images) change.
SMALL = ["target.name=small_cnn", "guide.name=tiny_cnn", "train.epochs=1", "method.steps=2",
         "data.batch_size=4", "eval.subset=1", "data.val_size=2"]  # fmt: skip


def _train(root: Path, out: Path, *extra: str) -> int:
    sets = [f"data.root={root}", *SMALL, *extra]
    args = ["train", "-c", CONFIG, "--out", str(out), "-q"]
    for item in sets:
        args += ["--set", item]
    return main(args)


def test_cifar10_config_trains_on_an_official_archive(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    make_official(monkeypatch, "cifar10", tmp_path)  # its checksum is the "published" one
    assert _train(tmp_path, tmp_path / "run") == 0
    cfg_text = (tmp_path / "run" / "config.yaml").read_text()
    assert "name: cifar10" in cfg_text and "alpha: 30.0" in cfg_text
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert epochs[-1]["kind"] == "epoch" and epochs[-1]["epoch"] == 1


def test_missing_archive_fails_before_any_work(tmp_path, capsys):
    assert _train(tmp_path, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "cifar-10-python.tar.gz is missing" in err
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in err
    assert not (tmp_path / "run").exists()


def test_archive_with_another_checksum_needs_verify_false(tmp_path, capsys):
    write_cifar10(tmp_path)  # not the official bytes
    assert _train(tmp_path, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "does not match the official" in err and "--set data.verify=false" in err
    assert not (tmp_path / "run").exists()
    assert _train(tmp_path, tmp_path / "run2", "data.verify=false") == 0
