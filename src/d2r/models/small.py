"""Small nets for the CPU demo (scikit-learn digits, 1x8x8) and the tests; any input size works."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d2r.models.base import MODELS, _conv3x3


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
