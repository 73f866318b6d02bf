"""Tables from run directories: the paper's Table 1 (Clean, PGD-20, PGD-50, C&W, AA, with eps)
as Markdown, LaTeX and JSON, grouped by data set / architecture / method with mean +- std over
seeds; `report()` also redraws each run's curves.png (d2r.curves, the paper's Fig. 2).

Numbers come from a run's eval.json (`d2r eval`). A run without one falls back to the last
per-epoch check of metrics.jsonl (one attack, a test subset), marked as such; a run with neither
says "not evaluated".
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from d2r.attacks import label as attack_label
from d2r.checkpoint import atomic_write_text
from d2r.config import format_eps, load_yaml
from d2r.curves import write_curves
from d2r.logs import read_metrics
from d2r.tables import PAPER_COLUMNS
from d2r.tables import markdown as markdown_lines

WORST = "worst_case"
EVAL_JSON = "eval.json"
EPOCH_CHECK = "per-epoch check"  # the source label of the metrics.jsonl fallback


@dataclass
class RunResult:
    """One run's row before grouping; `metrics` are fractions in [0, 1] by attack name."""

    run_dir: str
    data: str
    model: str
    method: str
    seed: int
    eps: float | None
    source: str  # "eval.json", "per-epoch check" or "not evaluated"
    detail: str  # which checkpoint / attack / how many test images
    metrics: dict[str, float] = field(default_factory=dict)

    def group_key(self) -> tuple:
        # Never average an eval.json number with a per-epoch check, nor across eps.
        return (self.data, self.model, self.method, self.eps, self.source)


# Reading runs ---------------------------------------------------------------------------------


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories among `paths`; a directory that is not a run but holds runs (e.g.
    runs/) stands for all of them."""
    runs = []
    for path in map(Path, paths):
        if (path / "config.yaml").is_file():
            runs.append(path)
            continue
        inner = sorted(p.parent for p in path.glob("*/config.yaml")) if path.is_dir() else []
        if not inner:
            raise FileNotFoundError(
                f"{str(path)!r} is not a run directory (no config.yaml) and "
                "holds none; pass directories written by `d2r train`"
            )
        runs += inner
    return runs


def read_run(run_dir: str | Path, checkpoint: str = "last") -> RunResult:
    """The run's identity from config.yaml and its numbers from eval.json (the `checkpoint`
    entry when there are several), else the last per-epoch check."""
    run_dir = Path(run_dir)
    cfg = load_yaml(run_dir / "config.yaml")
    base = {
        "run_dir": str(run_dir),
        "data": cfg.get("data", {}).get("name", "?"),
        "model": (cfg.get("target") or {}).get("name", "?"),
        "method": _method_label(cfg),
        "seed": cfg.get("seed", 0),
    }
    found = _from_eval_json(run_dir, checkpoint)
    if found is None:
        found = _from_epoch_check(run_dir, cfg)
    return RunResult(**base, **found)


def _method_label(cfg: dict[str, Any]) -> str:
    from d2r.methods import METHODS

    name = (cfg.get("method") or {}).get("name", "?")
    guide = (cfg.get("guide") or {}).get("name")
    try:
        uses_guide = METHODS.get(name).uses_guide
    except ValueError:  # a method this version does not know: show the config as it is
        uses_guide = guide is not None
    # the guide architecture changes the result, so it is part of the method's name
    return f"{name} (guide {guide})" if uses_guide and guide else name


def eval_entries(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """eval.json's results by checkpoint, for both shapes: one flat result ("clean" at the top,
    older files) or one entry per checkpoint ({"last": {...}, "best": {...}, "warnings": [...]})."""
    if "clean" in report:
        return {str(report.get("checkpoint") or "last"): report}
    return {k: v for k, v in report.items() if isinstance(v, dict) and "clean" in v}


def _from_eval_json(run_dir: Path, checkpoint: str) -> dict[str, Any] | None:
    path = run_dir / EVAL_JSON
    if not path.is_file():
        return None
    try:
        entries = eval_entries(json.loads(path.read_text()))
    except ValueError:
        raise ValueError(f"{str(path)!r} is not valid JSON; rerun `d2r eval {run_dir}`") from None
    if not entries:
        return None
    key = checkpoint if checkpoint in entries else next(iter(entries))
    entry = entries[key]
    settings = entry.get("settings", {})
    metrics = {k: float(entry[k]) for k in _accuracy_keys(entry)}
    n = settings.get("n")
    detail = f"{key}" + (f", n={n}" if n else "")
    return {"eps": settings.get("eps"), "source": EVAL_JSON, "detail": detail, "metrics": metrics}


def _accuracy_keys(entry: dict[str, Any]) -> list[str]:
    """ "clean", each attack the entry's settings list, "worst_case"; without that list, every
    number that is not bookkeeping (older or foreign files)."""
    attacks = entry.get("settings", {}).get("attacks")
    if isinstance(attacks, dict):
        keys = ["clean", *attacks, WORST]
    else:
        bookkeeping = {"epoch", "seconds", "settings", "warnings", "sha256", "checkpoint", "n"}
        keys = [k for k in entry if k not in bookkeeping]
    return [k for k in keys if _is_number(entry.get(k))]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _from_epoch_check(run_dir: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    evaluated = [r for r in read_metrics(run_dir, "epoch") if "clean_acc" in r]
    ev = cfg.get("eval", {})
    if not evaluated:
        return {"eps": None, "source": "not evaluated", "detail": "no eval.json, no epoch check"}
    last, attack = evaluated[-1], ev.get("attack", "robust")
    n = last.get("check_n")  # the images actually checked (the trainer records them)
    detail = f"{attack}, epoch {last['epoch']}" + (f", n={n}" if n else "")
    metrics = {"clean": last["clean_acc"], attack: last["robust_acc"]}
    eps = last.get("check_eps", ev.get("eps"))
    return {"eps": eps, "source": EPOCH_CHECK, "detail": detail, "metrics": metrics}


# Grouping -------------------------------------------------------------------------------------


def columns_of(results: list[RunResult]) -> list[str]:
    """The paper's columns, then any other attack that was run, then the worst case."""
    seen = {k for r in results for k in r.metrics}
    extra = sorted(seen - set(PAPER_COLUMNS) - {WORST})
    return [*PAPER_COLUMNS, *extra, WORST]


def column_label(key: str) -> str:
    return {"clean": "Clean", WORST: "Worst case"}.get(key) or attack_label(key)


def summarize(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n - 1; 0 for one run) of fractions."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def group(results: list[RunResult]) -> list[dict[str, Any]]:
    """One entry per (data, model, method, eps, source), in first-seen order."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.group_key(), []).append(r)
    out = []
    for (data, model, method, eps, source), runs in groups.items():
        keys = dict.fromkeys(k for r in runs for k in r.metrics)
        metrics = {k: summarize([r.metrics[k] for r in runs if k in r.metrics]) for k in keys}
        out.append(
            {
                "data": data,
                "model": model,
                "method": method,
                "eps": eps,
                "eps_text": format_eps(eps),
                "source": source,
                "details": [r.detail for r in runs],
                "seeds": [r.seed for r in runs],
                "runs": [r.run_dir for r in runs],
                "metrics": metrics,
            }
        )
    return out


# Formats --------------------------------------------------------------------------------------


def _cell(stats: dict[str, Any] | None, pm: str) -> str:
    if stats is None:
        return "—"
    text = f"{100 * stats['mean']:.2f}"
    return text + (f" {pm} {100 * stats['std']:.2f}" if stats["n"] > 1 else "")


def _source_text(g: dict[str, Any]) -> str:
    if g["source"] == EPOCH_CHECK:
        return f"{EPOCH_CHECK}† ({'; '.join(dict.fromkeys(g['details']))})"
    if g["source"] == EVAL_JSON:
        return f"eval.json ({'; '.join(dict.fromkeys(g['details']))})"
    return "not evaluated"


NOTES = [
    "Accuracies in % (mean ± sample std over seeds when there are several); eps is the Linf "
    "radius; worst case = robust against every attack run, per sample.",
    "† no eval.json: the last per-epoch check during training (one attack on a test subset), "
    "not the full evaluation; run `d2r eval RUN_DIR --attacks pgd20,pgd50,cw20,aa`.",
]


def notes(groups: list[dict[str, Any]]) -> list[str]:
    """The table's notes; the † one only when a row carries the mark."""
    marked = any(g["source"] == EPOCH_CHECK for g in groups)
    return NOTES if marked else NOTES[:1]


def markdown(groups: list[dict[str, Any]], columns: list[str]) -> str:
    head = ["Data", "Model", "Method", "eps (Linf)", "Seeds", *map(column_label, columns), "Source"]
    lines = markdown_lines(head, [_row_cells(g, columns, "±") for g in groups])
    runs = [f"- row {i}: {', '.join(g['runs'])}" for i, g in enumerate(groups, 1)]
    return "\n".join([*lines, "", *notes(groups), "", "Runs:", *runs]) + "\n"


def _row_cells(g: dict[str, Any], columns: list[str], pm: str) -> list[str]:
    seeds = ", ".join(map(str, g["seeds"]))
    if g["source"] == "not evaluated":
        values = ["not evaluated"] + ["—"] * (len(columns) - 1)
    else:
        values = [_cell(g["metrics"].get(k), pm) for k in columns]
    return [g["data"], g["model"], g["method"], g["eps_text"], seeds, *values, _source_text(g)]


def latex(groups: list[dict[str, Any]], columns: list[str]) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    head = [
        "Data",
        "Model",
        "Method",
        r"$\epsilon$",
        "Seeds",
        *map(column_label, columns),
        "Source",
    ]
    spec = "lllll" + "r" * len(columns) + "l"
    lines = [
        r"\begin{tabular}{" + spec + "}",
        r"\toprule",
        " & ".join(map(_tex, head)) + r" \\",
        r"\midrule",
    ]
    for g in groups:
        cells = [_tex(c) for c in _row_cells(g, columns, "PMSIGN")]
        lines.append(" & ".join(c.replace("PMSIGN", r"$\pm$") for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes_tex = [f"% {n}" for n in notes(groups)]
    return "\n".join([*notes_tex, *lines]) + "\n"


def _tex(text: str) -> str:
    if text.startswith("$"):
        return text
    for char, escaped in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("†", r"$^\dagger$"),
        ("—", "--"),
    ):
        text = text.replace(char, escaped)
    return text


def as_json(groups: list[dict[str, Any]], columns: list[str], results: list[RunResult]) -> str:
    labels = {k: column_label(k) for k in columns}
    body = {
        "format": "d2r-report",
        "format_version": 1,
        "units": "fraction in [0, 1]",
        "columns": labels,
        "groups": groups,
        "runs": [asdict(r) for r in results],
    }
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"


# Entry points ---------------------------------------------------------------------------------


def report(
    paths: list[str | Path],
    out: str | Path | None = None,
    *,
    checkpoint: str = "last",
    curves: bool = True,
    csv: bool = False,
) -> dict[str, str]:
    """Tables for the runs under `paths` ({"md", "tex", "json"} texts), written to `out`/report.*
    when `out` is given; curves.png (and metrics.csv with `csv`) in each run directory."""
    from d2r.logs import metrics_csv

    runs = find_runs(list(paths))
    results = [read_run(run, checkpoint) for run in runs]
    for run in runs:
        if curves and read_metrics(run, "epoch"):
            write_curves(run)
        if csv:
            metrics_csv(run)
    groups, columns = group(results), columns_of(results)
    texts = {
        "md": markdown(groups, columns),
        "tex": latex(groups, columns),
        "json": as_json(groups, columns, results),
    }
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        for suffix, text in texts.items():
            atomic_write_text(Path(out) / f"report.{suffix}", text)
    return texts


def add_command(sub: Any) -> None:
    """`d2r report RUN_DIR ... [--out DIR]` (called by cli.build_parser)."""
    p = sub.add_parser(
        "report",
        help="the paper's table (and curves.png) for any number of runs",
        description="Table 1 style results (Clean, PGD-20, PGD-50, C&W, AA) grouped by data set, "
        "architecture and method, mean ± std over seeds, as Markdown (printed), and with --out "
        "also report.md, report.tex and report.json. Writes curves.png in each run directory.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (or a folder of runs)"
    )
    p.add_argument("--out", help="directory for report.md / report.tex / report.json")
    p.add_argument(
        "--checkpoint",
        choices=["last", "best"],
        default="last",
        help="which eval.json entry to report when it holds several (default: last)",
    )
    p.add_argument(
        "--csv",
        action="store_true",
        help="also export each run's metrics.jsonl to metrics.csv in its directory",
    )
    p.add_argument("--no-curves", action="store_true", help="do not (re)draw curves.png")
    p.set_defaults(func=_command)


def _command(args: Any) -> int:
    texts = report(
        args.runs, args.out, checkpoint=args.checkpoint, curves=not args.no_curves, csv=args.csv
    )
    print(texts["md"], end="")
    if args.out:
        print(f"wrote {Path(args.out) / 'report.md'}, report.tex and report.json")
    return 0


__all__ = ["RunResult", "add_command", "find_runs", "read_run", "report", "write_curves"]
