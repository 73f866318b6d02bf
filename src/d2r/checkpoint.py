"""Checkpoint files: tensors in safetensors, metadata as JSON inside the same file (one atomic
rename writes both) and beside it as `<name>.json` for people. Nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

FORMAT = "d2r-checkpoint"
FORMAT_VERSION = 1
_META_KEY = "d2r"


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`: a crash
    leaves either the old file or the new one, never a half-written one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, text.encode())


def save(path: str | Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write `tensors` and JSON-able `meta` to `path` (.safetensors) and `meta` to `path`.json."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    text = json.dumps(meta, sort_keys=True)
    atomic_write(path, st_save(cpu, metadata={_META_KEY: text}))
    atomic_write_text(Path(path).with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True))


def load(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save`; ValueError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        meta = json.loads(_read_metadata(data).get(_META_KEY, "{}"))
    except (SafetensorError, ValueError, OSError) as err:
        raise ValueError(
            f"checkpoint {str(path)!r} is truncated or not a safetensors file ({err}); "
            "use another checkpoint (e.g. best.safetensors) or retrain"
        ) from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is a safetensors file but not a d2r checkpoint")
    return tensors, meta


def _read_metadata(data: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then a JSON header.
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__", {}) or {}


def prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    start = f"{prefix}."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}


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
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def _short(items: list[str], limit: int = 8) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
