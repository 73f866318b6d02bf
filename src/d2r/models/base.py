"""The model registry, `create` and the convolutions the ResNet families share."""

from __future__ import annotations

from typing import Any

from torch import nn

from d2r.registry import Registry

MODELS = Registry("model")


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
