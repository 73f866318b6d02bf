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
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from d2r.registry import Registry, check_choice

MODELS = Registry("model")
# The WRN family's nonlinearity: ReLU (the reference) or SiLU, a.k.a. swish (the WRN-28-10 of
# Gowal et al. 2020 and Wang et al. 2023). Functions, not modules: checkpoint keys do not change.
ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


def create(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registered model, e.g. `create("wrn34_10", num_classes=100)`; unknown names and
    unknown options raise ValueError listing the valid ones."""
    return MODELS.create(name, num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _needs_projection(in_planes: int, out_planes: int, stride: int) -> bool:
    return stride != 1 or in_planes != out_planes


# ---------------------------------------------------------------------------------------------
# Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation, as in TRADES/LBGAT/D2R


class WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus shortcut (ReLU
    or `activation`)."""

    def __init__(
        self,
        in_planes: int,
        out_planes: int,
        stride: int,
        drop_rate: float = 0.0,
        activation: str = "relu",
    ):
        super().__init__()
        self.act = ACTIVATIONS[activation]
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, out_planes, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = _conv3x3(out_planes, out_planes)
        self.drop_rate = drop_rate
        projection = _needs_projection(in_planes, out_planes, stride)
        # name kept from the reference so its checkpoints load
        self.convShortcut = _conv1x1(in_planes, out_planes, stride) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.act(self.bn1(x))
        # as in the reference: a projection reads the pre-activated input, the identity the raw one
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = self.act(self.bn2(self.conv1(act)))
        out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


def _wide_stage(
    blocks: int, in_planes: int, out_planes: int, stride: int, drop_rate: float, activation: str
):
    layers = [
        WideBlock(
            in_planes if i == 0 else out_planes,
            out_planes,
            stride if i == 0 else 1,
            drop_rate,
            activation,
        )
        for i in range(blocks)
    ]
    # the extra `layer` level reproduces the reference keys: block1.layer.0.conv1.weight
    return nn.Sequential(OrderedDict(layer=nn.Sequential(*layers)))


def _kaiming_init(model: nn.Module) -> None:
    """The reference WRN init: conv N(0, 2 / (k*k*out)), BN weight 1 bias 0, linear bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class WideResNet(nn.Module):
    """WRN-depth-k: conv3x3 16, three stages of (depth - 4) / 6 pre-activation blocks with widths
    16k, 32k, 64k and strides 1, 2, 2, final BN-ReLU, global average pool, linear. `activation`
    "silu" replaces every ReLU (the init stays the reference's)."""

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        activation: str = "relu",
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(
                f"WideResNet depth must be 6n + 4 with n >= 1 (e.g. 16, 28, 34), got {depth}"
            )
        check_choice("activation", activation, tuple(ACTIVATIONS))
        n, self.act = (depth - 4) // 6, ACTIVATIONS[activation]
        w1, w2, w3 = 16 * widen_factor, 32 * widen_factor, 64 * widen_factor
        self.conv1 = _conv3x3(in_channels, 16)
        self.block1 = _wide_stage(n, 16, w1, 1, drop_rate, activation)
        self.block2 = _wide_stage(n, w1, w2, 2, drop_rate, activation)
        self.block3 = _wide_stage(n, w2, w3, 2, drop_rate, activation)
        self.bn1 = nn.BatchNorm2d(w3)
        self.fc = nn.Linear(w3, num_classes)
        _kaiming_init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.act(self.bn1(out))  # (B, 64k, H/4, W/4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # global pool == the reference's avg_pool2d(8) at 32x32
        return self.fc(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@MODELS.register("wrn34_10")
def wrn34_10(
    num_classes: int = 10, in_channels: int = 3, drop_rate: float = 0.0, activation: str = "relu"
) -> WideResNet:
    """WRN-34-10 (Zagoruyko & Komodakis 2016) as in TRADES/LBGAT, without their unused
    `sub_block1`: 46,160,474 parameters at 10 classes; the D2R target on CIFAR."""
    return WideResNet(34, 10, num_classes, in_channels, drop_rate, activation)


@MODELS.register("wrn")
def wide_resnet(
    depth: int = 34,
    widen_factor: int = 10,
    num_classes: int = 10,
    in_channels: int = 3,
    drop_rate: float = 0.0,
    activation: str = "relu",
) -> WideResNet:
    """Any WRN-depth-k (Zagoruyko & Komodakis 2016); `depth=16, widen_factor=4` is a small one,
    `depth=28, widen_factor=10, activation="silu"` the WRN-28-10 of Wang et al. 2023."""
    return WideResNet(depth, widen_factor, num_classes, in_channels, drop_rate, activation)


# ---------------------------------------------------------------------------------------------
# ResNet-18 and PreActResNet-18 (He et al. 2016), CIFAR stem: conv3x3 stride 1, no max-pool

WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if _needs_projection(in_planes, planes, stride):
            self.shortcut = nn.Sequential(
                _conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut, the projection
    (when needed) reading the pre-activated input."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut = None
        if _needs_projection(in_planes, planes, stride):
            self.shortcut = nn.Sequential(_conv1x1(in_planes, planes, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(act)
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + shortcut


def _resnet_stages(block: type[nn.Module], strides: tuple[int, ...]) -> list[nn.Sequential]:
    """Four stages of two blocks each, widths 64/128/256/512 (ResNet-18)."""
    stages, in_planes = [], WIDTHS[0]
    for planes, stride in zip(WIDTHS, strides, strict=True):
        stages.append(nn.Sequential(block(in_planes, planes, stride), block(planes, planes, 1)))
        in_planes = planes
    return stages


def _check_strides(strides: tuple[int, ...]) -> tuple[int, ...]:
    strides = tuple(strides)
    if len(strides) != 4 or any(s < 1 for s in strides):
        raise ValueError(f"strides must be four positive integers, one per stage, got {strides}")
    return strides


class ResNet18(nn.Module):
    """ResNet-18 with a CIFAR stem; `strides` are the four stage strides. (1, 1, 2, 2) is the D2R
    reference guide (8x8 final map at 32x32, ~3x the compute of (1, 2, 2, 2), the standard one)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        strides: tuple[int, ...] = (1, 1, 2, 2),
    ):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, WIDTHS[0])
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        stages = _resnet_stages(BasicBlock, _check_strides(strides))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(WIDTHS[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))  # (B, 512, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # global pool == the reference's avg_pool2d(8) on the 8x8 map of (1, 1, 2, 2) at 32x32
        return self.linear(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet18:
    """ResNet-18 (He et al. 2016) as in the D2R/LBGAT reference: stage strides (1, 1, 2, 2)."""
    return ResNet18(num_classes, in_channels, strides=(1, 1, 2, 2))


@MODELS.register("resnet18_std")
def resnet18_std(num_classes: int = 10, in_channels: int = 3) -> ResNet18:
    """The standard CIFAR ResNet-18 (He et al. 2016): stage strides (1, 2, 2, 2), 4x4 final map
    at 32x32; about 3x cheaper than the reference guide `resnet18`, same 11.17 M parameters."""
    return ResNet18(num_classes, in_channels, strides=(1, 2, 2, 2))


class PreActResNet18(nn.Module):
    """PreActResNet-18 (He et al. 2016, identity mappings) with a CIFAR stem.

    The map before the linear layer is average-pooled to a (image_size // 32)^2 grid: 1x1 at 32
    (the usual CIFAR model), 2x2 at 64 (the Tiny ImageNet model of the LAS-AT and D2R code, whose
    avg_pool2d(4) on the 8x8 map feeds a 2048-wide linear layer). `final_bn` adds the BN-ReLU
    after the last block of He et al. (as in Rice et al. 2020); the LAS-AT/D2R Tiny ImageNet
    code has none, so `final_bn=False` reproduces it exactly.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        final_bn: bool = True,
    ):
        super().__init__()
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.grid = max(1, image_size // 32)
        self.conv1 = _conv3x3(in_channels, WIDTHS[0])
        stages = _resnet_stages(PreActBlock, (1, 2, 2, 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(WIDTHS[-1]) if final_bn else None
        self.linear = nn.Linear(WIDTHS[-1] * self.grid**2, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return out if self.bn is None else F.relu(self.bn(out))  # (B, 512, H/8, W/8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(F.adaptive_avg_pool2d(self.features(x), self.grid).flatten(1))


@MODELS.register("preact_resnet18")
def preact_resnet18(
    num_classes: int = 10, in_channels: int = 3, image_size: int = 32, final_bn: bool = True
) -> PreActResNet18:
    """PreActResNet-18 (He et al. 2016); `image_size=64, num_classes=200` for Tiny ImageNet."""
    return PreActResNet18(num_classes, in_channels, image_size, final_bn)


# ---------------------------------------------------------------------------------------------
# Small nets for the CPU demo (scikit-learn digits, 1x8x8) and the tests; any input size works


def _conv_bn_relu(in_planes: int, out_planes: int) -> nn.Sequential:
    return nn.Sequential(_conv3x3(in_planes, out_planes), nn.BatchNorm2d(out_planes), nn.ReLU())


def _two_conv_body(in_channels: int, width1: int, width2: int) -> nn.Sequential:
    """conv-BN-ReLU, max-pool 2, conv-BN-ReLU (pooled first, the wide conv sees 4x fewer pixels)."""
    return nn.Sequential(
        _conv_bn_relu(in_channels, width1),
        nn.MaxPool2d(2, ceil_mode=True),
        _conv_bn_relu(width1, width2),
    )


def _pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Adaptive average pool to size x size, skipped when already there (on CPU the no-op pool
    costs ~20% of a small_cnn step on 8x8 digits)."""
    return x if x.shape[-2:] == (size, size) else F.adaptive_avg_pool2d(x, size)


class SmallCNN(nn.Module):
    """conv 32 - max-pool 2 - conv 64 - (adaptive avg pool to 4x4) - fc `hidden` - fc classes,
    BN after every conv and the hidden fc. 151,530 parameters at 10 classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, hidden: int = 128):
        super().__init__()
        self.body = _two_conv_body(in_channels, 32, 64)
        self.head = nn.Sequential(
            nn.Linear(64 * 16, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, 64, H/2, W/2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_pool_to(self.features(x), 4).flatten(1))


class TinyCNN(nn.Module):
    """conv 16 - max-pool 2 - conv 32 - (adaptive avg pool to 2x2) - linear: the demo's guide."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.body = _two_conv_body(in_channels, 16, 32)
        self.linear = nn.Linear(32 * 4, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, 32, H/2, W/2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(_pool_to(self.features(x), 2).flatten(1))


@MODELS.register("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, hidden: int = 128) -> SmallCNN:
    """Small BN convnet: the demo's target on 1x8x8 digits."""
    return SmallCNN(num_classes, in_channels, hidden)


@MODELS.register("tiny_cnn")
def tiny_cnn(num_classes: int = 10, in_channels: int = 1) -> TinyCNN:
    """Smaller BN convnet: the demo's guide."""
    return TinyCNN(num_classes, in_channels)


class MLP(nn.Module):
    """flatten - linear `hidden` - BN - ReLU - linear; inputs must have exactly
    in_channels * image_size^2 values."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, image_size: int = 8, hidden: int = 64
    ):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size**2, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
        )
        self.linear = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


@MODELS.register("mlp")
def mlp(num_classes: int = 10, in_channels: int = 1, image_size: int = 8, hidden: int = 64) -> MLP:
    """A one-hidden-layer BN perceptron, for tests."""
    return MLP(num_classes, in_channels, image_size, hidden)
