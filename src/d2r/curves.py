"""Each run's curves.png, the paper's Fig. 2 for one run: target clean and robust accuracy and
guide clean accuracy per epoch (left), the method's loss terms per epoch (right), from the epoch
records of metrics.jsonl. Drawn on matplotlib's Agg canvas directly, never through pyplot, so a
notebook's backend is left alone."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from d2r.attacks import label as attack_label
from d2r.config import format_eps, load_yaml
from d2r.files import atomic_write
from d2r.logs import BOOKKEEPING, read_metrics

# Curves (the paper's Fig. 2) ------------------------------------------------------------------

ACC_CURVES = (
    ("clean_acc", "target clean"),
    ("robust_acc", "target robust"),
    ("guide_clean_acc", "guide clean"),
)
# bookkeeping in epoch records; every other number is one of the method's loss terms
_NOT_TERMS = {*BOOKKEEPING, *(k for k, _ in ACC_CURVES)}


def write_curves(run_dir: str | Path) -> Path:
    """Plot `run_dir`/curves.png from metrics.jsonl's epoch records: accuracies (left) and the
    method's loss terms (right) per epoch."""
    out = Path(run_dir) / "curves.png"
    atomic_write(out, curves_png(run_dir))
    return out


def curves_png(run_dir: str | Path, dpi: int = 120) -> bytes:
    """curves.png's bytes (the report's HTML page inlines them); ValueError without epochs."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir, "epoch")
    if not records:
        raise ValueError(
            f"{str(run_dir)!r} has no epoch records in metrics.jsonl yet; "
            "curves need at least one finished epoch"
        )
    cfg = load_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
    fig = _figure(records, cfg)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _figure(records: list[dict[str, Any]], cfg: dict[str, Any]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas: no pyplot, no global backend
    acc, loss = fig.subplots(1, 2)
    epochs = [r["epoch"] for r in records]
    _plot_accuracy(acc, records, epochs, cfg.get("eval", {}))
    _plot_losses(loss, records, epochs)
    for ax in (acc, loss):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    method = (cfg.get("method") or {}).get("name", "?")
    fig.suptitle(
        f"{method} on {cfg.get('data', {}).get('name', '?')}, target "
        f"{(cfg.get('target') or {}).get('name', '?')}, seed {cfg.get('seed', '?')}"
    )
    return fig


def _plot_accuracy(ax, records, epochs, ev: dict[str, Any]) -> None:
    attack = f"{attack_label(ev.get('attack', 'attack'))}, {_check_budget(records, ev)}"
    for key, label in ACC_CURVES:
        points = [(e, 100 * r[key]) for e, r in zip(epochs, records, strict=True) if key in r]
        if points:
            label = f"{label} ({attack})" if key == "robust_acc" else label
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    n = next((r["check_n"] for r in reversed(records) if "check_n" in r), None)  # older: none
    split = {"val": "validation"}.get(records[-1].get("check_split", "test"), "test")
    ax.set_ylabel(f"accuracy on {n} {split} images (%)" if n else "accuracy on the test subset (%)")
    ax.set_title("accuracy per epoch")
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no evaluation recorded", ha="center", transform=ax.transAxes)


def _check_budget(records: list[dict[str, Any]], ev: dict[str, Any]) -> str:
    """ "eps 0.1 (Linf)": the per-epoch check's radius and norm as its records say (older
    records: the config's eval.eps, and Linf, the only norm then)."""
    last = next((r for r in reversed(records) if "check_eps" in r), {})
    eps = last.get("check_eps", ev.get("eps"))
    return f"eps {format_eps(eps)} ({last.get('check_norm', 'Linf')})"


def _plot_losses(ax, records, epochs) -> None:
    terms = dict.fromkeys(
        k
        for r in records
        for k, v in r.items()
        if k not in _NOT_TERMS and isinstance(v, (int, float))
    )
    for key in terms:
        points = [(e, r[key]) for e, r in zip(epochs, records, strict=True) if key in r]
        style = {"linewidth": 2.5, "color": "black"} if key == "loss" else {}
        ax.plot(*zip(*points, strict=True), marker="o", label=key, **style)
    values = [r[k] for r in records for k in terms if isinstance(r.get(k), (int, float))]
    if values and min(values) > 0:  # the KL terms are orders of magnitude below CE and MSE
        ax.set_yscale("log")
    ax.set_ylabel("mean over the epoch's batches")
    ax.set_title("loss and its terms (before weighting) per epoch")
    if terms:
        ax.legend()
