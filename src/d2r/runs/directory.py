"""A run's directory: made (or resumed) writable, owned by one trainer at a time (its lock),
its environment record (env.json), and `Run`, what training returns."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from d2r.config import (
    Config,
)
from d2r.files import Lock, atomic_write_text, check_writable, lock_holder
from d2r.methods import Method
from d2r.version import __version__


def write_env(
    run_dir: Path, device: torch.device, extra: dict[str, Any], resumed_step: int | None
) -> None:
    """env.json: versions, git hash, device; a resumed run (resumed_step: where it resumed)
    keeps the original start and lists each resume after it."""
    env = {**environment(device), **extra}
    if resumed_step is not None:
        old = json.loads((run_dir / "env.json").read_text())
        env = {**old, "resumes": [*old.get("resumes", []), {**env, "step": resumed_step}]}
    atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2))


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "d2r": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        "git": _git_hash(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def prepare_run_dir(out: str | Path, resume: bool = False) -> Path:
    """The run directory, checked before any work: refused if it already holds a run (never
    overwrite a result) unless resuming it, or if it cannot be created or written. The check
    creates nothing; the run's first write does."""
    run_dir = Path(out)
    if resume:
        for name in ("config.yaml", "last.safetensors"):
            if not (run_dir / name).is_file():
                raise FileNotFoundError(
                    f"cannot resume {str(run_dir)!r}: it has no {name}; give a run directory "
                    "written by `d2r train` (a run killed before its first checkpoint must restart)"
                )
    elif (run_dir / "config.yaml").exists():
        raise ValueError(
            f"{str(run_dir)!r} already holds a run; choose another --out (or resume it)"
        )
    return check_writable(run_dir, "run directory (--out)")


RUN_LOCK = ".run.lock"  # held by the one trainer that writes the run directory


def own_run_dir(run_dir: str | Path, wait: bool = False) -> Lock:
    """The run directory's lock, held by its trainer for the run's life (released however the
    run ends, by the kernel if the process is killed): a second trainer on it (a second
    `d2r train --resume`, another sweep's cell) would write every record twice. Refused in one
    line naming the trainer that holds it, or, with `wait`, waited for (said in one line)."""
    run_dir = Path(run_dir)

    def waiting(holder: str) -> None:
        print(f"d2r train: waiting for {holder}, which trains {run_dir}", file=sys.stderr)

    return Lock(
        run_dir / RUN_LOCK,
        wait=wait,
        what=f"run directory {str(run_dir)!r}",
        fix="wait for that trainer to end (d2r train --wait), or stop it (its checkpoint resumes)",
        waiting=waiting,
    )


def training_now(run_dir: str | Path) -> str | None:
    """Who is training `run_dir` now (the holder of its lock: pid, host, command, start), or
    None when no trainer is."""
    return lock_holder(Path(run_dir) / RUN_LOCK)


def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.data.name}-{cfg.method['name']}"


@dataclass
class Run:
    """What `train` returns: the run directory, its config, the trained method, and the
    per-epoch records (the lines of metrics.jsonl with "kind": "epoch")."""

    dir: Path
    config: Config
    method: Method
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}
