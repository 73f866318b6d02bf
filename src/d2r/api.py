"""The Python API for notebooks and scripts: `d2r.train`, `d2r.make_report`, `d2r.export_model`,
`d2r.load_model` (and `d2r.evaluate`, from d2r.evaluate). (`make_report`, not `report`:
`d2r.report` is the module.)

Overrides are one form only: a mapping of the CLI's dotted `--set` keys to values, e.g.
`d2r.train(overrides={"train.epochs": 2, "method.eps": "8/255"})`; a string value is read
exactly as `--set` reads it, any other value is taken as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from d2r import export
from d2r.config import Config, apply_overrides, as_set, from_dict, load_yaml, to_dict
from d2r.report import report
from d2r.runs import Run, check_config
from d2r.trainer import Trainer


def make_config(
    config_or_path: str | Path | Mapping[str, Any] | Config | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults <- a YAML path, a nested dict or a Config <- dotted `overrides`, validated as
    the CLI validates (unknown keys and bad values, model and method options included, raise
    ValueError naming the key)."""
    if config_or_path is None:
        raw: dict[str, Any] = {}
    elif isinstance(config_or_path, Config):
        raw = to_dict(config_or_path)
    elif isinstance(config_or_path, Mapping):
        raw = dict(config_or_path)
    elif isinstance(config_or_path, (str, Path)):
        raw = load_yaml(config_or_path)
    else:
        raise ValueError(
            f"config_or_path: expected a YAML path, a dict or a d2r Config, got "
            f"{type(config_or_path).__name__}"
        )
    cfg = from_dict(apply_overrides(raw, [as_set(k, v) for k, v in (overrides or {}).items()]))
    check_config(cfg)
    return cfg


def train(
    config_or_path: str | Path | Mapping[str, Any] | Config | None = None,
    *,
    out: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    quiet: bool = False,
) -> Run:
    """Train as `d2r train` does and return the Run (`.dir`, `.config`, `.method`, `.history`,
    `.final`). `out`: the run directory (default runs/<time>-<data>-<method>); `quiet`: no
    progress bar or log lines."""
    cfg = make_config(config_or_path, overrides)
    return Trainer(cfg, out, progress=not quiet).fit()


def make_report(
    runs: str | Path | list[str | Path], out: str | Path | None = None, **kwargs: Any
) -> dict[str, str]:
    """The paper's table for `runs` (run directories): {"md", "tex", "json"}; see d2r.report."""
    paths = [runs] if isinstance(runs, (str, Path)) else list(runs)
    return report(paths, out, **kwargs)


def export_model(
    run_dir: str | Path,
    out: str | Path | None = None,
    checkpoint: str = "last",
    *,
    format: str = "d2r",
) -> dict[str, Any]:
    """Write a run's target with its model card (format "hf": the Hugging Face hub's directory
    layout in `out`); returns the card. See d2r.export and d2r.hubs."""
    return export.export_model(run_dir, out, checkpoint, format=format)


def load_model(path: str | Path, *, checkpoint: str = "last") -> nn.Module:
    """An eval-mode nn.Module from an exported file, an hf export directory,
    "hf://OWNER/REPO[@REVISION]" or a run directory. See d2r.export."""
    return export.load_model(path, checkpoint=checkpoint)


__all__ = ["export_model", "load_model", "make_config", "make_report", "train"]
