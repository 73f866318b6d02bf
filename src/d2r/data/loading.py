"""`load`: official archive -> verified -> read once -> cached uint8 tensors; and `subset`."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from d2r.data.download import require, split_files, verify_file
from d2r.data.sources import DATASETS, SPLITS, SYNTHETIC, DatasetInfo, fix_hint, info
from d2r.files import follow_umask

CACHE_DIR = "d2r_cache"  # under root, next to the archives it was converted from
_CACHE_VERSION = 1  # bump when a reader's output changes, so older caches are not reused


def _cache_path(root: Path, name: str, split: str, md5s: list[str]) -> Path:
    # Keyed by the archives' checksums: a changed archive never meets a stale cache.
    key = hashlib.sha256(f"{_CACHE_VERSION}:{name}:{split}:{','.join(md5s)}".encode())
    return root / CACHE_DIR / f"{name}-{split}-{key.hexdigest()[:16]}.safetensors"


def _read_cache(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        tensors = load_file(path)
        return tensors["x"], tensors["y"]
    except Exception:  # unreadable or foreign file: convert the archive again
        return None


def _write_cache(path: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    """Atomic write (temp + rename); stale caches of the same split are removed. A read-only
    root only costs the conversion again next time, so it warns instead of failing."""
    try:
        path.parent.mkdir(exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(handle)
        try:
            follow_umask(temp)  # a shared data root: others may read the cache too
            save_file({"x": x, "y": y}, temp)
            os.replace(temp, path)
        finally:
            Path(temp).unlink(missing_ok=True)
        name_split = path.name.rsplit("-", 1)[0]
        for stale in path.parent.glob(f"{name_split}-*.safetensors"):
            if stale != path:
                stale.unlink(missing_ok=True)
    except OSError as error:
        warnings.warn(f"could not cache converted arrays at {path}: {error}", stacklevel=3)


def _check_arrays(spec: DatasetInfo, x: np.ndarray, y: np.ndarray, paths: list[Path]) -> None:
    source = ", ".join(map(str, paths)) or spec.name
    root = paths[0].parent if paths else "ROOT"
    shape = (spec.channels, spec.size, spec.size)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != shape or len(x) != len(y):
        raise ValueError(
            f"{source}: read {x.dtype} images of shape {x.shape} with {len(y)} labels, expected "
            f"uint8 (N, {', '.join(map(str, shape))}) with N labels; the archive does not have "
            f"the official {spec.name} layout: run {fix_hint(spec.name, root)}."
        )
    if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
        raise ValueError(
            f"{source}: labels span {y.min()}..{y.max()}, expected 0..{spec.num_classes - 1} "
            f"for {spec.name}; the archive does not have the official layout: run "
            f"{fix_hint(spec.name, root)}."
        )


def _tensor(array: np.ndarray, dtype: type) -> torch.Tensor:
    # Copies only when needed: Tiny ImageNet's 1.2 GB should not exist twice.
    array = np.ascontiguousarray(array, dtype)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(
            f"{name}: unknown split {split!r}; use 'train' or 'test' "
            f"(Tiny ImageNet's labelled 'val' set is its 'test')."
        )


def load(
    name: str,
    root: str | Path,
    split: str,
    verify: bool = True,
    *,
    cache: bool = True,
    like: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of data set `name` as `(x uint8 (N, C, H, W), y int64 (N,))` CPU tensors.

    `root` holds the files exactly as the official URLs serve them (unextracted); it is ignored
    for the embedded `digits`. Missing files: FileNotFoundError naming file, URL and place.
    Each file's MD5 is checked first: a mismatch is a ValueError, or with `verify=False` a
    warning (for a user's own subset or mirror in the official layout). The converted arrays
    are cached under `root/d2r_cache/`, keyed by the archives' MD5, unless `cache=False`.
    `synthetic` is generated in the shape of `like` (see d2r.data.synthetic): no file, no cache."""
    spec = info(name, like)
    _check_split(name, split)
    root = Path(root).expanduser()
    paths = require(name, root, split)  # fails before any reading when a file is missing
    md5s = []
    for path, remote in zip(paths, split_files(spec, split), strict=True):
        md5s.append(verify_file(path, remote, name, verify))  # a loop keeps warn's stacklevel
    cache_path = _cache_path(root, name, split, md5s) if paths and cache else None
    cached = _read_cache(cache_path) if cache_path and cache_path.is_file() else None
    if cached is not None:
        return cached
    reader = DATASETS.get(name)
    # synthetic alone is parametrized: by the real set whose shape it takes
    x, y = reader(paths, split, like=like) if name == SYNTHETIC else reader(paths, split)
    _check_arrays(spec, x, y, paths)
    x, y = _tensor(x, np.uint8), _tensor(y, np.int64)
    if cache_path is not None:
        _write_cache(cache_path, x, y)
    return x, y


def subset(
    x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` examples, or with `seed` a seeded random sample of `n` kept in data order.

    `n=None` keeps everything (config keys data.train_subset / data.test_subset)."""
    if n is None:
        return x, y
    if not 0 < n <= len(x):
        raise ValueError(f"subset of {n} examples from {len(x)}: use 1..{len(x)}, or None for all")
    if seed is None:
        return x[:n], y[:n]
    # numpy's legacy RandomState stream is frozen, so a seed names the same sample forever.
    index = np.sort(np.random.RandomState(seed).permutation(len(x))[:n])
    index = torch.from_numpy(index).to(x.device)
    return x[index], y[index]


def load_splits(d: Any, check_subset: int | None = None) -> tuple[torch.Tensor, ...]:
    """What a training run reads, from the `data` config section `d`: (x, y) of the training
    split (data.train_subset) and (x, y) of the per-epoch check's images (data.test_subset,
    then the first `check_subset`). Every file is looked for before any is read."""
    for split in ("train", "test"):
        require(d.name, d.root, split)
    read = {"verify": d.verify, "like": d.like}
    x, y = subset(*load(d.name, d.root, "train", **read), d.train_subset, d.subset_seed)
    x_test, y_test = load(d.name, d.root, "test", **read)
    x_test, y_test = subset(x_test, y_test, d.test_subset, d.subset_seed)
    return x, y, x_test[:check_subset], y_test[:check_subset]
