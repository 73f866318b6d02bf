"""Weights files: a model's state dict loaded strictly (every key and shape must match), and
foreign weights (another codebase's safetensors or `.pt`) mapped onto our models. A `.pt` file is
read only with torch.load(weights_only=True), PyTorch's restricted unpickler: a file that
carries code is refused, not run."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import Tensor, nn

from d2r import checkpoint


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
        problems.append(f"missing keys {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {_short(shapes)}")
    if problems:
        raise ValueError(
            f"weights in {source!r} do not fit the model ({'; '.join(problems)}); "
            "check the architecture name and its options"
        )
    if any(t.is_meta for t in expected.values()):
        return  # a model built on the meta device to check a config: keys and shapes only
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def _short(items: list[str], limit: int = 8) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


# Foreign checkpoints -------------------------------------------------------------------------
# `.pt` files are read with torch.load(weights_only=True): PyTorch's restricted unpickler
# accepts tensors and plain containers only, so a file carrying code is refused, not run.
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
_NESTED = ("state_dict", "model_state_dict", "model", "net", "target")  # common wrappers


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a weights file: safetensors, or a torch `.pt` read with weights_only=True.
    A d2r run checkpoint (target + guide) gives its target. Keys are not yet mapped: see
    `normalize_keys`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} not found")
    if path.suffix in TORCH_SUFFIXES:
        return _torch_state(path)
    if path.suffix != ".safetensors":
        raise ValueError(
            f"{str(path)!r}: unknown weights format; use .safetensors or a torch file "
            f"({', '.join(TORCH_SUFFIXES)})"
        )
    if checkpoint.is_run_checkpoint(path):  # a d2r run's last/best: its target (verified)
        tensors, _ = checkpoint.load(path)
        return checkpoint.model_weights(tensors, "target")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError) as err:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({err})") from None


def _torch_state(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for code, RuntimeError for a broken zip, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"refused to load {str(path)!r}: not a plain tensor file under "
            f"torch.load(weights_only=True) ({first}); it may carry code. Re-save its state_dict "
            "(or convert it to safetensors) in a trusted environment"
        ) from None
    while isinstance(obj, dict) and not _is_tensor_dict(obj):
        inner = next((obj[k] for k in _NESTED if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not _is_tensor_dict(obj):
        raise ValueError(f"{str(path)!r} holds no state dict of tensors (keys: {_keys_of(obj)})")
    return dict(obj)


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _keys_of(obj: object) -> str:
    return _short(sorted(map(str, obj))) if isinstance(obj, dict) else type(obj).__name__


def normalize_keys(
    state: dict[str, Tensor], expected: set[str] | list[str] | None = None
) -> dict[str, Tensor]:
    """Map a foreign state dict's keys onto ours: strip DataParallel's `module.` and
    torch.compile's `_orig_mod.` prefixes, and drop the reference WRN's unused `sub_block1`
    stage (docs/method.md, "Architectures") unless the model has one. Anything else must match."""
    out = {}
    for key, value in state.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    has_sub_block = expected is not None and any(k.startswith("sub_block1.") for k in expected)
    if not has_sub_block:
        out = {k: v for k, v in out.items() if not k.startswith("sub_block1.")}
    return out


def load_foreign(model: nn.Module, path: str | Path) -> None:
    """Read `path`, map its keys and load it into `model` strictly (refusing any mismatch)."""
    state = normalize_keys(read_state_dict(path), set(model.state_dict()))
    load_weights(model, state, str(path))
