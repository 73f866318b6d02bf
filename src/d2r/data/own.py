"""Data sets from your own files, read into the same uint8 (N, C, H, W) arrays as the others:

- `folder`: `data.root` holds `train/<class>/*.png|jpg|jpeg` and `test/<class>/...`. The classes
  are the sorted subfolder names of train/ (label i = the i-th); every test class must be one of
  them. All images must have one square size, or `data.image_size=N` resizes each to N x N;
  `data.channels` 1 (greyscale) or 3 (RGB; default: the first image's, 1 if it is greyscale).
- `npz`: `data.root` holds `train.npz` and `test.npz`, each `image` (N, H, W, C) uint8 and
  `label` (N,) integers saved with np.savez: memory-mapped and checked as `data.extra` is.
  The classes are 0..K-1, all present in train; `data.classes` may name them.

`info` reads little (class folders and one image, or the arrays' headers and labels); `check`
reads every image's header before any work; `read` decodes a split; `fingerprint` is what the
cache is keyed by: each file's name, size and sha256. Every problem is one ValueError or
FileNotFoundError naming the file and the fix."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from d2r.data.extra import _check_images, _checked_labels, _open_members
from d2r.data.sources import DATASETS, FILE_SETS, Arrays, DatasetInfo

FOLDER, NPZ = "folder", "npz"
SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_LAYOUT = "train/<class>/*.png|jpg|jpeg and test/<class>/..."
NPZ_LAYOUT = "train.npz and test.npz, each image (N, H, W, C) uint8 and label (N,) integers"
_GREY = ("1", "L", "LA", "I", "I;16", "F")  # Pillow modes with one channel of grey
Tree = dict[str, list[Path]]  # class name -> its image files, sorted


def _root(root: str | Path | None, name: str) -> Path:
    if root is None:
        raise ValueError(f"data.name={name} reads data.root: set data.root=DIR")
    path = Path(root).expanduser()
    if not path.is_dir():
        layout = FOLDER_LAYOUT if name == FOLDER else NPZ_LAYOUT
        raise FileNotFoundError(
            f"data.root {str(root)!r} is not a directory; it must hold {layout}"
        )
    return path


def _open_image(path: Path):
    from PIL import Image  # imported only for data.name=folder

    try:
        return Image.open(path)
    except (OSError, ValueError) as error:  # not an image, or a damaged one
        raise ValueError(
            f"{path} is not a readable image ({error}); remove or replace it"
        ) from None


# folder ---------------------------------------------------------------------------------------
def _scan(root: Path, split: str) -> Tree:
    """The class folders of root/split and their image files (listing only, no reading)."""
    top = root / split
    if not top.is_dir():
        raise FileNotFoundError(
            f"data.root {str(root)!r} has no {split}/ folder; expected {FOLDER_LAYOUT}"
        )
    tree = {}
    for folder in sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = [f for f in folder.iterdir() if f.suffix.lower() in SUFFIXES and f.is_file()]
        if not files:
            raise ValueError(f"{folder} holds no {'/'.join(SUFFIXES)} image; add some or remove it")
        tree[folder.name] = sorted(files)
    return tree


def _train_tree(root: Path) -> Tree:
    tree = _scan(root, "train")
    if len(tree) < 2:
        raise ValueError(
            f"{root / 'train'} has {len(tree)} class folder(s) {sorted(tree)}; a classifier needs "
            f"at least two: {FOLDER_LAYOUT}"
        )
    return tree


def _test_tree(root: Path, classes: list[str]) -> Tree:
    tree = _scan(root, "test")
    if not tree:
        raise ValueError(f"{root / 'test'} holds no class folder; expected {FOLDER_LAYOUT}")
    absent = sorted(set(tree) - set(classes))
    if absent:
        raise ValueError(
            f"{root / 'test'}: class(es) {absent} have no folder in train/ (classes: {classes}); "
            "every test class must be a training class"
        )
    return tree


def _check_classes(given: tuple[str, ...] | list[str] | None, found: list[str], where: str) -> None:
    if given is not None and list(given) != found:
        raise ValueError(
            f"data.classes={list(given)} but {where} has the classes {found}; set "
            "data.classes=null (or to those)"
        )


def _channels(channels: int | None, first) -> int:
    if channels is None:
        return 1 if first.mode in _GREY else 3
    if channels not in (1, 3):
        raise ValueError(f"data.channels={channels}: use 1 (greyscale) or 3 (RGB), or null")
    return channels


def _square(size: tuple[int, int], path: Path) -> int:
    if size[0] != size[1]:
        raise ValueError(
            f"{path} is {size[0]}x{size[1]}, not square; set data.image_size=N to resize every "
            "image to N x N"
        )
    return size[0]


def folder_info(root, image_size=None, channels=None, classes=None) -> DatasetInfo:
    """The classes (train/'s sorted subfolders), size and channels of a folder data set."""
    tree = _train_tree(_root(root, FOLDER))
    found = list(tree)
    _check_classes(classes, found, str(Path(root) / "train"))
    first_path = tree[found[0]][0]
    with _open_image(first_path) as first:
        size = image_size or _square(first.size, first_path)
        channels = _channels(channels, first)
    return DatasetInfo(FOLDER, len(found), channels, size, 0, False, (), classes=tuple(found))


def _check_sizes(trees: list[Tree], image_size: int | None) -> None:
    """Every image opens (headers only); without image_size all have one square size."""
    seen: dict[tuple[int, int], Path] = {}
    for tree in trees:
        for path in (p for files in tree.values() for p in files):
            with _open_image(path) as image:
                seen.setdefault(image.size, path)
    if image_size is None and len(seen) > 1:
        (a, pa), (b, pb) = list(seen.items())[:2]
        raise ValueError(
            f"images of unequal size: {pa} is {a[0]}x{a[1]}, {pb} is {b[0]}x{b[1]}; set "
            "data.image_size=N to resize every image to N x N"
        )
    if image_size is None:
        _square(*next(iter(seen.items())))


def _decode(paths: list[Path], spec: DatasetInfo) -> np.ndarray:
    from PIL import Image  # imported only for data.name=folder

    mode = "L" if spec.channels == 1 else "RGB"

    def decode(path: Path) -> np.ndarray:
        with _open_image(path) as image:
            image = image.convert(mode)
            if image.size != (spec.size, spec.size):
                image = image.resize((spec.size, spec.size), Image.Resampling.BILINEAR)
            return np.asarray(image).reshape(spec.size, spec.size, spec.channels)

    x = np.empty((len(paths), spec.channels, spec.size, spec.size), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # Pillow releases the GIL
        for i, image in enumerate(pool.map(decode, paths)):
            x[i] = image.transpose(2, 0, 1)
    return x


@DATASETS.register(FOLDER)
def read_folder(root: Path, split: str, spec: DatasetInfo) -> Arrays:
    """The split's images (sorted by class, then file name) and labels (indices in spec.classes)."""
    tree = _split_tree(root, split, spec)
    paths = [p for files in tree.values() for p in files]
    labels = [spec.classes.index(c) for c, files in tree.items() for _ in files]
    return _decode(paths, spec), np.asarray(labels, dtype=np.int64)


def _split_tree(root: Path, split: str, spec: DatasetInfo) -> Tree:
    return _train_tree(root) if split == "train" else _test_tree(root, list(spec.classes))


# npz ------------------------------------------------------------------------------------------
def _arrays(root: Path, split: str) -> tuple[np.memmap, np.memmap, str]:
    path = root / f"{split}.npz"
    where = f"data.root {str(root)!r}: {split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{where} not found; expected {NPZ_LAYOUT}")
    images, labels = _open_members(path, where)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(
            f"{where}: image is {images.dtype} {tuple(images.shape)}, expected uint8 (N, H, W, C) "
            "of square images"
        )
    if images.shape[3] not in (1, 3):
        raise ValueError(
            f"{where}: images have {images.shape[3]} channels; use 1 or 3 (N, H, W, C)"
        )
    return images, labels, where


def npz_info(root, image_size=None, channels=None, classes=None) -> DatasetInfo:
    """Classes 0..K-1 (all present in train.npz's labels, named by data.classes when given),
    size and channels of train.npz's images."""
    images, labels, where = _arrays(_root(root, NPZ), "train")
    if image_size is not None:
        raise ValueError(f"data.image_size is for data.name=folder; {where} is used as it is")
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) == 0:
        raise ValueError(
            f"{where}: label is {labels.dtype} {tuple(labels.shape)}, expected (N,) integers"
        )
    k = int(labels.max()) + 1
    if k < 2:
        raise ValueError(f"{where}: labels hold {k} class; a classifier needs at least two")
    if channels is not None and channels != images.shape[3]:
        raise ValueError(
            f"data.channels={channels} but {where} has {images.shape[3]}-channel images"
        )
    if classes is not None and len(classes) != k:
        raise ValueError(f"data.classes names {len(classes)} classes, {where} has {k} (0..{k - 1})")
    names = tuple(classes) if classes is not None else tuple(map(str, range(k)))
    spec = DatasetInfo(NPZ, k, images.shape[3], images.shape[1], 0, False, (), classes=names)
    _checked_labels(labels, len(images), spec, where)  # every class present, one per image
    return spec


def _npz_labels(labels: np.memmap, n: int, spec: DatasetInfo, where: str) -> np.ndarray:
    if labels.ndim != 1 or len(labels) != n or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{where}: label is {labels.dtype} {tuple(labels.shape)}, expected ({n},) integers"
        )
    y = np.asarray(labels, dtype=np.int64)
    if len(y) and (y.min() < 0 or y.max() >= spec.num_classes):
        raise ValueError(
            f"{where}: labels span {y.min()}..{y.max()}, train.npz has the classes "
            f"0..{spec.num_classes - 1}; every test class must be a training class"
        )
    return y


@DATASETS.register(NPZ)
def read_npz(root: Path, split: str, spec: DatasetInfo) -> Arrays:
    """The split's images (copied out of the map) and labels, checked against train.npz's."""
    images, labels, where = _arrays(root, split)
    _check_images(images, spec, where)
    y = _npz_labels(labels, len(images), spec, where)
    return np.ascontiguousarray(np.asarray(images).transpose(0, 3, 1, 2)), y


# both -----------------------------------------------------------------------------------------
FILE_SETS[FOLDER] = folder_info
FILE_SETS[NPZ] = npz_info


def check(name: str, root: str | Path, spec: DatasetInfo, image_size: int | None = None) -> None:
    """Both splits, fully, before any work: a folder's every image opens, one size without
    image_size, its test classes among train's; an npz's arrays and labels (`read_npz`'s checks,
    without copying the images)."""
    root = _root(root, name)
    if name == FOLDER:
        trees = [_split_tree(root, split, spec) for split in ("train", "test")]
        _check_sizes(trees, image_size)
        return
    for split in ("train", "test"):  # the labels are cheap to read; the images stay mapped
        images, labels, where = _arrays(root, split)
        _check_images(images, spec, where)
        _npz_labels(labels, len(images), spec, where)


def files_of(name: str, root: Path, split: str, spec: DatasetInfo) -> list[Path]:
    if name == NPZ:
        return [root / f"{split}.npz"]
    return [p for files in _split_tree(root, split, spec).values() for p in files]


def fingerprint(name: str, root: str | Path, split: str, spec: DatasetInfo) -> str:
    """sha256 over the split's files' names (relative to root), sizes and contents' sha256:
    what its cache is keyed by, so any changed, added or removed file converts it again."""
    root = _root(root, name)
    paths = files_of(name, root, split, spec)

    def line(path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
        return f"{path.relative_to(root).as_posix()}\t{path.stat().st_size}\t{digest.hexdigest()}"

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        lines = list(pool.map(line, paths))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read(name: str, root: str | Path, split: str, spec: DatasetInfo) -> Arrays:
    return DATASETS.get(name)(_root(root, name), split, spec)
