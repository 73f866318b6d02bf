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
a test subset), marked as such, when it was at that eps; a run with neither says "not
evaluated", or "—" where only another eps was evaluated.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from d2r.attacks import label as attack_label
from d2r.attacks import norm_label
from d2r.checkpoint import atomic_write_text, checkpoint_path, stored_sha256
from d2r.config import Config, format_eps, parse_number
from d2r.curves import write_curves
from d2r.evalstore import Store, summary
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
from d2r.tables import PAPER_COLUMNS, eps_cell, eps_head
from d2r.tables import markdown as markdown_lines

WORST = "worst_case"
EVAL_JSON = "eval.json"
EPOCH_CHECK = "per-epoch check"  # the source label of the metrics.jsonl fallback
NO_RESULT = "no result at this eps"
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
    source: str  # "eval.json", "per-epoch check", "no result at this eps" or "not evaluated"
    detail: str  # which checkpoint / attack / how many test images
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    not_recorded: list[str] = field(default_factory=list)
    norm: str = "Linf"  # eps's norm: eval.json's settings, or the per-epoch check's


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


def read_run(run_dir: str | Path, checkpoint: str = "last", eps: float | None = None) -> RunResult:
    """The run's identity from config.yaml (resolved; keys it lacks are NOT_RECORDED) and its
    numbers at `eps` (default: its training eps, method.eps) from eval.json (the `checkpoint`
    entry, of the file there now), else the last per-epoch check if it was at that eps."""
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
    wanted = eps if eps is not None else cfg.method.get("eps")
    found = _from_eval_json(run_dir, cfg, checkpoint, wanted) or _from_epoch_check(run_dir, cfg)
    if found["source"] == "not evaluated":
        elsewhere = (run_dir / EVAL_JSON).is_file()  # evaluated, at other eps only
    else:
        elsewhere = eps is not None and not _same(found["eps"], eps)
    if elsewhere:
        found = {"eps": wanted, "source": NO_RESULT, "detail": f"at eps {format_eps(wanted)}"}
    return RunResult(**base, **found)


def _same(a: float | None, b: float) -> bool:
    return a is not None and abs(a - b) <= 1e-9 * max(1.0, abs(b))


def _method_label(cfg: Config) -> str:
    # the guide architecture changes the result, so it is part of the method's name (a resolved
    # config has no guide for a method that trains none)
    name, guide = cfg.method["name"], cfg.guide
    return f"{name} (guide {guide['name']})" if guide else name


def _from_eval_json(
    run_dir: Path, cfg: Config, checkpoint: str, eps: float | None
) -> dict[str, Any] | None:
    """The stored results of `checkpoint` at `eps` and the training norm, with their worst
    case; only those of the checkpoint file there now, when there is one."""
    store = Store.read(run_dir)  # a file it cannot read is an error naming it
    if eps is None or not store.results:
        return None
    norm = norm_label(cfg.method.get("norm", "linf"))  # as results record it: Linf, L2
    sha256 = stored_sha256(checkpoint_path(run_dir, checkpoint))  # ema: last's file
    row = summary(store, checkpoint, eps, norm, sha256)
    if row is None:
        return None
    metrics = {k: float(row[k]) for k in [*row["worst_case_over"], WORST]}
    over = ", ".join(map(column_label, row["worst_case_over"]))
    detail = f"{checkpoint}, n={row['settings']['n']}, worst case of {over}"
    budget = {"eps": row["eps"], "norm": norm}
    return {**budget, "source": EVAL_JSON, "detail": detail, "metrics": metrics}


def _from_epoch_check(run_dir: Path, cfg: Config) -> dict[str, Any]:
    evaluated = [r for r in read_metrics(run_dir, "epoch") if "clean_acc" in r]
    if not evaluated:
        return {"eps": None, "source": "not evaluated", "detail": "no eval.json, no epoch check"}
    last, attack = evaluated[-1], cfg.eval.attack
    # the images actually evaluated, never eval.subset (it may exceed the test split)
    n = f"n={last['check_n']}" if "check_n" in last else "n not recorded"
    split = last.get("check_split", "test")  # older logs: the check read the test split
    weights = ", EMA weights" if last.get("check_model") == "ema" else ""
    detail = f"{attack} on {split}, epoch {last['epoch']}, {n}{weights}"
    metrics = {"clean": last["clean_acc"], attack: last["robust_acc"]}
    eps = last.get("check_eps", cfg.eval.eps)  # older logs: the config's eval.eps
    budget = {"eps": eps, "norm": last.get("check_norm", "Linf")}  # older logs: Linf only
    return {**budget, "source": EPOCH_CHECK, "detail": detail, "metrics": metrics}


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
    """Runs share a row when their experiment_key, eps, norm and source are equal: an
    eval.json number is never averaged with a per-epoch check, nor across eps or norms."""
    return (result.eps, result.norm, result.source, experiment_key(result.config, by))


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
        "norm": runs[0].norm,
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
    if g["source"] == NO_RESULT:
        return f"no result ({'; '.join(dict.fromkeys(g['details']))})"
    if g["source"] == EPOCH_CHECK:
        return f"{EPOCH_CHECK}† ({'; '.join(dict.fromkeys(g['details']))})"
    if g["source"] == EVAL_JSON:
        return f"eval.json ({'; '.join(dict.fromkeys(g['details']))})"
    return "not evaluated"


NOTES = [
    "Accuracies in % (mean ± sample std over seeds when there are several); eps is the radius "
    "in the norm its column or cell names; worst case = robust against every attack run, per "
    "sample.",
    "† no eval.json result at that eps: the last per-epoch check during training (one attack on "
    "the validation split, or on a test subset in runs without one), not the full evaluation; "
    "run `d2r eval RUN_DIR --attacks pgd20,pgd50,cw20,aa`.",
]


def eps_note(eps: float | None) -> str:
    """Which eps fills the columns (`d2r report --eps`)."""
    if eps is None:
        return (
            "Each run at its training eps (method.eps); worst case over the results at that "
            "eps only. `d2r report --eps X` shows another eps."
        )
    return (
        f"Every run at eps = {format_eps(eps)} (--eps); worst case over the results at that "
        "eps only; a run without a result there shows —."
    )


def notes(
    groups: list[dict[str, Any]], by: list[str] | None = None, eps: float | None = None
) -> list[str]:
    """The table's notes: which eps, how rows were formed, the † one only when a row carries
    the mark, and every run whose config.yaml does not record some keys."""
    marked = any(g["source"] == EPOCH_CHECK for g in groups)
    out = [NOTES[0], eps_note(eps), *(NOTES[1:] if marked else []), _grouping_note(groups, by)]
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


def _norms(groups: list[dict[str, Any]]) -> list[str]:
    return [g.get("norm", "Linf") for g in groups]


def markdown(
    groups: list[dict[str, Any]],
    columns: list[str],
    by: list[str] | None = None,
    eps: float | None = None,
) -> str:
    head = [*_head(groups, columns, eps_head(_norms(groups))), "Source"]
    setting = _has_setting(groups)
    rows = [_row_cells(g, columns, "±", setting, _norms(groups)) for g in groups]
    lines = markdown_lines(head, rows)
    runs = [f"- row {i}: {', '.join(g['runs'])}" for i, g in enumerate(groups, 1)]
    return "\n".join([*lines, "", *notes(groups, by, eps), "", "Runs:", *runs]) + "\n"


def _row_cells(
    g: dict[str, Any], columns: list[str], pm: str, setting: bool, norms: list[str]
) -> list[str]:
    seeds = ", ".join(map(str, g["seeds"]))
    if g["source"] == "not evaluated":
        values = ["not evaluated"] + ["—"] * (len(columns) - 1)
    elif g["source"] == NO_RESULT:
        values = ["—"] * len(columns)
    else:
        values = [_cell(g["metrics"].get(k), pm) for k in columns]
    names = [g["data"], g["model"], g["method"], *([g["label"] or "—"] if setting else [])]
    eps = eps_cell(g["eps_text"], g.get("norm", "Linf"), norms)
    return [*names, eps, seeds, *values, _source_text(g)]


def latex(
    groups: list[dict[str, Any]],
    columns: list[str],
    by: list[str] | None = None,
    eps: float | None = None,
) -> str:
    """A booktabs table (needs \\usepackage{booktabs})."""
    kinds = set(_norms(groups))
    eps_title = r"$\epsilon$" + (f" ({kinds.pop()})" if len(kinds) == 1 else "")
    head = [*_head(groups, columns, eps_title), "Source"]
    spec = "l" * (len(head) - len(columns) - 1) + "r" * len(columns) + "l"
    lines = [
        r"\begin{tabular}{" + spec + "}",
        r"\toprule",
        " & ".join(map(_tex, head)) + r" \\",
        r"\midrule",
    ]
    for g in groups:
        row = _row_cells(g, columns, "PMSIGN", _has_setting(groups), _norms(groups))
        cells = [_tex(c) for c in row]
        lines.append(" & ".join(c.replace("PMSIGN", r"$\pm$") for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes_tex = [f"% {n}" for n in notes(groups, by, eps)]
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
    eps: float | None = None,
) -> str:
    labels = {k: column_label(k) for k in columns}
    body = {
        "format": "d2r-report",
        "format_version": 1,
        "units": "fraction in [0, 1]",
        "columns": labels,
        "group_by": by,  # None: every key but the seed and non_result_keys
        "eps": eps,  # None: each run's training eps
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
    eps: float | None = None,
) -> dict[str, str]:
    """Tables for the runs under `paths` ({"md", "tex", "json"} texts), written to `out`/report.*
    when `out` is given; curves.png (and metrics.csv with `csv`) in each run directory.
    `group_by`: config keys (e.g. ["method.name"]) to group by instead of the whole config.
    `eps`: the eps whose results fill the columns (default: each run's training eps)."""
    from d2r.logs import metrics_csv

    runs = find_runs(list(paths))
    _check_writable(runs, out, curves, csv)
    results = [read_run(run, checkpoint, eps) for run in runs]
    groups, columns = group(results, group_by), columns_of(results)  # refusals come first
    texts = {
        "md": markdown(groups, columns, group_by, eps),
        "tex": latex(groups, columns, group_by, eps),
        "json": as_json(groups, columns, results, group_by, eps),
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


def _check_writable(runs: list[Path], out: str | Path | None, curves: bool, csv: bool) -> None:
    """Every place the report writes, before it reads any run: `out`, and each run directory
    it draws curves.png or metrics.csv in (a colleague's runs may be read-only)."""
    from d2r.files import check_writable

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
    from d2r import figures  # matplotlib is imported only when a figure is drawn

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


def _command(args: Any) -> int:
    if args.figure or args.index is not None:  # the paper's figures (d2r.figures)
        from d2r.figures import command

        return command(args)
    texts = report(
        args.runs,
        args.out,
        checkpoint=args.checkpoint,
        curves=not args.no_curves,
        csv=args.csv,
        group_by=parse_group_by(args.group_by),
        eps=parse_eps(args.eps),
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
