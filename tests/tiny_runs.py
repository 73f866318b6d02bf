"""Tiny training runs shared by test_report, test_export and test_api: each is trained once per
test session (a cache here, not a fixture, so several modules reuse it). Tests must not modify
them except for files they own (curves.png, report outputs elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2r.cli import main

# 2 batches of 128 per epoch, a 3-step attack, a 100-image per-epoch check: seconds on a CPU.
TINY = ["data.train_subset=256", "method.steps=3", "eval.subset=100", "eval.attack=pgd10"]
_RUNS: dict[str, Path] = {}


def tiny_run(
    factory: pytest.TempPathFactory, name: str, *sets: str, evaluate: bool = False
) -> Path:
    """Train `name` once (with `sets` on top of TINY); with `evaluate`, also `d2r eval` it."""
    if name not in _RUNS:
        out = factory.getbasetemp() / "tiny-runs" / name
        args = ["train", "-q", "--out", str(out)]
        for item in [*TINY, *sets]:
            args += ["--set", item]
        assert main(args) == 0
        if evaluate:
            rc = main(
                [
                    "eval",
                    str(out),
                    "--attacks",
                    "pgd20,cw20",
                    "--eps",
                    "0.1",
                    "--n",
                    "50",
                    "--no-checks",
                    "-q",
                    "--checkpoint",
                    "last",
                ]
            )
            assert rc == 0
        _RUNS[name] = out
    return _RUNS[name]


def evaluated_run(factory: pytest.TempPathFactory) -> Path:
    """D2R-CAG, seed 0, two epochs, with eval.json (last checkpoint)."""
    return tiny_run(factory, "d2r-seed0", "train.epochs=2", evaluate=True)


def plain_run(factory: pytest.TempPathFactory) -> Path:
    """PGD-AT, one epoch, never evaluated (only the per-epoch check in metrics.jsonl), whose
    eval.subset (1000) exceeds the digits validation split (300 images)."""
    sets = ("train.epochs=1", "method.name=pgd_at", "eval.subset=1000")
    return tiny_run(factory, "pgd_at-seed0", *sets)


# The smallest study: 2 methods x 3 seeds, 1 epoch of 128 images, 1-step attacks, evaluated on
# 50 test images with PGD-1 (test_stats: intervals and tests on stored figures and flags).
STUDY_METHODS = ("pgd_at", "trades")
STUDY_SEEDS = (0, 1, 2)
_STUDY = ["train.epochs=1", "data.train_subset=128", "method.steps=1", "eval.subset=50"]


def tiny_study(factory: pytest.TempPathFactory) -> list[Path]:
    """Every run of the tiny study, trained and evaluated once per test session."""
    runs = []
    for method in STUDY_METHODS:
        for seed in STUDY_SEEDS:
            name = f"study-{method}-s{seed}"
            if name not in _RUNS:
                out = factory.getbasetemp() / "tiny-study" / name
                sets = [*_STUDY, "eval.attack=pgd1", f"method.name={method}", f"seed={seed}"]
                args = ["train", "-q", "--out", str(out)]
                assert main([*args, *(a for s in sets for a in ("--set", s))]) == 0
                flags = ["--attacks", "pgd1", "--n", "50", "--no-checks", "-q"]
                assert main(["eval", str(out), *flags]) == 0
                _RUNS[name] = out
            runs.append(_RUNS[name])
    return runs
