"""`synthetic`: a learnable stand-in for a real data set, generated on the fly (no file, no
download), so that benchmarks and the GPU check run anywhere.

`data.name=synthetic` with `data.like=cifar10` (or cifar100, svhn, tiny_imagenet, mnist,
digits) takes that set's image shape, class count, augmentation and split sizes. Each class
has a fixed template: a coarse grid of random grey levels in [64, 191] (size // 8 cells a side,
at least 2), blown up to the image size by repeating cells; an image is its class's template
plus uniform noise in [-64, 63], so it spans [0, 254] without clipping, uint8 like the real
sets. A small model separates the classes within a few steps, so loss and accuracy move as on
real data.

Every byte comes from SHAKE-128 (hashlib) keyed by seed, like, split and chunk, and the rest is
integer arithmetic: the same images on every machine and every numpy or torch version. The
templates depend on (seed, like) only, so both splits share them. Chunks are keyed by index, so
the first n images of a split do not depend on how many are generated."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from d2r.data.sources import DATASETS, INFO, SYNTHETIC, Arrays, resolve_like, synthetic_info

# (train, test) sizes of the real sets (Tiny ImageNet: its labelled val set is the test split)
SPLIT_SIZES = {
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
    "svhn": (73_257, 26_032),
    "mnist": (60_000, 10_000),
    "tiny_imagenet": (100_000, 10_000),
    "digits": (1_497, 300),
}
assert SPLIT_SIZES.keys() == INFO.keys()
CHUNK = 1024  # images per SHAKE stream (each chunk's stream is keyed by its index)
_VERSION = "v1"  # part of every key: bump when the recipe changes, so old figures stay named


def _bytes(*key: object, n: int) -> np.ndarray:
    text = ":".join(map(str, ("d2r-synthetic", _VERSION, *key)))
    return np.frombuffer(hashlib.shake_128(text.encode()).digest(n), np.uint8)


def templates(like: str, seed: int = 0) -> np.ndarray:
    """uint8 (classes, C, H, W): the class templates, grey levels in [64, 191]."""
    spec = synthetic_info(like)
    like = resolve_like(like)
    cells = max(2, spec.size // 8)
    grid = _bytes(seed, like, "templates", n=spec.num_classes * spec.channels * cells * cells)
    grid = (64 + grid // 2).reshape(-1, spec.channels, cells, cells)
    index = np.arange(spec.size) * cells // spec.size  # pixel -> cell, exact in integers
    return grid[:, :, index][:, :, :, index]


def generate(
    like: str = "cifar10", split: str = "train", n: int | None = None, seed: int = 0
) -> Arrays:
    """The first `n` images of the split (all of SPLIT_SIZES when None):
    `(x uint8 (n, C, H, W), y int64 (n,))` numpy arrays, the same bytes for the same arguments."""
    like = resolve_like(like)
    spec = synthetic_info(like)
    if split not in ("train", "test"):
        raise ValueError(f"synthetic: unknown split {split!r}; use 'train' or 'test'")
    total = SPLIT_SIZES[like][split == "test"]
    n = total if n is None else n
    if not 0 <= n <= total:
        raise ValueError(f"synthetic {like} {split}: n={n} invalid; use 0..{total}")
    bank = templates(like, seed) - 64  # template + noise - 64 = bank + noise: uint8, exact
    x = np.empty((n, *bank.shape[1:]), np.uint8)
    y = np.empty(n, np.int64)
    pixels = int(np.prod(bank.shape[1:]))
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        # A SHAKE output is a prefix of any longer one: a short last chunk reads the same bytes.
        raw = _bytes(seed, like, split, start // CHUNK, n=2 * CHUNK + count * pixels)
        labels = raw[: 2 * CHUNK].view("<u2")[:count].astype(np.int64) % spec.num_classes
        noise = raw[2 * CHUNK :].reshape(count, *bank.shape[1:]) >> 1  # 0..127
        np.add(np.take(bank, labels, 0), noise, out=x[start : start + count])  # <= 254: exact
        y[start : start + count] = labels
    return x, y


@DATASETS.register(SYNTHETIC)
def read_synthetic(paths: list[Path], split: str, like: str | None = None) -> Arrays:
    """The whole split of `synthetic` shaped like `like` (default cifar10); `paths` is empty."""
    return generate(resolve_like(like), split)
