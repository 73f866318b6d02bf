"""Guides and targets from files (issue 14): `guide.weights` / `target.weights` (a d2r export, a
run's checkpoint, a foreign state dict; strict), and a frozen guide (`guide.trainable=false`):
eval mode, outside the optimizer, bit-identical to its file after training and resuming."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from d2r import checkpoint, data
from d2r.api import make_config
from d2r.cli import main
from d2r.config import resolve
from d2r.export import export_model, load_model
from d2r.models import small_cnn, tiny_cnn
from d2r.runs import build_method, resolved_config
from tiny_runs import TINY, evaluated_run

DIGITS = data.info("digits")


def _guide_file(path, seed: int = 3):
    """A tiny_cnn whose BatchNorm statistics are not at their init (so an update would show),
    saved as a plain safetensors state dict (a foreign file, as another codebase writes)."""
    torch.manual_seed(seed)
    model = tiny_cnn(in_channels=1).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(32, 1, 8, 8))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train(out, *sets: str) -> int:
    args = ["train", "-q", "--out", str(out)]
    for item in [*TINY, "data.train_subset=128", "eval.subset=50", *sets]:
        args += ["--set", item]
    return main(args)


def test_a_frozen_guide_is_bit_identical_after_training_and_resuming(tmp_path):
    file = tmp_path / "guide.safetensors"
    state = _guide_file(file)
    run = tmp_path / "run"
    frozen = [f"guide.weights={file}", "guide.trainable=false"]
    assert _train(run, "train.epochs=1", *frozen) == 0
    tensors, meta = checkpoint.load(run / "last.safetensors")
    assert _equal(checkpoint.model_weights(tensors, "guide"), state)  # BN buffers included
    assert not any(k.startswith("state.optim.guide.") for k in tensors)  # not in the optimizer
    assert [g["name"] for g in meta["train_state"]["optimizer"]["groups"]] == ["target"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["guide"] == {"name": "tiny_cnn", "weights": str(file), "trainable": False}
    env = json.loads((run / "env.json").read_text())
    assert env["weights"]["guide"]["path"] == str(file) and len(env["weights"]["guide"]["sha256"])
    file.unlink()  # a resume (and eval, export) reads the checkpoint, never the file again
    assert main(["train", "-q", "--resume", str(run), "--set", "train.epochs=2"]) == 0
    tensors, _ = checkpoint.load(run / "last.safetensors")
    assert _equal(checkpoint.model_weights(tensors, "guide"), state)
    assert load_model(run).training is False


def test_a_frozen_guide_stays_in_eval_mode_and_takes_no_gradient(tmp_path):
    file = tmp_path / "guide.safetensors"
    state = _guide_file(file)
    cfg = resolve(overrides=[f"guide.weights={file}", "guide.trainable=false"])
    method = build_method(cfg, DIGITS).train()
    assert not method.guide.training and method.target.training
    assert method.frozen == ("guide",) and list(method.trained_models()) == ["target"]
    assert set(method.models()) == {"target", "guide"}  # still checkpointed
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    method(x, y)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in method.guide.parameters())
    assert any(p.grad is not None for p in method.target.parameters())
    assert _equal(method.guide.state_dict(), state)  # the train-mode forward moved no buffer
    method.eval().train()
    assert not method.guide.training


def test_a_trainable_guide_starts_from_its_file_and_learns(tmp_path):
    file = tmp_path / "guide.safetensors"
    state = _guide_file(file)
    method = build_method(resolve(overrides=[f"guide.weights={file}"]), DIGITS).train()
    assert _equal(method.guide.state_dict(), state) and method.frozen == ()
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    method(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))["loss"].backward()
    optimizer.step()
    moved = [k for k, p in method.guide.named_parameters() if not torch.equal(p, state[k])]
    assert moved  # the guide is in the optimizer and learns


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The cached tiny D2R run (target small_cnn) and its export."""
    run = evaluated_run(tmp_path_factory)
    export = tmp_path_factory.mktemp("export") / "target.safetensors"
    export_model(run, export)
    return run, export


def _run_target(run) -> dict:
    tensors, _ = checkpoint.load(run / "last.safetensors")
    return checkpoint.model_weights(tensors, "target")


def test_an_export_a_run_checkpoint_and_a_pt_file_load_as_guide_or_target(trained, tmp_path):
    run, export = trained
    expected = _run_target(run)
    pt = tmp_path / "foreign.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in expected.items()}}, pt)
    for file in (export, run / "last.safetensors", pt):
        sets = ["guide.name=small_cnn", f"guide.weights={file}", "guide.trainable=false"]
        method = build_method(resolve(overrides=sets), DIGITS)
        assert _equal(method.guide.state_dict(), expected), file  # a run gives its target
        method = build_method(resolve(overrides=[f"target.weights={file}"]), DIGITS)
        assert _equal(method.target.state_dict(), expected), file  # to fine-tune
    assert _equal(load_file(str(export)), expected)


@pytest.mark.parametrize(
    "sets,error,message",
    [
        (["guide.weights=nowhere.safetensors"], FileNotFoundError, "'guide.weights'.*not found"),
        (["guide.trainable=false"], ValueError, "'guide.trainable'.*give guide.weights=FILE"),
        (["guide.weights=3"], ValueError, "'guide.weights': expected a weights file path"),
        (["guide.trainable=maybe"], ValueError, "'guide.trainable': expected true or false"),
        (["target.trainable=false"], ValueError, "has no option 'trainable'"),
    ],
)
def test_bad_weights_options_are_one_line_errors_before_any_work(sets, error, message):
    with pytest.raises(error, match=message):
        make_config(overrides=dict(s.split("=", 1) for s in sets))


def test_weights_of_another_architecture_are_refused_naming_the_key(trained, tmp_path, capsys):
    run, export = trained
    with pytest.raises(ValueError, match=r"holds a small_cnn .* guide.name is tiny_cnn"):
        make_config(overrides={"guide.weights": str(export)})  # the card names the arch
    with pytest.raises(ValueError, match=r"'guide.weights'.*do not fit the model"):
        make_config(overrides={"guide.weights": str(run / "last.safetensors")})  # no card
    out = tmp_path / "refused"
    assert _train(out, f"guide.weights={export}") == 2
    assert "config key 'guide.weights'" in capsys.readouterr().err and not out.exists()


def test_defaults_are_not_recorded_so_older_runs_stay_comparable(tmp_path):
    plain = resolved_config(resolve())
    explicit = resolved_config(resolve(overrides=["guide.trainable=true", "target.weights=null"]))
    assert explicit == plain and "trainable" not in plain.guide and "weights" not in plain.target
    file = tmp_path / "g.safetensors"
    _guide_file(file)
    frozen = resolved_config(resolve(overrides=[f"guide.weights={file}", "guide.trainable=false"]))
    assert frozen.guide == {"name": "tiny_cnn", "weights": str(file), "trainable": False}
    assert resolved_config(frozen) == frozen


def test_an_exported_fine_tuned_target_has_a_card_without_the_weights_key(trained, tmp_path):
    """target.weights is where training started, not an option of the architecture: the card
    rebuilds the model without it."""
    _, export = trained
    out = tmp_path / "fine-tuned"
    assert _train(out, "train.epochs=1", "target.name=small_cnn", f"target.weights={export}") == 0
    card = export_model(out, tmp_path / "ft.safetensors")
    assert "weights" not in card["architecture"]["options"]
    assert card["training"]["config"]["target"]["weights"] == str(export)
    assert isinstance(load_model(tmp_path / "ft.safetensors"), type(small_cnn()))
