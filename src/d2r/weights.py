"""Weights files: a model's state dict loaded strictly (`load_weights`, from d2r.models: every
key and shape must match), the model card of an exported file (`read_card`), and foreign
weights (another codebase's safetensors or `.pt`) mapped onto our models. A `.pt` file is read
only with torch.load(weights_only=True), PyTorch's restricted unpickler: a file that carries
code is refused, not run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from torch import Tensor, nn

from d2r import checkpoint
from d2r.models.base import load_weights, short_list

# Model cards: the JSON an exported model file (d2r export) carries in its metadata
CARD_FORMAT = "d2r-model"
CARD_VERSION = 1
META_KEY = "d2r_model"  # not checkpoint.py's "d2r": a model file is not a training checkpoint


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
    return short_list(sorted(map(str, obj))) if isinstance(obj, dict) else type(obj).__name__


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


# Model cards ---------------------------------------------------------------------------------
def read_card(path: str | Path) -> dict[str, Any]:
    """The model card embedded in an exported file; ValueError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file ({err})") from None
    if META_KEY not in meta:
        raise ValueError(
            f"{str(path)!r} has no d2r model card; export models with "
            "`d2r export RUN_DIR --out FILE`, or load foreign weights with "
            "d2r.weights.load_foreign(model, path)"
        )
    try:
        card = json.loads(meta[META_KEY])
    except ValueError:
        raise ValueError(f"{str(path)!r}: the model card is not valid JSON; re-export") from None
    _check_card(card, path)
    return card


def _check_card(card: Any, path: Path) -> None:
    problems = []
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        problems.append(f"format is not {CARD_FORMAT!r}")
    elif not isinstance(card.get("format_version"), int) or card["format_version"] > CARD_VERSION:
        problems.append(
            f"format_version {card.get('format_version')!r} is newer than this "
            f"d2r reads ({CARD_VERSION}); upgrade d2r"
        )
    else:
        arch = card.get("architecture")
        if (
            not isinstance(arch, dict)
            or not isinstance(arch.get("name"), str)
            or not isinstance(arch.get("options", {}), dict)
        ):
            problems.append("architecture must be {name, options}")
    if problems:
        raise ValueError(
            f"{str(path)!r}: bad model card ({'; '.join(problems)}); re-export it with `d2r export`"
        )


def card_source(card: dict[str, Any]) -> tuple[Path, str]:
    """(run directory, checkpoint name: last, best or ema) a model card says its weights came
    from: what tells a refreshed export of the same checkpoint from another model's. The name,
    not the file: ema's weights live in last.safetensors too. KeyError/TypeError if the card
    lacks them."""
    return Path(card["source"]["run_dir"]).resolve(), card["training"]["checkpoint"]
