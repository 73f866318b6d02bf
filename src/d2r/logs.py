"""Training logs. `metrics.jsonl` is the source of truth (one JSON object per line, "kind":
"step" or "epoch"); this module reads it, exports it as CSV, and mirrors records to TensorBoard
when `train.tensorboard=true`."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from d2r.checkpoint import atomic_write_text

TENSORBOARD_HINT = 'pip install "d2r[tensorboard]"'
# Numbers of a record that are bookkeeping ("n": images of the per-epoch check); every other
# number is an accuracy ("*_acc") or one of the method's loss terms.
BOOKKEEPING = frozenset({"kind", "epoch", "step", "seconds", "lr", "skipped_batches", "n"})


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of `run_dir`/metrics.jsonl (only those of `kind` if given). A torn last line
    (a run killed mid-write) is skipped; any other bad line is an error naming it."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} not found; is {str(run_dir)!r} a d2r run directory?"
        )
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise ValueError(
                f"{str(path)!r} line {number} is not JSON; the log is corrupt"
            ) from None
    return [r for r in records if kind is None or r.get("kind") == kind]


def metrics_csv(run_dir: str | Path) -> Path:
    """Write `run_dir`/metrics.csv from metrics.jsonl: one row per record, the union of the
    keys as columns (first-seen order), empty where a record lacks a key."""
    records = read_metrics(run_dir)
    columns = list(dict.fromkeys(k for r in records for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    out = Path(run_dir) / "metrics.csv"
    atomic_write_text(out, buffer.getvalue())
    return out


def _summary_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module imports the `tensorboard` package itself
        raise ValueError(
            f"train.tensorboard=true needs the tensorboard package: {TENSORBOARD_HINT} "
            "(or set train.tensorboard=false)"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """Mirror of metrics.jsonl in RUN_DIR/tensorboard: step records under train/, epoch
    records under epoch/ (x axis: the epoch, as in the paper's Fig. 2). Built before the run
    starts, so a missing package fails at once; the writer opens on the first record."""

    def __init__(self) -> None:
        self.writer_class, self.writer = _summary_writer_class(), None

    def write(self, run_dir: str | Path, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        if kind not in ("step", "epoch"):
            return
        if self.writer is None:
            self.writer = self.writer_class(log_dir=str(Path(run_dir) / "tensorboard"))
        x = record["step"] if kind == "step" else record["epoch"]
        group = "train" if kind == "step" else "epoch"
        for key, value in record.items():
            if key not in ("kind", "epoch", "step") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{group}/{key}", value, x)
        if kind == "epoch":
            self.writer.flush()  # epochs are minutes apart: make them visible now

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
