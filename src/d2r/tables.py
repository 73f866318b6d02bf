"""The one Markdown table writer, the paper's Table 1 columns and the eps column (with its
norm), shared by eval.md, `d2r report` and the summary `d2r train` prints."""

from __future__ import annotations

from d2r.attacks import PAPER_ATTACKS
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
