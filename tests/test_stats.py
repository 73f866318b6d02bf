"""d2r.stats against scipy and hand computations, and the report's intervals, comparisons,
robust overfitting and device-hours on a tiny study (2 methods x 3 seeds) and crafted runs."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from scipy import stats as scipy_stats

from d2r import train_command
from d2r.cli import main
from d2r.config import dump_yaml, resolve
from d2r.evalstore import Store, commit, make_entry, result_key, row_entries, summary, unpack_flags
from d2r.logs import overfit_warning, robust_overfit
from d2r.report import StudyOptions, report
from d2r.runs import resolved_config
from d2r.stats import discordant, mcnemar_p, t_interval, welch_p, wilson
from tiny_runs import STUDY_SEEDS, tiny_study

# --- the statistics -----------------------------------------------------------------------------


def test_wilson_interval_matches_a_hand_computation_and_scipy():
    # 40 of 50 right: p = 0.8, z = 1.959964 (z^2 = 3.841459)
    z2 = 1.959964**2
    centre = (0.8 + z2 / 100) / (1 + z2 / 50)
    half = 1.959964 / (1 + z2 / 50) * math.sqrt(0.8 * 0.2 / 50 + z2 / (4 * 50**2))
    low, high = wilson(40, 50)
    assert (low, high) == pytest.approx((centre - half, centre + half), abs=1e-6)
    assert (low, high) == pytest.approx((0.66962, 0.88756), abs=1e-5)  # by hand, 5 digits
    ref = scipy_stats.binomtest(40, 50).proportion_ci(0.95, method="wilson")
    assert (low, high) == pytest.approx((ref.low, ref.high))
    assert wilson(50, 50)[1] == 1.0 and wilson(0, 50)[0] == 0.0 and wilson(0, 0) is None


def test_t_interval_matches_scipy():
    values = [0.80, 0.82, 0.87]
    mean, sem = sum(values) / 3, scipy_stats.sem(values)
    ref = scipy_stats.t.interval(0.95, 2, loc=mean, scale=sem)
    assert t_interval(values) == pytest.approx(list(ref))
    assert t_interval([0.8]) is None


@pytest.mark.parametrize(
    "a, b",
    [([0.80, 0.82, 0.87], [0.60, 0.62, 0.67]), ([0.5, 0.51, 0.49], [0.5, 0.52, 0.47, 0.55])],
)
def test_welch_p_matches_scipy(a, b):
    assert welch_p(a, b) == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue)


def test_welch_p_is_undefined_for_one_seed_or_no_spread():
    assert welch_p([0.8], [0.7, 0.6]) is None and welch_p([0.8, 0.8], [0.7, 0.7]) is None


@pytest.mark.parametrize("b, c", [(0, 0), (3, 1), (10, 2), (7, 7), (0, 9), (40, 61)])
def test_exact_mcnemar_matches_scipys_binomial_test(b, c):
    ref = scipy_stats.binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert mcnemar_p(b, c) == pytest.approx(ref)


def test_discordant_counts_images_only_one_model_gets_right():
    assert discordant([1, 1, 0, 0, 1], [1, 0, 1, 0, 0]) == (2, 1)
    with pytest.raises(ValueError, match="same images"):
        discordant([1, 0], [1])


# --- the tiny study: the report equals scipy on its stored figures and flags ------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return tiny_study(tmp_path_factory)


def _stored(run):
    """(accuracy by attack, flags by attack, images sha256) from the run's eval.json."""
    store = Store.read(run)
    row = summary(store, "last", 0.1)
    entries = row_entries(store, row)
    flags = {k: unpack_flags(e["correct"], e["n"]) for k, e in entries.items()}
    flags["worst_case"] = flags["clean"] & flags["pgd1"]
    return {k: row[k] for k in ("clean", "pgd1", "worst_case")}, flags


def test_the_tiny_studys_comparison_equals_scipy_on_its_stored_results(study, tmp_path):
    texts = report(
        study, tmp_path / "out", curves=False, study=StudyOptions(True, ("pgd_at", "trades"))
    )
    body = json.loads(texts["json"])
    assert body["format_version"] == 2
    stored = [_stored(run) for run in study]
    pgd_at, trades = stored[:3], stored[3:]
    by_attack = {c["attack"]: c for c in body["comparisons"]}
    assert set(by_attack) == {"clean", "pgd1", "worst_case"}
    for key, c in by_attack.items():
        a, b = [s[0][key] for s in pgd_at], [s[0][key] for s in trades]
        assert (c["a"], c["b"], c["eps"]) == ("pgd_at", "trades", 0.1)
        assert c["mean_a"] == pytest.approx(sum(a) / 3) and c["diff"] == pytest.approx(
            (sum(a) - sum(b)) / 3
        )
        ref = scipy_stats.ttest_ind(a, b, equal_var=False).pvalue
        assert c["welch_p"] == (None if math.isnan(ref) else pytest.approx(ref))
        assert [m["seed"] for m in c["mcnemar"]] == list(STUDY_SEEDS)
        for m, (_, fa), (_, fb) in zip(c["mcnemar"], pgd_at, trades, strict=True):
            only_a = int((fa[key] & ~fb[key]).sum())
            only_b = int((fb[key] & ~fa[key]).sum())
            assert (m["b"], m["c"]) == (only_a, only_b)
            n = only_a + only_b
            assert m["p"] == pytest.approx(scipy_stats.binomtest(only_a, n).pvalue if n else 1.0)
    rows = body["groups"]
    for row, seeds in zip(rows, (pgd_at, trades), strict=True):
        clean = row["metrics"]["clean"]
        values = [s[0]["clean"] for s in seeds]
        assert (clean["n_seeds"], clean["n"]) == (3, 50)
        if clean["std"] > 0:
            sem = scipy_stats.sem(values)
            ref = scipy_stats.t.interval(0.95, 2, loc=sum(values) / 3, scale=sem)
            assert clean["ci95"] == pytest.approx([max(0.0, ref[0]), min(1.0, ref[1])])
        assert row["overfit_gap"] == 0.0  # one epoch: best is last
        assert row["device_hours"]["train_seconds"] > 0 and row["device_hours"]["eval_seconds"] > 0
    assert "Comparison: A = pgd_at, B = trades" in texts["md"] and "Welch p" in texts["md"]
    assert "Device-hours:" in texts["md"] and "- total:" in texts["md"]
    assert "[" in texts["tex"]  # the intervals, with --ci


def test_cli_compare_by_selectors_and_ci(study, capsys):
    args = ["report", *map(str, study), "--no-curves", "--ci"]
    assert main([*args, "--compare", "method.name=trades", "--against", "pgd_at"]) == 0
    out = capsys.readouterr().out
    assert "Comparison: A = trades, B = pgd_at" in out and "95% interval" in out
    assert main([*args, "--compare", "mart", "--against", "pgd_at"]) == 2
    assert "--compare 'mart' names no row" in capsys.readouterr().err
    assert main([*args, "--compare", "trades"]) == 2
    assert "--against B" in capsys.readouterr().err


def test_one_run_gets_wilson_interval_on_its_images(study):
    (row,) = json.loads(report(study[:1], curves=False)["json"])["groups"]
    clean = row["metrics"]["clean"]
    assert (clean["n_seeds"], clean["n"]) == (1, 50)
    assert clean["ci95"] == pytest.approx(wilson(round(50 * clean["mean"]), 50))


# --- robust overfitting and device-hours from crafted files -------------------------------------


def _epochs(robust: list[float], seconds: float = 1800.0) -> str:
    records = [
        {"kind": "epoch", "epoch": i, "seconds": seconds, "clean_acc": 0.9, "robust_acc": r}
        for i, r in enumerate(robust, 1)
    ]
    step = {"kind": "step", "step": 1, "loss": 1.0}
    return "".join(json.dumps(r) + "\n" for r in [step, *records])


def _crafted_run(root, name, robust, seed=0, env=None):
    run = root / name
    run.mkdir()
    cfg = resolved_config(resolve(None, ["method.name=pgd_at", f"seed={seed}"]))
    (run / "config.yaml").write_text(dump_yaml(cfg))
    (run / "metrics.jsonl").write_text(_epochs(robust))
    if env is not None:
        (run / "env.json").write_text(json.dumps(env))
    images, sha = {"data": "digits", "split": "test", "n": 100, "sha256": "0" * 64}, "f" * 64
    flags = torch.arange(100) < 80
    entries = [
        make_entry(result_key(sha, "clean", {}, None, None, images, seed), flags, 60.0),
        make_entry(
            result_key(sha, "pgd20", {"type": "PGD"}, 0.1, "Linf", images, seed), flags, 120.0
        ),
    ]
    commit(run, [{"checkpoint": "last", "label": "last", "sha256": sha}], entries)
    return run


def test_a_crafted_log_gives_its_known_gap_and_the_train_warning(tmp_path):
    text = _epochs([0.40, 0.52, 0.47, 0.45])  # best 52% at epoch 2, last 45%: 7 points
    (tmp_path / "metrics.jsonl").write_text(text)
    records = [json.loads(line) for line in text.splitlines()]
    found = robust_overfit(records)
    assert (found["best"], found["best_epoch"], found["last"], found["last_epoch"]) == (
        0.52,
        2,
        0.45,
        4,
    )
    assert found["gap"] == pytest.approx(7.0)
    warning = overfit_warning(records)
    assert "\n" not in warning and "7.00 points" in warning and "epoch 2" in warning
    assert "best.safetensors" in warning
    assert overfit_warning(records[:3]) is None  # the step, 40%, 52%: the last is the best
    two_points = [json.loads(line) for line in _epochs([0.50, 0.48]).splitlines()]
    assert robust_overfit(two_points)["gap"] == pytest.approx(2.0)
    assert overfit_warning(two_points) is None  # 3 points or less: no warning
    assert robust_overfit(records[:1]) is None  # no per-epoch check


def test_d2r_train_ends_with_one_warning_line_when_the_gap_exceeds_3_points(
    tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(_epochs([0.40, 0.52, 0.47, 0.45]))

    class FakeTrainer:
        def __init__(self, cfg, out, progress, resume, wait=False):
            self.cfg, self.run_dir, self.already_finished, self.device = cfg, run, False, "cpu"
            self.dist = types.SimpleNamespace(is_main=True, world_size=1)

        def fit(self):
            return types.SimpleNamespace(dir=run, history=[])

    monkeypatch.setattr(train_command, "Trainer", FakeTrainer)
    assert main(["train", "-q", "--out", str(run)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "robust overfitting" in err[0] and "7.00 points" in err[0]
    (run / "metrics.jsonl").write_text(_epochs([0.40, 0.52, 0.50]))  # 2 points: no warning
    assert main(["train", "-q", "--out", str(run)]) == 0
    assert "robust overfitting" not in capsys.readouterr().err


def test_rows_carry_overfitting_and_device_hours(tmp_path):
    env = {"device": "cuda:0", "device_name": "NVIDIA H200", "world_size": 2}
    a = _crafted_run(tmp_path, "s0", [0.40, 0.52, 0.47, 0.45], seed=0, env=env)  # gap 7
    b = _crafted_run(tmp_path, "s1", [0.40, 0.50, 0.49], seed=1, env=env)  # gap 1
    texts = report([a, b], curves=False)
    body = json.loads(texts["json"])
    (row,) = body["groups"]
    assert row["overfit_gap"] == pytest.approx(4.0)
    each = {e["run"]: e for e in row["robust_overfitting"]}
    assert each[str(a)]["best_epoch"] == 2 and each[str(b)]["last"] == 0.49
    hours = row["device_hours"]
    # training: 4 + 3 epochs of 1800 s on 2 devices; evaluation: 180 s per run on one
    assert hours["train_seconds"] == pytest.approx(7 * 1800)
    assert hours["eval_seconds"] == pytest.approx(360)
    assert hours["device_hours"] == pytest.approx((7 * 1800 * 2 + 360) / 3600)
    assert hours["devices"] == ["2 x NVIDIA H200"]
    assert body["device_hours"] == pytest.approx(hours["device_hours"])
    assert "gap 4.00 points" in texts["md"] and "2 x NVIDIA H200" in texts["md"]
    assert f"total: {(7 * 1800 * 2 + 360) / 3600:.4g} device-hours" in texts["md"]
