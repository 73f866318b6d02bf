"""The synthetic data set: the shape of the set it is `like`, deterministic bytes, no file, and
learnable (a tiny model beats chance within a few steps, through the trainer too)."""

import json

import numpy as np
import pytest
import torch

import d2r
from d2r import data
from d2r.cli import main
from d2r.data import synthetic
from d2r.data.sources import INFO


@pytest.mark.parametrize("like", sorted(INFO))
def test_info_takes_the_shape_classes_and_augmentation_of_the_like_set(like):
    spec, real = data.info("synthetic", like), data.info(like)
    assert spec.name == "synthetic" and spec.files == ()
    shape = (spec.num_classes, spec.channels, spec.size, spec.crop_padding, spec.flip)
    assert shape == (real.num_classes, real.channels, real.size, real.crop_padding, real.flip)
    x, y = synthetic.generate(like, "test", n=5)
    assert x.dtype == np.uint8 and x.shape == (5, real.channels, real.size, real.size)
    assert y.dtype == np.int64 and y.min() >= 0 and y.max() < real.num_classes


def test_default_like_is_cifar10_and_bad_likes_are_one_line_errors():
    assert data.info("synthetic") == data.info("synthetic", "cifar10")
    with pytest.raises(ValueError, match=r"data\.like='imagenet' unknown; choose one of cifar10"):
        data.info("synthetic", "imagenet")
    with pytest.raises(ValueError, match=r"only for data\.name=synthetic"):
        data.info("cifar10", "mnist")
    with pytest.raises(ValueError, match=r"n=301 invalid; use 0\.\.300"):  # digits' test: 300
        synthetic.generate("digits", "test", n=301)


def test_the_same_arguments_give_the_same_bytes_and_prefixes_do_not_depend_on_n():
    x, y = synthetic.generate("mnist", "train", n=1500)  # crosses a 1024-image chunk
    x2, y2 = synthetic.generate("mnist", "train", n=1100)
    assert np.array_equal(x[:1100], x2) and np.array_equal(y[:1100], y2)
    x3, _ = synthetic.generate("mnist", "train", n=1500)
    assert np.array_equal(x, x3)
    other, _ = synthetic.generate("mnist", "train", n=1500, seed=1)
    test, _ = synthetic.generate("mnist", "test", n=1500)
    assert not np.array_equal(x, other) and not np.array_equal(x, test)
    assert x.max() <= 254  # template [64, 191] + noise [-64, 63]: never clipped at 255
    assert len(np.unique(y)) == 10


def test_templates_are_shared_by_the_splits_and_images_are_template_plus_bounded_noise():
    bank = synthetic.templates("cifar10").astype(int)  # (10, 3, 32, 32)
    assert bank.shape == (10, 3, 32, 32) and bank.min() >= 64 and bank.max() <= 191
    for split in ("train", "test"):
        x, y = synthetic.generate("cifar10", split, n=200)
        noise = x.astype(int) - bank[y]
        assert noise.min() >= -64 and noise.max() <= 63
        assert abs(noise.mean() + 0.5) < 0.5  # uniform on [-64, 63]: mean -0.5


def test_load_needs_no_file_and_returns_the_whole_split(tmp_path):
    x, y = data.load("synthetic", tmp_path / "nothing-here", "test", like="digits")
    assert x.shape == (300, 1, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.int64
    want, labels = synthetic.generate("digits", "test")
    assert np.array_equal(x.numpy(), want) and np.array_equal(y.numpy(), labels)
    assert not (tmp_path / "nothing-here").exists()  # nothing cached, nothing written
    assert data.require("synthetic", tmp_path, "train") == []


@pytest.mark.parametrize("like", ["cifar10", "mnist", "digits"])
def test_a_linear_model_beats_chance_within_a_few_steps(like):
    """20 full-batch SGD steps of a linear classifier on 512 images; accuracy on 300 held-out
    images: chance is 10 %."""
    x, y = (torch.from_numpy(a) for a in synthetic.generate(like, "train", n=512))
    xt, yt = (torch.from_numpy(a) for a in synthetic.generate(like, "test", n=300))
    torch.manual_seed(0)
    model = torch.nn.Linear(x[0].numel(), 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    flat = x.flatten(1).float() / 255 - 0.5
    before = (model(xt.flatten(1).float() / 255 - 0.5).argmax(1) == yt).float().mean()
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(flat), y).backward()
        optimizer.step()
    after = (model(xt.flatten(1).float() / 255 - 0.5).argmax(1) == yt).float().mean()
    assert after > 0.5 and after > before + 0.3, (before, after)


def test_the_trainer_learns_on_it_and_eval_rebuilds_the_like_shape(tmp_path):
    """One epoch (12 steps) of D2R-CAG through d2r.train on synthetic digits-shaped images, then
    `d2r eval` of the run, which must rebuild the 1x8x8 model from data.like (the default like,
    cifar10, would give a 3x32x32 model that cannot load the weights)."""
    sets = {
        "data.name": "synthetic",
        "data.like": "digits",
        "data.test_subset": 200,
        "method.steps": 2,
        "train.epochs": 1,
        "train.warmup_factor": 1.0,  # the full lr 0.1 from the first step
        "eval.attack": "pgd2",
        "train.checkpoint_minutes": 0,
    }
    run = d2r.train(out=tmp_path / "run", overrides=sets, quiet=True)
    assert run.final["clean_acc"] > 0.3, run.final  # chance: 0.1 (measured: 0.475)
    assert run.method.target(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert main(["eval", str(tmp_path / "run"), "--attacks", "pgd5", "--n", "50", "-q"]) == 0
    results = json.loads((tmp_path / "run" / "eval.json").read_text())["results"]
    assert {r["key"]["images"]["data"] for r in results} == {"synthetic"}
