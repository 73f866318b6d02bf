"""The paper's Fig. 2 and Fig. 3 from tiny runs (`d2r report RUN... --figure fig2|fig3`): the
files are real PNGs, and what is drawn equals its source (metrics.jsonl, the models' softmax)."""

import shutil
import struct

import pytest
import torch
import torch.nn.functional as F
import yaml

from d2r import data, figures
from d2r.cli import main
from d2r.evaluate import as_float
from d2r.figures import fig2, fig3
from d2r.logs import read_metrics
from d2r.runs import load_run
from tiny_runs import evaluated_run, plain_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The cached D2R (beta 20, two epochs) and PGD-AT runs, and a copy of the D2R run's config
    and log with beta = 0 and other numbers (the arm without the symmetric term; Fig. 2 reads
    only config.yaml and metrics.jsonl)."""
    d2r_run, pgd_run = evaluated_run(tmp_path_factory), plain_run(tmp_path_factory)
    beta0 = tmp_path_factory.mktemp("beta0") / "d2r-beta0"
    beta0.mkdir()
    config = yaml.safe_load((d2r_run / "config.yaml").read_text())
    config["method"]["beta"] = 0.0
    (beta0 / "config.yaml").write_text(yaml.safe_dump(config))
    lines = (d2r_run / "metrics.jsonl").read_text().replace('"robust_acc": 0.', '"robust_acc": 0.0')
    (beta0 / "metrics.jsonl").write_text(lines)
    return d2r_run, pgd_run, beta0


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _robust(run, key="robust_acc") -> list[list[float]]:
    return [[r["epoch"], 100 * r[key]] for r in read_metrics(run, "epoch") if key in r]


def test_fig2_draws_the_three_panels_from_the_runs_logs(runs, tmp_path):
    d2r_run, pgd_run, beta0 = runs
    drawn = fig2([d2r_run, pgd_run, beta0], tmp_path)
    assert drawn["path"] == tmp_path / "fig2.png" and _png_size(drawn["path"]) == (1920, 666)
    assert drawn["path"].stat().st_size > 30_000  # three panels of curves, not a blank canvas
    a, b, c = (drawn["panels"][k] for k in "abc")
    # PGD-AT's check ran on 300 images, D2R's on 100: each label says how its run was checked
    checks = ["PGD-10, eps 0.1 (Linf), n=100", "PGD-10, eps 0.1 (Linf), n=300"]
    assert drawn["check"] == checks
    d2r20, d2r0 = (f"d2r (guide tiny_cnn), beta={b} [{checks[0]}]" for b in (20, 0))
    expected = {d2r20: d2r_run, f"pgd_at [{checks[1]}]": pgd_run, d2r0: beta0}
    assert a == {text: _robust(run) for text, run in expected.items()}
    assert _robust(beta0) != _robust(d2r_run)  # the copy's numbers differ
    assert b[f"guide clean: {d2r20}"] == _robust(d2r_run, "guide_clean_acc")
    assert b[f"target robust: {d2r0}"] == _robust(beta0)
    assert len(b) == 4 and not any("pgd_at" in k for k in b)  # PGD-AT trains no guide
    assert c == {
        f"with symmetric term (beta=20): {d2r20}": _robust(d2r_run),
        f"without (beta=0): {d2r0}": _robust(beta0),
    }


def test_fig2_refuses_a_run_without_a_per_epoch_check(runs, tmp_path):
    empty = tmp_path / "empty"
    shutil.copytree(runs[2], empty)
    (empty / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no per-epoch check"):
        fig2([empty], tmp_path)
    assert not (tmp_path / "fig2.png").exists()


def test_fig3_plots_the_guide_and_target_softmax_of_a_test_image(runs, tmp_path):
    run = runs[0]
    drawn = fig3([run], 7, tmp_path)
    assert drawn["path"] == tmp_path / "fig3-image7.png"
    assert _png_size(drawn["path"]) == (1152, 408) and drawn["path"].stat().st_size > 10_000
    cfg, method = load_run(run, "last")
    x, y = data.load("digits", cfg.data.root, "test")
    assert drawn["label"] == int(y[7])
    with torch.no_grad():
        for name in ("guide", "target"):
            probs = F.softmax(method.models()[name](as_float(x[7:8])), 1)[0]
            plotted = torch.tensor(drawn["probs"][str(run)][name])
            assert torch.allclose(plotted, probs, atol=1e-6), name
    assert list(drawn["probs"][str(run)]) == ["guide", "target"]  # the paper's order


def test_fig3_of_two_runs_and_a_run_without_a_guide(runs, tmp_path):
    drawn = fig3([runs[0], runs[1]], 0, tmp_path, checkpoint="best")
    assert [list(p) for p in drawn["probs"].values()] == [["guide", "target"], ["target"]]
    assert _png_size(drawn["path"]) == (4 * 384, 408)  # the image and three models


def test_cli_report_figure(runs, tmp_path, capsys):
    out = str(tmp_path)
    assert main(["report", str(runs[0]), "--figure", "fig3", "--index", "2", "--out", out]) == 0
    assert (tmp_path / "fig3-image2.png").is_file()
    assert main(["report", str(runs[0]), str(runs[2]), "--figure", "fig2", "--out", out]) == 0
    assert f"wrote {tmp_path / 'fig2.png'}" in capsys.readouterr().out
    assert not (tmp_path / "report.md").exists()  # a figure instead of the table
    for bad, message in (
        (["--figure", "fig3"], "--index I goes with --figure fig3"),
        (["--figure", "fig2", "--index", "1"], "--index I goes with --figure fig3"),
        (["--figure", "fig3", "--index", "300"], "images 0 to 299"),
    ):
        assert main(["report", str(runs[0]), *bad, "--out", out]) == 2
        assert message in capsys.readouterr().err


def test_fig2_says_which_split_it_checked_and_keeps_long_labels_on_the_canvas(
    runs, tmp_path, monkeypatch
):
    d2r_run, pgd_run, _ = runs  # both checked on the digits' validation split
    drawn = fig2([d2r_run, pgd_run], tmp_path)
    assert drawn["title"].endswith("per-epoch check on the validation split")
    long = ["a run label " * 20, "another " * 30]  # 240 characters each: past a panel
    monkeypatch.setattr(figures, "_labels", lambda read: long)
    drawn = fig2([d2r_run, pgd_run], tmp_path / "long")
    legend = drawn["legends"]["a"]
    shown = [" ".join(text.split()) for text in legend]  # each label whole, with its check
    assert all(s.startswith(" ".join(t.split())) for s, t in zip(shown, long, strict=True))
    assert all(len(line) <= figures.LEGEND_WIDTH for t in legend for line in t.splitlines())
    assert _png_size(drawn["path"])[1] > _png_size(tmp_path / "fig2.png")[1]  # a taller canvas
