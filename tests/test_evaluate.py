"""Worst-case evaluation, its sanity checks, foreign checkpoints and `d2r eval` end to end."""

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import d2r
from conftest import Rounded, mlp
from d2r import checkpoint, weights
from d2r.attacks import AA_INSTALL, PGD, AutoAttack
from d2r.cli import main
from d2r.config import format_eps
from d2r.evalstore import Store, rows
from d2r.evaluate import EvaluationWarning, markdown_table, suite_flags, worst_case
from d2r.models import create
from d2r.sanity import check_suite


class Noisy(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x + 0.1 * torch.randn_like(x))


@pytest.fixture()
def data():
    model = mlp()
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10  # a few clean mistakes
    return model, x, y


def _messages(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, EvaluationWarning)]


def test_worst_case_is_the_per_sample_and_of_all_attacks(data):
    model, x, y = data
    suite = {"pgd5": PGD(eps=0.05, steps=5), "cw5": PGD(eps=0.05, steps=5, loss="cw")}
    flags, _ = suite_flags(model, x, y, suite)
    worst = worst_case(flags)
    for name, f in flags.items():
        assert not (worst & ~f).any(), name  # robust in the worst case => robust to each
    assert torch.equal(worst, flags["clean"] & flags["pgd5"] & flags["cw5"])


def test_evaluate_reports_fractions_settings_and_is_reproducible(data):
    model, x, y = data
    result = d2r.evaluate(
        model, x, y, attacks=["pgd10", "cw10", "fgsm"], eps=8 / 255, seed=3, batch_size=10
    )
    assert set(result) >= {"clean", "pgd10", "cw10", "fgsm", "worst_case", "settings", "warnings"}
    assert result["clean"] == pytest.approx(28 / 32)
    for name in ("pgd10", "cw10", "fgsm"):
        assert 0 <= result["worst_case"] <= result[name] <= result["clean"]
    s = result["settings"]
    assert (s["eps"], s["eps_text"], s["norm"], s["n"], s["seed"]) == (
        8 / 255,
        "8/255",
        "Linf",
        32,
        3,
    )
    assert s["attacks"]["pgd10"]["steps"] == 10 and s["attacks"]["cw10"]["loss"] == "cw"
    assert s["attacks"]["pgd10"]["step_size"] == pytest.approx(2 / 255)
    # batch i is seeded from (seed, i): the same seed and batch size give the same numbers
    again = d2r.evaluate(
        model, x, y, attacks=["pgd10", "cw10", "fgsm"], eps=8 / 255, seed=3, batch_size=10
    )
    assert {k: again[k] for k in ("pgd10", "cw10")} == {k: result[k] for k in ("pgd10", "cw10")}
    assert result["worst_case_over"] == ["clean", "pgd10", "cw10", "fgsm"]
    uint8 = d2r.evaluate(model, (x * 255).round().to(torch.uint8), y, attacks=[], checks=False)
    assert 0 <= uint8["clean"] <= 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        d2r.evaluate(model, x * 255, y, attacks=[])


def test_train_mode_warns_and_is_restored(data):
    model, x, y = data
    model.train()
    with pytest.warns(EvaluationWarning, match="train mode"):
        result = d2r.evaluate(model, x, y, attacks=[], checks=False)
    assert model.training
    assert any("train mode" in w for w in result["warnings"])


def test_probabilities_and_random_outputs_warn(data):
    model, x, y = data
    with pytest.warns(EvaluationWarning, match="probabilities"):
        d2r.evaluate(nn.Sequential(model, nn.Softmax(1)).eval(), x, y, attacks=[], checks=False)
    with pytest.warns(EvaluationWarning, match="non-deterministic"):
        d2r.evaluate(Noisy(model).eval(), x, y, attacks=[], checks=False)


def test_an_honest_model_gets_no_warning(data):
    model, x, y = data
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        result = d2r.evaluate(model, x, y, attacks=["pgd10", "pgd20"], eps=0.05)
    assert result["warnings"] == []


def test_masked_gradient_triggers_the_masking_warnings(data):
    model, x, y = data
    with pytest.warns(EvaluationWarning) as record:
        result = d2r.evaluate(Rounded(model), x, y, attacks=["pgd10"], eps=0.1)
    messages = _messages(record)
    assert any("zero input gradient" in m for m in messages)
    assert any("eps=1.0" in m for m in messages)  # PGD cannot even win with the whole box
    assert messages == result["warnings"]


def _flags(*bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_pgd_far_above_autoattack_warns():
    # Synthetic flags (running AA's Square to break a masked model takes too long for a test):
    # PGD keeps 8 of 10, AA 4 of 10 -> 40 points apart, over the 5-point threshold.
    suite = {"pgd20": PGD(steps=20), "aa": AutoAttack()}
    flags = {
        "clean": _flags(*[1] * 10),
        "pgd20": _flags(*[1] * 8, 0, 0),
        "aa": _flags(*[1] * 4, *[0] * 6),
    }
    with pytest.warns(EvaluationWarning, match="gradient masking"):
        check_suite(flags, suite)
    flags["aa"] = _flags(*[1] * 7, 0, 0, 0)  # one sample apart: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationWarning)
        check_suite(flags, suite)


def test_accuracy_rising_with_more_steps_warns():
    suite = {"pgd10": PGD(steps=10), "pgd50": PGD(steps=50), "cw50": PGD(steps=50, loss="cw")}
    flags = {
        "clean": _flags(*[1] * 10),
        "pgd10": _flags(*[1] * 5, *[0] * 5),
        "pgd50": _flags(*[1] * 8, 0, 0),
        "cw50": _flags(*[0] * 10),
    }
    with pytest.warns(EvaluationWarning, match="more steps: pgd50"):
        check_suite(flags, suite)


def test_autoattack_in_evaluate_runs_and_is_reproducible(data):
    pytest.importorskip("pyautoattack", reason=AA_INSTALL)
    model, x, y = data
    suite = {
        "pgd10": PGD(eps=0.05, step_size=0.0125, steps=10),
        "aa": AutoAttack(eps=0.05, version="custom", attacks=("apgd-ce",), seed=0),
    }
    a = d2r.evaluate(model, x[:8], y[:8], attacks=suite, eps=0.05, checks=False)
    b = d2r.evaluate(model, x[:8], y[:8], attacks=suite, eps=0.05, checks=False)
    assert a["aa"] == b["aa"] and a["worst_case"] <= min(a["aa"], a["pgd10"])
    assert a["settings"]["attacks"]["aa"]["runs"] == ["apgd-ce"]
    assert a["settings"]["attacks"]["aa"]["package"].startswith("pyautoattack")


def test_missing_autoattack_fails_before_any_attack(data, monkeypatch):
    model, x, y = data
    monkeypatch.setitem(__import__("sys").modules, "pyautoattack", None)
    with pytest.raises(ImportError, match=r"d2r-robust\[autoattack\]"):
        d2r.evaluate(model, x, y, attacks=["pgd20", "aa"])


def test_markdown_table_has_the_paper_columns_and_dashes(data):
    model, x, y = data
    result = d2r.evaluate(model, x, y, attacks=["pgd20", "fgsm"], eps=8 / 255, checks=False)
    table = markdown_table({"last (epoch 3)": result})
    header = table.splitlines()[0]
    for column in ("Clean", "PGD-20", "PGD-50", "C&W", "AA", "FGSM", "Worst case", "eps (Linf)"):
        assert column in header
    row = table.splitlines()[2]
    assert row.startswith("| last (epoch 3) | 32 | 8/255 | 0 |") and row.count("—") == 3
    assert row.endswith("| Clean, PGD-20, FGSM |")  # what the worst case covers
    assert format_eps(0.031) == "0.031" and format_eps(8 / 255) == "8/255"
    # a short decimal reads as itself even where it is k/255 (0.2 = 51/255, 1 = 255/255)
    assert [format_eps(e) for e in (0.2, 1.0, 0.0, 16 / 255)] == ["0.2", "1", "0", "16/255"]


# Foreign checkpoints --------------------------------------------------------------------------


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_module_prefix_and_sub_block1_are_mapped(tmp_path):
    model = create("mlp", in_channels=1)
    state = {f"module.{k}": v for k, v in _state(model).items()}
    state["module.sub_block1.layer.0.conv1.weight"] = torch.zeros(1)  # the reference WRN's extra
    torch.save(state, tmp_path / "w.pt")
    other = create("mlp", in_channels=1)
    weights.load_foreign(other, tmp_path / "w.pt")
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s.update({"body.9.weight": torch.zeros(1)}), "unexpected keys body.9.weight"),
        (lambda s: s.pop("linear.bias"), "missing keys linear.bias"),
        (lambda s: s.update({"linear.bias": torch.zeros(3)}), "shape mismatches linear.bias"),
    ],
)
def test_mismatched_weights_are_refused_with_key_names(tmp_path, change, message):
    state = _state(create("mlp", in_channels=1))
    change(state)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=message):
        weights.load_foreign(create("mlp", in_channels=1), tmp_path / "w.safetensors")


class _Payload:
    """Unpickling this would create `marker`: the side effect must never happen."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_code_carrying_pt_file_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "evil": _Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused"):
        weights.read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_a_d2r_run_checkpoint_gives_its_target(tmp_path):
    target, guide = create("mlp", in_channels=1), create("mlp", in_channels=1, hidden=8)
    tensors = {
        **checkpoint.prefixed("target", target.state_dict()),
        **checkpoint.prefixed("guide", guide.state_dict()),
    }
    checkpoint.save(tmp_path / "last.safetensors", tensors, {"epoch": 1})
    assert set(weights.read_state_dict(tmp_path / "last.safetensors")) == set(target.state_dict())


# `d2r eval` end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    rc = main(
        [
            "train",
            "--set",
            "train.epochs=1",
            "--set",
            "data.train_subset=256",
            "--set",
            "eval.subset=100",
            "--out",
            str(out),
            "-q",
        ]
    )
    assert rc == 0
    return out


# the 1-epoch demo model is nearly constant: the large-eps check rightly warns about it
@pytest.mark.filterwarnings("ignore::d2r.attacks.EvaluationWarning")
def test_cli_eval_writes_json_and_table_for_last_and_best(run_dir, capsys):
    rc = main(
        ["eval", str(run_dir), "--attacks", "pgd20,pgd50,cw20", "--eps", "0.1", "--n", "40", "-q"]
    )
    assert rc == 0
    report = json.loads((run_dir / "eval.json").read_text())
    assert (report["format"], report["format_version"]) == ("d2r-eval", 2)
    assert [c["checkpoint"] for c in report["checkpoints"]] == ["last", "best"]
    # last and best hold the same epoch-1 weights: one sha256, each result stored once
    assert len({c["sha256"] for c in report["checkpoints"]}) == 1
    assert sorted(r["key"]["attack"] for r in report["results"]) == [
        "clean", "cw20", "pgd20", "pgd50"
    ]  # fmt: skip
    by_name = {r["checkpoint"]: r for r in rows(Store.read(run_dir))}
    last = by_name["last"]
    assert last["epoch"] == 1 and last["settings"]["n"] == 40 and last["eps"] == 0.1
    assert last["worst_case"] <= min(last["pgd20"], last["pgd50"], last["cw20"]) <= last["clean"]
    assert last["settings"]["eps_text"] == "0.1" and by_name["best"]["pgd20"] == last["pgd20"]
    table = (run_dir / "eval.md").read_text()
    assert "| last (epoch 1) | 40 | 0.1 |" in table and "| best (epoch 1) |" in table
    assert "PGD-50" in capsys.readouterr().out


# the 1-epoch demo model is nearly constant: the large-eps check rightly warns about it
@pytest.mark.filterwarnings("ignore::d2r.attacks.EvaluationWarning")
def test_cli_eval_foreign_weights(run_dir, tmp_path):
    tensors, _ = checkpoint.load(run_dir / "last.safetensors")
    state = {f"module.{k}": v for k, v in checkpoint.unprefixed("target", tensors).items()}
    torch.save(state, tmp_path / "foreign.pt")
    rc = main(
        [
            "eval",
            "--model",
            "small_cnn",
            "--weights",
            str(tmp_path / "foreign.pt"),
            "--data",
            "digits",
            "--attacks",
            "pgd20",
            "--eps",
            "0.1",
            "--n",
            "20",
            "-q",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    store = Store.read(tmp_path / "out")
    assert store.checkpoints[0]["model"] == "small_cnn"
    (foreign,) = rows(store)
    assert foreign["label"] == "foreign.pt" and foreign["settings"]["n"] == 20
    assert 0 <= foreign["pgd20"] <= foreign["clean"] <= 1
    assert not any("train mode" in w for w in foreign["warnings"])
    assert "| foreign.pt | 20 | 0.1 |" in (tmp_path / "out" / "eval.md").read_text()


def test_cli_eval_refuses_wrong_architecture(run_dir, tmp_path, capsys):
    rc = main(
        [
            "eval",
            "--model",
            "tiny_cnn",
            "--weights",
            str(run_dir / "last.safetensors"),
            "--data",
            "digits",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2
    assert "missing keys" in capsys.readouterr().err
