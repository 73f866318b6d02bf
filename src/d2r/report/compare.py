"""Comparing two rows of a report (`d2r report RUNS --compare A --against B`): per attack at
the rows' eps, both means, their difference, Welch's t-test over the seeds and, for every seed
both rows evaluated on the same test images, the exact McNemar test on the per-image flags
(d2r.stats)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from d2r.report.read import run_flags
from d2r.stats import discordant, mcnemar_p, welch_p

SIGNIFICANT = 0.05  # the Markdown table marks p-values below it


@dataclass(frozen=True)
class StudyOptions:
    """What `d2r report` adds to the table: `ci` prints the 95% intervals in Markdown and LaTeX
    (JSON always holds them); `compare` = (A, B), two rows named by their label as the table
    prints it (Method, or "Method (Setting)") or by KEY=VALUE selectors ("method.name=trades",
    comma-separated, all must hold); `html` adds the study page (texts["html"], d2r.report.html)
    with Fig. 3 for test image `index` when given."""

    ci: bool = False
    compare: tuple[str, str] | None = None
    html: bool = False
    index: int | None = None


def row_name(g: dict[str, Any]) -> str:
    """A row as the report names it: its Method, with its Setting in brackets if it has one."""
    return f"{g['method']} ({g['label']})" if g["label"] else g["method"]


def select(groups: list[dict[str, Any]], text: str, flag: str) -> dict[str, Any]:
    """The one row `text` names (row_name, Method, Setting, or KEY=VALUE,...); ValueError
    naming the rows otherwise."""
    found = [g for g in groups if text in (row_name(g), g["method"], g["label"])]
    if not found and "=" in text:
        found = [g for g in groups if _matches(g["config"], text)]
    if len(found) == 1:
        return found[0]
    names = "; ".join(f"{row_name(g)} (row {i})" for i, g in enumerate(groups, 1))
    what = "no row" if not found else f"{len(found)} rows"
    raise ValueError(
        f"{flag} {text!r} names {what}; give a row's label as the table prints it or "
        f"KEY=VALUE selectors (e.g. method.name=trades,seed...): rows are {names}"
    )


def _matches(config: dict[str, Any], text: str) -> bool:
    """Every KEY=VALUE of `text` holds in the row's common config (KEY: a dotted key, or its
    last parts, e.g. attack for method.attack)."""
    for item in text.split(","):
        key, _, value = (part.strip() for part in item.partition("="))
        keys = [k for k in config if k == key or k.endswith("." + key)]
        wanted = yaml.safe_load(value) if value else None
        if not keys or not any(config[k] == wanted or str(config[k]) == value for k in keys):
            return False
    return True


def compare(
    groups: list[dict[str, Any]], pair: tuple[str, str], checkpoint: str, eps: float | None
) -> list[dict[str, Any]]:
    """One comparison per attack (and the worst case) both rows hold; ValueError if the
    rows are one row or at two eps (give --eps)."""
    a, b = select(groups, pair[0], "--compare"), select(groups, pair[1], "--against")
    if a is b:
        raise ValueError(f"--compare {pair[0]!r} and --against {pair[1]!r} name the same row")
    if a["eps"] != b["eps"] or a["norm"] != b["norm"]:
        raise ValueError(
            f"{row_name(a)} is at eps {a['eps_text']} and {row_name(b)} at {b['eps_text']}: "
            "compare them at one eps with --eps"
        )
    flags = {id(g): _flags(g, checkpoint, eps) for g in (a, b)}
    out = []
    for key in [k for k in a["metrics"] if k in b["metrics"]]:
        ma, mb = a["metrics"][key], b["metrics"][key]
        out.append(
            {
                "a": row_name(a),
                "b": row_name(b),
                "attack": key,
                "eps": a["eps"],
                "mean_a": ma["mean"],
                "mean_b": mb["mean"],
                "diff": ma["mean"] - mb["mean"],
                "welch_p": welch_p(ma["values"], mb["values"]),
                "mcnemar": _mcnemar(flags[id(a)], flags[id(b)], key),
            }
        )
    return out


def _flags(g: dict[str, Any], checkpoint: str, eps: float | None) -> dict[Any, tuple]:
    """Seed -> (test images' sha256, flags by attack) for the row's eval.json runs."""
    if g["source"] != "eval.json":
        return {}
    pairs = zip(g["seeds"], g["runs"], strict=True)
    found = {seed: run_flags(run, checkpoint, eps) for seed, run in pairs}
    return {seed: value for seed, value in found.items() if value is not None}


def _mcnemar(a: dict[Any, tuple], b: dict[Any, tuple], key: str) -> list[dict[str, Any]]:
    out = []
    for seed in [s for s in a if s in b]:
        (images_a, flags_a), (images_b, flags_b) = a[seed], b[seed]
        if images_a != images_b or key not in flags_a or key not in flags_b:
            continue  # other test images: no paired test
        only_a, only_b = discordant(flags_a[key].tolist(), flags_b[key].tolist())
        out.append({"seed": seed, "b": only_a, "c": only_b, "p": mcnemar_p(only_a, only_b)})
    return out
