"""The recipe of the strongest published models (issue 13): a validation split that picks
`best` and keeps the test split for `d2r eval`; the EMA of the target's weights (checked,
checkpointed, resumed, evaluated and exported); generated data mixed into every batch from a
memory-mapped .npz; SiLU WRNs, the cosine schedule and label smoothing."""

import itertools
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from d2r import data, losses, runs, trainer
from d2r.checkpoint import load
from d2r.cli import main
from d2r.config import resolve
from d2r.data import DeviceLoader, load_splits, open_extra, validation_split
from d2r.ema import EMA
from d2r.evalstore import Store, rows
from d2r.evaluate import correct_flags
from d2r.export import load_model
from d2r.logs import read_metrics
from d2r.methods import METHODS
from d2r.models import create
from d2r.report import read_run
from d2r.runs import check_config, load_run
from d2r.trainer import cosine_factor

DIGITS = data.info("digits")


def write_npz(path, n=40, *, save=np.savez, **arrays):
    """A generated-data file for digits: image i is filled with 100 + 10 * label (label
    i % 10), so a test can tell generated images and their labels apart from real ones."""
    labels = np.arange(n) % 10
    images = np.broadcast_to((100 + 10 * labels)[:, None, None, None], (n, 8, 8, 1))
    contents = {"image": images.astype(np.uint8), "label": labels, **arrays}
    save(path, **{k: v for k, v in contents.items() if v is not None})
    return path


def sets(*items):
    return [a for item in items for a in ("--set", item)]


# A validation split ----------------------------------------------------------------------------


def test_validation_split_is_stratified_disjoint_and_seeded():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    train, val = validation_split(y, 10, seed=None)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))  # disjoint, complete
    assert torch.equal(val, val.sort().values) and torch.equal(train, train.sort().values)
    assert torch.bincount(y[val]).tolist() == [5, 3, 2]  # each class its share
    assert torch.equal(val, validation_split(y, 10, seed=0)[1])  # None is seed 0
    assert not torch.equal(val, validation_split(y, 10, seed=1)[1])
    _, odd = validation_split(y, 7, seed=3)  # 3.5 / 2.1 / 1.4: largest remainders round up
    assert torch.bincount(y[odd]).tolist() == [4, 2, 1]
    with pytest.raises(ValueError, match=r"data.val_size=100.*hold out 1..99"):
        validation_split(y, 100)


def test_load_splits_holds_out_validation_and_never_reads_the_test_split(monkeypatch):
    reads = []
    real_load = data.loading.load
    monkeypatch.setattr(
        data.loading,
        "load",
        lambda n, r, split, **kw: reads.append(split) or real_load(n, r, split, **kw),
    )
    d = resolve(overrides=["data.val_size=200", "data.train_subset=1000"]).data
    splits = load_splits(d, val_subset=150)
    assert reads == ["train"] and splits.val_split == "val"
    x_all, y_all = real_load("digits", "data", "train")
    train, val = validation_split(y_all, 200)
    assert torch.equal(splits.x_val, x_all[val][:150]) and len(splits.x) == 1000
    assert torch.equal(splits.x, x_all[train][:1000])  # the training images exclude val
    d.val_size = None  # no validation split: the check reads the test split, as before
    assert load_splits(d).val_split == "test" and reads[-1] == "test"
    d.val_size, d.train_subset = 200, 1400
    with pytest.raises(ValueError, match=r"data.train_subset=1400: 1297 training images are left"):
        load_splits(d)


def test_a_run_of_an_older_d2r_resumes_without_a_validation_split(tmp_path):
    """Its config.yaml records no data.val_size: it trained on the whole training split, so it
    resumes so (today's default would hold images out and refuse the loader's state)."""
    out = tmp_path / "run"
    tiny = sets("train.epochs=1", "data.train_subset=64", "method.steps=1", "eval.subset=20")
    assert main(["train", "-q", "--out", str(out), *tiny, *sets("data.val_size=null")]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["data"]["val_size"]  # as an older d2r wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    assert main(["train", "--resume", str(out), "-q", *sets("train.epochs=2")]) == 0
    assert [r["check_split"] for r in read_metrics(out, "epoch")] == ["test", "test"]


# One tiny run with EMA, validation and the cosine schedule, shared ------------------------------

EMA_RUN = [
    "train.epochs=3",
    "data.train_subset=128",
    "data.batch_size=64",
    "data.val_size=100",
    "method.steps=2",
    "eval.attack=pgd3",
    "train.ema_decay=0.5",
    "train.schedule=cosine",
    "train.warmup_epochs=1",
    "train.channels_last=off",  # the layout evaluation uses: the same numbers, bit for bit
]


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ema"
    reads = []
    real_load = data.loading.load
    with pytest.MonkeyPatch.context() as patch:  # record which splits training reads
        patch.setattr(
            data.loading,
            "load",
            lambda n, r, split, **kw: reads.append(split) or real_load(n, r, split, **kw),
        )
        assert main(["train", "-q", "--out", str(out), *sets(*EMA_RUN)]) == 0
    return out, reads


def test_the_check_reads_validation_images_only_and_best_follows_it(ema_run):
    run, reads = ema_run
    assert "test" not in reads  # only `d2r eval` reads the test split
    epochs = read_metrics(run, "epoch")
    assert all(r["check_split"] == "val" and r["check_n"] == 100 for r in epochs)
    best = max(epochs, key=lambda r: r["robust_acc"])  # the first of equal maxima
    assert json.loads((run / "best.json").read_text())["epoch"] == best["epoch"]
    assert load(run / "best.safetensors")[1]["record"]["robust_acc"] == best["robust_acc"]


def test_the_check_measures_the_ema_weights(ema_run):
    run, _ = ema_run
    last = read_metrics(run, "epoch")[-1]
    assert last["check_model"] == "ema"
    _, meta = load(run / "last.safetensors")
    assert meta["ema"] == {"of": "target", "decay": 0.5, "updates": 6}  # every step
    x, y = data.load("digits", "data", "train")
    _, val = validation_split(y, 100)
    _, method = load_run(run, "ema")
    with torch.no_grad():
        flags = correct_flags(method.target, x[val], y[val], batch_size=500)  # as the check
    assert flags.float().mean().item() == last["clean_acc"]
    _, raw = load_run(run, "last")  # the trained weights themselves differ from their EMA
    assert any(
        not torch.equal(a, b)
        for a, b in zip(raw.target.parameters(), method.target.parameters(), strict=True)
    )


def test_the_cosine_schedule_sets_every_step(ema_run):
    run, _ = ema_run
    for record in read_metrics(run, "epoch"):  # the lr of each epoch's last step
        expected = 0.1 * cosine_factor(record["step"] - 1, 6, 2)
        assert record["lr"] == pytest.approx(expected)


def test_eval_and_export_of_the_ema(ema_run, tmp_path):
    run, _ = ema_run
    args = ["eval", str(run), "--attacks", "pgd3", "--eps", "0.1", "--n", "30", "--no-checks"]
    assert main([*args, "-q", "--out", str(tmp_path)]) == 0
    store = Store.read(tmp_path)
    weights = {c["checkpoint"]: c["weights"] for c in store.checkpoints}
    # ema beside last and best; best holds the EMA weights its check picked
    assert weights == {"last": "target", "best": "ema", "ema": "ema"}
    found = {r["checkpoint"]: r for r in rows(store)}
    assert {k: v["weights"] for k, v in found.items()} == weights
    assert found["ema"]["sha256"] == found["last"]["sha256"]  # one file, two results
    keys = {e["id"]: e["key"].get("weights") for e in store.results}
    assert sorted(map(str, keys.values())).count("ema") == 2 * 2  # clean + pgd3, best and ema
    assert "| ema (epoch 3) |" in (tmp_path / "eval.md").read_text()
    out = tmp_path / "ema.safetensors"
    assert main(["export", str(run), "--out", str(out), "--checkpoint", "ema"]) == 0
    tensors, _ = load(run / "last.safetensors")
    model = load_model(out)
    assert model.d2r_card["training"]["weights"] == "ema"
    for key, value in model.state_dict().items():
        assert torch.equal(value, tensors[f"ema.{key}"])
    # the same checkpoint again replaces its export; last's export is not ema's, though both
    # come from last.safetensors
    assert main(["export", str(run), "--out", str(out), "--checkpoint", "ema"]) == 0
    assert main(["export", str(run), "--out", str(out), "--checkpoint", "last"]) == 2
    assert load_model(out).d2r_card["training"]["weights"] == "ema"  # kept


def test_the_report_reads_the_ema_results_of_the_current_file(ema_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ema_run[0], run)
    before = read_run(run, "ema")  # no eval.json yet: the last per-epoch check, of the EMA
    assert before.source == "per-epoch check" and before.detail.endswith("EMA weights")
    args = ["eval", str(run), "--checkpoint", "ema", "--attacks", "pgd3", "--eps", "0.1"]
    assert main([*args, "--n", "30", "--no-checks", "-q"]) == 0
    after = read_run(run, "ema", 0.1)
    assert after.source == "eval.json" and after.detail.startswith("ema, n=30")
    assert read_run(run, "last", 0.1).source == "per-epoch check"  # ema's results are not last's


def test_ema_of_a_run_without_one_is_refused(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "-q", "--out", str(out), *sets(*EMA_RUN[:6], "train.epochs=1")]) == 0
    with pytest.raises(ValueError, match=r"holds no EMA weights.*train.ema_decay=0"):
        load_run(out, "ema")


# EMA -------------------------------------------------------------------------------------------


def test_ema_equals_a_hand_written_ema():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    ema = EMA(model, decay=0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for t in range(12):  # d_t = (1 + t) / (10 + t) up to t = 8, then 0.5
        optimizer.zero_grad()
        model(torch.randn(16, 4)).square().mean().backward()
        optimizer.step()
        ema.update()
        d = min(0.5, (1 + t) / (10 + t))
        for name, param in model.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * param.detach()
        for name, buffer in model.named_buffers():  # BatchNorm statistics: copied
            expected[name] = buffer.clone()
    assert ema.updates == 12
    for name, value in ema.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-7)
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied():  # the model holds the EMA inside, its own weights after, exactly
        assert all(torch.equal(v, ema.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="EMA decay must be in"):
        EMA(model, 1.0)


def test_resume_with_ema_generated_data_and_cosine_is_bit_identical(tmp_path, monkeypatch):
    """A run stopped by SIGTERM mid-epoch and resumed ends with the target, guide and EMA
    weights of an uninterrupted run, bit for bit (the generated data's draws included)."""
    gen = write_npz(tmp_path / "gen.npz", n=60)
    config = sets(
        *EMA_RUN[1:],
        "train.epochs=2",
        "data.train_subset=96",
        "data.batch_size=32",
        f"data.extra={gen}",
        "data.extra_fraction=0.5",
        "method.label_smoothing=0.1",
    )  # 3 steps an epoch, 6 in all
    assert main(["train", "-q", "--out", str(tmp_path / "ref"), *config]) == 0
    calls, step = itertools.count(1), trainer.train_step

    def signalled_step(*args):  # a real SIGTERM during step 4; the run stops after step 5
        out = step(*args)
        if next(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(trainer, "train_step", signalled_step)
    assert main(["train", "-q", "--out", str(tmp_path / "run"), *config]) == 143
    monkeypatch.undo()
    assert load(tmp_path / "run" / "last.safetensors")[1]["step"] == 5  # mid-epoch
    assert main(["train", "--resume", str(tmp_path / "run"), "-q"]) == 0
    got, meta = load(tmp_path / "run" / "last.safetensors")
    want, meta_ref = load(tmp_path / "ref" / "last.safetensors")
    weights = [k for k in want if k.startswith(("target.", "guide.", "ema."))]
    assert any(k.startswith("ema.") for k in weights)
    assert all(torch.equal(got[k], want[k]) for k in weights), "resumed weights differ"
    assert meta["ema"] == meta_ref["ema"]


# Generated data ---------------------------------------------------------------------------------


def _extra_loader(tmp_path, fraction=0.25, **kwargs):
    extra = open_extra(write_npz(tmp_path / "g.npz", n=40), fraction, DIGITS, 16)
    x, y = torch.zeros(50, 1, 8, 8, dtype=torch.uint8), torch.zeros(50, dtype=torch.int64)
    return DeviceLoader(x, y, 16, extra=extra, extra_fraction=fraction, **kwargs)


def test_generated_images_fill_the_asked_share_of_every_batch(tmp_path):
    loader = _extra_loader(tmp_path)
    batches = list(loader)
    assert len(batches) == len(loader) == 4  # the real set's 50 images in batches of 16
    for x, y in batches:
        generated = x.flatten(1).amax(1) > 0  # real images are black
        assert len(x) == 16 and generated.sum() == 4  # floor(16 * 0.25)
        pixel = (x[generated, 0, 0, 0] * 255).round().long()
        assert torch.equal(pixel, 100 + 10 * y[generated])  # labels travel with their images
    ranks = [list(_extra_loader(tmp_path, rank=r, world_size=2)) for r in (0, 1)]
    for (x, _), (x0, _), (x1, _) in zip(batches, *ranks, strict=True):  # each rank its slice
        assert torch.equal(x, torch.cat([x0[:6], x1[:6], x0[6:], x1[6:]]))


def test_loader_with_generated_data_resumes_at_the_next_batch(tmp_path):
    loader = _extra_loader(tmp_path, crop_padding=2, flip=True, seed=3)
    first = [b for _, b in zip(range(6), itertools.chain(loader, loader), strict=False)]
    again = _extra_loader(tmp_path, crop_padding=2, flip=True, seed=3)
    it = iter(again)
    next(it), next(it)
    state = again.state_dict()
    resumed = _extra_loader(tmp_path, crop_padding=2, flip=True, seed=3)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(itertools.chain(resumed, resumed), 4))
    for (x, y), (x2, y2) in zip(first[2:], rest, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="generated images"):
        DeviceLoader(
            torch.zeros(50, 1, 8, 8, dtype=torch.uint8), torch.zeros(50), 16
        ).load_state_dict(state)


BAD_FILES = {
    "compressed": ({"save": np.savez_compressed}, "compressed.*re-save it with np.savez"),
    "no label": ({"label": None}, "has no 'label' array.*expected image"),
    "pickled": ({"label": np.array([1, "a"] * 20, dtype=object)}, "Python objects"),
    "float images": ({"image": np.zeros((40, 8, 8, 1), np.float32)}, "image is float32"),
    "size": ({"image": np.zeros((40, 28, 28, 1), np.uint8)}, r"expected uint8 \(N, 8, 8, 1\)"),
    "channels": ({"image": np.zeros((40, 8, 8, 3), np.uint8)}, r"\(40, 8, 8, 3\)"),
    "no images": ({"image": np.zeros((0, 8, 8, 1), np.uint8)}, "holds no images"),
    "labels": ({"label": np.arange(30)}, r"label is int64 \(30,\), expected \(40,\)"),
    "float labels": ({"label": np.zeros(40)}, "label is float64"),
    "range": ({"label": np.arange(40) % 11}, "labels span 0..10, digits has classes 0..9"),
    "classes": ({"label": np.arange(40) % 5}, "labels cover 5 of digits's 10 classes"),
    "fortran": ({"image": np.asfortranarray(np.zeros((40, 8, 8, 1), np.uint8))}, "Fortran"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_every_bad_npz_is_refused(tmp_path, case):
    arrays, message = BAD_FILES[case]
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        open_extra(path, 0.5, DIGITS, 16)


def test_bad_extra_settings_are_refused(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros(3))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.npz")
    with pytest.raises(ValueError, match=r"not an .npz \(zip\) file"):
        open_extra(tmp_path / "plain.npz", 0.5, DIGITS, 16)
    with pytest.raises(FileNotFoundError, match="not found"):
        open_extra(tmp_path / "missing.npz", 0.5, DIGITS, 16)
    with pytest.raises(FileNotFoundError, match="not found"):  # the file first, not the share
        open_extra(tmp_path / "missing.npz", 0.0, DIGITS, 16)
    with pytest.raises(ValueError, match=r"data.extra_fraction=0.5 but no data.extra"):
        open_extra(None, 0.5, DIGITS, 16)
    with pytest.raises(ValueError, match="is no image"):
        open_extra(write_npz(tmp_path / "g.npz"), 0.05, DIGITS, 16)


def test_cli_refuses_a_bad_npz_in_one_line_with_nothing_written(tmp_path, capsys):
    bad = write_npz(tmp_path / "bad.npz", label=np.arange(40) % 11)
    out = tmp_path / "run"
    args = ["train", "-q", "--out", str(out), *sets(f"data.extra={bad}", "data.extra_fraction=0.7")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("d2r: error: data.extra") and "0..10" in err
    assert not out.exists()


# SiLU, the cosine schedule, label smoothing, ranges ----------------------------------------------


def test_wrn_activation_silu_keeps_the_keys_and_changes_the_function():
    torch.manual_seed(0)
    relu = create("wrn", depth=10, widen_factor=1, in_channels=1)
    silu = create("wrn", depth=10, widen_factor=1, in_channels=1, activation="silu")
    silu.load_state_dict(relu.state_dict())  # the same keys: checkpoints of either load
    x = torch.rand(2, 1, 8, 8)
    relu.eval(), silu.eval()
    assert silu.act is F.silu and silu.block1.layer[0].act is F.silu
    assert not torch.allclose(relu(x), silu(x))
    cfg = resolve(overrides=["target.name=wrn", "target.activation=gelu"])
    with pytest.raises(ValueError, match=r"'target.activation': choose one of relu, silu"):
        check_config(cfg)


def test_cosine_factor_and_the_schedule_options():
    assert cosine_factor(0, 100, 10) == pytest.approx(0.1)  # linear warm-up, per step
    assert cosine_factor(9, 100, 10) == cosine_factor(10, 100, 10) == 1.0
    assert cosine_factor(55, 100, 10) == pytest.approx(0.5)
    assert cosine_factor(100, 100, 0) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="warmup_epochs is the cosine schedule's"):
        runs.check_schedule(resolve(overrides=["train.warmup_epochs=1"]).train)
    with pytest.raises(ValueError, match="leaves no epoch"):
        runs.check_schedule(
            resolve(overrides=["train.schedule=cosine", "train.warmup_epochs=15"]).train
        )


@pytest.mark.parametrize(
    "key", ["train.ema_decay=1", "data.extra_fraction=1.0", "train.schedule=linear"]
)
def test_recipe_keys_are_range_checked(key):
    with pytest.raises(ValueError, match=key.split("=")[0]):
        resolve(overrides=[key])


def test_label_smoothing_range():
    cfg = resolve(overrides=["method.label_smoothing=1"])
    with pytest.raises(ValueError, match=r"'method.label_smoothing': must be >= 0 and < 1"):
        check_config(cfg)


LOSSES = {  # (loss, the argument holding the logits of its CE term, the CE term's weight)
    "trades": (losses.trades_loss, 1, 1.0),  # (logits_adv, logits_clean, y): CE on the clean
    "mart": (losses.mart_loss, 0, 1.0),  # its boosted CE is on the adversarial logits
    "lbgat": (losses.lbgat_loss, 2, 1.0),
    "d2r": (lambda *z, **kw: losses.d2r_loss(*z, lam=0.5, **kw), 2, 0.5),
}


@pytest.mark.parametrize("name", LOSSES)
def test_label_smoothing_changes_the_ce_term_only(name):
    fn, ce_index, weight = LOSSES[name]
    torch.manual_seed(0)
    logits = [torch.randn(8, 10) for _ in range(3 if name in ("lbgat", "d2r") else 2)]
    y = torch.randint(0, 10, (8,))
    plain, smooth = fn(*logits, y), fn(*logits, y, label_smoothing=0.1)
    z = logits[ce_index]
    change = F.cross_entropy(z, y, label_smoothing=0.1) - F.cross_entropy(z, y)
    assert change.abs() > 1e-3
    assert smooth["loss"] - plain["loss"] == pytest.approx(weight * change.item(), abs=1e-5)


# LAS-AT (its strategy network reads the target's channels: no MLP): test_las_at
@pytest.mark.parametrize("name", [n for n in METHODS.names() if n != "las_at"])
def test_every_method_passes_label_smoothing_to_its_ce_term(name):
    """The same models and batch with and without smoothing: the loss moves by exactly the
    change of its (weighted) CE term, which each method reports."""
    outs = []
    for smoothing in (0.0, 0.1):
        torch.manual_seed(0)
        models = [create("mlp", hidden=16) for _ in range(1 + METHODS.get(name).uses_guide)]
        method = METHODS.create(name, *models, steps=1, label_smoothing=smoothing)
        x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
        outs.append(method(x, y))
    term = "bce" if name == "mart" else "ce"
    # every method's default weight of its CE term (D2R's lam = 1), RAT's 1 - alpha = 0.8
    weight = 0.8 if name == "rat_trades" else 1.0
    change = outs[1][term] - outs[0][term]
    assert change.abs() > 1e-4
    moved = (outs[1]["loss"] - outs[0]["loss"]).item()
    assert moved == pytest.approx(weight * change.item(), abs=1e-5)
