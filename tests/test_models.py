"""Models: shapes, exact parameter counts, the reference strides, registry errors, training."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2r.models import MODELS, count_parameters, create
from d2r.weights import normalize_keys

# name -> (options, input shape (C, H, W)) at each model's natural size; small options for `wrn`
NATURAL = {
    "wrn34_10": ({}, (3, 32, 32)),
    "wrn": ({"depth": 16, "widen_factor": 4}, (3, 32, 32)),
    "resnet18": ({}, (3, 32, 32)),
    "resnet18_std": ({}, (3, 32, 32)),
    "preact_resnet18": ({}, (3, 32, 32)),
    "small_cnn": ({}, (1, 8, 8)),
    "tiny_cnn": ({}, (1, 8, 8)),
    "mlp": ({}, (1, 8, 8)),
}
SMALL = ["small_cnn", "tiny_cnn", "mlp"]


@functools.cache
def built(name: str) -> nn.Module:
    """One shared 10-class instance per name (WRN-34-10 takes ~1 s to build); never trained."""
    torch.manual_seed(0)
    return create(name, num_classes=10, **NATURAL[name][0]).eval()


def natural_input(name: str, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, *NATURAL[name][1])


def test_every_registered_model_has_a_natural_input():
    assert set(MODELS.names()) == set(NATURAL)


@pytest.mark.parametrize("name", MODELS.names())
def test_output_shape(name):
    with torch.no_grad():
        logits = built(name)(natural_input(name))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", MODELS.names())
def test_uses_batchnorm(name):
    # D2R relies on BN's train/eval behaviour, so every model must have it
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in built(name).modules())


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_takes_in_channels(name):
    # configs set in_channels for every data set (1: digits/MNIST, 3: CIFAR)
    assert "in_channels" in inspect.signature(MODELS.get(name)).parameters


@pytest.mark.parametrize("name", SMALL)
def test_small_model_with_three_input_channels(name):
    model = create(name, in_channels=3).eval()
    assert model(torch.rand(2, 3, 8, 8)).shape == (2, 10)


def test_big_model_with_one_input_channel():
    model = create("resnet18_std", num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("wrn34_10", 46_160_474),  # TRADES/LBGAT WRN-34-10 without the unused sub_block1
        ("resnet18", 11_173_962),  # strides do not change the count
        ("resnet18_std", 11_173_962),
        ("preact_resnet18", 11_172_170),  # 11,171,146 + the final BN (1,024)
        ("wrn", 2_748_890),  # WRN-16-4
    ],
)
def test_parameter_count(name, expected):
    assert count_parameters(built(name)) == expected


@pytest.mark.parametrize(("name", "side"), [("resnet18", 8), ("resnet18_std", 4)])
def test_resnet18_final_feature_map(name, side):
    with torch.no_grad():
        features = built(name).features(natural_input(name))
    assert features.shape == (2, 512, side, side)


@pytest.mark.parametrize("final_bn", [True, False])
def test_preact_resnet18_tiny_imagenet(final_bn):
    model = create("preact_resnet18", num_classes=200, image_size=64, final_bn=final_bn).eval()
    # the reference's avg_pool2d(4) of the 8x8 map feeds a 2x2x512 = 2048-wide linear layer
    assert model.linear.in_features == 2048
    assert count_parameters(model) == 11_575_816 + 1024 * final_bn
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 200)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid choices") as info:
        create("wrn_34_10")
    for name in MODELS.names():
        assert name in str(info.value)


def test_unknown_option_is_named():
    with pytest.raises(ValueError, match="widht"):
        create("small_cnn", widht=64)


def test_bad_wrn_depth():
    with pytest.raises(ValueError, match="6n"):
        create("wrn", depth=20)


@pytest.mark.parametrize("name", SMALL)
def test_sgd_step_changes_every_weight(name):
    torch.manual_seed(0)
    model = create(name).train()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    for p, p0 in zip(model.parameters(), before, strict=True):
        assert not torch.equal(p, p0)


@pytest.mark.parametrize("name", SMALL)
def test_small_models_take_other_sizes(name):
    options = {"image_size": 28} if name == "mlp" else {}
    model = create(name, **options).eval()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_reference_checkpoint_keys_load():
    # a reference (TRADES/LBGAT) checkpoint: DataParallel prefix and an unused sub_block1 stage
    model = create("wrn", depth=10, widen_factor=1)
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    state["module.sub_block1.layer.0.conv1.weight"] = torch.zeros(16, 16, 3, 3)
    assert "block1.layer.0.convShortcut.weight" not in model.state_dict()  # 16 -> 16: identity
    assert "block2.layer.0.convShortcut.weight" in model.state_dict()
    create("wrn", depth=10, widen_factor=1).load_state_dict(normalize_keys(state))
