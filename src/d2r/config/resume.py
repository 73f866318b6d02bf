"""Resuming: what a run of an older d2r (a config.yaml without some keys) was trained with, and
which keys a resume may change."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

# What a run whose config.yaml does not record these keys was trained with: an older d2r,
# before the option existed (or before its default changed). Resuming that run keeps these
# values, and `d2r report` compares them as known values, not as "not recorded".
EARLIER_DEFAULTS: dict[str, Any] = {
    "data.val_size": None,  # before the validation split (the default is 300 since)
    "data.extra": None,  # before generated data
    "data.extra_fraction": 0.0,
    "data.crop_padding": None,  # before data sets from files: the data set's own
    "data.flip": None,
    "data.image_size": None,
    "data.channels": None,
    "data.classes": None,
    "method.norm": "linf",  # before L2
    "method.label_smoothing": 0.0,
    "train.ema_decay": 0.0,  # before the EMA
    "train.schedule": "step",  # before the cosine schedule
    "train.warmup_epochs": 0,
}


def earlier_defaults(raw: dict[str, Any]) -> list[str]:
    """`--set` items giving the EARLIER_DEFAULTS of the keys that `raw` (a run's config.yaml,
    as read) does not record."""
    given = flatten(raw)
    missing = {k: v for k, v in EARLIER_DEFAULTS.items() if k not in given}
    return [f"{k}={yaml.safe_dump(v).splitlines()[0]}" for k, v in missing.items()]


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
