"""Which runs are one experiment: the rule every gathering of runs follows (`d2r report`, a
sweep's report). An experiment is a resolved config (d2r.runs.read_config: every option of the
method, models, data and training, defaults included); its runs may differ only in the seed and
in NON_RESULT_KEYS. A key an older run's config.yaml does not record is NOT_RECORDED, never
today's default, so such a run is not silently pooled with newer ones.
"""

from __future__ import annotations

from typing import Any

from d2r.config import Config, flatten, format_eps, to_dict

NOT_RECORDED = "not recorded"

# Config keys that cannot change a result: where data are read from and whether their hash is
# checked, logging, progress, the device, checkpoint cadence, the kernels' layout and the
# evaluation batch size. bf16 (train.amp), train.sync_bn and train.nonfinite do change the
# numbers, so they are not here.
NON_RESULT_KEYS = frozenset(
    {
        "data.root",
        "data.verify",
        "train.device",
        "train.log_every",
        "train.tensorboard",
        "train.checkpoint_minutes",
        "train.channels_last",
        "train.compile",
        "train.optimizer_impl",
        "eval.batch_size",
    }
)


def flat_config(cfg: Config, not_recorded: list[str]) -> dict[str, Any]:
    """A resolved config (d2r.runs.read_config) as dotted keys ("method.alpha": 30.0), with
    NOT_RECORDED for each key its run's config.yaml lacks."""
    return {**flatten(to_dict(cfg)), **dict.fromkeys(not_recorded, NOT_RECORDED)}


def result_keys(config: dict[str, Any]) -> list[str]:
    """The keys of a flat config that can change a result: all but the seed and
    NON_RESULT_KEYS."""
    return [k for k in config if k != "seed" and k not in NON_RESULT_KEYS]


def experiment_key(config: dict[str, Any], by: list[str] | None = None) -> tuple:
    """Equal for runs of one experiment: the values of every result key, or only of the keys
    `by` (grouping on purpose by fewer keys)."""
    keys = sorted(result_keys(config) if by is None else by)
    return tuple((k, _hashable(config.get(k, NOT_RECORDED))) for k in keys)


def _hashable(value: Any) -> Any:
    return tuple(map(_hashable, value)) if isinstance(value, list) else value


def check_group_by(configs: list[dict[str, Any]], by: list[str]) -> None:
    """Each key of `by` must be a key of some run's config."""
    known = {k for c in configs for k in c}
    for key in by:
        if key not in known:
            raise ValueError(
                f"--group-by {key!r}: no run's config has that key; give dotted config keys, "
                "e.g. method.name, method.alpha, data.name, train.epochs"
            )


def check_seeds(runs: list[tuple[Any, str]]) -> None:
    """`runs`: (seed, run directory) of one row. A row is a mean over seeds, so the same seed
    twice would count one experiment twice: ValueError naming both directories."""
    seen: dict[Any, str] = {}
    for seed, run_dir in runs:
        if seed in seen:
            raise ValueError(
                f"runs {seen[seed]!r} and {run_dir!r} fall in one row with the same seed "
                f"{seed}; report one of them, give it another seed, or group by more keys"
            )
        seen[seed] = run_dir


def distinguishing(configs: list[dict[str, Any]], skip: frozenset[str] = frozenset()) -> list:
    """For each config, the values of the result keys (but `skip`) that differ between
    `configs`, in first-seen order: what tells each one apart from the others."""
    keys = dict.fromkeys(k for c in configs for k in result_keys(c) if k not in skip)
    differ = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    return [{k: c[k] for k in differ if k in c} for c in configs]


def label(setting: dict[str, Any]) -> str:
    """{"method.alpha": 30.0, "method.attack": "cag"} -> "alpha=30, attack=cag": method options
    by their paper names, other keys in full, eps as k/255 when it is one."""
    return ", ".join(f"{k.removeprefix('method.')}={_text(k, v)}" for k, v in setting.items())


def _text(key: str, value: Any) -> str:
    if key.endswith("eps") and isinstance(value, float):
        return format_eps(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    return str(value)
