"""Config parsing: defaults, YAML, --set overrides, fractions, one-line errors."""

import pytest
import yaml

from d2r.config import Config, apply_overrides, from_dict, parse_number, resolve, to_dict
from d2r.runs import check_config


def test_defaults_are_the_embedded_demo():
    cfg = resolve()
    assert cfg.data.name == "digits" and cfg.method["name"] == "d2r"
    assert cfg.target["name"] == "small_cnn" and cfg.guide["name"] == "tiny_cnn"


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.031", 0.031), (" 2 / 4 ", 0.5)])
def test_parse_number_accepts_fractions(text, value):
    assert parse_number(text) == pytest.approx(value)


def test_overrides_set_nested_keys_with_types():
    cfg = resolve(
        overrides=[
            "train.epochs=2",
            "method.alpha=30",
            "method.eps=8/255",
            "data.name=digits",
            "seed=3",
            "train.nesterov=true",
        ]
    )
    assert cfg.train.epochs == 2 and cfg.seed == 3 and cfg.train.nesterov is True
    assert cfg.method["eps"] == pytest.approx(8 / 255) and cfg.method["alpha"] == 30
    assert cfg.method["name"] == "d2r"  # the default component is kept and extended


def test_yaml_round_trip(tmp_path):
    cfg = resolve(overrides=["train.epochs=3", "eval.eps=8/255"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    again = resolve(path)
    assert to_dict(again) == to_dict(cfg)


def test_yaml_component_replaces_the_default_whole(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: {name: trades, beta: 6}\nguide: null\n")
    cfg = resolve(path)
    assert cfg.method == {"name": "trades", "beta": 6} and cfg.guide is None


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("train.epoch=2", "unknown config key 'train.epoch'.*valid keys: epochs"),
        ("bogus=1", "unknown config key 'bogus'"),
        ("train.epochs=two", "'train.epochs': expected a number"),
        ("train.lr=-0.1", "'train.lr': must be > 0"),
        ("train.lr=0", "'train.lr': must be > 0"),
        ("data.verify=maybe", "'data.verify': expected true or false"),
        ("train.decay_at=null", "'train.decay_at': expected list, got null"),
        ("train.epochs=null", "'train.epochs': expected int, got null"),
        ("train.epochs", "expected KEY=VALUE"),
        ("train.epochs.x=1", "'train.epochs': expected int"),
    ],
)
def test_bad_overrides_give_one_line_errors(override, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        resolve(overrides=[override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("method.eps=-0.1", "'method.eps': must be >= 0"),
        ("method.steps=0", "'method.steps': must be > 0"),
        ("method.alpha=-1", "'method.alpha': must be >= 0"),
        ("method.sym_rule=max", "'method.sym_rule': choose one of abs, sign, got 'max'"),
    ],
)
def test_component_ranges_are_checked_by_their_constructors(override, pattern):
    """config.py knows no method option: the constructor refuses, named by its config key,
    before any model is allocated (meta device)."""
    cfg = resolve(overrides=[override])  # structure and types are fine
    with pytest.raises(ValueError, match=pattern) as info:
        check_config(cfg)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        resolve(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="mapping"):
        resolve(listy)


def test_from_dict_requires_a_target():
    with pytest.raises(ValueError, match="target"):
        from_dict({"target": None})


def test_apply_overrides_does_not_mutate_input():
    raw = {"train": {"epochs": 1}}
    apply_overrides(raw, ["train.epochs=5"])
    assert raw == {"train": {"epochs": 1}}


def test_config_is_a_plain_dataclass():
    assert to_dict(Config())["train"]["lr"] == 0.1


def test_null_switches_an_optional_setting_off():
    cfg = resolve(overrides=["data.train_subset=100", "data.train_subset=null"])
    assert cfg.data.train_subset is None
    assert resolve(overrides=["guide=null"]).guide is None


@pytest.mark.parametrize(
    "override", ["method.eps=.nan", "method.eps=[0.5, .nan]", "train.lr=.inf", "method.beta=-.inf"]
)
def test_non_finite_numbers_are_refused_at_once_even_inside_lists(override):
    """(found by the hypothesis test: a NaN inside a list reached the config)"""
    with pytest.raises(ValueError, match=f"'{override.split('=')[0]}': must be a finite number"):
        resolve(None, [override])
