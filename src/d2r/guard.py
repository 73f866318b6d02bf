"""How a training step is guarded and how a run stops: a non-finite loss (skip the batch or stop,
`train.nonfinite`) and a signal (SIGINT/SIGTERM: finish the step, checkpoint, exit 130/143),
decided by every rank together and read by the host without stalling the device.

The trainer owns the step; these are the objects it asks."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import Tensor

from d2r import distributed


class NonFiniteLossError(ValueError):
    """The loss became NaN/inf (train.nonfinite=stop); the weights were not updated by it."""


class Preempted(Exception):
    """SIGINT/SIGTERM: the current step finished and a checkpoint was written. Not a ValueError:
    the CLI exits with 128 + the signal number (130 / 143), the shell's convention, so a job
    scheduler sees the run as unfinished and can requeue it."""

    def __init__(self, signum: int, run_dir: Path, step: int) -> None:
        self.signum, self.run_dir, self.step = signum, run_dir, step
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} after step {step}; checkpoint {run_dir / 'last.safetensors'} "
            f"is complete; continue with: d2r train --resume {run_dir}"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class DeviceFlags:
    """Flags computed on the device and read by the host without draining the device's queue:
    the copy to pinned host memory is queued right after the flags, and `values` waits for that
    copy only, not for the backward pass and update queued after it. On a CPU, a plain read."""

    def __init__(self, flags: Tensor) -> None:
        self.tensor = flags
        self._values: list[float] | None = None
        self._event = None
        if flags.is_cuda:
            self._host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._host.copy_(flags, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = flags

    def values(self) -> list[float]:
        if self._values is None:
            if self._event is not None:
                self._event.synchronize()
            self._values = self._host.tolist()
        return self._values


# Signals --------------------------------------------------------------------------------------
class SignalGuard:
    """While active, the first SIGINT/SIGTERM only sets `signum` (the loop finishes its step,
    checkpoints and raises Preempted); a second one raises KeyboardInterrupt at once - safe
    because every file is written by atomic rename. Only the main thread can own handlers."""

    # SIGUSR1: Slurm's warning before a time limit or preemption (sbatch --signal=USR1@120)
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, action: str = "finishing the step and writing a checkpoint") -> None:
        self.signum: int | None = None
        self.action = action  # what the loop does before it stops, for the notice
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nd2r: {signal.Signals(signum).name} received; {self.action} (send it again to "
            "stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# The step's guard -------------------------------------------------------------------------------
class StepGuard:
    """What guards every training step: a non-finite loss (train.nonfinite: skip the batch or
    stop) and a signal (stop after this step). Both travel as one device tensor, maxed over
    ranks: every rank must skip the same batch and stop after the same step, or the others hang
    in the next collective (torchrun passes a SIGTERM to each worker, which may see it a step
    apart). `flags` syncs nothing (the signal enters as a fill value, the all-reduce is queued);
    `finite` is the step's one host read."""

    def __init__(self, device: torch.device, nonfinite: str) -> None:
        self.device, self.nonfinite = device, nonfinite
        self.signals = SignalGuard()
        self.stop_signum: int | None = None  # a signal every rank knows of

    def flags(self, loss: Tensor | None) -> DeviceFlags:
        """[loss non-finite on any rank, a signal number on any rank] (no loss: 0 for the
        first, to share a signal only)."""
        if loss is None:
            bad = torch.zeros((), device=self.device)
        else:
            bad = (~torch.isfinite(loss.detach())).float()
        flags = torch.stack([bad, bad.new_full((), float(self.signals.signum or 0))])
        return DeviceFlags(distributed.all_max(flags))

    def finite(self, flags: DeviceFlags) -> bool:
        """Read the flags: note a signal, say whether the loss was finite on every rank."""
        bad, signum = flags.values()
        if signum and self.stop_signum is None:
            self.stop_signum = int(signum)
        return bad == 0

    def accept(
        self,
        flags: DeviceFlags,
        out: dict[str, Tensor],
        epoch: int,
        step: int,
        last: Callable[[], str],
    ) -> bool:
        """Accept the step's update: True if the loss was finite; else warn (skip) or raise naming
        the step,
        the loss terms and last(), the last good checkpoint (stop). Every step is checked, not
        only log points: one NaN update reaches every weight and momentum buffer at once."""
        if self.finite(flags):
            return True
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in out.items())
        where = f"epoch {epoch + 1} step {step + 1}"
        if self.nonfinite == "skip":
            print(
                f"d2r: warning: non-finite loss at {where} ({terms}); batch skipped",
                file=sys.stderr,
            )
            return False
        raise NonFiniteLossError(
            f"non-finite loss at {where} ({terms}); the weights were not updated with it; last "
            f"good checkpoint: {last()}; lower train.lr, check the data, or set "
            "train.nonfinite=skip to skip such batches"
        )

    def stop_if_signalled(self, run_dir: Path, step: int) -> None:
        if self.stop_signum is not None:
            raise Preempted(self.stop_signum, run_dir, step)


StepChecks = StepGuard  # its name before "check" came to mean validation only
