"""The Python API (`d2r.train`, `d2r.api.make_config`), the progress display, TensorBoard's
missing-package error, and every ```python block of docs/usage.md, docs/own-models.md and
README.md, run as written."""

from __future__ import annotations

import io
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

import d2r
from d2r import logs
from d2r.api import make_config
from d2r.cli import main
from d2r.config import Config
from d2r.evaluate import EvaluationWarning
from d2r.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "usage.md", ROOT / "README.md", ROOT / "docs" / "own-models.md"]


# make_config ---------------------------------------------------------------------------------


def test_make_config_takes_a_path_a_dict_or_a_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n")
    assert make_config(path).train.epochs == 3
    assert make_config({"train": {"epochs": 4}}).train.epochs == 4
    assert make_config(Config(), {"train.epochs": 5}).train.epochs == 5
    assert make_config().train.epochs == Config().train.epochs


def test_overrides_read_strings_like_set_and_keep_other_values():
    cfg = make_config(
        overrides={
            "method.eps": "8/255",
            "train.decay_at": [0.5],
            "data.augment": False,
            "train.lr": 0.05,
        }
    )
    assert cfg.method["eps"] == pytest.approx(8 / 255)
    assert cfg.train.decay_at == [0.5] and cfg.data.augment is False and cfg.train.lr == 0.05


def test_overrides_refuse_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown config key .train\.epoch."):
        make_config(overrides={"train.epoch": 2})


# progress --------------------------------------------------------------------------------------


class _Loader:
    """Four batches of two images, like DeviceLoader (which exposes the split as .x)."""

    x = torch.zeros(8, 1, 8, 8)

    def __iter__(self):
        for i in range(4):
            yield self.x[2 * i : 2 * i + 2], torch.zeros(2, dtype=torch.long)


def _drive(mode: str) -> str:
    stream = io.StringIO()
    progress = Progress(epochs=1, mode=mode, stream=stream)
    progress.end_epoch({"kind": "epoch", "epoch": 0, "clean_acc": 0.5, "robust_acc": 0.25})
    bar = progress.epoch(_Loader(), 0)
    for step, _ in enumerate(bar, 1):
        if step % 2 == 0:  # as the trainer does every train.log_every steps
            bar.log(step, {"loss": 1.5, "ce": 1.0})
    return stream.getvalue()


def test_plain_lines_when_not_a_terminal():
    text = _drive("auto")  # a StringIO is not a terminal
    lines = [line for line in text.splitlines() if " step " in line]
    assert len(lines) == 2 and "\r" not in text
    assert "4/8 img (50%)" in lines[0] and "img/s" in lines[0] and "eta" in lines[0]
    assert "loss=1.5 ce=1" in lines[0] and "last clean=50.0% robust=25.0%" in lines[0]


def test_a_bar_on_request_and_nothing_when_quiet():
    assert "epoch 1/1" in _drive("bar")
    assert _drive("off") == ""


# TensorBoard -----------------------------------------------------------------------------------


def test_tensorboard_without_the_package_fails_at_start(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    out = tmp_path / "run"
    assert main(["train", "-q", "--set", "train.tensorboard=true", "--out", str(out)]) == 1
    err = capsys.readouterr().err  # a missing package: the environment, exit 1, one line
    assert 'pip install "d2r-robust[tensorboard]"' in err and err.count("\n") == 1
    assert not out.exists()


def test_tensorboard_mirrors_step_and_epoch_records(monkeypatch, tmp_path):
    scalars = []

    class Writer:
        def __init__(self, log_dir):
            assert log_dir == str(tmp_path / "tensorboard")

        def add_scalar(self, tag, value, x):
            scalars.append((tag, value, x))

        flush = close = lambda self: None

    monkeypatch.setattr(logs, "_summary_writer_class", lambda: Writer)
    board = logs.TensorBoardLog()
    board.write(tmp_path, {"kind": "step", "epoch": 1, "step": 20, "loss": 2.0})
    board.write(tmp_path, {"kind": "epoch", "epoch": 1, "step": 40, "clean_acc": 0.5})
    board.close()
    assert scalars == [("train/loss", 2.0, 20), ("epoch/clean_acc", 0.5, 1)]


def test_tensorboard_writes_real_event_files(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason=f"tensorboard not installed ({logs.TENSORBOARD_HINT}; the dev extra has it)",
    )
    out = tmp_path / "run"
    args = ["train", "-q", "--out", str(out), "--set", "train.tensorboard=true"]
    for item in ("train.epochs=1", "data.train_subset=128", "method.steps=2", "train.log_every=1"):
        args += ["--set", item]
    assert main(args) == 0
    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "epoch/clean_acc" in tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1]  # 128 images = 1 batch of 128


# docs ------------------------------------------------------------------------------------------


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if d.is_file() and python_blocks(d)], ids=lambda d: d.name
)
def test_python_blocks_in_docs_run(doc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the snippets write runs/ and model files where they stand
    namespace: dict = {"__name__": "__docs__"}
    with warnings.catch_warnings():  # an example must not teach a number its checks distrust
        warnings.simplefilter("error", EvaluationWarning)
        for i, block in enumerate(python_blocks(doc)):
            exec(compile(block, f"{doc.name}[python block {i + 1}]", "exec"), namespace)
    if doc.name == "own-models.md":  # its modules were imported from the working directory
        assert (tmp_path / "own.safetensors").is_file()
        assert (tmp_path / "runs" / "own-method" / "last.safetensors").is_file()
    if doc.name == "usage.md":
        assert (tmp_path / "robust.safetensors").is_file()
        assert (tmp_path / "runs" / "usage-demo" / "curves.png").is_file()


def test_train_returns_the_run_and_writes_every_file(tmp_path):
    run = d2r.train(
        out=tmp_path / "run",
        quiet=True,
        overrides={
            "train.epochs": 1,
            "data.train_subset": 128,
            "method.steps": 2,
            "eval.subset": 50,
            "eval.attack": "pgd5",
        },
    )
    assert run.dir == tmp_path / "run" and run.config.train.epochs == 1
    assert [r["epoch"] for r in run.history] == [1] and 0 <= run.final["robust_acc"] <= 1
    for name in ("config.yaml", "metrics.jsonl", "last.safetensors", "curves.png"):
        assert (run.dir / name).is_file(), name
