"""The model registry, `create`, the strict weight load every reader of weights goes through,
and the convolutions the ResNet families share."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from d2r.registry import Registry

MODELS = Registry("model")


def create(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registered model, e.g. `create("wrn34_10", num_classes=100)`; unknown names and
    unknown options raise ValueError listing the valid ones."""
    return MODELS.create(name, num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def load_weights(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Strict load: refuse missing or unexpected keys and shape mismatches, listing them.
    (Never strict=False: that silently evaluates a partly random network.)"""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {short_list(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {short_list(shapes)}")
    if problems:
        raise ValueError(
            f"weights in {source!r} do not fit the model ({'; '.join(problems)}); "
            "check the architecture name and its options"
        )
    if any(t.is_meta for t in expected.values()):
        return  # a model built on the meta device to check a config: keys and shapes only
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def short_list(items: list[str], limit: int = 8) -> str:
    """The first `limit` items, comma-separated, and how many more: for error messages."""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def _needs_projection(in_planes: int, out_planes: int, stride: int) -> bool:
    return stride != 1 or in_planes != out_planes
