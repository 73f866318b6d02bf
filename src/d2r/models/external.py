"""Models that are not registered here: `timm:NAME` and `torchvision:NAME` (resolvers added to
MODELS when this package is imported; `MODULE:CALLABLE` import paths are the registry's own),
the `normalize` layer a model that wants mean/std gets in front, and the checks an external
model passes before any work (an nn.Module, (B, num_classes) logits on a tiny batch).

Normalization is a forward pre-hook on the model itself with its mean and std as
non-persistent buffers: the model still takes images in [0, 1] (every attack's eps stays in
pixel units) and its state_dict keys are exactly those of the architecture, so a checkpoint, an
export or a foreign state dict fits with or without it (the mean and std are recorded in the
config and the model card instead)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from d2r.models.base import MODELS

TIMM_EXTRA = "pip install 'd2r-robust[timm]'"
TORCHVISION_EXTRA = "pip install 'd2r-robust[torchvision]'"
NORMALIZE_MEAN, NORMALIZE_STD = "d2r_normalize_mean", "d2r_normalize_std"


def _need(module: str, spec: str, install: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(
            f"model {spec!r} needs {module}, which is not installed: {install}"
        ) from None


def _fetch_failed(spec: str, err: Exception) -> ValueError:
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return ValueError(
        f"model {spec!r}: the pretrained weights could not be fetched ({first[:200]}); connect "
        "to the network once (they are cached), or set pretrained: false"
    )


def timm_model(name: str) -> Any:
    """The constructor of `timm:NAME`: timm.create_model(NAME, num_classes, in_chans,
    pretrained, **options)."""
    spec = f"timm:{name}"
    timm = _need("timm", spec, TIMM_EXTRA)
    if not timm.is_model(name):
        raise ValueError(f"model {spec!r}: timm has no model {name!r} (see timm.list_models())")

    def make(
        num_classes: int = 1000, in_channels: int = 3, pretrained: bool = False, **options: Any
    ) -> nn.Module:
        try:
            return timm.create_model(
                name, num_classes=num_classes, in_chans=in_channels, pretrained=pretrained,
                **options,
            )  # fmt: skip
        except TypeError as err:
            raise ValueError(f"model {spec!r}: {err}") from None
        except (OSError, RuntimeError) as err:  # offline, no cache: one line
            if pretrained:
                raise _fetch_failed(spec, err) from None
            raise

    return make


def torchvision_model(name: str) -> Any:
    """The constructor of `torchvision:NAME`: torchvision.models.get_model(NAME), its ImageNet
    weights with `pretrained` (its classifier then replaced for `num_classes`)."""
    spec = f"torchvision:{name}"
    _need("torchvision", spec, TORCHVISION_EXTRA)
    from torchvision import models as tv  # optional dependency: imported where it is used

    if name not in tv.list_models():
        raise ValueError(f"model {spec!r}: torchvision has no model {name!r}")

    def make(
        num_classes: int = 1000, in_channels: int = 3, pretrained: bool = False, **options: Any
    ) -> nn.Module:
        if in_channels != 3:
            raise ValueError(
                f"model {spec!r} takes 3-channel images, the data set has {in_channels}; "
                "use a timm: model (in_chans) or an import path"
            )
        try:
            if not pretrained:
                return tv.get_model(name, weights=None, num_classes=num_classes, **options)
            model = tv.get_model(name, weights="DEFAULT", **options)
        except TypeError as err:
            raise ValueError(f"model {spec!r}: {err}") from None
        except (OSError, RuntimeError) as err:
            raise _fetch_failed(spec, err) from None
        return _new_head(model, num_classes)

    return make


def _new_head(model: nn.Module, num_classes: int) -> nn.Module:
    """`model` with its last nn.Linear replaced by a fresh one with `num_classes` outputs."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    if old.out_features != num_classes:
        setattr(parent, child, nn.Linear(old.in_features, num_classes))
    return model


MODELS.add_resolver("timm", timm_model)
MODELS.add_resolver("torchvision", torchvision_model)


# Normalization --------------------------------------------------------------------------------
def check_normalize(value: Any, channels: int, key: str = "normalize") -> dict[str, list[float]]:
    """`{mean: [...], std: [...]}` (one value each, or one per channel; std > 0), as floats."""
    if not isinstance(value, dict) or set(value) != {"mean", "std"}:
        raise ValueError(f"config key {key!r}: expected {{mean: [...], std: [...]}}, got {value!r}")
    out = {}
    for part in ("mean", "std"):
        items = value[part] if isinstance(value[part], (list, tuple)) else [value[part]]
        try:
            numbers = [float(v) for v in items]
        except (TypeError, ValueError):
            raise ValueError(
                f"config key '{key}.{part}': expected numbers, got {items!r}"
            ) from None
        if len(numbers) not in (1, channels):
            raise ValueError(
                f"config key '{key}.{part}': {len(numbers)} values for {channels} channels; "
                f"give 1 or {channels}"
            )
        out[part] = numbers
    if not all(s > 0 for s in out["std"]):
        raise ValueError(f"config key '{key}.std': must be > 0, got {out['std']}")
    return out


def _normalize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    x = args[0]
    mean, std = getattr(module, NORMALIZE_MEAN), getattr(module, NORMALIZE_STD)
    return ((x - mean.to(x.dtype)) / std.to(x.dtype), *args[1:])


def add_normalization(model: nn.Module, normalize: dict[str, list[float]]) -> nn.Module:
    """`model` normalizing its input first ((x - mean) / std per channel), its state_dict keys
    unchanged; `model.d2r_normalize` says with what."""
    for name, values in ((NORMALIZE_MEAN, normalize["mean"]), (NORMALIZE_STD, normalize["std"])):
        model.register_buffer(name, torch.tensor(values).view(1, -1, 1, 1), persistent=False)
    model.register_forward_pre_hook(_normalize_input)
    model.d2r_normalize = normalize
    return model


# Checks ----------------------------------------------------------------------------------------
class ForwardFailed(ValueError):
    """The model's forward raised on the tiny batch (on the meta device: try the CPU)."""


def check_model(model: Any, name: str, num_classes: int, shape: tuple[int, int, int]) -> None:
    """An external model is an nn.Module whose output on a tiny batch of `shape` images is
    (2, num_classes) logits: on the meta device when its forward runs there, else on the CPU."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned {type(model).__name__!r}, not a torch.nn.Module")
    out = _tiny_forward(model, name, shape)
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"model {name!r} returns {got} for a batch of 2 images of shape {shape}; "
            f"expected logits of shape (2, {num_classes})"
        )


def _tiny_forward(model: nn.Module, name: str, shape: tuple[int, int, int]) -> Any:
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        with torch.no_grad():
            return model.eval()(torch.full((2, *shape), 0.5, device=device))  # no RNG drawn
    except Exception as err:  # any failure of the user's forward, in one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ForwardFailed(
            f"model {name!r} fails on a batch of 2 images of shape {shape}: "
            f"{type(err).__name__}: {first[:200]}"
        ) from None
    finally:
        model.train(was_training)
