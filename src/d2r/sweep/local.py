"""The local executor: cells one after another, or one per visible GPU in parallel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from d2r.sweep.cell import Cell, Stopped, python_command, run_cell


class Local:
    """Cells one after another, or one per visible GPU in parallel (CUDA_VISIBLE_DEVICES per
    process). Each process has its own session, so a signal reaches it once, forwarded from
    here: the first SIGINT/SIGTERM makes the running cells checkpoint and exit (a second one
    stops them at once), as `d2r train` does alone."""

    def __init__(self, devices: list[str | None], progress: bool = True) -> None:
        self.devices, self.progress = devices, progress  # progress: a line as a cell starts, ends
        self.procs: set[subprocess.Popen] = set()
        self.signum: int | None = None

    def spawn(self, args: list[str], log: Path, device: str | None) -> int:
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        with open(log, "a") as f:
            proc = subprocess.Popen(
                python_command(args),
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            self.procs.add(proc)
            try:
                return proc.wait()
            finally:
                self.procs.discard(proc)

    def _forward(self, signum: int, frame: Any) -> None:
        self.signum = self.signum or signum
        print(
            f"\nd2r sweep: {signal.Signals(signum).name}: stopping the running cells",
            file=sys.stderr,
        )
        for proc in list(self.procs):
            proc.send_signal(signum)

    def stopped(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    @contextmanager
    def forwarding(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread can own handlers (the caller's stay in force)
            return
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def run(self, out: Path, todo: list[Cell], save: Callable[[], None]) -> None:
        free = list(self.devices)
        with self.forwarding(), ThreadPoolExecutor(len(free)) as pool:
            running: dict[Any, str | None] = {}
            queue = list(todo)
            while queue or running:
                while queue and free and self.signum is None:
                    cell, device = queue.pop(0), free.pop(0)
                    cell.state, cell.extra["device"] = "running", device
                    save()
                    running[pool.submit(self._one, out, cell, device)] = device
                done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in done:
                    free.append(running.pop(fut))
                    fut.result()  # Stopped propagates once the others have been waited for
                    save()
                if self.signum is not None and not running:
                    break

    def _one(self, out: Path, cell: Cell, device: str | None) -> None:
        say = print if self.progress else lambda *_: None
        say(f"d2r sweep: {cell.name}: running" + (f" on GPU {device}" if device else ""))
        try:
            cell.state = run_cell(
                out, cell, lambda a, log: self.spawn(a, log, device), self.stopped
            )
        except Stopped:
            cell.state = "interrupted"
            raise
        say(f"d2r sweep: {cell.name}: {cell.state}" + (f" ({cell.error})" if cell.error else ""))


def visible_gpus() -> list[str | None]:
    """One slot per visible GPU (CUDA_VISIBLE_DEVICES' entries, else 0..N-1); [None] without."""
    import torch

    if not torch.cuda.is_available():
        return [None]
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in listed.split(",") if d.strip()] if listed else []
    return ids or [str(i) for i in range(torch.cuda.device_count())]
