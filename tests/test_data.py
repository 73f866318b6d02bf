"""d2r.data: each official format written small and exact, read back pixel for pixel; checksum,
truncation, missing-file and layout errors; the safe unpickler; download; the device pipeline."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2r.data import (
    CACHE_DIR,
    DATASETS,
    DeviceLoader,
    crop_flip,
    download,
    info,
    load,
    md5sum,
    sources,
    subset,
)
from d2r.data.safe_pickle import safe_loads

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------------------
# Writers of tiny archives in the official layouts. Each returns {split: (x (N, C, H, W), y)}.


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote into the official CIFAR archives: every string as a
    byte string (BINSTRING) and numpy's globals under their numpy 1 names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None):
        module = {"_reconstruct": "numpy.core.multiarray"}.get(obj.__name__, "numpy")
        self.write(pickle.GLOBAL + f"{module}\n{obj.__name__}\n".encode())
        self.memoize(obj)


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    _Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def images(n: int, c: int, size: int) -> np.ndarray:
    return RNG.integers(0, 256, (n, c, size, size), dtype=np.uint8)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))


def _cifar_dict(x: np.ndarray, y: np.ndarray, label_key: bytes) -> dict:
    # One row per image: the 1024 red, then green, then blue values of the row-major 32x32 planes.
    rows = np.stack([np.concatenate([x[i, c].ravel() for c in range(3)]) for i in range(len(x))])
    names = [b"image_%d.png" % i for i in range(len(x))]
    return {b"batch_label": b"batch", label_key: [int(v) for v in y], b"data": rows,
            b"filenames": names}  # fmt: skip


def write_cifar10(root: Path, dumps=py2_pickle, skip: tuple[str, ...] = ()) -> dict:
    x, y = images(7, 3, 32), RNG.integers(0, 10, 7)
    members, starts = {}, [0, 2, 3, 4, 5, 6]  # uneven batches of 2, 1, 1, 1, 1 + a test batch
    for i in range(5):
        part = slice(starts[i], starts[i + 1])
        members[f"data_batch_{i + 1}"] = dumps(_cifar_dict(x[part], y[part], b"labels"))
    members["test_batch"] = dumps(_cifar_dict(x[6:], y[6:], b"labels"))
    members["batches.meta"] = dumps({b"label_names": [b"airplane"] * 10})
    members = {f"cifar-10-batches-py/{k}": v for k, v in members.items() if k not in skip}
    _tar(root / "cifar-10-python.tar.gz", members)
    return {"train": (x[:6], y[:6]), "test": (x[6:], y[6:])}


def write_cifar100(root: Path, label_key: bytes = b"fine_labels") -> dict:
    expected, members = {}, {}
    for split, n in (("train", 4), ("test", 3)):
        x, y = images(n, 3, 32), RNG.integers(0, 100, n)
        batch = _cifar_dict(x, y, label_key) | {b"coarse_labels": [0] * n}
        members[f"cifar-100-python/{split}"], expected[split] = py2_pickle(batch), (x, y)
    members["cifar-100-python/meta"] = py2_pickle({b"fine_label_names": [b"apple"] * 100})
    _tar(root / "cifar-100-python.tar.gz", members)
    return expected


def _idx_gz(path: Path, array: np.ndarray, magic: int = 8) -> None:
    header = bytes([0, 0, magic, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.tobytes())


def write_mnist(root: Path, magic: int = 8) -> dict:
    expected = {}
    for split, prefix, n in (("train", "train", 5), ("test", "t10k", 3)):
        x, y = images(n, 1, 28), RNG.integers(0, 10, n).astype(np.uint8)
        _idx_gz(root / f"{prefix}-images-idx3-ubyte.gz", x[:, 0], magic)
        _idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz", y)
        expected[split] = (x, y)
    return expected


def write_svhn(root: Path, x_key: str = "X") -> dict:
    from scipy.io import savemat

    expected = {}
    for split, n in (("train", 5), ("test", 4)):
        x, y = images(n, 3, 32), np.array([0, 1, 9, 3, 0][:n])
        mat_y = np.where(y == 0, 10, y).astype(np.uint8)[:, None]  # SVHN writes digit 0 as 10
        savemat(root / f"{split}_32x32.mat", {x_key: x.transpose(2, 3, 1, 0), "y": mat_y})
        expected[split] = (x, y)
    return expected


def _jpeg(array: np.ndarray) -> tuple[bytes, np.ndarray]:
    """JPEG bytes of a (C, 64, 64) image and the (3, 64, 64) pixels a decoder returns for them."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array[0] if len(array) == 1 else array.transpose(1, 2, 0)).save(
        buffer, "JPEG", quality=95
    )
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    decoded = decoded.transpose(2, 0, 1)
    assert np.abs(decoded - array.astype(float)).mean() < 3  # lossy, but the same picture
    return buffer.getvalue(), decoded


def _smooth_image(channels: int) -> np.ndarray:
    """A smooth image (JPEG keeps it close) that differs along rows, columns and channels."""
    rows, cols = np.meshgrid(np.linspace(0, 1, 64), np.linspace(0, 1, 64), indexing="ij")
    a, b, c = RNG.uniform(20, 120, 3)
    planes = [a * rows + b * cols, c * cols + 30, 200 - a * rows]
    return np.stack(planes[:channels]).astype(np.uint8)


def write_tiny_imagenet(root: Path, skip: str = "") -> dict:
    top, wnids = "tiny-imagenet-200/", ["n09999999", "n01443537", "n05555555"]  # not sorted
    label = {wnid: i for i, wnid in enumerate(sorted(wnids))}  # labels index the sorted wnids
    members = {top + "wnids.txt": "\n".join(wnids).encode(), top + "words.txt": b"n01443537\tfish"}
    train = []
    for wnid in wnids:
        for k in range(2):
            channels = 1 if (wnid, k) == ("n05555555", 1) else 3  # some images are greyscale
            name = f"{top}train/{wnid}/images/{wnid}_{k}.JPEG"
            members[name], decoded = _jpeg(_smooth_image(channels))
            train.append((name, decoded, label[wnid]))
        members[f"{top}train/{wnid}/{wnid}_boxes.txt"] = b"0 0 63 63"
    val, rows = [], []
    for k, wnid in enumerate(["n05555555", "n09999999", "n05555555", "n01443537"]):
        members[f"{top}val/images/val_{k}.JPEG"], decoded = _jpeg(_smooth_image(3))
        rows.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
        val.append((decoded, label[wnid]))
    members[top + "val/val_annotations.txt"] = "\n".join(rows).encode() + b"\n"
    members[top + "test/images/test_0.JPEG"] = _jpeg(_smooth_image(3))[0]  # unlabelled: unused
    with zipfile.ZipFile(root / "tiny-imagenet-200.zip", "w") as archive:
        for name, data in members.items():
            if not (skip and name.endswith(skip)):
                archive.writestr(name, data)
    train.sort(key=lambda entry: entry[0])  # the reader orders training images by name
    return {
        "train": (np.stack([e[1] for e in train]), np.array([e[2] for e in train])),
        "test": (np.stack([e[0] for e in val]), np.array([e[1] for e in val])),
    }


WRITERS = {
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "mnist": write_mnist,
    "svhn": write_svhn,
    "tiny_imagenet": write_tiny_imagenet,
}
# A broken variant of each: the right file names, the wrong inside.
BROKEN = {
    "cifar10": lambda root: write_cifar10(root, skip=("data_batch_3",)),
    "cifar100": lambda root: write_cifar100(root, label_key=b"labels"),
    "mnist": lambda root: write_mnist(root, magic=9),
    "svhn": lambda root: write_svhn(root, x_key="images"),
    "tiny_imagenet": lambda root: write_tiny_imagenet(root, skip="val_annotations.txt"),
}


def make_official(monkeypatch, name: str, root: Path) -> None:
    """Makes the tiny files in `root` the 'official' ones by patching the checksum table."""
    spec = info(name)
    files = tuple(
        dataclasses.replace(
            f, md5=md5sum(root / f.filename), size=(root / f.filename).stat().st_size
        )
        for f in spec.files
    )
    monkeypatch.setitem(sources.INFO, name, dataclasses.replace(spec, files=files))


def assert_equal(x: torch.Tensor, y: torch.Tensor, expected: tuple) -> None:
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    np.testing.assert_array_equal(x.numpy(), expected[0])
    np.testing.assert_array_equal(y.numpy(), expected[1])


# ------------------------------------------------------------------------------------------------
# Readers


def test_registry_and_info():
    # synthetic, folder and npz: no INFO (folder and npz read theirs from your files)
    assert DATASETS.names() == sorted([*sources.INFO, "synthetic", *sources.FILE_SETS])
    assert set(DATASETS.names()) == {
        "cifar10",
        "cifar100",
        "svhn",
        "mnist",
        "tiny_imagenet",
        "digits",
        "synthetic",
        "folder",
        "npz",
    }
    assert not info("svhn").flip and not info("mnist").flip and info("cifar10").flip
    assert info("tiny_imagenet").size == 64 and info("tiny_imagenet").num_classes == 200
    with pytest.raises(ValueError, match="valid choices: cifar10"):
        info("imagenet")


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_reads_official_layout_exactly(name, tmp_path, monkeypatch):
    expected = WRITERS[name](tmp_path)
    make_official(monkeypatch, name, tmp_path)
    for split in ("train", "test"):
        x, y = load(name, tmp_path, split)  # verify=True against the patched table
        assert_equal(x, y, expected[split])
        assert x.shape[1:] == (info(name).channels, info(name).size, info(name).size)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_verify_false_loads_a_subset_with_a_warning(name, tmp_path):
    expected = WRITERS[name](tmp_path)
    with pytest.warns(UserWarning, match="differs from the official"):
        x, y = load(name, tmp_path, "test", verify=False)
    assert_equal(x, y, expected["test"])


def test_tiny_imagenet_labels_and_greyscale(tmp_path):
    write_tiny_imagenet(tmp_path)
    with pytest.warns(UserWarning):
        x, y = load("tiny_imagenet", tmp_path, "train", verify=False)
    assert y.tolist() == [0, 0, 1, 1, 2, 2]  # n01443537, n05555555, n09999999
    assert torch.equal(x[3, 0], x[3, 1]) and torch.equal(x[3, 1], x[3, 2])  # n05555555_1: grey
    assert not torch.equal(x[2, 0], x[2, 1])


def test_cifar_reads_python3_pickles(tmp_path, monkeypatch):
    # A user's own subset written by Python 3 + numpy 2 (protocol 2 and 4) reads the same.
    for protocol in (2, 4):
        expected = write_cifar10(tmp_path, dumps=lambda d, p=protocol: pickle.dumps(d, protocol=p))
        with pytest.warns(UserWarning):
            assert_equal(*load("cifar10", tmp_path, "train", verify=False), expected["train"])


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar_refuses_a_code_executing_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2)
    write_cifar10(tmp_path, dumps=lambda d: evil)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"refused global .*system"):
        load("cifar10", tmp_path, "test", verify=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(eval, protocol=2),  # builtins.eval
        pickle.dumps(np.array([1, "a"], dtype=object), protocol=2),  # object arrays nest pickles
        pickle.dumps(np.zeros(2, dtype=[("a", "u1")]), protocol=2),  # structured dtype
        pickle.dumps({b"data": 1}, protocol=2)[:-3],  # truncated
    ],
)
def test_safe_loads_refuses(payload):
    with pytest.raises(pickle.UnpicklingError):
        safe_loads(payload)


def test_safe_loads_admits_plain_values():
    value = {
        b"a": [1, 2.5, "s", b"b", None, True],
        b"x": np.arange(6, dtype=np.int32).reshape(2, 3),
    }
    out = safe_loads(pickle.dumps(value, protocol=2))
    assert out[b"a"] == value[b"a"] and np.array_equal(out[b"x"], value[b"x"])
    assert out[b"x"].dtype == np.int32
    fortran = np.asfortranarray(np.arange(12, dtype=">f8").reshape(3, 4))
    assert np.array_equal(safe_loads(py2_pickle(fortran)), fortran)


def test_digits_split():
    x, _ = load("digits", "ignored", "train")
    x_test, y_test = load("digits", "ignored", "test")
    assert x.shape == (1497, 1, 8, 8) and x_test.shape == (300, 1, 8, 8)
    assert torch.equal(torch.bincount(y_test), torch.full((10,), 30))
    assert x.dtype == torch.uint8 and x.max() == 255 and x.min() == 0
    from sklearn.datasets import load_digits

    all_x = np.round(load_digits().images * 255 / 16).astype(np.uint8)
    rows = {row.tobytes() for row in all_x}
    assert {row.tobytes() for row in x[:, 0].numpy()} <= rows
    assert torch.equal(load("digits", "", "test")[0], x_test)  # deterministic


# ------------------------------------------------------------------------------------------------
# Errors: each names the file, the problem and the fix


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_missing_file_names_file_url_and_place(name, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load(name, tmp_path, "train")
    remote = info(name).files[0]
    for part in (remote.filename, remote.urls[0], str(tmp_path), "d2r data download"):
        assert part in str(error.value)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_wrong_checksum_is_refused(name, tmp_path):
    WRITERS[name](tmp_path)
    with pytest.raises(ValueError, match="does not match the official") as error:
        load(name, tmp_path, "train")
    remote = sources.INFO[name].files[0]
    path = tmp_path / remote.filename
    for part in (str(path), remote.md5, md5sum(path), "verify=False", "d2r data download"):
        assert part in str(error.value)


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_truncated_file_is_never_half_read(name, tmp_path, monkeypatch):
    WRITERS[name](tmp_path)
    make_official(monkeypatch, name, tmp_path)
    path = tmp_path / info(name).files[0].filename
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated"):
        load(name, tmp_path, "train")  # caught by the checksum
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="truncated or corrupt"):
        load(name, tmp_path, "train", verify=False)  # caught by the reader
    assert not list((tmp_path / CACHE_DIR).glob("*.safetensors"))


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_wrong_layout_is_refused(name, tmp_path):
    BROKEN[name](tmp_path)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="layout") as error:
        load(name, tmp_path, "train", verify=False)
    assert str(tmp_path) in str(error.value) and "d2r data download" in str(error.value)


def test_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load("digits", tmp_path, "val")


# ------------------------------------------------------------------------------------------------
# Cache


def test_cache_is_used_and_invalidated_by_a_changed_archive(tmp_path, monkeypatch):
    first = write_mnist(tmp_path)
    with pytest.warns(UserWarning):
        load("mnist", tmp_path, "train", verify=False)
    assert len(list((tmp_path / CACHE_DIR).glob("mnist-train-*.safetensors"))) == 1

    def fail(paths, split):
        raise AssertionError("the archive was read again instead of the cache")

    monkeypatch.setitem(DATASETS._entries, "mnist", fail)
    with pytest.warns(UserWarning):
        assert_equal(*load("mnist", tmp_path, "train", verify=False), first["train"])
    monkeypatch.undo()
    second = write_mnist(tmp_path)  # new pixels: new checksums, new cache key
    with pytest.warns(UserWarning):
        assert_equal(*load("mnist", tmp_path, "train", verify=False), second["train"])
    assert len(list((tmp_path / CACHE_DIR).glob("mnist-train-*.safetensors"))) == 1  # stale gone


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"real MNIST files not found at {MNIST_DIR}")
def test_real_mnist_verified(tmp_path):
    # Links, so the cache goes to tmp_path and not into the shared (read-only) data directory.
    for path in MNIST_DIR.glob("*.gz"):
        (tmp_path / path.name).symlink_to(path)
    x, y = load("mnist", tmp_path, "train")
    x_test, y_test = load("mnist", tmp_path, "test")
    assert x.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4] and y_test[:3].tolist() == [7, 2, 1]
    assert torch.equal(torch.bincount(y_test), torch.bincount(y_test, minlength=10))
    assert torch.equal(load("mnist", tmp_path, "test")[0], x_test)  # from the cache


# ------------------------------------------------------------------------------------------------
# Download


def _serve(monkeypatch, name: str, urls: tuple[str, ...], md5: str) -> None:
    spec = info(name)
    files = tuple(dataclasses.replace(f, urls=urls, md5=md5) for f in spec.files)
    monkeypatch.setitem(sources.INFO, name, dataclasses.replace(spec, files=files))


def test_download_verifies_then_renames(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    write_cifar10(tmp_path / "src")
    archive = tmp_path / "src" / "cifar-10-python.tar.gz"
    missing = (tmp_path / "nowhere.tar.gz").as_uri()
    _serve(monkeypatch, "cifar10", (missing, archive.as_uri()), md5sum(archive))
    root = tmp_path / "root"
    assert download("cifar10", root) == [root / "cifar-10-python.tar.gz"]  # second mirror
    assert md5sum(root / "cifar-10-python.tar.gz") == md5sum(archive)
    assert sorted(os.listdir(root)) == ["cifar-10-python.tar.gz"]
    _serve(monkeypatch, "cifar10", (missing,), md5sum(archive))
    assert download("cifar10", root) == [root / "cifar-10-python.tar.gz"]  # kept, not refetched


def test_download_with_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    archive = tmp_path / "cifar-10-python.tar.gz"
    _serve(monkeypatch, "cifar10", (archive.as_uri(),), "0" * 32)
    root = tmp_path / "root"
    with pytest.raises(ValueError, match=r"expected 0{32}") as error:
        download("cifar10", root)
    assert md5sum(archive) in str(error.value) and archive.as_uri() in str(error.value)
    assert os.listdir(root) == []


def test_download_unreachable_is_an_oserror(tmp_path, monkeypatch):
    url = (tmp_path / "absent").as_uri()
    _serve(monkeypatch, "cifar10", (url,), "0" * 32)
    with pytest.raises(OSError, match="by hand"):
        download("cifar10", tmp_path / "root")
    assert os.listdir(tmp_path / "root") == []


# ------------------------------------------------------------------------------------------------
# subset


def test_subset():
    x, y = torch.arange(100).view(100, 1, 1, 1).to(torch.uint8), torch.arange(100)
    assert torch.equal(subset(x, y, 10)[1], torch.arange(10))
    assert subset(x, y, None)[1] is y
    a, b = subset(x, y, 20, seed=1)[1], subset(x, y, 20, seed=1)[1]
    assert torch.equal(a, b) and len(a.unique()) == 20 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, subset(x, y, 20, seed=2)[1]) and not torch.equal(a, y[:20])
    assert torch.equal(subset(x, y, 20, seed=1)[0].view(-1).long(), a)  # x and y stay paired
    for n in (0, 101):
        with pytest.raises(ValueError, match=r"1\.\.100"):
            subset(x, y, n)


# ------------------------------------------------------------------------------------------------
# Device pipeline


def _data(n: int = 37, c: int = 3, size: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    # Pixels 1..255, so any 0 in a batch can only come from the padding.
    x = torch.from_numpy(RNG.integers(1, 256, (n, c, size, size), dtype=np.uint8))
    return x, torch.arange(n)  # y names the source image


def _windows(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every window of the zero-padded image and its mirror: the possible augmentations."""
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    h, w = image.shape[1:]
    out = []
    for i in range(2 * padding + 1):
        for j in range(2 * padding + 1):
            window = padded[:, i : i + h, j : j + w]
            out += [window, window.flip(-1)]
    return out


def test_batches_have_shape_range_and_cover_the_epoch():
    x, y = _data()
    loader = DeviceLoader(x, y, 8, crop_padding=2, flip=True, seed=3)
    assert len(loader) == 5
    seen = []
    for xb, yb in loader:
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert xb.shape[1:] == x.shape[1:] and xb.min() >= 0 and xb.max() <= 1
        seen.append(yb)
    assert sorted(torch.cat(seen).tolist()) == list(range(37))  # each example exactly once
    dropped = DeviceLoader(x, y, 8, drop_last=True)
    assert len(dropped) == 4 and sum(len(yb) for _, yb in dropped) == 32
    ordered = DeviceLoader(x, y, 8, shuffle=False)
    assert torch.equal(torch.cat([yb for _, yb in ordered]), y)
    assert torch.equal(next(iter(ordered))[0], x[:8].float() / 255)


def test_crops_are_windows_of_the_padded_image():
    x, y = _data()
    crops, flips = set(), 0
    for xb, yb in DeviceLoader(x, y, 16, crop_padding=2, flip=True, seed=0):
        for image, k in zip((xb * 255).round().to(torch.uint8), yb, strict=True):
            matches = [i for i, w in enumerate(_windows(x[k], 2)) if torch.equal(w, image)]
            assert matches, "an augmented image is no window of the padded original"
            crops.add(matches[0] // 2)
            flips += matches[0] % 2
    assert len(crops) > 10 and 0 < flips < 37  # offsets and flips both vary


def test_flips_are_exact_mirrors():
    x, y = _data(n=64)
    mirrored = 0
    for xb, yb in DeviceLoader(x, y, 64, flip=True, seed=1):
        for image, k in zip((xb * 255).round().to(torch.uint8), yb, strict=True):
            assert torch.equal(image, x[k]) or torch.equal(image, x[k].flip(-1))
            mirrored += not torch.equal(image, x[k])
    assert 16 < mirrored < 48


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 4), c=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7),
    padding=st.integers(0, 3), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_crop_flip_matches_a_per_image_reference(b, c, h, w, padding, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=g)
    flips = torch.rand(b, generator=g) < 0.5
    out = crop_flip(x, offsets, flips, padding)
    for k in range(b):
        padded = torch.nn.functional.pad(x[k], (padding,) * 4)
        i, j = offsets[k].tolist()
        window = padded[:, i : i + h, j : j + w]
        assert torch.equal(out[k], window.flip(-1) if flips[k] else window)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(p, q) and torch.equal(r, s) for (p, r), (q, s) in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_batches_and_epochs_differ(device):
    x, y = _data()

    def make(seed: int) -> DeviceLoader:
        return DeviceLoader(x, y, 8, crop_padding=2, flip=True, seed=seed, device=device)

    a, b = make(5), make(5)
    first = _epoch(a)
    assert first[0][0].device.type == device and first[0][1].device.type == device
    assert _same(first, _epoch(b)) and _same(_epoch(a), _epoch(b))
    assert not _same(first, _epoch(a))  # a new permutation each epoch
    assert not _same(first, _epoch(make(6)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stop", [0, 3, 5])  # before any batch, mid-epoch, at the epoch's end
def test_resume_continues_with_identical_batches(stop, device):
    x, y = _data()

    def make() -> DeviceLoader:
        return DeviceLoader(x, y, 8, crop_padding=2, flip=True, seed=7, device=device)

    reference = make()
    epochs = [_epoch(reference) for _ in range(4)]
    interrupted = make()
    _epoch(interrupted)
    batches = iter(interrupted)  # epoch 2, interrupted after `stop` batches
    for _ in range(stop):
        next(batches)
    state = interrupted.state_dict()
    # Through a checkpoint: the generator state via torch.save, the rest via JSON.
    buffer = io.BytesIO()
    torch.save(state["generator"], buffer)
    plain = json.loads(json.dumps({k: v for k, v in state.items() if k != "generator"}))
    resumed = make()
    resumed.load_state_dict(plain | {"generator": torch.load(io.BytesIO(buffer.getvalue()))})
    if stop < len(resumed):
        assert _same(_epoch(resumed), epochs[1][stop:])
        assert _same(_epoch(resumed), epochs[2])
    else:  # the interrupted epoch had ended: go on with the next one
        assert _same(_epoch(resumed), epochs[2])
        assert _same(_epoch(resumed), epochs[3])


def test_resume_rejects_other_data():
    x, y = _data()
    state = DeviceLoader(x, y, 8).state_dict()
    with pytest.raises(ValueError, match="same data and batch size"):
        DeviceLoader(x, y, 4).load_state_dict(state)


def test_loader_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(torch.rand(4, 1, 2, 2), torch.arange(4), 2)
