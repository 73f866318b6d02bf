"""The report's formats: Markdown, LaTeX (booktabs) and JSON, and the notes under a table."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from d2r.config import format_eps
from d2r.experiments import (
    NON_RESULT_KEYS,
    NOT_RECORDED,
)
from d2r.report.compare import SIGNIFICANT
from d2r.report.read import EPOCH_CHECK, EVAL_JSON, NO_RESULT, RunResult, column_label
from d2r.tables import eps_cell, eps_head
from d2r.tables import markdown as markdown_lines


def _cell(stats: dict[str, Any] | None, pm: str, ci: bool = False) -> str:
    if stats is None:
        return "—"
    text = f"{100 * stats['mean']:.2f}"
    text += f" {pm} {100 * stats['std']:.2f}" if stats["n_seeds"] > 1 else ""
    if ci and stats.get("ci95"):
        low, high = stats["ci95"]
        text += f" [{100 * low:.2f}, {100 * high:.2f}]"
    return text


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


CI_NOTE = (
    "[low, high]: 95% interval on the mean, Student's t over the seeds (k - 1 degrees of "
    "freedom), or for one run Wilson's interval on its n test images, within [0, 100] "
    "(docs/studies.md)."
)


def markdown(
    groups: list[dict[str, Any]],
    columns: list[str],
    by: list[str] | None = None,
    eps: float | None = None,
    ci: bool = False,
    comparisons: list[dict[str, Any]] | None = None,
) -> str:
    head = [*_head(groups, columns, eps_head(_norms(groups))), "Source"]
    setting = _has_setting(groups)
    rows = [_row_cells(g, columns, "±", (setting, ci), _norms(groups)) for g in groups]
    lines = markdown_lines(head, rows)
    runs = [f"- row {i}: {', '.join(g['runs'])}" for i, g in enumerate(groups, 1)]
    table_notes = [*notes(groups, by, eps), *([CI_NOTE] if ci else [])]
    extra = [*overfit_lines(groups), *device_lines(groups), *comparison_lines(comparisons)]
    return "\n".join([*lines, "", *table_notes, "", "Runs:", *runs, *extra]) + "\n"


def overfit_lines(groups: list[dict[str, Any]]) -> list[str]:
    """Robust overfitting per row: the per-epoch check's best and last robust accuracy."""
    lines = []
    for i, g in enumerate(groups, 1):
        each = g.get("robust_overfitting") or []
        if each:
            runs = "; ".join(
                f"{100 * e['best']:.2f} (epoch {e['best_epoch']}) -> {100 * e['last']:.2f}"
                for e in each
            )
            lines.append(f"- row {i}: gap {g['overfit_gap']:.2f} points ({runs})")
    head = "Robust overfitting (per-epoch check, best - last robust accuracy in points, mean "
    return ["", head + "over seeds; each run's best -> last in %):", *lines] if lines else []


def device_lines(groups: list[dict[str, Any]]) -> list[str]:
    """Device-hours per row (training x its devices + evaluation) and the study's total."""
    lines = []
    for i, g in enumerate(groups, 1):
        d = g.get("device_hours") or {}
        if d:
            devices = ", ".join(d["devices"]) or "unknown device"
            lines.append(
                f"- row {i}: {d['device_hours']:.4g} device-hours on {devices} (training "
                f"{d['train_seconds']:.3g} s, evaluation {d['eval_seconds']:.3g} s)"
            )
    total = sum((g.get("device_hours") or {}).get("device_hours", 0.0) for g in groups)
    return ["", "Device-hours:", *lines, f"- total: {total:.4g} device-hours"] if lines else []


def _p_text(p: float | None) -> str:
    if p is None:
        return "—"
    return f"{p:.3g}" + (" *" if p < SIGNIFICANT else "")


def comparison_lines(comparisons: list[dict[str, Any]] | None) -> list[str]:
    """The --compare table: means, difference (points), Welch's p, McNemar per seed."""
    if not comparisons:
        return []
    first = comparisons[0]
    head = ["Attack", "eps", "A", "B", "A - B", "Welch p", "McNemar per seed (b, c, p)"]
    rows = [
        [
            column_label(c["attack"]),
            format_eps(c["eps"]) if c["eps"] is not None and c["attack"] != "clean" else "—",
            f"{100 * c['mean_a']:.2f}",
            f"{100 * c['mean_b']:.2f}",
            f"{100 * c['diff']:+.2f}",
            _p_text(c["welch_p"]),
            "; ".join(
                f"seed {m['seed']}: {m['b']}, {m['c']}, {_p_text(m['p'])}" for m in c["mcnemar"]
            )
            or "—",
        ]
        for c in comparisons
    ]
    title = f"Comparison: A = {first['a']}, B = {first['b']}"
    note = (
        "* p < 0.05. Welch: t-test over the seeds' figures; McNemar: exact test on one seed's "
        "per-image flags (b: images only A gets right, c: only B). See docs/studies.md."
    )
    return ["", title, "", *markdown_lines(head, rows), "", note]


def _row_cells(
    g: dict[str, Any], columns: list[str], pm: str, flags: tuple[bool, bool], norms: list[str]
) -> list[str]:
    setting, ci = flags
    seeds = ", ".join(map(str, g["seeds"]))
    if g["source"] == "not evaluated":
        values = ["not evaluated"] + ["—"] * (len(columns) - 1)
    elif g["source"] == NO_RESULT:
        values = ["—"] * len(columns)
    else:
        values = [_cell(g["metrics"].get(k), pm, ci) for k in columns]
    names = [g["data"], g["model"], g["method"], *([g["label"] or "—"] if setting else [])]
    eps = eps_cell(g["eps_text"], g.get("norm", "Linf"), norms)
    return [*names, eps, seeds, *values, _source_text(g)]


def latex(
    groups: list[dict[str, Any]],
    columns: list[str],
    by: list[str] | None = None,
    eps: float | None = None,
    ci: bool = False,
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
        row = _row_cells(g, columns, "PMSIGN", (_has_setting(groups), ci), _norms(groups))
        cells = [_tex(c) for c in row]
        lines.append(" & ".join(c.replace("PMSIGN", r"$\pm$") for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes_tex = [f"% {n}" for n in [*notes(groups, by, eps), *([CI_NOTE] if ci else [])]]
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
    comparisons: list[dict[str, Any]] | None = None,
) -> str:
    labels = {k: column_label(k) for k in columns}
    body = {
        "format": "d2r-report",
        "format_version": 2,  # 2: a metric's "n" is its images ("n_seeds" its seeds), ci95
        "units": "fraction in [0, 1]",
        "columns": labels,
        "group_by": by,  # None: every key but the seed and non_result_keys
        "eps": eps,  # None: each run's training eps
        "non_result_keys": sorted(NON_RESULT_KEYS),
        "groups": groups,
        "runs": [asdict(r) for r in results],
        "device_hours": sum(g["device_hours"]["device_hours"] for g in groups),
        **({"comparisons": comparisons} if comparisons is not None else {}),
    }
    return json.dumps(body, indent=2, ensure_ascii=False) + "\n"
