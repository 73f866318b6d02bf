"""The local executor: cells one after another, or one per visible GPU in parallel."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
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
    stops them at once), as `d2r train` does alone. The cells die with the sweep: however it
    ends, what still runs is stopped, and a cell whose sweep was killed (SIGKILL: no handler
    runs) notices it (`watch_parent`) and stops itself."""

    def __init__(self, devices: list[str | None], progress: bool = True) -> None:
        self.devices, self.progress = devices, progress  # progress: a line as a cell starts, ends
        self.procs: set[subprocess.Popen] = set()
        self.signum: int | None = None

    def spawn(self, args: list[str], log: Path, device: str | None) -> int:
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
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

    def stop_all(self) -> None:
        """SIGTERM to each running cell's process group, unless the sweep's signal reached it
        already (a second one would stop it before its checkpoint)."""
        if self.signum is not None or not self.procs:
            return
        self.signum = signal.SIGTERM
        for proc in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)

    def run(self, out: Path, todo: list[Cell], save: Callable[[], None]) -> None:
        free = list(self.devices)
        with self.forwarding(), ThreadPoolExecutor(len(free)) as pool:
            try:
                self._run(out, todo, save, pool, free)
            finally:  # an error here, a second Ctrl-C: no cell trains on without its sweep
                self.stop_all()

    def _run(self, out: Path, todo: list[Cell], save: Callable[[], None], pool, free) -> None:
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


PARENT_ENV = "D2R_SWEEP_PID"  # set for a cell's process: the sweep's pid


def watch_parent() -> None:
    """In a cell's process (`python -m d2r` with D2R_SWEEP_PID set): once the sweep that
    started it is gone (its parent changed: killed, even by SIGKILL), SIGTERM to itself, so it
    checkpoints and exits as a stopped cell does, instead of training on alone into a directory
    the rerun would give a second trainer."""
    pid = os.environ.pop(PARENT_ENV, None)
    if not pid or not pid.isdigit():
        return

    def watch() -> None:
        while os.getppid() == int(pid):
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="d2r-watch-sweep").start()
