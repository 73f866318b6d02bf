"""`load`: official archive -> verified -> read once -> cached uint8 tensors; `subset`; the
validation split and `load_splits`, what a training run reads."""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from d2r.data import own
from d2r.data.download import require, split_files, verify_file
from d2r.data.sources import (
    DATASETS,
    FILE_SETS,
    SPLITS,
    SYNTHETIC,
    DatasetInfo,
    fix_hint,
    info,
    section_info,
)
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
    image_size: int | None = None,
    channels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split of data set `name` as `(x uint8 (N, C, H, W), y int64 (N,))` CPU tensors.

    `root` holds the files exactly as the official URLs serve them (unextracted); it is ignored
    for the embedded `digits`. Missing files: FileNotFoundError naming file, URL and place.
    Each file's MD5 is checked first: a mismatch is a ValueError, or with `verify=False` a
    warning (for a user's own subset or mirror in the official layout). The converted arrays
    are cached under `root/d2r_cache/`, keyed by the archives' MD5, unless `cache=False`.
    `synthetic` is generated in the shape of `like` (see d2r.data.synthetic): no file, no cache.
    `folder`, `npz`: your own files (d2r.data.own), cached by their names, sizes and sha256."""
    spec = info(name, like, root=root, image_size=image_size, channels=channels)
    _check_split(name, split)
    root = Path(root).expanduser()
    if name in FILE_SETS:
        sums, paths = [own.fingerprint(name, root, split, spec), f"{spec.size}:{spec.channels}"], []
    else:
        paths = require(name, root, split)  # fails before any reading when a file is missing
        sums = [
            verify_file(path, remote, name, verify)  # in the loop: warn's stacklevel stays right
            for path, remote in zip(paths, split_files(spec, split), strict=True)
        ]
    cache_path = _cache_path(root, name, split, sums) if (paths or sums) and cache else None
    cached = _read_cache(cache_path) if cache_path and cache_path.is_file() else None
    if cached is not None:
        return cached
    x, y = _read(name, root, split, spec, paths, like)  # checked
    x, y = _tensor(x, np.uint8), _tensor(y, np.int64)
    if cache_path is not None:
        _write_cache(cache_path, x, y)
    return x, y


def _read(name: str, root: Path, split: str, spec: DatasetInfo, paths: list[Path], like) -> Any:
    if name in FILE_SETS:
        x, y = own.read(name, root, split, spec)
    else:  # synthetic alone is parametrized: by the real set whose shape it takes
        reader = DATASETS.get(name)
        x, y = reader(paths, split, like=like) if name == SYNTHETIC else reader(paths, split)
    _check_arrays(spec, x, y, paths)
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


VAL_SEED = 0  # the validation sample when data.subset_seed is None: the same for every run


def validation_split(y: torch.Tensor, n: int, seed: int | None = None) -> tuple[torch.Tensor, ...]:
    """Indices `(train, val)` of a stratified hold-out of `n` examples: each class gives its share
    of `n` (n * count / N, rounded by largest remainder), sampled with `seed` (None: VAL_SEED).
    Both are sorted (data order kept) and never overlap; together they are every index."""
    labels = y.cpu().numpy()
    if not 0 < n < len(labels):
        raise ValueError(
            f"data.val_size={n}: the training split has {len(labels)} images; hold out "
            f"1..{len(labels) - 1} of them, or set data.val_size=null for no validation split"
        )
    classes, counts = np.unique(labels, return_counts=True)
    quota = n * counts / len(labels)
    take = np.floor(quota).astype(np.int64)
    largest = np.argsort(take - quota, kind="stable")  # largest remainder first
    take[largest[: n - take.sum()]] += 1
    # numpy's legacy RandomState stream is frozen, so a seed names the same split forever.
    rng = np.random.RandomState(VAL_SEED if seed is None else seed)
    pairs = zip(classes, take, strict=True)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in pairs]
    val = np.sort(np.concatenate(picked))
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return torch.from_numpy(train), torch.from_numpy(val)


class Splits(NamedTuple):
    """What a training run reads: the training images and the per-epoch validation's images,
    with the split those come from ("val", held out of the training split, or "test")."""

    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    val_split: str


def load_splits(d: Any, val_subset: int | None = None) -> Splits:
    """The training images and the per-epoch validation's, from the `data` config section `d`:
    `data.val_size` images held out of the training split (stratified, `validation_split`),
    then `data.train_subset` of the rest; validation reads the first `val_subset` validation
    images, or without a validation split the test split's (`data.test_subset` first).
    Every file is looked for before any is read; with a validation split the test split is
    not read at all (only `d2r eval` reads it)."""
    if d.name in FILE_SETS:  # your own files: all of both splits checked first
        own.check(d.name, d.root, section_info(d), d.image_size)
    for split in ("train",) if d.val_size else ("train", "test"):
        require(d.name, d.root, split)
    read = {"verify": d.verify, "like": d.like, "image_size": d.image_size, "channels": d.channels}
    x, y = load(d.name, d.root, "train", **read)
    if d.val_size:
        train, val = validation_split(y, d.val_size, d.subset_seed)
        x_val, y_val, x, y, split = x[val], y[val], x[train], y[train], "val"
    else:
        x_val, y_val = load(d.name, d.root, "test", **read)
        x_val, y_val = subset(x_val, y_val, d.test_subset, d.subset_seed)
        split = "test"
    if d.train_subset is not None and d.train_subset > len(x):
        raise ValueError(
            f"data.train_subset={d.train_subset}: {len(x)} training images are left after "
            f"data.val_size={d.val_size} are held out; use at most {len(x)}"
        )
    x, y = subset(x, y, d.train_subset, d.subset_seed)
    return Splits(x, y, x_val[:val_subset], y_val[:val_subset], split)
