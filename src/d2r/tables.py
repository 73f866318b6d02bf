"""The one Markdown table writer, and the paper's Table 1 columns, shared by eval.md,
`d2r report` and the summary `d2r train` prints."""

from __future__ import annotations

from d2r.attacks import PAPER_ATTACKS

# The paper's Table 1 columns, in its order, by result key; other attacks follow them.
PAPER_COLUMNS = {"clean": "Clean", **PAPER_ATTACKS}


def markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table as lines: the header, the rule, one line per row."""
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]
