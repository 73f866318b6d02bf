"""Tables from run directories: the paper's Table 1 (Clean, PGD-20, PGD-50, C&W, AA, with eps)
as Markdown, LaTeX and JSON, one row per experiment with mean +- std over seeds; `report()` also
redraws each run's curves.png (d2r.curves, the paper's Fig. 2).

An experiment is a resolved config (d2r.runs.read_config: every option, defaults included):
runs share a row only when their configs are equal except for the seed and NON_RESULT_KEYS, and
each row is labelled by the keys that tell it apart from the rows of the same method.
`group_by` groups on purpose by fewer keys, and says so in the table's notes.

Numbers come from a run's eval.json (`d2r eval`'s store, d2r.evalstore) at one eps: each run's
training eps, or the one `eps` names (the worst case covers the results at that eps only). A
run without results there falls back to the last per-epoch check of metrics.jsonl (one attack,
on the validation split or a test subset), marked as such, when it was at that eps; a run with
neither says "not evaluated", or "—" where only another eps was evaluated.

Every accuracy has a 95% interval (`ci95`), every row its robust overfitting (the per-epoch
check's best and last) and device-hours; `--compare A --against B` tests two rows (Welch over
seeds, exact McNemar per seed; d2r.stats), `--format html` writes the study page.

`read` turns a run directory into a RunResult, `group` runs into rows, `compare` two rows into
tests, `formats` rows into Markdown, LaTeX and JSON, `html` into the page; here are the entry
point `report()` and the `d2r report` command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2r import figures
from d2r.config import parse_number
from d2r.curves import write_curves
from d2r.experiments import NON_RESULT_KEYS
from d2r.files import atomic_write_text, check_writable, locked
from d2r.logs import metrics_csv, read_metrics
from d2r.report.compare import StudyOptions, compare, row_name, select
from d2r.report.formats import as_json, latex, markdown, notes
from d2r.report.group import columns_of, group, group_key, summarize
from d2r.report.html import page
from d2r.report.read import (
    EPOCH_CHECK,
    EVAL_JSON,
    NO_RESULT,
    WORST,
    RunResult,
    column_label,
    find_runs,
    read_run,
)

REPORT_LOCK = ".report.lock"  # beside report.*, while a report writes them (removed after)

__all__ = [
    "EPOCH_CHECK",
    "EVAL_JSON",
    "NON_RESULT_KEYS",
    "NO_RESULT",
    "WORST",
    "RunResult",
    "StudyOptions",
    "add_command",
    "as_json",
    "column_label",
    "columns_of",
    "compare",
    "find_runs",
    "group",
    "group_key",
    "latex",
    "markdown",
    "notes",
    "parse_eps",
    "parse_group_by",
    "read_run",
    "report",
    "row_name",
    "select",
    "summarize",
    "write_curves",
]


def report(
    paths: list[str | Path],
    out: str | Path | None = None,
    *,
    checkpoint: str = "last",
    curves: bool = True,
    csv: bool = False,
    group_by: list[str] | None = None,
    eps: float | None = None,
    study: StudyOptions | None = None,
) -> dict[str, str]:
    """Tables for the runs under `paths` ({"md", "tex", "json"} texts), written to `out`/report.*
    when `out` is given; curves.png (and metrics.csv with `csv`) in each run directory.
    `group_by`: config keys (e.g. ["method.name"]) to group by instead of the whole config.
    `eps`: the eps whose results fill the columns (default: each run's training eps).
    `study`: intervals in the Markdown and LaTeX tables, a comparison of two rows
    (d2r.report.compare; JSON "comparisons"), the HTML page ("html", d2r.report.html)."""
    study = study or StudyOptions()
    runs = find_runs(list(paths))
    _check_writable(runs, out, curves, csv)
    results = [read_run(run, checkpoint, eps) for run in runs]
    groups, columns = group(results, group_by), columns_of(results)  # refusals come first
    tests = compare(groups, study.compare, checkpoint, eps) if study.compare else None
    texts = {
        "md": markdown(groups, columns, group_by, eps, study.ci, tests),
        "tex": latex(groups, columns, group_by, eps, study.ci),
        "json": as_json(groups, columns, results, group_by, eps, tests),
    }
    if study.html:
        context = {"by": group_by, "eps": eps, "runs": runs, "index": study.index}
        texts["html"] = page(groups, columns, tests, {**context, "checkpoint": checkpoint})
    _write(runs, out, texts, curves, csv)
    return texts


def _write(runs: list[Path], out, texts: dict[str, str], curves: bool, csv: bool) -> None:
    """curves.png and metrics.csv in each run directory, the texts to `out`/report.*."""
    for run in runs:
        if curves and read_metrics(run, "epoch"):
            write_curves(run)
        if csv:
            metrics_csv(run)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        # each file is replaced whole; the lock keeps report.md, .tex, .json one report's when
        # two reports (a sweep's and yours) write to one directory at once
        with locked(Path(out) / REPORT_LOCK):
            for suffix, text in texts.items():
                atomic_write_text(Path(out) / f"report.{suffix}", text)


def _check_writable(runs: list[Path], out: str | Path | None, curves: bool, csv: bool) -> None:
    """Every place the report writes, before it reads any run: `out`, and each run directory
    it draws curves.png or metrics.csv in (a colleague's runs may be read-only)."""
    if out is not None:
        check_writable(out, "report directory (--out)")
    what = "for curves.png; --no-curves only reads runs" if curves else "for metrics.csv"
    for run in runs if curves or csv else []:
        check_writable(run, f"run directory ({what})")


def add_command(sub: Any) -> None:
    """`d2r report RUN_DIR ... [--out DIR]` (called by cli.build_parser)."""
    p = sub.add_parser(
        "report",
        help="the paper's table (and curves.png) for any number of runs",
        description="Table 1 style results (Clean, PGD-20, PGD-50, C&W, AA), one row per "
        "experiment (equal resolved configs except the seed), mean ± std over seeds, labelled "
        "by what tells rows apart, as Markdown (printed), and with --out "
        "also report.md, report.tex and report.json. Writes curves.png in each run directory.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (or a folder of runs)"
    )
    p.add_argument(
        "--out", help="directory for report.md / report.tex / report.json (or --figure's PNG)"
    )
    p.add_argument(
        "--checkpoint",
        choices=["last", "best", "ema"],
        default="last",
        help="which checkpoint's eval.json results to report, and the models of --figure fig3 "
        "(default: last)",
    )
    p.add_argument(
        "--eps",
        help="the eps whose results fill the columns, e.g. 8/255 or 0.031 (default: each "
        "run's training eps); a run without a result at it shows —",
    )
    p.add_argument(
        "--csv",
        action="store_true",
        help="also export each run's metrics.jsonl to metrics.csv in its directory",
    )
    p.add_argument("--no-curves", action="store_true", help="do not (re)draw curves.png")
    p.add_argument(
        "--group-by",
        metavar="KEY,...",
        help="group runs by these config keys only (e.g. method.name,data.name), pooling runs "
        "that differ elsewhere; default: runs share a row only when their configs are equal "
        "except for the seed",
    )

    p.add_argument(
        "--ci",
        action="store_true",
        help="print each accuracy's 95%% interval in the Markdown and LaTeX tables (Student's t "
        "over seeds, Wilson for one run; report.json always holds it)",
    )
    p.add_argument(
        "--compare",
        metavar="A",
        help="compare row A with --against B: a row's label as the table prints it (Method, or "
        "'Method (Setting)') or KEY=VALUE selectors (method.name=trades); means, difference, "
        "Welch's t-test over seeds and the exact McNemar test per seed",
    )
    p.add_argument("--against", metavar="B", help="the row --compare A is compared with")
    p.add_argument(
        "--format",
        choices=["md", "html"],
        default="md",
        help="html: write one self-contained study page to --out FILE (tables with intervals, "
        "the comparison, overfitting, device-hours, per-run curves, Fig. 2, and Fig. 3 with "
        "--index); default md: print the Markdown table",
    )
    figures.add_arguments(p)
    p.set_defaults(func=_command)


def parse_eps(text: str | None) -> float | None:
    """--eps '8/255' -> 0.0313...; None stays None."""
    if text is None:
        return None
    try:
        return parse_number(text)
    except ValueError:
        raise ValueError(f"--eps {text!r}: give one number, e.g. 8/255 or 0.031") from None


def parse_group_by(text: str | None) -> list[str] | None:
    """'method.name, data.name' -> ["method.name", "data.name"]; None stays None."""
    if text is None:
        return None
    keys = [k.strip() for k in text.split(",")]
    if not all(keys):
        raise ValueError(f"--group-by {text!r}: give comma-separated config keys, e.g. method.name")
    return keys


def _page_file(args: Any) -> Path | None:
    """--format html's --out FILE, checked writable before any work; None for Markdown."""
    if args.format != "html":
        return None
    if not args.out or args.figure:
        raise ValueError("--format html writes one page: give --out FILE.html (and no --figure)")
    check_writable(Path(args.out).parent, "directory of the page (--out)")
    return Path(args.out)


def _pair(a: str | None, b: str | None) -> tuple[str, str] | None:
    if (a is None) != (b is None):
        raise ValueError("--compare A goes with --against B: give both rows")
    return None if a is None else (a, b)


def _command(args: Any) -> int:
    page_file = _page_file(args)
    if args.figure or (args.index is not None and not page_file):  # the paper's figures
        return figures.command(args)
    study = StudyOptions(args.ci, _pair(args.compare, args.against), bool(page_file), args.index)
    texts = report(
        args.runs,
        None if page_file else args.out,
        checkpoint=args.checkpoint,
        curves=not args.no_curves,
        csv=args.csv,
        group_by=parse_group_by(args.group_by),
        eps=parse_eps(args.eps),
        study=study,
    )
    if page_file:
        atomic_write_text(page_file, texts["html"])
        print(f"wrote {page_file}")
        return 0
    print(texts["md"], end="")
    if args.out:
        print(f"wrote {Path(args.out) / 'report.md'}, report.tex and report.json")
    return 0


__all__ = [
    "NON_RESULT_KEYS",
    "RunResult",
    "add_command",
    "find_runs",
    "group",
    "read_run",
    "report",
    "write_curves",
]
