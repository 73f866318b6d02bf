"""A study's cells and their states (issue 29): an empty grid or a study of no cell is refused
in one line with nothing written; a cell is done when its eval.json store holds every result
its spec asks for, so a stopped evaluation and an attack added to the spec complete on the
rerun; a second sweep on one --out is refused naming the first, and a killed sweep leaves no
process behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from d2r import sweep
from d2r.attacks import PGD
from d2r.cli import main
from d2r.evalstore import CLEAN, Store
from d2r.evaluate import evaluate_run


def write_spec(path: Path, **spec) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False) if spec else "")
    return path


def cli_error(capsys, *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("d2r: error:") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "is empty; give a grid"),
        ({"grid": {}}, "no grid; a study needs one"),
        ({"set": {"train.epochs": 1}}, "no grid; a study needs one"),
        ({"parts": []}, "parts must be a non-empty list"),
        ({"parts": [{"name": "a", "grid": {"seed": [0]}}, {"name": "b"}]}, "part 2: no grid"),
    ],
    ids=["empty-file", "empty-grid", "no-grid", "no-parts", "a-part-without-grid"],
)
def test_a_study_of_no_cell_is_refused_in_one_line_writing_nothing(
    tmp_path, capsys, spec, expected
):
    path, out = write_spec(tmp_path / "spec.yaml", **spec), tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        assert expected in cli_error(capsys, "sweep", str(path), "--out", str(out), *extra)
    assert not out.exists()


# A cell is done when its store holds every result its spec asks for ------------------------------
ROOT = Path(__file__).resolve().parents[1]
# 1 epoch of 128 images, a 3-step attack, a 50-image per-epoch check (as tests/test_sweep.py)
TINY = {
    "train.epochs": 1,
    "data.train_subset": 128,
    "method.steps": 3,
    "eval.subset": 50,
    "eval.attack": "pgd3",
}
PGD_AT = {"name": "pgd_at", "eps": 0.1, "step_size": 0.025, "steps": 3}
EVAL = {"attacks": ["pgd3"], "eps": 0.1, "n": 30, "batch_size": 10}


def test_a_stopped_evaluation_and_an_added_attack_complete_on_the_rerun(tmp_path, monkeypatch):
    spec = {"set": TINY, "grid": {"method": {"pgd_at": PGD_AT}}}
    out, run = tmp_path / "out", tmp_path / "out" / "pgd_at"
    assert [c.state for c in sweep.run(write_spec(tmp_path / "train.yaml", **spec), out)] == [
        "done"
    ]  # no evaluation asked
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}

    # the cell's evaluation stopped after its first batch of PGD: eval.json exists already
    path = write_spec(tmp_path / "spec.yaml", **spec, eval=EVAL)
    calls, original = [], PGD.__call__

    def stop_at_the_second_batch(attack, model, x, y):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(attack, model, x, y)

    monkeypatch.setattr(PGD, "__call__", stop_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, ["pgd3"], 0.1, checkpoint="last", seed=0, n=30, batch_size=10)
    monkeypatch.setattr(PGD, "__call__", original)
    assert (run / "eval.json").is_file() and list(run.glob("eval-partial-*.json"))
    [cell] = sweep.cells(path)
    assert sweep.cell_state(run, cell) == "trained"
    assert [c.state for c in sweep.run(path, out)] == ["done"]
    assert {r["key"]["attack"] for r in Store.read(run).results} == {CLEAN, "pgd3"}
    assert not list(run.glob("eval-partial-*.json"))  # resumed from it, then removed
    before = {r["key"]["attack"]: r for r in Store.read(run).results}

    # an attack added to the spec's eval: only it runs
    path = write_spec(tmp_path / "spec.yaml", **spec, eval={**EVAL, "attacks": ["pgd3", "fgsm"]})
    [cell] = sweep.cells(path)
    assert sweep.cell_state(run, cell) == "trained"
    assert [c.state for c in sweep.run(path, out)] == ["done"]
    after = {r["key"]["attack"]: r for r in Store.read(run).results}
    assert set(after) == {CLEAN, "pgd3", "fgsm"}
    assert all(after[k]["seconds"] == before[k]["seconds"] for k in before)  # kept, not redone
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}  # no training
