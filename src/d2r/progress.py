"""What a user sees while training: a live tqdm bar per epoch on a terminal (ETA, images/s, the
loss terms, the last clean/robust accuracy), one plain line every `train.log_every` steps when
the output is not a terminal (log files, CI, notebooks), nothing when quiet.

The trainer calls `epoch(loader, epoch)` to wrap its loader, `log(means)` when it has synced
the running means anyway (every `log_every` steps), and `end_epoch(record)` after evaluation.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TextIO

from tqdm import tqdm

from d2r.logs import BOOKKEEPING

Mode = Literal["auto", "bar", "lines", "off"]
_ACC_KEYS = (("clean_acc", "clean"), ("robust_acc", "robust"), ("guide_clean_acc", "guide"))


def resolve_mode(mode: Mode, stream: TextIO) -> str:
    """'auto' is a bar on a terminal and plain lines otherwise (a redirected bar is a mess of
    carriage returns)."""
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def _fmt_terms(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in values.items())


def _fmt_acc(record: dict[str, Any]) -> str:
    parts = [f"{label}={100 * record[k]:.1f}%" for k, label in _ACC_KEYS if k in record]
    return " ".join(parts)


def _fmt_seconds(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Feedback for a whole run; `mode` is 'auto', 'bar', 'lines' or 'off'."""

    def __init__(self, epochs: int, mode: Mode = "auto", stream: TextIO | None = None):
        self.epochs, self.stream = epochs, stream or sys.stderr
        self.mode = resolve_mode(mode, self.stream)
        self.last_eval: dict[str, Any] = {}  # accuracies of the last evaluated epoch

    def epoch(self, loader: Iterable, epoch: int) -> EpochProgress:
        """Wrap `loader` for 0-based `epoch`."""
        return EpochProgress(self, loader, epoch)

    def end_epoch(self, record: dict[str, Any]) -> None:
        """One summary line per epoch (the bar is transient), and remember its accuracies."""
        if "clean_acc" in record:
            self.last_eval = {k: record[k] for k, _ in _ACC_KEYS if k in record}
        if self.mode == "off":
            return
        terms = {k: v for k, v in record.items() if k in _loss_keys(record)}
        line = (
            f"epoch {record['epoch']}/{self.epochs} done in {record.get('seconds', 0):.1f}s  "
            f"{_fmt_terms(terms)}  {_fmt_acc(record)}"
        ).rstrip()
        self.write(line)

    def write(self, line: str) -> None:
        if self.mode == "bar":
            tqdm.write(line, file=self.stream)  # above the live bar, not through it
        elif self.mode == "lines":
            print(line, file=self.stream, flush=True)


def _loss_keys(record: dict[str, Any]) -> list[str]:
    """The method's terms in an epoch record: everything that is not bookkeeping or accuracy."""
    skip = {*BOOKKEEPING, *(k for k, _ in _ACC_KEYS)}
    return [k for k, v in record.items() if k not in skip and isinstance(v, (int, float))]


class EpochProgress:
    """Iterates the loader, counting images (a shape read, no host sync)."""

    def __init__(self, parent: Progress, loader: Iterable, epoch: int):
        self.parent, self.loader, self.epoch = parent, loader, epoch
        self.images, self.start = 0, time.perf_counter()
        # DeviceLoader keeps the whole split as `.x`: the epoch's image count, for ETA
        self.total = len(loader.x) if hasattr(loader, "x") else None
        self.bar = None
        if parent.mode == "bar":
            self.bar = tqdm(
                total=self.total,
                desc=f"epoch {epoch + 1}/{parent.epochs}",
                unit="img",
                unit_scale=True,
                leave=False,
                file=parent.stream,
                dynamic_ncols=True,
            )

    def __iter__(self) -> Iterator:
        try:
            for batch in self.loader:
                n = len(batch[0])
                self.images += n  # before the step, so log() inside the step counts its batch
                yield batch
                if self.bar is not None:
                    self.bar.update(n)
        finally:
            if self.bar is not None:
                self.bar.close()

    def log(self, step: int, means: dict[str, float]) -> None:
        """Running means of the loss terms at `step` (already on the host)."""
        if self.parent.mode == "bar":
            post = {k: f"{v:.3g}" for k, v in means.items()}
            post.update(
                {
                    label: f"{100 * self.parent.last_eval[k]:.1f}%"
                    for k, label in _ACC_KEYS
                    if k in self.parent.last_eval
                }
            )
            self.bar.set_postfix(post, refresh=False)
        elif self.parent.mode == "lines":
            self.parent.write(self._line(step, means))

    def _line(self, step: int, means: dict[str, float]) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.images / elapsed if elapsed > 0 else 0.0
        where = f"{self.images}"
        eta = ""
        if self.total:
            where += f"/{self.total} img ({100 * self.images / self.total:.0f}%)"
            if rate > 0:
                eta = f"  eta {_fmt_seconds((self.total - self.images) / rate)}"
        last = _fmt_acc(self.parent.last_eval)
        last = f"  last {last}" if last else ""
        return (
            f"epoch {self.epoch + 1}/{self.parent.epochs} step {step}  {where}  "
            f"{rate:.0f} img/s{eta}  {_fmt_terms(means)}{last}"
        )
