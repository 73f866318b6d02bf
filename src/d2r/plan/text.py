"""`d2r plan`'s text: a table a person reads at a glance, and the notes that qualify it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from d2r.tables import markdown

HEAD = ["run", "runs", "images x epochs", "steps/epoch", "GFLOP/image-step", "PFLOP/epoch",
        "eval PFLOP", "limit s/epoch", "limit h", "expected h"]  # fmt: skip


def text(result: dict[str, Any]) -> str:
    """A short table a person reads at a glance (cells of equal cost, a study's seeds, on one
    row: hours per run), and the notes that qualify it."""
    rows = result.get("cells") or [{"name": Path(result["config"]).stem, **result}]
    table = _grouped([_row(p) for p in rows])
    if "total" in result:
        t = result["total"]
        hours = [_num(t["limit_hours_total"], 1), _num(t["expected_hours_total"], 1)]
        ev = _num(t["eval_flops_total"] / 1e15, 1)
        table.append(["total", str(t["runs"]), *[""] * 4, ev, "", *hours])
    mfu = result["mfu"]
    lines = [
        f"{result.get('study') or result['config']} on {result['device']}: "
        f"{result['peak_flops'] / 1e12:.0f} TFLOP/s dense bf16 ({result['peak_source']})",
        f"FLOPs: {result['count']}; limit = FLOPs / peak, per run (per-epoch checks and the "
        "evaluation included in limit h, not in limit s/epoch)",
        "",
        *markdown(HEAD, table),
        "",
        f"expected h = limit h / MFU {mfu['value']:.3f} ({mfu['source']})"
        if mfu
        else f"expected h: {result['mfu_missing']}",
    ]
    lines += _uncounted_lines(rows)
    return "\n".join(lines) + "\n"


def _grouped(table: list[list[str]]) -> list[list[str]]:
    """Rows equal but for their name on one row: the first name and how many runs."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, _, *rest in table:
        groups.setdefault(tuple(rest), []).append(name)
    return [[names[0], str(len(names)), *rest] for rest, names in groups.items()]


def _row(p: dict[str, Any]) -> list[str]:
    ev = p["eval"]["flops_total"] / 1e15 if p["eval"] else None
    return [
        p["name"],
        "1",
        f"{p['train_images']:,} x {p['epochs']}",
        str(p["steps_per_epoch"]),
        _num(p["train_flops_per_image_step"] / 1e9, 1),
        _num(p["train_flops_per_epoch"] / 1e15, 2),
        _num(ev, 1),
        _num(p["limit_seconds_per_epoch"], 1),
        _num(p["limit_hours_total"], 1),
        _num(p["expected_hours_total"], 1),
    ]


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _uncounted_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for p in rows:
        if p["uncounted_ops"]:
            ops = ", ".join(f"{op} ({n} calls)" for op, n in sorted(p["uncounted_ops"].items()))
            lines.append(f"{p['name']}: not counted (no FLOP formula), the rest is: {ops}")
    if any(
        p["eval"] and any(a["upper_bound"] for a in p["eval"]["attacks"].values()) for p in rows
    ):
        lines.append(
            "AutoAttack: an upper bound (every image through every attack at its full "
            "iteration counts; the package attacks only what is still robust)"
        )
    return lines
