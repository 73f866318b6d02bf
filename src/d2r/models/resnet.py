"""ResNet-18 and PreActResNet-18 (He et al. 2016), CIFAR stem: conv3x3 stride 1, no max-pool."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2r.models.base import MODELS, _conv1x1, _conv3x3, _needs_projection

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
