"""Every config under configs/ loads, validates and builds its method; the rows of Tables 1 and 2
carry the paper's settings, and configs of one data set differ only in the method."""

from pathlib import Path

import pytest
import torch

from d2r import data
from d2r.config import resolve, to_dict
from d2r.methods import METHODS
from d2r.runs import resolved_config
from d2r.trainer import build_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PATHS = sorted(CONFIGS.rglob("*.yaml"))
# The recipe of Wang et al. 2023 (generated data, EMA, ...) with two methods; the other configs
# are rows of the paper's tables, on the D2R recipe.
RECIPES = [CONFIGS / "cifar10/trades_ema_gen.yaml", CONFIGS / "cifar10/d2r_cag_ema_gen.yaml"]
PAPER = [p for p in PATHS if p not in RECIPES]

# Table 1 (docs/method.md, "Paper targets"; plus the PGD-AT, MART, FAT, GAIRAT, AWP rows of
# CIFAR-10, RAT(TRADES) on both and SAT's CIFAR-100 row, with its CIFAR-10 twin) and Table 2
TABLE1 = {
    "cifar10/d2r_cag.yaml": ("wrn34_10", "d2r", {"attack": "cag", "lam": 1.0, "alpha": 30.0}),
    "cifar10/lbgat.yaml": ("wrn34_10", "lbgat", {"beta": 0.0}),
    "cifar10/trades.yaml": ("wrn34_10", "trades", {"beta": 6.0, "bn_passes": "reference"}),
    "cifar10/trades_awp.yaml": (
        "wrn34_10",
        "trades",
        {"beta": 6.0, "awp_gamma": 5e-3, "bn_passes": "reference"},
    ),
    "cifar10/pgd_at.yaml": ("wrn34_10", "pgd_at", {"attack_mode": "eval"}),
    "cifar10/mart.yaml": ("wrn34_10", "mart", {"beta": 6.0}),
    "cifar10/fat.yaml": ("wrn34_10", "fat", {"tau": 0, "dynamictau": True, "omega": 0.001}),
    "cifar10/gairat.yaml": (
        "wrn34_10",
        "gairat",
        {"lam": -1.0, "weight_assignment_function": "tanh", "begin_at": 0.5},
    ),
    "cifar10/rat_trades.yaml": (
        "wrn34_10",
        "rat_trades",
        {"beta": 6.0, "alpha": 0.2, "noise_std": 1e-4, "bn_passes": "reference"},
    ),
    "cifar10/sat.yaml": ("wrn34_10", "sat", {"curriculum": "eps", "ramp_at": 0.5}),
    "cifar10/las_at.yaml": (
        "wrn34_10",
        "las_at",
        {"alpha": 4.0, "beta": 2.0, "factor": 0.7, "interval_num": 20},
    ),
    "cifar100/las_at.yaml": (
        "wrn34_10",
        "las_at",
        {"factor": 0.6, "policy_optimizer": "SGD_with_momentum"},
    ),
    "tiny_imagenet/las_at_preact_resnet18.yaml": (
        "preact_resnet18",
        "las_at",
        {"factor": 0.8, "interval_num": 1},
    ),
    "cifar100/d2r_cag.yaml": ("wrn34_10", "d2r", {"attack": "cag", "lam": 0.1, "beta": 20.0}),
    "cifar100/rat_trades.yaml": (
        "wrn34_10",
        "rat_trades",
        {"beta": 6.0, "alpha": 0.2, "noise_std": 1e-4, "bn_passes": "reference"},
    ),
    "cifar100/sat.yaml": ("wrn34_10", "sat", {"curriculum": "eps", "ramp_at": 0.5}),
    "cifar100/lbgat.yaml": ("wrn34_10", "lbgat", {"beta": 6.0}),
    "tiny_imagenet/d2r_cag_preact_resnet18.yaml": ("preact_resnet18", "d2r", {"lam": 0.1}),
    "tiny_imagenet/d2r_cag_wrn34_10.yaml": ("wrn34_10", "d2r", {"lam": 0.1}),
}
TABLE2 = [(0, 1), (1, 0), (20, 1), (30, 1), (30, 20)]


@pytest.fixture
def fast_init(monkeypatch):
    # Random initialization is ~all of the time to build WRN-34-10 on a CPU; these tests check
    # the config and the constructors, never the weights.
    for name in ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_"):
        monkeypatch.setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)


def test_there_are_configs():
    assert len(PATHS) >= len(TABLE1) + 2 * len(TABLE2)


@pytest.mark.parametrize("path", PATHS, ids=[str(p.relative_to(CONFIGS)) for p in PATHS])
def test_config_loads_validates_and_builds(path, fast_init):
    cfg = resolve(path)
    info = data.info(cfg.data.name)
    # a guide.weights file is made by the user first (the config says how): not read here
    method = build_method(cfg, info, initial_weights=False)
    assert type(method) is METHODS.get(cfg.method["name"])
    assert (cfg.guide is not None) == method.uses_guide  # no unused guide in a config
    with torch.device("meta"):  # shapes only: the head matches the data set's classes
        logits = method.target.to("meta")(torch.empty(2, info.channels, info.size, info.size))
    assert logits.shape == (2, info.num_classes)


@pytest.mark.parametrize("path", PAPER, ids=[str(p.relative_to(CONFIGS)) for p in PAPER])
def test_config_follows_the_paper_recipe(path):
    cfg = resolve(path)
    t = cfg.train
    assert (t.epochs, t.lr, t.momentum, t.weight_decay, t.nesterov) == (100, 0.1, 0.9, 2e-4, False)
    assert (t.warmup_factor, t.decay_at, cfg.data.batch_size) == (0.2, [0.75, 0.9], 128)
    assert (t.schedule, t.ema_decay, cfg.data.extra, cfg.method.get("label_smoothing", 0)) == (
        "step",
        0.0,
        None,
        0.0,
    )
    options = {k: cfg.method[k] for k in ("eps", "step_size", "steps")}
    assert options == {"eps": 0.031, "step_size": 0.007, "steps": 10}
    assert cfg.eval.eps == pytest.approx(8 / 255) and cfg.eval.attack == "pgd20"
    assert cfg.guide is None or cfg.guide["name"] == "resnet18"  # the reference strides
    assert cfg.guide is None or set(cfg.guide) <= {"name", "weights", "trainable"}


@pytest.mark.parametrize("path", PATHS, ids=[str(p.relative_to(CONFIGS)) for p in PATHS])
def test_every_config_holds_out_a_validation_split(path):
    assert resolve(path).data.val_size == 1000  # best is never picked on test images


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_configs_carry_wang_et_al_2023(path):
    cfg = resolve(path)
    d, t, m = cfg.data, cfg.train, resolved_config(cfg).method  # "8/255" read as a number
    assert cfg.target == {"name": "wrn", "depth": 28, "widen_factor": 10, "activation": "silu"}
    assert (d.batch_size, d.extra_fraction, d.extra.endswith(".npz")) == (512, 0.7, True)
    assert (t.epochs, t.lr, t.weight_decay, t.nesterov) == (400, 0.2, 5e-4, True)
    assert (t.schedule, t.warmup_epochs, t.ema_decay) == ("cosine", 10, 0.995)
    assert m["label_smoothing"] == 0.1 and m["steps"] == 10
    assert (m["eps"], m["step_size"]) == pytest.approx((8 / 255, 2 / 255))
    text = path.read_text()  # the published figure and the data's source, in its comments
    assert "67.31" in text and "huggingface.co/datasets/P2333/DM-Improves-AT" in text
    assert "arXiv:2302.04638" in text


@pytest.mark.parametrize("row,expected", TABLE1.items())
def test_table1_rows(row, expected):
    target, method, options = expected
    cfg = resolve(CONFIGS / row)
    assert cfg.data.name == row.split("/")[0] and cfg.target["name"] == target
    assert cfg.method["name"] == method
    assert {k: cfg.method[k] for k in options} == pytest.approx(options)


@pytest.mark.parametrize("alpha,beta", TABLE2)
@pytest.mark.parametrize("cag", [True, False])
def test_table2_rows(alpha, beta, cag):
    cfg = resolve(
        CONFIGS / f"cifar10/ablation/d2r_{'cag' if cag else 'nocag'}_a{alpha}_b{beta}.yaml"
    )
    m = cfg.method
    assert (m["name"], m["attack"], m["lam"]) == ("d2r", "cag" if cag else "trades", 1.0)
    assert (m["alpha"], m["beta"]) == (alpha, beta)


def test_rows_of_one_data_set_and_target_differ_only_in_the_method():
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in PATHS:
        raw = to_dict(resolve(path))
        key = (raw["data"]["name"], raw["target"]["name"])
        groups.setdefault(key, []).append(
            {k: v for k, v in raw.items() if k not in ("method", "guide")}
        )
    for key, rest in groups.items():
        assert all(r == rest[0] for r in rest), f"configs of {key} differ outside `method`"


def test_every_method_has_a_config():
    assert {resolve(p).method["name"] for p in PATHS} == set(METHODS.names())


def test_the_pretrained_guide_arm_of_fig_2a_freezes_a_guide_from_a_file(fast_init):
    cfg = resolve(CONFIGS / "cifar10/ablation/d2r_cag_pretrained_guide.yaml")
    learnable = resolve(CONFIGS / "cifar10/ablation/d2r_cag_a30_b20.yaml")
    assert cfg.guide["trainable"] is False and cfg.guide["weights"].endswith(".safetensors")
    assert to_dict(cfg) == {**to_dict(learnable), "guide": cfg.guide}  # only the guide differs
    with torch.device("meta"):
        method = build_method(cfg, data.info("cifar10"), initial_weights=False)
    assert method.frozen == ("guide",) and list(method.trained_models()) == ["target"]
