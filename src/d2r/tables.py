"""The one Markdown table writer, the paper's Table 1 columns and the eps column (with its
norm), shared by eval.md, `d2r report` and the summary `d2r train` prints; `markdown_table`
is eval.md's table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from d2r.attacks import PAPER_ATTACKS
from d2r.attacks import label as attack_label
from d2r.config import format_eps
from d2r.registry import View

# The paper's Table 1 columns, in its order, by result key; other attacks follow them. A view of
# the attack registry (attacks.EVAL_ATTACKS): an attack registered with a column has it here.
PAPER_COLUMNS = View(lambda: {"clean": "Clean", **PAPER_ATTACKS})


def markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table as lines: the header, the rule, one line per row."""
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def eps_head(norms: list[str]) -> str:
    """The eps column's heading: "eps (Linf)" when every row has that norm, else "eps" and
    each cell names its norm (`eps_cell`)."""
    kinds = set(norms) or {"Linf"}
    return f"eps ({kinds.pop()})" if len(kinds) == 1 else "eps"


def eps_cell(text: str, norm: str, norms: list[str]) -> str:
    return text if len(set(norms)) == 1 else f"{text} ({norm})"


def markdown_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per checkpoint (or model) at one eps and norm: the paper's columns (— where not
    run), any other attack, the worst case and which results it covers, n / eps / seed beside
    the numbers; every attack's settings and every warning below."""
    run = [k for r in results.values() for k in r["settings"]["attacks"]]
    extra = [k for k in run if k not in PAPER_COLUMNS]
    names = [*PAPER_COLUMNS, *dict.fromkeys(extra), "worst_case"]
    labels = [PAPER_COLUMNS.get(k) or attack_label(k) for k in names[:-1]]
    norms = "/".join(dict.fromkeys(str(r["settings"]["norm"]) for r in results.values()))
    head = ["checkpoint", "n", f"eps ({norms})", "seed", *labels, "Worst case", "worst case over"]
    rows = []
    for row, r in results.items():
        s = r["settings"]
        cells = [f"{100 * r[k]:.2f}" if k in r else "—" for k in names]
        over = ", ".join(PAPER_COLUMNS.get(k) or attack_label(k) for k in r["worst_case_over"])
        rows.append([row, str(s["n"]), s["eps_text"], str(s["seed"]), *cells, over])
    lines = markdown(head, rows)
    lines += [
        "",
        "Accuracies in %; worst case = robust against every result it covers (per sample).",
    ]
    described = [
        f"- {attack_label(k)}: {_describe(a)}"
        for r in results.values()
        for k, a in r["settings"]["attacks"].items()
    ]
    lines += ["", *dict.fromkeys(described)]
    warned = [f"- **warning** ({row}): {w}" for row, r in results.items() for w in r["warnings"]]
    return "\n".join(lines + (["", *warned] if warned else [])) + "\n"


def _describe(settings: Mapping[str, Any]) -> str:
    skip = {"type"}
    body = ", ".join(f"{k}={_fmt(v)}" for k, v in settings.items() if k not in skip)
    return f"{settings.get('type', '')}({body})"


def _fmt(value: Any) -> str:
    return format_eps(value) if isinstance(value, float) else str(value)
