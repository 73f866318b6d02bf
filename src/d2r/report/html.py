"""The study page (`d2r report RUNS --format html --out FILE`): one self-contained HTML file,
no network (inline CSS, figures as PNG data URIs): the table with its 95% intervals, the
comparison of --compare, robust overfitting, device-hours, each run's curves of the per-epoch
check and the paper's Fig. 2 (and Fig. 3 with --index) where their runs are present."""

from __future__ import annotations

import base64
import html
import tempfile
from pathlib import Path
from typing import Any

from d2r import figures
from d2r.curves import curves_png
from d2r.logs import read_metrics
from d2r.report.formats import (
    CI_NOTE,
    _head,
    _row_cells,
    comparison_lines,
    device_lines,
    notes,
    overfit_lines,
)
from d2r.tables import eps_head

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2430;
  background: #fff; margin: 0 auto; max-width: 1240px; padding: 1.5rem 2rem 3rem; }
h1 { font-size: 1.6rem; margin: 0 0 .3rem; } h2 { font-size: 1.2rem; margin: 2rem 0 .6rem;
  border-bottom: 1px solid #dde3ea; padding-bottom: .25rem; } h3 { font-size: 1rem; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; font-size: 13px; }
th, td { padding: .35rem .6rem; border-bottom: 1px solid #e5e9ef; text-align: left;
  white-space: nowrap; vertical-align: top; } th { background: #f3f6f9; }
tr:nth-child(even) td { background: #fafbfc; } td.num { text-align: right;
  font-variant-numeric: tabular-nums; } .sig { color: #b3261e; font-weight: 600; }
.notes, .muted { color: #566170; font-size: 13px; } ul.notes { padding-left: 1.2rem; }
figure { margin: 1rem 0; } .grid { display: grid; gap: 0 1.2rem;
  grid-template-columns: repeat(auto-fill, minmax(540px, 1fr)); }
figure img { max-width: 100%; height: auto;
  border: 1px solid #e5e9ef; } figcaption { font-size: 13px; color: #566170; }
"""


def page(
    groups: list[dict[str, Any]],
    columns: list[str],
    comparisons: list[dict[str, Any]] | None,
    context: dict[str, Any],
) -> str:
    """The whole page. `context`: "by" and "eps" (as the tables take them), "runs" (the run
    directories) and "index" (Fig. 3's test image, or None) and "checkpoint"."""
    runs = [Path(r) for r in context["runs"]]
    body = [
        "<h1>d2r study</h1>",
        f'<p class="muted">{len(runs)} run(s) in {len(groups)} row(s).</p>',
        "<h2>Results</h2>",
        _results(groups, columns),
        _list([*notes(groups, context["by"], context["eps"]), CI_NOTE], "notes"),
        _section("Comparison", _comparison(comparisons)),
        _section("Robust overfitting", _lines(overfit_lines(groups))),
        _section("Device-hours", _lines(device_lines(groups), head=False)),
        _section("Paper figures", _paper_figures(runs, context)),
        _section("Per-run curves (per-epoch check)", _curves(runs)),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>d2r study</title><style>{CSS}</style></head><body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )


def _section(title: str, content: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{content}" if content else ""


def _table(head: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    """An HTML table; cells already escaped; columns in `numeric` right-aligned."""
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = []
    for row in rows:
        cells = [
            f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
            for i, c in enumerate(row)
        ]
        trs.append("<tr>" + "".join(cells) + "</tr>")
    table = f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(trs)}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _results(groups: list[dict[str, Any]], columns: list[str]) -> str:
    """The report's table with intervals; a column no row has a number in is left out (the
    page fits a laptop's width; the Markdown keeps the paper's columns)."""
    columns = [k for k in columns if any(k in g["metrics"] for g in groups)] or columns
    norms = [g.get("norm", "Linf") for g in groups]
    head = ["#", *_head(groups, columns, eps_head(norms)), "Source"]
    setting = any(g["label"] for g in groups)
    rows = [
        [str(i), *_row_cells(g, columns, "±", (setting, True), norms)]
        for i, g in enumerate(groups, 1)
    ]
    first = len(head) - len(columns) - 1
    escaped = [[html.escape(c) for c in row] for row in rows]
    return _table([html.escape(h) for h in head], escaped, set(range(first, len(head) - 1)))


def _comparison(comparisons: list[dict[str, Any]] | None) -> str:
    if not comparisons:
        return ""
    lines = comparison_lines(comparisons)  # title, table and note, as the Markdown prints them
    table = [line for line in lines if line.startswith("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[_mark(c.strip()) for c in line.strip("|").split("|")] for line in table[2:]]
    title, note = lines[1], lines[-1]
    return (
        f"<p>{html.escape(title)}</p>"
        + _table([html.escape(h) for h in head], rows, {2, 3, 4, 5})
        + f'<p class="notes">{html.escape(note)}</p>'
    )


def _mark(cell: str) -> str:
    """A p-value below 0.05 (marked * in the Markdown) in red."""
    parts = [html.escape(p) for p in cell.split("; ")]
    marked = [f'<span class="sig">{p}</span>' if p.endswith(" *") else p for p in parts]
    return "; ".join(marked)


def _lines(lines: list[str], head: bool = True) -> str:
    """overfit_lines / device_lines (a blank line, a head, "- " items) as a paragraph (unless
    the section's title says it all) and a list."""
    if not lines:
        return ""
    items = [line[2:] for line in lines[2:]]
    return (f'<p class="muted">{html.escape(lines[1])}</p>' if head else "") + _list(items, "")


def _list(items: list[str], css: str) -> str:
    lis = "".join(f"<li>{html.escape(item)}</li>" for item in items)
    return f'<ul class="{css}">{lis}</ul>'


def _image(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode()
    alt = html.escape(caption, quote=True)
    return (
        f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _curves(runs: list[Path]) -> str:
    out = []
    for run in runs:
        if (run / "metrics.jsonl").is_file() and read_metrics(run, "epoch"):
            out.append(_image(curves_png(run, dpi=80), str(run)))
    return f'<div class="grid">{"".join(out)}</div>' if out else ""


def _paper_figures(runs: list[Path], context: dict[str, Any]) -> str:
    """Fig. 2 from every run with a per-epoch check (its panels (b) and (c) say when no run
    fits them), Fig. 3 for test image --index; a figure its runs cannot give says why."""
    with tempfile.TemporaryDirectory(prefix="d2r-page-") as tmp:
        out = []
        checked = [r for r in runs if any("robust_acc" in e for e in _epochs(r))]
        if checked:
            out.append(_image(Path(figures.fig2(checked, tmp)["path"]).read_bytes(), "Fig. 2"))
        if context.get("index") is not None:
            drawn = figures.fig3(runs, context["index"], tmp, context["checkpoint"])
            out.append(
                _image(Path(drawn["path"]).read_bytes(), f"Fig. 3, test image {context['index']}")
            )
        else:
            out.append('<p class="muted">Fig. 3: add --index I (a test image).</p>')
    return "\n".join(out)


def _epochs(run: Path) -> list[dict[str, Any]]:
    return read_metrics(run, "epoch") if (run / "metrics.jsonl").is_file() else []
