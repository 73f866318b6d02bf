"""What a run needs to survive interruptions: the complete training state as tensors + JSON
(optimizer by parameter name, every RNG), the resume-config check, the metrics log trimmed to
the checkpoint, signal handling for preemption, and the step's checks (a non-finite loss, a
signal) that every rank decides together.

The trainer calls these; nothing here knows about adversarial examples."""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from d2r import distributed
from d2r.speed import DeviceFlags

STATE = "state"  # tensor-key prefix of the training state in a run checkpoint (beside target/guide)


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


# RNG ------------------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every generator a step may draw from: torch CPU and CUDA, numpy, Python `random`.
    (The data pipeline's own generator is saved with the loader state.)"""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(internal, dtype=torch.int64)  # 625 words < 2**32
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [version, gauss_next],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state(
        (kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    version, gauss_next = meta["python"]
    random.setstate((version, tuple(tensors["rng.python"].tolist()), gauss_next))


# Optimizer ------------------------------------------------------------------------------------
def optimizer_state(
    optimizer: torch.optim.Optimizer, models: dict[str, nn.Module]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Per-parameter state keyed `optim.<model>.<parameter name>.<slot>` (e.g. momentum_buffer),
    not by position, so a reordered model fails loudly instead of loading the wrong buffers;
    group hyper-parameters (lr, momentum, ...) as JSON."""
    tensors, scalars = {}, {}
    for name, model in models.items():
        for pname, param in model.named_parameters():
            for slot, value in optimizer.state.get(param, {}).items():
                key = f"optim.{name}.{pname}.{slot}"
                if isinstance(value, Tensor):
                    tensors[key] = value
                else:
                    scalars[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"groups": groups, "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    models: dict[str, nn.Module],
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    source: str,
) -> None:
    if len(meta["groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"{source}: optimizer has {len(meta['groups'])} parameter groups in the "
            f"file, {len(optimizer.param_groups)} here; resume with the same models"
        )
    for group, saved in zip(optimizer.param_groups, meta["groups"], strict=True):
        group.update(saved)
    params = {
        f"optim.{n}.{p}": param for n, m in models.items() for p, param in m.named_parameters()
    }
    slots = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    for key, value in {**slots, **meta["scalars"]}.items():
        pname, slot = key.rsplit(".", 1)
        if pname not in params:
            raise ValueError(
                f"{source}: optimizer state for unknown parameter {pname[6:]!r}; "
                "the checkpoint is from another architecture"
            )
        param = params[pname]
        if isinstance(value, Tensor) and value.shape == param.shape:
            # in the parameter's memory format (the file holds contiguous NCHW): fused SGD
            # walks a channels_last parameter and its momentum buffer as flat memory
            value = torch.empty_like(param, dtype=value.dtype).copy_(value)
        elif isinstance(value, Tensor):
            value = value.to(param.device)
        optimizer.state[param][slot] = value


# Config ---------------------------------------------------------------------------------------
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k, ...) != b.get(k, ...))


def check_resume_config(
    old: dict[str, Any], new: dict[str, Any], overrides: list[str], source: Path
) -> None:
    """A resumed run must be the run that was started: refuse any difference that the user did
    not ask for by name with `--set KEY=VALUE` (a `-c` file that differs is refused)."""
    allowed = [item.partition("=")[0].strip() for item in overrides]
    refused = [
        k
        for k in changed_keys(old, new)
        if not any(k == a or k.startswith(a + ".") for a in allowed)
    ]
    if refused:
        raise ValueError(
            f"the config differs from the run's {str(source)!r} in {', '.join(refused)}; resume "
            "with the run's own config, or change a key explicitly with --set KEY=VALUE"
        )


# Files ----------------------------------------------------------------------------------------
def truncate_log(path: Path, size: int) -> None:
    """Cut metrics.jsonl back to its size when the checkpoint was taken: lines logged after it
    (a kill between log and checkpoint) would otherwise appear twice once the run resumes."""
    if path.is_file() and path.stat().st_size > size:
        with open(path, "r+b") as f:
            f.truncate(size)


def remove_stale_temps(run_dir: Path) -> None:
    """Temp files of a write that was killed (atomic_write's `.<name>.*.tmp`) are debris."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# Signals --------------------------------------------------------------------------------------
class SignalGuard:
    """While active, the first SIGINT/SIGTERM only sets `signum` (the loop finishes its step,
    checkpoints and raises Preempted); a second one raises KeyboardInterrupt at once - safe
    because every file is written by atomic rename. Only the main thread can own handlers."""

    # SIGUSR1: Slurm's warning before a time limit or preemption (sbatch --signal=USR1@120)
    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
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
            f"\nd2r: {signal.Signals(signum).name} received; finishing the step and writing a "
            "checkpoint (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# The step's checks -------------------------------------------------------------------------------
class StepChecks:
    """What every training step checks: a non-finite loss (train.nonfinite: skip the batch or
    stop) and a signal (stop after this step). Both travel as one device tensor, maxed over
    ranks: every rank must skip the same batch and stop after the same step, or the others hang
    in the next collective (torchrun passes a SIGTERM to each worker, which may see it a step
    apart). `flags` syncs nothing (the signal enters as a fill value, the all-reduce is queued);
    `finite` is the step's one host read."""

    def __init__(self, device: torch.device, nonfinite: str) -> None:
        self.device, self.nonfinite = device, nonfinite
        self.guard = SignalGuard()
        self.stop_signum: int | None = None  # a signal every rank knows of
        self.skipped = 0  # batches skipped for a non-finite loss

    def flags(self, loss: Tensor | None) -> DeviceFlags:
        """[loss non-finite on any rank, a signal number on any rank] (no loss: 0 for the
        first, to share a signal only)."""
        if loss is None:
            bad = torch.zeros((), device=self.device)
        else:
            bad = (~torch.isfinite(loss.detach())).float()
        flags = torch.stack([bad, bad.new_full((), float(self.guard.signum or 0))])
        return DeviceFlags(distributed.all_max(flags))

    def finite(self, flags: DeviceFlags) -> bool:
        """Read the flags: note a signal, say whether the loss was finite on every rank."""
        bad, signum = flags.values()
        if signum and self.stop_signum is None:
            self.stop_signum = int(signum)
        return bad == 0

    def check(
        self,
        flags: DeviceFlags,
        out: dict[str, Tensor],
        epoch: int,
        step: int,
        last: Callable[[], str],
    ) -> bool:
        """True if the loss was finite; else warn and count (skip) or raise naming the step,
        the loss terms and last(), the last good checkpoint (stop). Every step is checked, not
        only log points: one NaN update reaches every weight and momentum buffer at once."""
        if self.finite(flags):
            return True
        terms = ", ".join(f"{k}={v.item():.4g}" for k, v in out.items())
        where = f"epoch {epoch + 1} step {step + 1}"
        if self.nonfinite == "skip":
            self.skipped += 1
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
