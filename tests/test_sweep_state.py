"""A study's cells and their states (issue 29): an empty grid or a study of no cell is refused
in one line with nothing written; a cell is done when its eval.json store holds every result
its spec asks for, so a stopped evaluation and an attack added to the spec complete on the
rerun; a second sweep on one --out is refused naming the first, and a killed sweep leaves no
process behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from d2r.cli import main


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
