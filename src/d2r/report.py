"""Tables from run directories: the paper's Table 1 (Clean, PGD-20, PGD-50, C&W, AA, with eps)
as Markdown, LaTeX and JSON, one row per experiment with mean +- std over seeds; `report()` also
redraws each run's curves.png (d2r.curves, the paper's Fig. 2).

An experiment is a resolved config (d2r.runs.read_config: every option, defaults included):
runs share a row only when their configs are equal except for the seed and NON_RESULT_KEYS, and
each row is labelled by the keys that tell it apart from the rows of the same method.
`group_by` groups on purpose by fewer keys, and says so in the table's notes.

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
from d2r.config import Config, format_eps
from d2r.curves import write_curves
from d2r.experiments import (
    NON_RESULT_KEYS,
    NOT_RECORDED,
    check_group_by,
    check_seeds,
    distinguishing,
    experiment_key,
    flat_config,
    label,
    result_keys,
)
from d2r.logs import read_metrics
from d2r.tables import PAPER_COLUMNS
from d2r.tables import markdown as markdown_lines

WORST = "worst_case"
EVAL_JSON = "eval.json"
EPOCH_CHECK = "per-epoch check"  # the source label of the metrics.jsonl fallback
# Keys a table shows in its own columns (Data, Model, Method), so never in a row's label.
_SHOWN = frozenset({"data.name", "target.name", "method.name", "guide", "guide.name"})


@dataclass
class RunResult:
    """One run's row before grouping; `metrics` are fractions in [0, 1] by attack name, `config`
    its resolved config flattened to dotted keys (NOT_RECORDED where config.yaml lacks a key)."""

    run_dir: str
    data: str
    model: str
    method: str
    seed: int | str
    eps: float | None
    source: str  # "eval.json", "per-epoch check" or "not evaluated"
    detail: str  # which checkpoint / attack / how many test images
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    not_recorded: list[str] = field(default_factory=list)


# Reading runs ---------------------------------------------------------------------------------


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories among `paths`, each once (`runs/*` and `runs/a` name runs/a twice); a
    directory that is not a run but holds runs (e.g. runs/) stands for all of them."""
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
    unique: dict[Path, Path] = {}
    for run in runs:
        unique.setdefault(run.resolve(), run)
    return list(unique.values())


def read_run(run_dir: str | Path, checkpoint: str = "last") -> RunResult:
    """The run's identity from config.yaml (resolved; keys it lacks are NOT_RECORDED) and its
    numbers from eval.json (the `checkpoint` entry when there are several), else the last
    per-epoch check."""
    from d2r.runs import read_config

    run_dir = Path(run_dir)
    cfg, missing = read_config(run_dir)
    config = flat_config(cfg, missing)
    base = {
        "run_dir": str(run_dir),
        "data": cfg.data.name,
        "model": cfg.target["name"],
        "method": _method_label(cfg),
        "seed": config["seed"],
        "config": config,
        "not_recorded": missing,
    }
    found = _from_eval_json(run_dir, checkpoint)
    if found is None:
        found = _from_epoch_check(run_dir, cfg)
    return RunResult(**base, **found)


def _method_label(cfg: Config) -> str:
    # the guide architecture changes the result, so it is part of the method's name (a resolved
    # config has no guide for a method that trains none)
    name, guide = cfg.method["name"], cfg.guide
    return f"{name} (guide {guide['name']})" if guide else name


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


def _from_epoch_check(run_dir: Path, cfg: Config) -> dict[str, Any]:
    evaluated = [r for r in read_metrics(run_dir, "epoch") if "clean_acc" in r]
    if not evaluated:
        return {"eps": None, "source": "not evaluated", "detail": "no eval.json, no epoch check"}
    last, attack = evaluated[-1], cfg.eval.attack
    # the images actually evaluated, never eval.subset (it may exceed the test split)
    n = f"n={last['check_n']}" if "check_n" in last else "n not recorded"
    split = last.get("check_split", "test")  # older logs: the check read the test split
    detail = f"{attack} on {split}, epoch {last['epoch']}, {n}"
    metrics = {"clean": last["clean_acc"], attack: last["robust_acc"]}
    eps = last.get("check_eps", cfg.eval.eps)  # older logs: the config's eval.eps
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


def group_key(result: RunResult, by: list[str] | None = None) -> tuple:
    """Runs share a row when their experiment_key, eps and source are equal: an eval.json
    number is never averaged with a per-epoch check, nor across eps."""
    return (result.eps, result.source, experiment_key(result.config, by))


def group(results: list[RunResult], by: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per experiment (group_key), in first-seen order, each labelled by what tells it
    apart from the other rows of its method; ValueError if a row would hold a seed twice."""
    if by is not None:
        check_group_by([r.config for r in results], by)
    groups: dict[tuple, list[RunResult]] = {}
    for r in results:
        groups.setdefault(group_key(r, by), []).append(r)
    rows = [_row(runs) for runs in groups.values()]
    _label(rows)
    return rows


def _row(runs: list[RunResult]) -> dict[str, Any]:
    check_seeds([(r.seed, r.run_dir) for r in runs])
    keys = dict.fromkeys(k for r in runs for k in r.metrics)
    first = runs[0].config
    common = {k: v for k, v in first.items() if all(r.config.get(k, ...) == v for r in runs)}
    varies = [k for k in result_keys({k: 0 for r in runs for k in r.config}) if k not in common]
    return {
        "data": _joined(r.data for r in runs),
        "model": _joined(r.model for r in runs),
        "method": _joined(r.method for r in runs),
        "label": "",
        "setting": {},
        "eps": runs[0].eps,
        "eps_text": format_eps(runs[0].eps),
        "source": runs[0].source,
        "details": [r.detail for r in runs],
        "seeds": [r.seed for r in runs],
        "runs": [r.run_dir for r in runs],
        "metrics": {k: summarize([r.metrics[k] for r in runs if k in r.metrics]) for k in keys},
        "config": common,  # the keys all its runs agree on
        "varies": varies,  # result keys its runs differ in (only with group_by)
        "not_recorded": {r.run_dir: r.not_recorded for r in runs if r.not_recorded},
    }


def _joined(values: Any) -> str:
    return " / ".join(dict.fromkeys(values))


def _label(rows: list[dict[str, Any]]) -> None:
    """Set each row's `setting` and `label`: the result keys whose values differ between the
    rows of the same data, model and method (e.g. "alpha=30, beta=20, attack=cag")."""
    peers: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        peers.setdefault((row["data"], row["model"], row["method"]), []).append(row)
    for same in peers.values():
        settings = distinguishing([row["config"] for row in same], skip=_SHOWN)
        for row, setting in zip(same, settings, strict=True):
            row["setting"], row["label"] = setting, label(setting)


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
    "† no eval.json: the last per-epoch check during training (one attack on the validation "
    "split, or a test subset in runs without one), "
    "not the full evaluation; run `d2r eval RUN_DIR --attacks pgd20,pgd50,cw20,aa`.",
]


def notes(groups: list[dict[str, Any]], by: list[str] | None = None) -> list[str]:
    """The table's notes: how rows were formed, the † one only when a row carries the mark,
    and every run whose config.yaml does not record some keys."""
    marked = any(g["source"] == EPOCH_CHECK for g in groups)
    out = [NOTES[0], *(NOTES[1:] if marked else []), _grouping_note(groups, by)]
    missing: dict[tuple, list[str]] = {}
    for g in groups:
        for run, keys in g["not_recorded"].items():
            missing.setdefault(tuple(keys), []).append(run)
    for keys, runs in missing.items():
        out.append(
            f"{', '.join(runs)}: config.yaml does not record {', '.join(keys)} (an older d2r "
            f'wrote it); compared as "{NOT_RECORDED}", never as a default.'
        )
    return out


def _grouping_note(groups: list[dict[str, Any]], by: list[str] | None) -> str:
    if by is None:
        return (
            "A row's runs have equal resolved configs except for the seed and keys that cannot "
            f"change a result ({', '.join(sorted(NON_RESULT_KEYS))}); Setting names what tells "
            "rows of one method apart."
        )
    pooled = [
        f"row {i} pools {', '.join(g['varies'])}" for i, g in enumerate(groups, 1) if g["varies"]
    ]
    return (
        f"Rows grouped on purpose by --group-by {','.join(by)} (and eps and source): their "
        "runs may differ in other keys" + (f" ({'; '.join(pooled)})." if pooled else ".")
    )


def _has_setting(groups: list[dict[str, Any]]) -> bool:
    """A Setting column only when some rows of one method differ."""
    return any(g["label"] for g in groups)


def _head(groups: list[dict[str, Any]], columns: list[str], eps: str) -> list[str]:
    setting = ["Setting"] if _has_setting(groups) else []
    return ["Data", "Model", "Method", *setting, eps, "Seeds", *map(column_label, columns)]


def markdown(groups: list[dict[str, Any]], columns: list[str], by: list[str] | None = None) -> str:
    head = [*_head(groups, columns, "eps (Linf)"), "Source"]
    setting = _has_setting(groups)
    lines = markdown_lines(head, [_row_cells(g, columns, "±", setting) for g in groups])
    runs = [f"- row {i}: {', '.join(g['runs'])}" for i, g in enumerate(groups, 1)]
    return "\n".join([*lines, "", *notes(groups, by), "", "Runs:", *runs]) + "\n"


def _row_cells(g: dict[str, Any], columns: list[str], pm: str, setting: bool) -> list[str]:
    seeds = ", ".join(map(str, g["seeds"]))
    if g["source"] == "not evaluated":
        values = ["not evaluated"] + ["—"] * (len(columns) - 1)
    else:
        values = [_cell(g["metrics"].get(k), pm) for k in columns]
    names = [g["data"], g["model"], g["method"], *([g["label"] or "—"] if setting else [])]
    return [*names, g["eps_text"], seeds, *values, _source_text(g)]


def latex(groups: list[dict[str, Any]], columns: list[str], by: list[str] | None = None) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    head = [*_head(groups, columns, r"$\epsilon$"), "Source"]
    spec = "l" * (len(head) - len(columns) - 1) + "r" * len(columns) + "l"
    lines = [
        r"\begin{tabular}{" + spec + "}",
        r"\toprule",
        " & ".join(map(_tex, head)) + r" \\",
        r"\midrule",
    ]
    for g in groups:
        cells = [_tex(c) for c in _row_cells(g, columns, "PMSIGN", _has_setting(groups))]
        lines.append(" & ".join(c.replace("PMSIGN", r"$\pm$") for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes_tex = [f"% {n}" for n in notes(groups, by)]
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


def as_json(
    groups: list[dict[str, Any]],
    columns: list[str],
    results: list[RunResult],
    by: list[str] | None = None,
) -> str:
    labels = {k: column_label(k) for k in columns}
    body = {
        "format": "d2r-report",
        "format_version": 1,
        "units": "fraction in [0, 1]",
        "columns": labels,
        "group_by": by,  # None: every key but the seed and non_result_keys
        "non_result_keys": sorted(NON_RESULT_KEYS),
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
    group_by: list[str] | None = None,
) -> dict[str, str]:
    """Tables for the runs under `paths` ({"md", "tex", "json"} texts), written to `out`/report.*
    when `out` is given; curves.png (and metrics.csv with `csv`) in each run directory.
    `group_by`: config keys (e.g. ["method.name"]) to group by instead of the whole config."""
    from d2r.logs import metrics_csv

    runs = find_runs(list(paths))
    results = [read_run(run, checkpoint) for run in runs]
    groups, columns = group(results, group_by), columns_of(results)  # refusals come first
    texts = {
        "md": markdown(groups, columns, group_by),
        "tex": latex(groups, columns, group_by),
        "json": as_json(groups, columns, results, group_by),
    }
    for run in runs:
        if curves and read_metrics(run, "epoch"):
            write_curves(run)
        if csv:
            metrics_csv(run)
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
        description="Table 1 style results (Clean, PGD-20, PGD-50, C&W, AA), one row per "
        "experiment (equal resolved configs except the seed), mean ± std over seeds, labelled "
        "by what tells rows apart, as Markdown (printed), and with --out "
        "also report.md, report.tex and report.json. Writes curves.png in each run directory.",
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run directories (or a folder of runs)"
    )
    p.add_argument("--out", help="directory for report.md / report.tex / report.json")
    p.add_argument(
        "--checkpoint",
        choices=["last", "best", "ema"],
        default="last",
        help="which eval.json entry to report when it holds several (default: last)",
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
    p.set_defaults(func=_command)


def parse_group_by(text: str | None) -> list[str] | None:
    """'method.name, data.name' -> ["method.name", "data.name"]; None stays None."""
    if text is None:
        return None
    keys = [k.strip() for k in text.split(",")]
    if not all(keys):
        raise ValueError(f"--group-by {text!r}: give comma-separated config keys, e.g. method.name")
    return keys


def _command(args: Any) -> int:
    texts = report(
        args.runs,
        args.out,
        checkpoint=args.checkpoint,
        curves=not args.no_curves,
        csv=args.csv,
        group_by=parse_group_by(args.group_by),
    )
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
