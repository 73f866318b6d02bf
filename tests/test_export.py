"""`d2r export` / `d2r.load_model`: the target with a model card, identical outputs after a
round trip, and refusal of files whose card or tensors do not fit."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import d2r
from d2r.cli import main
from d2r.evalstore import Store, summary
from d2r.export import META_KEY, export_model, load_model, read_card
from d2r.runs import load_run
from tiny_runs import evaluated_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return evaluated_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "robust.safetensors"
    export_model(run_dir, path)
    return path


def _resave(path, dest, tensors=None, card=None):
    """Copy of an exported file with other tensors and/or another card (None: no card)."""
    tensors = load_file(path) if tensors is None else tensors
    save_file(tensors, dest, metadata=None if card is None else {META_KEY: json.dumps(card)})
    return dest


def test_round_trip_gives_identical_outputs(run_dir, exported):
    _, method = load_run(run_dir, "last")
    model = d2r.load_model(exported)
    assert not any(m.training for m in model.modules())  # eval mode, ready for attacks
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), method.target(x))


def test_card_describes_the_model(run_dir, exported):
    card = read_card(exported)
    assert json.loads(exported.with_suffix(".json").read_text()) == card
    assert card["format"] == "d2r-model" and card["format_version"] == 1
    assert card["d2r_version"] == d2r.__version__
    assert card["architecture"] == {
        "name": "small_cnn",
        "options": {"num_classes": 10, "in_channels": 1, "hidden": 128},  # every option
    }
    assert card["data"] == {
        "name": "digits",
        "num_classes": 10,
        "in_channels": 1,
        "input_size": [1, 8, 8],
    }
    assert card["normalization"].startswith("none") and card["eps"] == 0.1
    assert card["training"]["method"]["name"] == "d2r" and card["training"]["method"]["steps"] == 3
    assert card["training"]["guide"] == {"name": "tiny_cnn"}
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert card["training"]["config"] == saved and card["training"]["not_recorded"] == []
    assert card["training"]["method"]["alpha"] == 30.0  # a default, recorded all the same
    (stored,) = card["evaluation"]  # one eps evaluated: one entry, from eval.json
    full = summary(Store.read(run_dir), "last", 0.1)
    assert stored["pgd20"] == full["pgd20"] and stored["worst_case"] == full["worst_case"]
    assert stored["settings"]["eps"] == 0.1 and stored["worst_case_over"] == [
        "clean",
        "pgd20",
        "cw20",
    ]


def test_cli_export_best_checkpoint(run_dir, tmp_path, capsys):
    out = tmp_path / "best.safetensors"
    assert main(["export", str(run_dir), "--out", str(out), "--checkpoint", "best"]) == 0
    assert read_card(out)["training"]["checkpoint"] == "best"
    assert "wrote" in capsys.readouterr().out


def test_refuses_to_overwrite_a_checkpoint(run_dir, capsys):
    before = (run_dir / "last.safetensors").read_bytes()
    assert main(["export", str(run_dir), "--out", str(run_dir / "last.safetensors")]) == 2
    assert "would overwrite the run's checkpoint" in capsys.readouterr().err
    assert (run_dir / "last.safetensors").read_bytes() == before


def test_refuses_a_file_without_a_card(exported, tmp_path):
    path = _resave(exported, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="has no d2r model card"):
        load_model(path)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"format": "something-else"}, "bad model card"),
        ({"format_version": 99}, "newer than this d2r reads"),
        ({"architecture": "small_cnn"}, "architecture must be"),
        ({"architecture": {"name": "resnet99", "options": {}}}, "cannot build"),
        ({"architecture": {"name": "mlp", "options": {"in_channels": 1}}}, "do not fit"),
    ],
)
def test_refuses_a_wrong_card(exported, tmp_path, change, message):
    card = {**read_card(exported), **change}
    path = _resave(exported, tmp_path / "bad.safetensors", card=card)
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_refuses_tensors_that_do_not_fit(exported, tmp_path):
    tensors = load_file(exported)
    first = next(iter(tensors))
    broken = {**tensors, first: torch.zeros(3, 3)}
    del broken[list(tensors)[-1]]
    path = _resave(exported, tmp_path / "broken.safetensors", broken, read_card(exported))
    with pytest.raises(ValueError, match="do not fit the model") as err:
        load_model(path)
    assert "missing keys" in str(err.value) and "shape mismatches" in str(err.value)


def test_load_model_from_a_run_directory(run_dir):
    model = load_model(run_dir)
    assert type(model).__name__ == "SmallCNN" and not model.training


def test_card_of_an_older_run_lists_what_its_config_does_not_record(run_dir, tmp_path):
    """A value config.yaml lacks would be this version's default: left out, and named."""
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    raw = yaml.safe_load((old / "config.yaml").read_text())
    del raw["method"]["beta"]
    (old / "config.yaml").write_text(yaml.safe_dump(raw))
    card = export_model(old, tmp_path / "m.safetensors")
    assert card["training"]["not_recorded"] == ["method.beta"]
    assert "beta" not in card["training"]["method"]
    assert "beta" not in card["training"]["config"]["method"]
