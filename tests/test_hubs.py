"""`d2r export --format hf` and `d2r.load_model(DIR | "hf://OWNER/REPO")`: the hub's layout,
the same logits after a round trip, and one-line refusals that write nothing. Nothing reaches
the network: huggingface_hub is replaced by a fake serving a local directory (and the real one,
where installed, runs with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import d2r
from d2r import hubs
from d2r.cli import main
from d2r.evalstore import Store, summary
from d2r.export import export_model, load_model, read_card
from d2r.runs import load_run
from tiny_runs import evaluated_run

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return evaluated_run(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "robust-digits"
    export_model(run_dir, out, format="hf")
    return out


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes: to show a refusal wrote nothing."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _fake_hub(monkeypatch, serve: Path | None = None, error: Exception | None = None) -> list:
    """A huggingface_hub whose hf_hub_download serves `serve`'s files (or raises `error`);
    returns the calls it got."""
    calls = []

    def hf_hub_download(repo_id, filename, *, revision=None):
        calls.append((repo_id, filename, revision))
        if error is not None:
            raise error
        return str(serve / filename)

    module = types.ModuleType("huggingface_hub")
    module.hf_hub_download = hf_hub_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    return calls


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert text and "\n" not in text
    return text


# The layout ----------------------------------------------------------------------------------


def test_layout_is_the_hubs(hf_dir, run_dir, tmp_path):
    assert sorted(p.name for p in hf_dir.iterdir()) == sorted(hubs.FILES)
    plain = tmp_path / "plain.safetensors"
    card = export_model(run_dir, plain)
    # the weights are the plain export's file, card and all
    assert (hf_dir / "model.safetensors").read_bytes() == plain.read_bytes()
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["d2r_format"] == "d2r-hf" and config["d2r_format_version"] == 1
    assert config["model_card"] == card == read_card(hf_dir / "model.safetensors")
    assert config["architecture"] == "small_cnn" and config["num_classes"] == 10
    assert config["options"] == {"num_classes": 10, "in_channels": 1, "hidden": 128}
    assert config["input_size"] == [1, 8, 8] and config["dataset"] == "digits"
    assert config["mean"] is None and config["std"] is None  # no normalization layer
    assert (config["eps"], config["norm"], config["method"]) == (0.1, "Linf", "d2r")
    assert config["d2r_version"] == d2r.__version__ and config["library_name"] == "d2r"


def test_readme_front_matter_holds_the_results_at_the_runs_eps(hf_dir, run_dir):
    text = (hf_dir / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["library_name"] == "d2r" and meta["datasets"] == ["digits"]
    assert {"d2r", "adversarial-robustness", "linf"} <= set(meta["tags"])
    (index,) = meta["model-index"]
    assert index["name"] == run_dir.name
    (result,) = index["results"]  # one evaluation stored at eps 0.1
    assert result["task"]["type"] == "image-classification"
    assert result["dataset"] == {"name": "digits", "type": "digits", "split": "test"}
    full = summary(Store.read(run_dir), "last", 0.1)
    got = [(m["type"], m["name"].split(" ")[0], m["value"]) for m in result["metrics"]]
    assert got == [
        ("accuracy", "clean", round(100 * full["clean"], 2)),
        ("robust_accuracy", "PGD-20", round(100 * full["pgd20"], 2)),
        ("robust_accuracy", "C&W", round(100 * full["cw20"], 2)),
        ("robust_accuracy", "worst", round(100 * full["worst_case"], 2)),
    ]
    assert result["metrics"][-1]["name"] == "worst case over clean, PGD-20, C&W (Linf, eps 0.1)"
    assert 'd2r.load_model("hf://OWNER/REPO")' in text and "| PGD-20 |" in text


def test_readme_of_an_unevaluated_run_says_so():
    card = {
        "architecture": {"name": "small_cnn"},
        "data": {"name": "digits", "input_size": [1, 8, 8]},
        "eps": 0.1,
        "norm": "Linf",
        "d2r_version": "0",
        "normalization": "none",
        "training": {"method": {"name": "pgd_at"}, "checkpoint": "last", "weights": "target"},
        "evaluation": None,
    }
    text = hubs.readme(card, "m")
    assert _front_matter(text)["model-index"] == [{"name": "m", "results": []}]
    assert "No evaluation at Linf eps 0.1" in text


# Round trips ---------------------------------------------------------------------------------


def _same_logits(model, run_dir):
    _, method = load_run(run_dir, "last")
    assert not any(m.training for m in model.modules())
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), method.target(x))


def test_hf_directory_round_trips_to_the_same_logits(hf_dir, run_dir):
    model = d2r.load_model(hf_dir)
    _same_logits(model, run_dir)
    assert model.d2r_card == read_card(hf_dir / "model.safetensors")


def test_hf_uri_loads_through_hf_hub_download(hf_dir, run_dir, monkeypatch):
    calls = _fake_hub(monkeypatch, serve=hf_dir)
    _same_logits(d2r.load_model("hf://someone/robust-digits"), run_dir)
    assert calls == [
        ("someone/robust-digits", "config.json", None),
        ("someone/robust-digits", "model.safetensors", None),
    ]
    calls.clear()
    load_model("hf://someone/robust-digits@v1.0")
    assert {c[2] for c in calls} == {"v1.0"}


def test_a_run_directory_still_loads_as_a_run(run_dir):
    assert type(load_model(run_dir)).__name__ == "SmallCNN"


def test_re_export_of_the_same_checkpoint_refreshes_it(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    (out / ".git").mkdir(parents=True)  # e.g. a clone of the hub repository
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    before = _tree(out)
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    assert _tree(out) == before


# Refusals: one line, nothing written ---------------------------------------------------------


def _refused(argv: list[str], root: Path, capsys, message: str) -> None:
    before = _tree(root)
    try:
        rc = main(argv)
    except SystemExit as stop:  # argparse's own refusal, one line too (cli.Parser)
        rc = stop.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert _tree(root) == before


def test_refuses_hf_without_out(run_dir, capsys):
    argv = ["export", str(run_dir), "--format", "hf"]
    _refused(argv, run_dir, capsys, "--format hf writes a directory for the hub: give --out DIR")


def test_refuses_an_out_that_is_a_file(run_dir, tmp_path, capsys):
    (tmp_path / "model").write_text("mine")
    argv = ["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "model")]
    _refused(argv, tmp_path, capsys, "is a file; --format hf writes a directory")


def test_refuses_a_directory_holding_other_files(run_dir, tmp_path, capsys):
    (tmp_path / "README.md").write_text("# mine\n")
    argv = ["export", str(run_dir), "--format", "hf", "--out", str(tmp_path)]
    _refused(argv, tmp_path, capsys, "files that are not a d2r hf export")


def test_refuses_the_run_directory_itself(run_dir, capsys):
    argv = ["export", str(run_dir), "--format", "hf", "--out", str(run_dir)]
    _refused(argv, run_dir, capsys, "files that are not a d2r hf export")


def test_refuses_the_export_of_another_checkpoint(run_dir, hf_dir, capsys):
    argv = ["export", str(run_dir), "--format", "hf", "--out", str(hf_dir), "--checkpoint", "best"]
    _refused(argv, hf_dir.parent, capsys, "the hf export of checkpoint 'last'")


def test_refuses_the_export_of_another_run(run_dir, hf_dir, tmp_path, capsys):
    other = tmp_path / "other-run"
    shutil.copytree(run_dir, other)
    argv = ["export", str(other), "--format", "hf", "--out", str(hf_dir)]
    _refused(argv, hf_dir.parent, capsys, f"of {str(run_dir.resolve())!r}")


def test_refuses_an_unknown_format(run_dir, tmp_path, capsys):
    argv = ["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x")]
    _refused(argv, tmp_path, capsys, "invalid choice: 'onnx'")
    with pytest.raises(ValueError, match="unknown export format 'onnx'") as err:
        export_model(run_dir, tmp_path / "x", format="onnx")
    _one_line(err)
    assert not (tmp_path / "x").exists()


def _copy(hf_dir: Path, dest: Path, **config_changes) -> Path:
    shutil.copytree(hf_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(config_changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.parametrize(
    "change,message",
    [
        ({"d2r_format": None}, "has no d2r_format 'd2r-hf': not a d2r export for the hub"),
        ({"d2r_format_version": 99}, "newer than this d2r reads"),
        ({"model_card": {"format": "d2r-model"}}, "differs from the one in model.safetensors"),
    ],
)
def test_refuses_a_wrong_config(hf_dir, tmp_path, change, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_model(_copy(hf_dir, tmp_path / "bad", **change))
    _one_line(err)


def test_refuses_config_json_that_is_not_json(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path / "bad")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not readable JSON") as err:
        load_model(bad)
    _one_line(err)


def test_refuses_a_directory_without_weights(hf_dir, tmp_path):
    bad = _copy(hf_dir, tmp_path / "bad")
    (bad / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors not found") as err:
        load_model(bad)
    _one_line(err)


@pytest.mark.parametrize(
    "uri", ["hf://owner", "hf://owner/", "hf:///repo", "hf://a/b@", "hf://a/b/c"]
)
def test_refuses_a_bad_uri(uri, monkeypatch):
    calls = _fake_hub(monkeypatch, serve=Path("/nonexistent"))
    with pytest.raises(ValueError, match="expected hf://OWNER/REPO") as err:
        load_model(uri)
    _one_line(err)
    assert calls == []


def test_missing_huggingface_hub_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(ImportError, match=r'pip install "d2r-robust\[hf\]"') as err:
        load_model("hf://someone/robust-digits")
    _one_line(err)


def _error(name: str, *bases: type) -> Exception:
    """An exception of huggingface_hub's class `name` (matched by name, as d2r.hubs does)."""
    return type(name, bases or (Exception,), {})("line one\nline two")


_ENTRY = type("EntryNotFoundError", (Exception,), {})


@pytest.mark.parametrize(
    "error,kind,message",
    [
        (_error("RepositoryNotFoundError", OSError), ValueError, "no such model repository"),
        (_error("RevisionNotFoundError", OSError), ValueError, "no such revision"),
        (_error("LocalEntryNotFoundError", FileNotFoundError, _ENTRY), ConnectionError, "offline"),
        (_error("EntryNotFoundError"), ValueError, "has no config.json: not a d2r export"),
        (ConnectionError("refused"), ConnectionError, "cannot reach the Hugging Face hub"),
        (RuntimeError("boom\nmore"), OSError, "fetching config.json failed (RuntimeError: boom)"),
    ],
)
def test_fetch_failures_are_one_line(monkeypatch, error, kind, message):
    _fake_hub(monkeypatch, error=error)
    with pytest.raises(kind, match=re.escape(message)) as err:
        load_model("hf://someone/robust-digits")
    _one_line(err)


def test_real_huggingface_hub_offline_is_one_line(tmp_path):
    """huggingface_hub itself, with HF_HUB_OFFLINE=1 and an empty cache: nothing is fetched."""
    pytest.importorskip("huggingface_hub")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    code = (
        "import d2r\n"
        "try:\n    d2r.load_model('hf://someone/robust-digits')\n"
        "except ConnectionError as err:\n    print(err)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and "cannot reach the Hugging Face hub for config.json" in line
