"""Classifiers by name: the paper's WRN-34-10 / ResNet-18 / PreActResNet-18, and small nets for
the CPU demo and the tests.

Every model takes float images (B, C, H, W) in [0, 1] and has no normalization layer (the paper's
models use none), returns (B, num_classes) logits, and exposes `features(x)`, the last feature
map before pooling (the hidden vector for the MLP). All of them use BatchNorm: D2R's loss depends
on the train/eval behaviour of BN (three separate forward passes, each normalized by its own batch
statistics).

Module names follow the reference code (TRADES/LBGAT `WideResNet`, the CIFAR `ResNet` and
`PreActResNet` of the D2R/LAS-AT repositories), so their checkpoints load with
`load_state_dict(d2r.weights.normalize_keys(state))` (or `d2r eval --weights`).

`base` holds the registry, `create` and the strict `load_weights`; `wrn`, `resnet` and `small`
the families; `external` the `timm:` / `torchvision:` names, the `normalize` layer and the
checks a model built from an import path passes. Importing this package registers every model
in MODELS.
"""

from d2r.models.base import MODELS, count_parameters, create, load_weights
from d2r.models.external import (
    ForwardFailed,
    add_normalization,
    check_model,
    check_normalize,
    timm_model,
    torchvision_model,
)
from d2r.models.resnet import (
    PreActResNet18,
    ResNet18,
    preact_resnet18,
    resnet18,
    resnet18_std,
)
from d2r.models.small import MLP, SmallCNN, TinyCNN, mlp, small_cnn, tiny_cnn
from d2r.models.wrn import ACTIVATIONS, WideResNet, wide_resnet, wrn34_10

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "MODELS",
    "ForwardFailed",
    "PreActResNet18",
    "ResNet18",
    "SmallCNN",
    "TinyCNN",
    "WideResNet",
    "add_normalization",
    "check_model",
    "check_normalize",
    "count_parameters",
    "create",
    "load_weights",
    "mlp",
    "preact_resnet18",
    "resnet18",
    "resnet18_std",
    "small_cnn",
    "timm_model",
    "tiny_cnn",
    "torchvision_model",
    "wide_resnet",
    "wrn34_10",
]
