"""Generated training data read from disk as it is needed: the .npz layout of the public 1M-50M
generated CIFAR-10/100 sets of Wang, Pang, Du, Lin, Liu, Yan, "Better diffusion models further
improve adversarial training", ICML 2023 (arXiv:2302.04638; github.com/wzekai99/DM-Improves-AT):
`image` (N, H, W, C) uint8 and `label` (N,) integers, written by `np.savez` (uncompressed).

20M images are 61 GB, so the images are never loaded: each member of the zip is located and
memory-mapped (np.load cannot map a member of an .npz), and each batch's images are gathered
from the map into pinned host memory and copied to the device asynchronously. Only the labels
(8 bytes an image) are read into memory, to check them. Nothing is unpickled: the .npy headers
are parsed by numpy's header reader, and an object (pickled) array is refused.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from d2r.data.sources import DatasetInfo

LAYOUT = "image (N, H, W, C) uint8 and label (N,) integers, saved with np.savez"
_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


@dataclass(frozen=True)
class _Member:
    offset: int  # where the array's bytes start in the file
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass
class ExtraData:
    """An opened, checked generated-data file: images memory-mapped, labels in memory."""

    path: Path
    images: np.memmap  # (N, H, W, C) uint8, on disk
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: np.ndarray, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels at `index` in host memory (pinned with `pin`, for an asynchronous
        copy to a GPU): (k, H, W, C) uint8 and (k,) int64. Runs in the loader's reading thread."""
        x = torch.empty((len(index), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        # mode="clip" lets np.take write straight into `out` (the indices are in range)
        np.take(self.images, index, axis=0, out=x.numpy(), mode="clip")
        y = torch.from_numpy(self.labels[index])
        return x, y.pin_memory() if pin else y

    @staticmethod
    def to_device(
        batch: tuple[torch.Tensor, torch.Tensor], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`read`'s output on `device` (asynchronous copies from pinned memory), images as
        (k, C, H, W)."""
        x, y = (t.to(device, non_blocking=True) for t in batch)
        return x.permute(0, 3, 1, 2), y


def open_extra(
    path: str | Path | None, fraction: float, info: DatasetInfo, batch_size: int
) -> ExtraData | None:
    """Open and check `data.extra` for data set `info` (None when no file is given): every
    problem (a missing or compressed member, a shape, dtype or channel count that is not the
    data set's, labels outside its classes or not covering them, a pickled array) is one
    ValueError naming the file and the fix, raised before any training."""
    if path is None:
        if fraction > 0:
            raise ValueError(
                f"data.extra_fraction={fraction} but no data.extra file: set data.extra=PATH.npz "
                "or data.extra_fraction=0"
            )
        return None
    where = f"data.extra {str(path)!r}"
    if not Path(path).is_file():  # the first thing to fix, whatever the fraction
        raise FileNotFoundError(f"{where} not found; give the path of the generated .npz file")
    if int(batch_size * fraction) < 1:
        raise ValueError(
            f"{where}: data.extra_fraction={fraction} of a batch of {batch_size} is no image; "
            f"set data.extra_fraction to at least {1 / batch_size:.3g} (e.g. 0.7)"
        )
    images, labels = _open_members(Path(path), where)
    _check_images(images, info, where)
    return ExtraData(Path(path), images, _checked_labels(labels, len(images), info, where))


def _open_members(path: Path, where: str) -> tuple[np.memmap, np.memmap]:
    if not path.is_file():
        raise FileNotFoundError(f"{where} not found; give the path of the generated .npz file")
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            image = _member(archive, raw, "image", where)
            label = _member(archive, raw, "label", where)
    except zipfile.BadZipFile:
        raise ValueError(f"{where} is not an .npz (zip) file; expected {LAYOUT}") from None
    return (
        np.memmap(path, dtype=image.dtype, mode="r", offset=image.offset, shape=image.shape),
        np.memmap(path, dtype=label.dtype, mode="r", offset=label.offset, shape=label.shape),
    )


def _member(archive: zipfile.ZipFile, raw, key: str, where: str) -> _Member:
    """Locate `key`.npy in the zip and parse its .npy header (no unpickling)."""
    try:
        entry = archive.getinfo(f"{key}.npy")
    except KeyError:
        keys = sorted(n.removesuffix(".npy") for n in archive.namelist())
        raise ValueError(
            f"{where} has no {key!r} array (it has {keys}); expected {LAYOUT}"
        ) from None
    if entry.compress_type != zipfile.ZIP_STORED or entry.flag_bits & 1:
        raise ValueError(
            f"{where}: {key!r} is compressed (np.savez_compressed) or encrypted and cannot be "
            "memory-mapped; re-save it with np.savez (uncompressed)"
        )
    raw.seek(entry.header_offset)
    local = raw.read(_LOCAL_HEADER)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = entry.header_offset + _LOCAL_HEADER + name_len + extra_len
    raw.seek(start)
    shape, fortran, dtype = _npy_header(raw, key, where)
    offset = raw.tell()
    if dtype.hasobject:  # loading it would unpickle whatever the file holds
        raise ValueError(f"{where}: {key!r} holds Python objects (a pickle); expected {LAYOUT}")
    if fortran:
        raise ValueError(f"{where}: {key!r} is in Fortran order; re-save it C-ordered (np.savez)")
    if offset - start + int(np.prod(shape)) * dtype.itemsize != entry.file_size:
        raise ValueError(f"{where}: {key!r} is truncated or damaged; download the file again")
    return _Member(offset, tuple(shape), dtype)


def _npy_header(raw, key: str, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(raw)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(raw)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(raw)
    except ValueError:
        pass
    raise ValueError(f"{where}: {key!r} is not a readable .npy array; expected {LAYOUT}")


def _check_images(images: np.memmap, info: DatasetInfo, where: str) -> None:
    expected = (info.size, info.size, info.channels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(
            f"{where}: image is {images.dtype} {tuple(images.shape)}, expected uint8 "
            f"(N, {', '.join(map(str, expected))}) for {info.name} (N, H, W, C); is it a file "
            "for another data set?"
        )
    if len(images) == 0:
        raise ValueError(f"{where} holds no images; expected {LAYOUT}")


def _checked_labels(labels: np.memmap, n: int, info: DatasetInfo, where: str) -> np.ndarray:
    """The labels as int64, checked: one per image, each a class of the data set, every class
    present (a file for a data set with fewer classes is refused)."""
    if labels.ndim != 1 or len(labels) != n or labels.dtype.kind not in "iu":
        raise ValueError(
            f"{where}: label is {labels.dtype} {tuple(labels.shape)}, expected ({n},) integers "
            "(one per image)"
        )
    values = np.asarray(labels, dtype=np.int64)
    low, high, classes = values.min(), values.max(), info.num_classes
    if low < 0 or high >= classes:
        raise ValueError(
            f"{where}: labels span {low}..{high}, {info.name} has classes 0..{classes - 1}; "
            "is it a file for another data set?"
        )
    present = np.count_nonzero(np.bincount(values, minlength=classes))
    if present != classes:
        raise ValueError(
            f"{where}: labels cover {present} of {info.name}'s {classes} classes; is it a file "
            "for another data set?"
        )
    return values
