"""`d2r report`: the paper's table from run directories (eval.json or the per-epoch check),
mean +- std over seeds, Markdown/LaTeX/JSON, curves.png, metrics.csv."""

from __future__ import annotations

import csv
import inspect
import json
import shutil
import statistics
import threading

import matplotlib.image
import pytest
import torch
import yaml

from d2r import checkpoint
from d2r.cli import main
from d2r.config import dump_yaml, resolve, to_dict
from d2r.evalstore import (
    Store,
    commit,
    make_entry,
    pack_flags,
    result_key,
    summary,
    unpack_flags,
)
from d2r.files import locked
from d2r.logs import read_metrics
from d2r.methods import METHODS
from d2r.models import MODELS
from d2r.registry import resolve_spec
from d2r.report import (
    NON_RESULT_KEYS,
    REPORT_LOCK,
    column_label,
    read_run,
    report,
    write_curves,
)
from d2r.runs import DATA_SIZED, read_config, resolved_config
from tiny_runs import evaluated_run, plain_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return evaluated_run(tmp_path_factory), plain_run(tmp_path_factory)


def _eval_last(run_dir) -> dict:
    """The stored results of the last checkpoint at eps 0.1 (tiny_runs evaluates there)."""
    return summary(Store.read(run_dir), "last", 0.1)


def _by_source(report_json: dict) -> dict:
    return {g["source"]: g for g in report_json["groups"]}


def test_all_formats_hold_the_runs_numbers(runs, tmp_path):
    evaluated, plain = runs
    texts = report([evaluated, plain], tmp_path / "out")
    for suffix in ("md", "tex", "json"):
        assert (tmp_path / "out" / f"report.{suffix}").read_text() == texts[suffix]
    groups = _by_source(json.loads(texts["json"]))
    full = _eval_last(evaluated)
    for key in ("clean", "pgd20", "cw20", "worst_case"):
        assert groups["eval.json"]["metrics"][key]["mean"] == pytest.approx(full[key])
        assert f"{100 * full[key]:.2f}" in texts["md"]
    assert groups["eval.json"]["eps"] == full["settings"]["eps"]
    last = read_metrics(plain, "epoch")[-1]  # no eval.json: the per-epoch check, marked
    check = groups["per-epoch check"]
    assert check["method"] == "pgd_at" and check["eps"] == 0.1
    assert check["metrics"]["clean"]["mean"] == pytest.approx(last["clean_acc"])
    assert check["metrics"]["pgd10"]["mean"] == pytest.approx(last["robust_acc"])
    assert "per-epoch check†" in texts["md"] and r"$^\dagger$" in texts["tex"]
    for label in ("Clean", "PGD-20", "PGD-50", "C&W", "AA"):
        assert label in texts["md"]
    assert r"C\&W" in texts["tex"] and r"\toprule" in texts["tex"]


def test_a_report_writes_its_files_under_the_lock_and_leaves_none(runs, tmp_path):
    """Two reports into one directory: the second waits for the first's lock, so report.md,
    .tex and .json are all one report's; the lock file goes with the writer."""
    out = tmp_path / "out"
    out.mkdir()
    done = threading.Event()
    with locked(out / REPORT_LOCK):
        writer = threading.Thread(target=lambda: (report(list(runs), out), done.set()))
        writer.start()
        assert not done.wait(3.0) and not (out / "report.md").exists()  # it waits
    writer.join(60)
    assert done.is_set() and (out / "report.json").is_file()
    assert not (out / REPORT_LOCK).exists()


def _copy_as_seed(run_dir, dest, seed: int, shift: float):
    """A second seed of the same run: config seed changed, eval numbers shifted."""
    shutil.copytree(run_dir, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["seed"] = seed
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    store = json.loads((dest / "eval.json").read_text())
    for result in store["results"]:  # the first `shift` of the images now all correct
        flags = unpack_flags(result["correct"], result["n"]).clone()
        flags[: int(shift * len(flags))] = True
        result.update(correct=pack_flags(flags), accuracy=flags.float().mean().item())
    (dest / "eval.json").write_text(json.dumps(store))
    return dest


def test_mean_and_std_over_seeds(runs, tmp_path):
    evaluated = runs[0]
    second = _copy_as_seed(evaluated, tmp_path / "seed1", seed=1, shift=0.25)
    texts = report([evaluated, second], curves=False)
    (group,) = json.loads(texts["json"])["groups"]
    assert group["seeds"] == [0, 1]
    values = [_eval_last(evaluated)["clean"], _eval_last(second)["clean"]]
    stats = group["metrics"]["clean"]
    assert stats["mean"] == pytest.approx(statistics.fmean(values))
    assert stats["std"] == pytest.approx(statistics.stdev(values))
    cell = f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"
    assert cell in texts["md"]
    assert cell.replace("±", r"$\pm$") in texts["tex"]


def test_an_eval_json_that_is_not_a_store_is_refused_by_name(runs, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(runs[0], old)
    (old / "eval.json").write_text(json.dumps({"last": {"clean": 0.9}}))  # a pre-store snapshot
    assert main(["report", str(old), "--no-curves"]) == 2
    err = capsys.readouterr().err
    assert str(old / "eval.json") in err and "not a d2r-eval results file" in err


def test_a_run_without_any_evaluation_says_so(runs, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(runs[1], bare)
    lines = (bare / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    stripped = [{k: v for k, v in r.items() if not k.endswith("_acc")} for r in records]
    (bare / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stripped))
    texts = report([bare], curves=False)
    assert "not evaluated" in texts["md"]
    assert json.loads(texts["json"])["groups"][0]["source"] == "not evaluated"


def test_curves_png_is_written_by_training_and_is_not_blank(runs):
    evaluated = runs[0]
    png = evaluated / "curves.png"
    assert png.is_file()  # Trainer.fit draws it at the end
    write_curves(evaluated)
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # lines and text on white, not an empty canvas


def test_cli_report_writes_tables_and_csv(runs, tmp_path, capsys):
    evaluated, plain = runs
    assert main(["report", str(evaluated), str(plain), "--out", str(tmp_path), "--csv"]) == 0
    out = capsys.readouterr().out
    assert "| Data | Model | Method |" in out and "report.tex" in out
    rows = list(csv.DictReader((plain / "metrics.csv").open()))
    assert len(rows) == len(read_metrics(plain))
    assert rows[-1]["kind"] == "epoch" and float(rows[-1]["clean_acc"]) >= 0


def test_cli_report_refuses_a_directory_without_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a run directory" in err and str(tmp_path) in err


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("pgd20", "PGD-20"),
        ("cw20", "C&W"),
        ("aa", "AA"),
        ("cw30", "C&W-30"),
        ("pgd10r5", "PGD-10 x5 restarts"),
        ("aa_plus", "AA+"),
        ("fgsm", "FGSM"),
    ],
)
def test_an_attack_has_one_label_in_tables_and_plots(name, text):
    """eval.md, d2r report and curves.png all name attacks through d2r.attacks.label."""
    from d2r import attacks
    from d2r.curves import attack_label
    from d2r.evaluate.core import attacks_mod

    assert attacks.label(name) == text
    assert column_label(name) == text
    assert attack_label is attacks.label and attacks_mod.label is attacks.label


# One row per experiment (issue 19) ------------------------------------------------------------


def _fake_run(root, name: str, *sets: str, seed: int = 0, clean: float, robust: float = 0.5):
    """A run directory as `d2r train` + `d2r eval` leave it, without training: the resolved
    config.yaml of `sets`, an eval.json with these numbers (300 images) and no epoch records."""
    run = root / name
    run.mkdir(parents=True)
    cfg = resolved_config(resolve(None, [*sets, f"seed={seed}"]))
    (run / "config.yaml").write_text(dump_yaml(cfg))
    _store(run, {"clean": clean, "pgd20": robust})
    (run / "metrics.jsonl").write_text("")
    return run


def _store(run, accuracies: dict[str, float], eps: float = 0.1, n: int = 300) -> None:
    """Stored results with these accuracies (the first images correct) for a checkpoint
    "last" that is not on disk (so any sha256 is its)."""
    images, sha = {"data": "digits", "split": "test", "n": n, "sha256": "0" * 64}, "f" * 64
    entries = []
    for name, accuracy in accuracies.items():
        flags = torch.arange(n) < round(accuracy * n)
        settings, norm = ({}, None) if name == "clean" else ({"type": "PGD", "eps": eps}, "Linf")
        key = result_key(sha, name, settings, None if name == "clean" else eps, norm, images, 0)
        entries.append(make_entry(key, flags, 1.0))
    commit(run, [{"checkpoint": "last", "label": "last", "sha256": sha}], entries)


def _seeds(root, name: str, *sets: str, clean: list[float]):
    return [
        _fake_run(root, f"{name}-s{seed}", *sets, seed=seed, clean=c)
        for seed, c in enumerate(clean)
    ]


def _groups(paths, **kwargs) -> list[dict]:
    return json.loads(report(paths, curves=False, **kwargs)["json"])["groups"]


def test_d2r_with_and_without_cag_are_two_rows_with_their_own_means(tmp_path):
    cag = _seeds(tmp_path, "cag", clean=[0.80, 0.82, 0.84])
    no_cag = _seeds(tmp_path, "trades-attack", "method.attack=trades", clean=[0.60, 0.62, 0.67])
    texts = report([*cag, *no_cag], curves=False)
    rows = json.loads(texts["json"])["groups"]
    assert [row["seeds"] for row in rows] == [[0, 1, 2], [0, 1, 2]]
    assert [row["label"] for row in rows] == ["attack=cag", "attack=trades"]
    assert rows[0]["metrics"]["clean"]["mean"] == pytest.approx(0.82)
    assert rows[1]["metrics"]["clean"]["mean"] == pytest.approx(statistics.fmean([0.6, 0.62, 0.67]))
    assert rows[1]["runs"] == [str(p) for p in no_cag]
    assert "| Setting |" in texts["md"] and "| attack=trades |" in texts["md"]
    assert "attack=cag" in texts["tex"]


def test_trades_and_trades_awp_are_two_rows(tmp_path):
    plain = _fake_run(tmp_path, "trades", "method.name=trades", clean=0.8)
    awp = _fake_run(tmp_path, "awp", "method.name=trades", "method.awp_gamma=5e-3", clean=0.7)
    rows = _groups([plain, awp])
    assert [row["label"] for row in rows] == ["awp_gamma=0", "awp_gamma=0.005"]
    assert [row["method"] for row in rows] == ["trades", "trades"]


def test_a_default_given_explicitly_or_left_out_is_one_row(tmp_path):
    given = _fake_run(tmp_path, "given", "method.alpha=30", "method.lam=1", seed=0, clean=0.8)
    left_out = _fake_run(tmp_path, "left-out", seed=1, clean=0.9)
    (row,) = _groups([given, left_out])
    assert row["seeds"] == [0, 1] and row["label"] == ""
    assert row["metrics"]["clean"]["mean"] == pytest.approx(0.85)


def test_the_ablation_grid_gives_one_row_per_alpha_beta_attack(tmp_path):
    """The paper's Table 2: (alpha, beta) with CAG, and (30, 20) without it."""
    grid = [(0, 1, "cag"), (1, 0, "cag"), (20, 1, "cag"), (30, 1, "cag"), (30, 20, "cag")]
    grid.append((30, 20, "trades"))
    runs = []
    for i, (alpha, beta, attack) in enumerate(grid):
        sets = (f"method.alpha={alpha}", f"method.beta={beta}", f"method.attack={attack}")
        runs += [
            _fake_run(tmp_path, f"{i}-s{seed}", *sets, seed=seed, clean=0.5 + i / 100)
            for seed in (0, 1)
        ]
    rows = _groups(runs)
    labels = [f"alpha={a}, beta={b}, attack={c}" for a, b, c in grid]
    assert [row["label"] for row in rows] == labels
    assert all(row["seeds"] == [0, 1] for row in rows)
    for i, row in enumerate(rows):
        assert row["metrics"]["clean"]["mean"] == pytest.approx(0.5 + i / 100)


def test_a_seed_twice_in_one_row_is_refused_naming_both_runs(tmp_path, capsys):
    first = _fake_run(tmp_path, "first", clean=0.8)
    second = _fake_run(tmp_path, "second", clean=0.7)
    again = tmp_path / ".." / tmp_path.name / "first"  # one directory named twice counts once
    assert _groups([first, again])[0]["runs"] == [str(first)]
    assert main(["report", str(first), str(second), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "d2r: error:" in err and "same seed 0" in err
    assert str(first) in err and str(second) in err
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_keys_that_cannot_change_a_result_do_not_split_a_row(tmp_path):
    a = _fake_run(tmp_path, "a", "train.device=cpu", "train.log_every=5", seed=0, clean=0.8)
    b = _fake_run(tmp_path, "b", "data.root=/elsewhere", "train.compile=off", seed=1, clean=0.8)
    (row,) = _groups([a, b])
    assert row["seeds"] == [0, 1]
    assert {"train.device", "data.root", "train.compile"} <= NON_RESULT_KEYS
    c = _fake_run(tmp_path, "c", "data.train_subset=100", seed=2, clean=0.8)  # a result key
    labels = ["data.train_subset=none", "data.train_subset=100"]
    assert [row["label"] for row in _groups([a, c])] == labels


def test_group_by_pools_on_purpose_and_says_so(tmp_path, capsys):
    runs = [
        _fake_run(tmp_path, f"alpha{alpha}", f"method.alpha={alpha}", seed=seed, clean=0.8)
        for seed, alpha in enumerate((20, 30))
    ]
    assert len(_groups(runs)) == 2
    assert main(["report", *map(str, runs), "--group-by", "method.name", "--no-curves"]) == 0
    out = capsys.readouterr().out
    assert "--group-by method.name" in out and "row 1 pools method.alpha" in out
    (row,) = _groups(runs, group_by=["method.name"])
    assert row["seeds"] == [0, 1] and row["varies"] == ["method.alpha"]
    with pytest.raises(ValueError, match=r"--group-by 'method\.alpah'"):
        report(runs, curves=False, group_by=["method.alpah"])


def test_an_older_config_is_never_filled_in_silently(tmp_path):
    new = _fake_run(tmp_path, "new", seed=0, clean=0.8)
    old = _fake_run(tmp_path, "old", seed=1, clean=0.7)
    raw = yaml.safe_load((old / "config.yaml").read_text())
    del raw["method"]["lam"], raw["train"]["sync_bn"]  # options an older d2r did not write
    (old / "config.yaml").write_text(yaml.safe_dump(raw))
    result = read_run(old)
    assert result.not_recorded == ["method.lam", "train.sync_bn"]
    assert result.config["method.lam"] == "not recorded"
    texts = report([new, old], curves=False)
    rows = json.loads(texts["json"])["groups"]
    labels = ["lam=1, train.sync_bn=false", "lam=not recorded, train.sync_bn=not recorded"]
    assert [row["label"] for row in rows] == labels  # not pooled with the new run
    assert f"{old}: config.yaml does not record method.lam, train.sync_bn" in texts["md"]


def test_the_per_epoch_check_reports_the_images_evaluated(runs):
    """eval.subset=1000 on digits, whose validation split (the default data.val_size) has 300
    images: n=300, never 1000, and the split is named."""
    plain = runs[1]
    assert yaml.safe_load((plain / "config.yaml").read_text())["eval"]["subset"] == 1000
    assert read_metrics(plain, "epoch")[-1]["check_n"] == 300
    texts = report([plain], curves=False)
    assert "pgd10 on val, epoch 1, n=300" in texts["md"] and "n=1000" not in texts["md"]


# The resolved config ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS.names())
def test_the_resolved_config_lists_every_option_of_the_method(name, tmp_path):
    cfg = resolved_config(resolve(None, [f"method.name={name}"]))
    params = inspect.signature(METHODS.get(name)).parameters
    options = [p for p, v in params.items() if v.default is not inspect.Parameter.empty]
    assert list(cfg.method) == ["name", *options]
    assert (cfg.guide is not None) == METHODS.get(name).uses_guide  # no unused guide recorded
    assert resolved_config(cfg) == cfg  # resolving twice changes nothing
    (tmp_path / "config.yaml").write_text(dump_yaml(cfg))
    assert resolve(tmp_path / "config.yaml") == cfg  # config.yaml loads back as it was


@pytest.mark.parametrize("name", MODELS.names())
def test_every_models_resolved_options_are_plain_yaml(name):
    """config.yaml is safe YAML: a default such as a tuple could not be written."""
    spec = resolve_spec(MODELS, {"name": name}, skip=DATA_SIZED)
    assert yaml.safe_load(yaml.safe_dump(spec)) == spec


def test_resolve_spec_converts_fills_and_refuses():
    spec = resolve_spec(METHODS, {"name": "d2r", "alpha": 30, "eps": "8/255"}, key="method")
    assert spec["alpha"] == 30.0 and isinstance(spec["alpha"], float)
    assert spec["eps"] == pytest.approx(8 / 255) and spec["beta"] == 20.0
    model = resolve_spec(MODELS, {"name": "small_cnn"}, skip=DATA_SIZED)
    assert model == {"name": "small_cnn", "hidden": 128}  # the data set sizes it
    with pytest.raises(ValueError, match="has no option 'alfa'"):
        resolve_spec(METHODS, {"name": "d2r", "alfa": 1})


def test_a_trained_runs_config_yaml_and_checkpoint_hold_the_resolved_config(runs):
    evaluated = runs[0]
    saved = yaml.safe_load((evaluated / "config.yaml").read_text())
    params = inspect.signature(METHODS.get("d2r")).parameters
    assert set(saved["method"]) == {"name", *params} - {"target", "guide"}
    assert saved["method"]["steps"] == 3 and saved["target"] == {"name": "small_cnn", "hidden": 128}
    _, meta = checkpoint.load(evaluated / "last.safetensors")
    assert meta["config"] == saved
    cfg, missing = read_config(evaluated)  # loads back, nothing missing
    assert to_dict(cfg) == saved and missing == []


def test_the_data_column_says_which_real_set_synthetic_data_imitates():
    from d2r.config import resolve
    from d2r.report.read import _data_label

    assert _data_label(resolve(None, ["data.name=synthetic", "data.like=digits"])) == (
        "synthetic (like digits)"
    )
    assert _data_label(resolve(None, ["data.name=synthetic"])) == "synthetic (like cifar10)"
    assert _data_label(resolve(None, [])) == "digits"


def test_keys_added_since_an_older_run_are_its_known_earlier_values(tmp_path):
    """An older config.yaml without the options added later (method.norm, data.val_size,
    train.ema_decay, ...) was trained with their EARLIER_DEFAULTS: known, so it pools with a
    new run of those values."""
    from d2r.config import EARLIER_DEFAULTS

    new = _fake_run(tmp_path, "new", "data.val_size=null", seed=0, clean=0.8)
    old = _fake_run(tmp_path, "old", "data.val_size=null", seed=1, clean=0.7)
    raw = yaml.safe_load((old / "config.yaml").read_text())
    for key in EARLIER_DEFAULTS:
        section, name = key.split(".")
        del raw[section][name]
    (old / "config.yaml").write_text(yaml.safe_dump(raw))
    result = read_run(old)
    assert result.not_recorded == []
    assert result.config["data.val_size"] is None and result.config["method.norm"] == "linf"
    (row,) = json.loads(report([new, old], curves=False)["json"])["groups"]
    assert row["seeds"] == [0, 1]
