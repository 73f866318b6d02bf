"""`d2r report`: the paper's table from run directories (eval.json or the per-epoch check),
mean +- std over seeds, Markdown/LaTeX/JSON, curves.png, metrics.csv."""

from __future__ import annotations

import csv
import json
import shutil
import statistics

import matplotlib.image
import pytest
import yaml

from d2r.cli import main
from d2r.logs import read_metrics
from d2r.report import column_label, eval_entries, read_run, report, write_curves
from tiny_runs import evaluated_run, plain_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return evaluated_run(tmp_path_factory), plain_run(tmp_path_factory)


def _eval_last(run_dir) -> dict:
    return json.loads((run_dir / "eval.json").read_text())["last"]


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


def _copy_as_seed(run_dir, dest, seed: int, shift: float):
    """A second seed of the same run: config seed changed, eval numbers shifted."""
    shutil.copytree(run_dir, dest)
    cfg = yaml.safe_load((dest / "config.yaml").read_text())
    cfg["seed"] = seed
    (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = json.loads((dest / "eval.json").read_text())
    for key in ("clean", "pgd20", "cw20", "worst_case"):
        result["last"][key] = min(1.0, result["last"][key] + shift)
    (dest / "eval.json").write_text(json.dumps(result))
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


def test_flat_and_per_checkpoint_eval_json_agree(runs, tmp_path):
    evaluated = runs[0]
    flat = tmp_path / "flat"
    shutil.copytree(evaluated, flat)
    (flat / "eval.json").write_text(json.dumps(_eval_last(evaluated)))  # the older, flat shape
    assert read_run(flat).metrics == read_run(evaluated).metrics
    assert list(eval_entries(_eval_last(evaluated))) == ["last"]


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
    from d2r.evaluate import attacks_mod

    assert attacks.label(name) == text
    assert column_label(name) == text
    assert attack_label is attacks.label and attacks_mod.label is attacks.label
