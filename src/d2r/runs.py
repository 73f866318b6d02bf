"""What a run is: its method built from the config, its directory and environment record,
and loading it back from a checkpoint. The training loop itself is in `trainer`."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import d2r
from d2r import checkpoint, data
from d2r.config import Config
from d2r.methods import METHODS, Method
from d2r.models import MODELS
from d2r.registry import build


def build_method(cfg: Config, info: data.DatasetInfo) -> Method:
    """Models from the registry (sized for the data set), then the method around them."""
    sizes = {"num_classes": info.num_classes, "in_channels": info.channels}
    method_cls = METHODS.get(cfg.method["name"])
    target = build(MODELS, {**sizes, **cfg.target}, key="target")
    guide = None
    if method_cls.uses_guide:
        if cfg.guide is None:
            raise ValueError(f"method {cfg.method['name']!r} needs a guide: set guide.name")
        guide = build(MODELS, {**sizes, **cfg.guide}, key="guide")
    args = (target, guide) if method_cls.uses_guide else (target,)
    return build(METHODS, cfg.method, *args, key="method")


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "d2r": d2r.__version__,
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
    """Create the run directory, refusing one that already holds a run (never overwrite a
    result) unless resuming it, and checking it is writable before any training starts."""
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
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"cannot write to run directory {str(run_dir)!r}: {err.strerror}"
        ) from None
    return run_dir


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


def load_run(run_dir: str | Path, which: str = "last") -> tuple[Config, Method]:
    """Rebuild a run's method from its config.yaml and load the `which` checkpoint (strictly)."""
    from d2r.config import resolve

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = resolve(run_dir / "config.yaml")
    method = build_method(cfg, data.info(cfg.data.name, cfg.data.like))
    path = run_dir / f"{which}.safetensors"
    tensors, _ = checkpoint.load(path)
    for name, model in method.models().items():
        checkpoint.load_weights(model, checkpoint.unprefixed(name, tensors), f"{path}:{name}")
    method.eval()
    return cfg, method
