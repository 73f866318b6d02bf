"""What identifies a stored result: its key (checkpoint sha256, attack, settings, eps, norm,
the test images, seed, d2r version), the key's short id, and the per-sample flags, bit-packed."""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from d2r.version import __version__

FORMAT = "d2r-eval"
FORMAT_VERSION = 2  # 1 was one snapshot per call, never released
PARTIAL_FORMAT = "d2r-eval-partial"
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
EVAL_LOCK = ".eval.json.lock"  # held while eval.json is read, merged and written
CLEAN = "clean"
TARGET = "target"  # a checkpoint's own target weights (the other: "ema", their moving average)

# Keys and flags -------------------------------------------------------------------------------


def images_id(data: str, x: Tensor, y: Tensor, split: str = "test") -> dict[str, Any]:
    """Which test images: data set, split, n, and a sha256 of their bytes and labels (a mirror
    loaded with data.verify=false, or another subset, is another key)."""
    digest = hashlib.sha256()
    for t in (x, y):
        digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"data": data, "split": split, "n": len(y), "sha256": digest.hexdigest()}


def result_key(
    sha256: str,
    attack: str,
    settings: Mapping[str, Any],
    eps: float | None,
    norm: str | None,
    images: Mapping[str, Any],
    seed: int,
    weights: str = TARGET,
) -> dict[str, Any]:
    """What determines a result. Clean accuracy has no attack settings, eps or norm. `weights`:
    which weights of the file, the target's or (train.ema_decay) their EMA; named in the key
    only for an EMA, so the keys of every other result stay those of earlier versions."""
    key = {
        "sha256": sha256,
        "attack": attack,
        "settings": dict(settings),
        "eps": eps,
        "norm": norm,
        "images": dict(images),
        "seed": seed,
        "version": __version__,
    }
    return key if weights == TARGET else {**key, "weights": weights}


def key_id(key: Mapping[str, Any]) -> str:
    """A short name for a key (its JSON text's sha256): the store's index and the partial file's
    name. Tuples and lists give the same text, so a key read back from JSON has the same id."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pack_flags(flags: Tensor) -> str:
    """(N,) bool -> base64 of the bits (10,000 images: 1,668 characters)."""
    bits = np.packbits(flags.cpu().numpy().astype(np.uint8))
    return base64.b64encode(bits.tobytes()).decode()


def unpack_flags(text: str, n: int) -> Tensor:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    return torch.from_numpy(bits[:n].astype(bool))


def make_entry(key: Mapping[str, Any], flags: Tensor, seconds: float, **meta: Any) -> dict:
    """A stored result: its key, accuracy, per-sample flags, and how it was run (`meta`:
    batch_size, device, ...); `warnings` are the evaluation's warnings about it."""
    return {
        "id": key_id(key),
        "key": dict(key),
        "accuracy": flags.float().mean().item() if len(flags) else 0.0,
        "n": len(flags),
        "correct": pack_flags(flags),
        "seconds": seconds,
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "warnings": [],
        **meta,
    }
