"""Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation, as in TRADES/LBGAT/D2R: WRN-34-10
and any depth/width (`wrn`), ReLU or SiLU."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from d2r.models.base import MODELS, _conv1x1, _conv3x3, _needs_projection
from d2r.registry import check_choice

# The WRN family's nonlinearity: ReLU (the reference) or SiLU, a.k.a. swish (the WRN-28-10 of
# Gowal et al. 2020 and Wang et al. 2023). Functions, not modules: checkpoint keys do not change.
ACTIVATIONS = {"relu": F.relu, "silu": F.silu}


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
