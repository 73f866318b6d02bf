"""`d2r report RUNS --format html --out FILE`: one self-contained page holding every row, the
comparison, overfitting, device-hours and figures, with no network reference; rendered in
headless Chromium (Debian's `chromium`; the test skips, saying why, where there is none)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import matplotlib.image
import pytest

from d2r.cli import main
from d2r.report import report
from tiny_runs import tiny_study


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    runs = tiny_study(tmp_path_factory)
    out = tmp_path_factory.mktemp("page") / "study.html"
    args = ["report", *map(str, runs), "--no-curves", "--format", "html", "--out", str(out)]
    assert main([*args, "--compare", "pgd_at", "--against", "trades"]) == 0
    return runs, out


def test_the_page_holds_every_row_and_is_self_contained(page):
    runs, out = page
    text = out.read_text()
    groups = json.loads(report(runs, curves=False)["json"])["groups"]
    rows = re.findall(r"<tr><td>(\d+)</td>", text)
    assert rows == [str(i) for i in range(1, len(groups) + 1)]
    for g in groups:
        cell = (
            f"{100 * g['metrics']['clean']['mean']:.2f} ± {100 * g['metrics']['clean']['std']:.2f}"
        )
        low, high = g["metrics"]["clean"]["ci95"]
        assert f"{cell} [{100 * low:.2f}, {100 * high:.2f}]" in text  # with its interval
    for head in ("Comparison", "Robust overfitting", "Device-hours", "Paper figures"):
        assert f"<h2>{head}</h2>" in text
    assert "Welch p" in text and "total:" in text
    assert text.count("data:image/png;base64,") == len(runs) + 1  # each run's curves, Fig. 2
    # no network: nothing fetched from elsewhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<script" not in text and "@import" not in text


def test_html_needs_an_out_file(page, capsys):
    runs, _ = page
    assert main(["report", str(runs[0]), "--no-curves", "--format", "html"]) == 2
    assert "--out FILE" in capsys.readouterr().err


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium here (`apt-get install chromium`, as .ci/run does) to render the page",
)
def test_the_page_renders_in_headless_chromium(page, tmp_path):
    _, out = page
    shot = tmp_path / "shot.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,900",
    ]
    subprocess.run([CHROMIUM, *flags, out.resolve().as_uri()], capture_output=True, timeout=120)
    assert shot.is_file(), "Chromium wrote no screenshot"
    image = matplotlib.image.imread(shot)[..., :3]
    assert image.shape[:2] == (900, 1280)
    assert image.std() > 0.05  # text, tables and figures on white, not a blank page
    assert (image < 0.5).mean() > 0.005  # dark text covers part of it
