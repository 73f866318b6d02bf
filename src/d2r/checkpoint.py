"""Checkpoint files: tensors in safetensors, metadata as JSON inside the same file (one atomic
rename writes both) and beside it as `<name>.json` for people. Nothing is ever unpickled,
except foreign `.pt` weights through torch's restricted `weights_only=True` loader."""

from __future__ import annotations

import hashlib
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
FORMAT_VERSION = 2  # 2: content sha256 and the full training state
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
    meta["sha256"] = content_sha256(cpu, meta)  # a flipped bit anywhere is refused on load
    text = json.dumps(meta, sort_keys=True)
    try:
        atomic_write(path, st_save(cpu, metadata={_META_KEY: text}))
    except OSError as err:  # full disk, read-only mount: the previous file is still whole
        raise ValueError(
            f"could not write checkpoint {str(path)!r} ({err.strerror or err}); the previous "
            "checkpoint there is intact; free disk space or fix permissions, then resume"
        ) from None
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
    _verify(path, tensors, meta)
    return tensors, meta


def content_sha256(tensors: dict[str, Tensor], meta: dict[str, Any]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and the metadata without the hash."""
    digest = hashlib.sha256()
    rest = {k: v for k, v in meta.items() if k != "sha256"}
    digest.update(json.dumps(rest, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _verify(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has checkpoint format version {version!r}; this d2r "
            f"reads up to {FORMAT_VERSION}: upgrade d2r"
        )
    if version >= 2 and meta.get("sha256") != content_sha256(tensors, meta):
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupted (its sha256 does not match its content); "
            "use another checkpoint (e.g. best.safetensors) or retrain"
        )


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
    if path.suffix == ".safetensors":
        try:
            state = st_load(path.read_bytes())
        except (SafetensorError, ValueError) as err:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({err})") from None
    elif path.suffix in TORCH_SUFFIXES:
        state = _torch_state(path)
    else:
        raise ValueError(
            f"{str(path)!r}: unknown weights format; use .safetensors or a torch file "
            f"({', '.join(TORCH_SUFFIXES)})"
        )
    return _target_only(state)


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


def _target_only(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # A d2r checkpoint stores "target.*" and "guide.*"; only the target is ever evaluated.
    prefixes = {k.split(".", 1)[0] for k in state}
    if "target" in prefixes and prefixes <= {"target", "guide", "state"}:  # state: resume only
        return unprefixed("target", state)
    return state


def normalize_keys(
    state: dict[str, Tensor], expected: set[str] | list[str] | None = None
) -> dict[str, Tensor]:
    """Map a foreign state dict's keys onto ours: strip DataParallel's `module.` and
    torch.compile's `_orig_mod.` prefixes, and drop the reference WRN's unused `sub_block1`
    stage (SPEC section 6) unless the model has one. Anything else must match exactly."""
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
