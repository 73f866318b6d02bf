"""Data sets from your own files (d2r.data.own): `data.name=folder` (train/<class>/*.png and
test/<class>/...) and `data.name=npz` (train.npz and test.npz) train, evaluate on exactly their
test images and export with their class names; every bad input is one line before any work."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import d2r
from d2r import data
from d2r.cli import main
from d2r.config import EARLIER_DEFAULTS, resolve
from d2r.evalstore import images_id
from d2r.weights import read_card

# 8x8 images, class c: channel c saturated, so a small CNN separates them
ONE_EPOCH = [
    "train.epochs=1",
    "data.batch_size=16",
    "data.val_size=8",
    "method.steps=2",
    "eval.attack=pgd10",
]


def write_folder(root, sizes=None, classes=("cat", "dog"), n=(16, 5), suffix=".png"):
    """train/<class>/ and test/<class>/ of 8x8 RGB images (`sizes`: {(split, class, i): (w, h)})."""
    rng = np.random.RandomState(0)
    for split, count in zip(("train", "test"), n, strict=True):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = (sizes or {}).get((split, name, i), (8, 8))
                pixels = rng.randint(0, 128, (h, w, 3)).astype(np.uint8)
                pixels[..., c % 3] = 255
                Image.fromarray(pixels).save(folder / f"{i}{suffix}")
    return root


def write_npz_pair(root, n=(32, 10), classes=2, channels=1, **test):
    root.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "test"), n, strict=True):
        label = np.arange(count) % classes
        image = np.broadcast_to((60 + 120 * label)[:, None, None, None], (count, 8, 8, channels))
        arrays = {"image": image.astype(np.uint8), "label": label}
        arrays.update(test if split == "test" else {})
        save = arrays.pop("save", np.savez)
        save(root / f"{split}.npz", **{k: v for k, v in arrays.items() if v is not None})
    return root


def sets(*items):
    return [a for item in items for a in ("--set", item)]


def train_and_eval(tmp_path, *items):
    out = tmp_path / "run"
    assert main(["train", "-q", "--out", str(out), *sets(*ONE_EPOCH, *items)]) == 0
    args = ["eval", str(out), "--attacks", "pgd10", "--eps", "0.1", "--no-checks", "-q"]
    assert main([*args, "--checkpoint", "last"]) == 0
    return out


def _evaluated_images(out):
    store = json.loads((out / "eval.json").read_text())
    return {json.dumps(r["key"]["images"], sort_keys=True) for r in store["results"]}


def test_a_folder_of_pngs_trains_and_evaluates_on_exactly_its_test_images(tmp_path):
    root = write_folder(tmp_path / "pets")
    out = train_and_eval(tmp_path, "data.name=folder", f"data.root={root}")
    cfg = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert cfg["classes"] == ["cat", "dog"] and cfg["crop_padding"] is None
    x, y = data.load("folder", root, "test")
    assert x.shape == (10, 3, 8, 8) and y.tolist() == [0] * 5 + [1] * 5
    assert _evaluated_images(out) == {json.dumps(images_id("folder", x, y), sort_keys=True)}
    model = tmp_path / "pets.safetensors"
    assert main(["export", str(out), "--out", str(model), "-q"]) == 0
    assert read_card(model)["data"]["classes"] == ["cat", "dog"]
    args = ["eval", "--weights", str(model), "--data", "folder", "--root", str(root)]
    assert main([*args, "--attacks", "pgd10", "--eps", "0.1", "--no-checks", "-q"]) == 0


def test_a_pair_of_npz_files_trains_and_evaluates_on_exactly_its_test_images(tmp_path):
    root = write_npz_pair(tmp_path / "arrays")
    out = train_and_eval(tmp_path, "data.name=npz", f"data.root={root}", "data.flip=true")
    cfg = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert cfg["classes"] == ["0", "1"] and cfg["flip"] is True
    x, y = data.load("npz", root, "test")
    assert x.shape == (10, 1, 8, 8) and y.tolist() == [0, 1] * 5
    assert _evaluated_images(out) == {json.dumps(images_id("npz", x, y), sort_keys=True)}
    # moved off the machine that has the files: the run still rebuilds and exports from what
    # env.json recorded of them (shape, classes); evaluating needs them and says so
    before = d2r.load_model(out)(x[:4].float() / 255)
    shutil.move(root, tmp_path / "elsewhere")
    assert json.loads((out / "env.json").read_text())["data"]["channels"] == 1
    after = d2r.load_model(out)(x[:4].float() / 255)
    assert torch.equal(before, after)
    model = tmp_path / "arrays.safetensors"
    assert main(["export", str(out), "--out", str(model), "-q"]) == 0
    assert read_card(model)["data"]["input_size"] == [1, 8, 8]
    assert main(["eval", str(out), "--attacks", "pgd10", "--no-checks", "-q"]) == 2


def test_folder_resizes_converts_and_caches_by_the_files_contents(tmp_path):
    sizes = {("train", "cat", 0): (12, 10), ("test", "dog", 1): (5, 5)}
    root = write_folder(tmp_path / "mixed", sizes=sizes, suffix=".jpg")
    spec = data.info("folder", root=root, image_size=6, channels=1)
    assert (spec.num_classes, spec.channels, spec.size, spec.classes) == (2, 1, 6, ("cat", "dog"))
    x, _ = data.load("folder", root, "train", image_size=6, channels=1)
    assert x.shape == (32, 1, 6, 6) and x.dtype == data.load("digits", root, "test")[0].dtype
    cache = sorted((root / data.CACHE_DIR).glob("folder-train-*"))
    assert len(cache) == 1
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "cat" / "0.jpg")
    x2, _ = data.load("folder", root, "train", image_size=6, channels=1)
    assert not np.array_equal(x2[0].numpy(), x[0].numpy())  # a changed file: converted again
    assert len(list((root / data.CACHE_DIR).glob("folder-train-*"))) == 1  # the stale one gone
    assert data.own.fingerprint("folder", root, "train", spec) != cache[0].name


def test_augmentation_keys_keep_the_built_in_sets_own():
    for name, expected in (("digits", (1, False)), ("cifar10", (4, True))):
        d = resolve(overrides=[f"data.name={name}"]).data
        assert data.augmentation(d, data.info(name)) == expected
    d = resolve(overrides=["data.crop_padding=2", "data.flip=true"]).data
    assert data.augmentation(d, data.info("digits")) == (2, True)
    d = resolve(overrides=["data.crop_padding=2", "data.augment=false"]).data
    assert data.augmentation(d, data.info("digits")) == (0, False)
    for key in ("crop_padding", "flip", "image_size", "channels", "classes"):
        assert f"data.{key}" in EARLIER_DEFAULTS and EARLIER_DEFAULTS[f"data.{key}"] is None
    with pytest.raises(ValueError, match=r"data\.image_size is only for data\.name=folder"):
        data.info("cifar10", image_size=32)


def _unequal(root):
    return write_folder(root, sizes={("train", "dog", 3): (10, 10)})


def _no_images(root):
    write_folder(root)
    for image in (root / "train" / "dog").iterdir():
        image.unlink()
    return root


def _absent_class(root):
    write_folder(root)
    (root / "test" / "bird").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "bird" / "0.png")
    return root


def _not_an_image(root):
    write_folder(root)
    (root / "test" / "cat" / "9.png").write_bytes(b"not a png")
    return root


BAD = {
    "no folder": ("folder", lambda r: r, "is not a directory"),
    "no test": ("folder", lambda r: write_folder(r) and _rm(r / "test"), "has no test/ folder"),
    "no images": ("folder", _no_images, r"train/dog holds no .png/.jpg/.jpeg image"),
    "unequal": ("folder", _unequal, "images of unequal size.*data.image_size=N"),
    "not square": (
        "folder",
        lambda r: write_folder(r, sizes={("train", "cat", 0): (8, 6)}),
        "not square",
    ),
    "absent class": ("folder", _absent_class, r"\['bird'\] have no folder in train/"),
    "one class": ("folder", lambda r: write_folder(r, classes=("cat",)), "at least two"),
    "bad image": ("folder", _not_an_image, "9.png is not a readable image"),
    "npz missing": ("npz", lambda r: r.mkdir() or r, "train.npz not found"),
    "npz compressed": (
        "npz",
        lambda r: write_npz_pair(r, save=np.savez_compressed),
        "test.npz: 'image' is compressed",
    ),
    "npz one class": ("npz", lambda r: write_npz_pair(r, classes=1), "at least two"),
    "npz test class": (
        "npz",
        lambda r: write_npz_pair(r, label=np.arange(10) % 3),
        "test.npz: labels span 0..2",
    ),
    "npz shape": (
        "npz",
        lambda r: write_npz_pair(r, image=np.zeros((10, 6, 6, 1), np.uint8)),
        r"test.npz: image is uint8 \(10, 6, 6, 1\), expected uint8 \(N, 8, 8, 1\)",
    ),
    "npz labels": ("npz", lambda r: write_npz_pair(r, label=np.zeros(3)), "test.npz: label is"),
}


def _rm(path):
    shutil.rmtree(path)
    return path.parent


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_own_data_is_refused_in_one_line_before_any_work(tmp_path, capsys, case):
    name, make, message = BAD[case]
    root = tmp_path / "own"
    make(root)
    out = tmp_path / "run"
    items = (*ONE_EPOCH, f"data.name={name}", f"data.root={root}")
    assert main(["train", "-q", "--out", str(out), *sets(*items)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("d2r: error:"), err
    assert re.search(message, err), err
    assert not out.exists()
    assert not (root / data.CACHE_DIR).exists()  # nothing converted either
