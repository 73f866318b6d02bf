"""Training logs. `metrics.jsonl` is the source of truth (one JSON object per line, "kind":
"step" or "epoch"); this module reads it, exports it as CSV, and mirrors records to TensorBoard
when `train.tensorboard=true`."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from d2r.files import atomic_write_text

TENSORBOARD_HINT = 'pip install "d2r-robust[tensorboard]"'
# Keys of a record that are bookkeeping (the per-epoch check's images, split, weights, eps and
# norm); every other number is an accuracy ("*_acc") or one of the method's loss terms.
BOOKKEEPING = frozenset(
    {"kind", "epoch", "step", "seconds", "lr", "skipped_batches"}
    | {"check_n", "check_eps", "check_norm", "check_split", "check_model"}
)


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


OVERFIT_WARN_POINTS = 3.0  # `d2r train` warns when the last check is this far below the best


def robust_overfit(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Robust overfitting from the per-epoch checks (epoch records with "robust_acc"): the best
    (the first epoch reaching it: the one best.safetensors keeps) and the last robust accuracy
    (fractions), and `gap`, best minus last in percentage points; None without a check."""
    checked = [r for r in records if r.get("kind", "epoch") == "epoch" and "robust_acc" in r]
    if not checked:
        return None
    best = max(checked, key=lambda r: r["robust_acc"])  # max keeps the first of equals
    last = checked[-1]
    return {
        "best": best["robust_acc"],
        "best_epoch": best.get("epoch"),
        "last": last["robust_acc"],
        "last_epoch": last.get("epoch"),
        "gap": 100 * (best["robust_acc"] - last["robust_acc"]),
    }


def overfit_warning(records: list[dict[str, Any]]) -> str | None:
    """`d2r train`'s last line when the run's gap exceeds OVERFIT_WARN_POINTS, else None."""
    found = robust_overfit(records)
    if found is None or found["gap"] <= OVERFIT_WARN_POINTS:
        return None
    return (
        f"d2r: warning: robust overfitting: the per-epoch check's robust accuracy fell "
        f"{found['gap']:.2f} points, from {100 * found['best']:.2f}% at epoch "
        f"{found['best_epoch']} (kept as best.safetensors) to {100 * found['last']:.2f}% at "
        f"epoch {found['last_epoch']} (last.safetensors); `d2r eval RUN --checkpoint best`"
    )


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
        raise ImportError(
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


class MetricsLog:
    """RUN_DIR/metrics.jsonl, appended one record at a time (rank 0 only: `enabled`), mirrored
    to TensorBoard when asked. A resumed run cuts the file back to its size at the checkpoint:
    lines logged after it (a kill between log and checkpoint) would otherwise appear twice."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, enabled: bool = True) -> None:
        self.path, self.enabled = Path(run_dir) / "metrics.jsonl", enabled
        # a missing tensorboard package fails here, before any data or directory
        self.tensorboard = TensorBoardLog() if tensorboard else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise ValueError(
                f"could not append to {str(self.path)!r} ({err.strerror}); free disk "
                f"space, then: d2r train --resume {self.path.parent}"
            ) from None
        if self.tensorboard is not None:
            self.tensorboard.write(self.path.parent, record)

    def size(self) -> int:
        try:
            return os.path.getsize(self.path)
        except OSError:
            return 0

    def truncate(self, size: int) -> None:
        if self.path.is_file() and self.path.stat().st_size > size:
            with open(self.path, "r+b") as f:
                f.truncate(size)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
