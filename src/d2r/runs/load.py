"""Rebuilding a run from its directory for evaluation and export: its config as recorded, its
method with a checkpoint's weights (metadata from the same bytes), and the shape of a data set
from files as env.json recorded it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from d2r import checkpoint, data
from d2r.config import (
    Config,
    earlier_defaults,
    flatten,
    load_yaml,
    resolve,
    to_dict,
)
from d2r.methods import Method
from d2r.models import (
    load_weights,
)
from d2r.runs.build import build_method, resolved_config


def data_record(info: data.DatasetInfo) -> dict[str, Any]:
    """What rebuilding a run's models needs of a data set from files (env.json's "data")."""
    return {
        "name": info.name,
        "num_classes": info.num_classes,
        "channels": info.channels,
        "size": info.size,
        "classes": list(info.classes),
    }


def run_data_info(run_dir: Path, d: Any) -> data.DatasetInfo:
    """The data set's shape and classes to rebuild a run's models: for a set from files, as
    env.json recorded them (so `d2r export` and `load_model` need none of data.root's files);
    else, and for a run of an older d2r, `data.section_info`."""
    env_path = run_dir / "env.json"
    record = None
    if d.name in data.FILE_SETS and env_path.is_file():
        record = json.loads(env_path.read_text()).get("data")
    if record is None:
        return data.section_info(d)
    sizes = (record["num_classes"], record["channels"], record["size"])
    return data.DatasetInfo(d.name, *sizes, 0, False, (), classes=tuple(record["classes"]))


def read_config(run_dir: str | Path) -> tuple[Config, list[str]]:
    """A run's config.yaml, resolved, and the keys it does not record (an older d2r wrote it):
    their values in the Config are this version's defaults, not what the run was known to use,
    so callers must say so (`d2r report` compares them as "not recorded")."""
    path = Path(run_dir) / "config.yaml"
    raw = load_yaml(path)
    earlier = earlier_defaults(raw)  # keys an older d2r did not write but is known to have used
    cfg = resolve(path, earlier)  # errors name the file
    try:
        cfg = resolved_config(cfg)
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: {err}") from None
    given = flatten({k: {"name": v} if isinstance(v, str) else v for k, v in raw.items()})
    given |= dict.fromkeys(item.partition("=")[0] for item in earlier)
    recorded = set(given) | {k.rsplit(".", 1)[0] for k in given}  # guide.* records "guide"
    missing = [k for k in flatten(to_dict(cfg)) if k not in recorded]
    return cfg, missing


def load_run(run_dir: str | Path, which: str = "last") -> tuple[Config, Method]:
    """Rebuild a run's method from its config.yaml and load its `which` checkpoint (strictly),
    in eval mode: what `d2r eval` and `d2r export` start from. `which`: "last", "best", or
    "ema", last.safetensors with the target's EMA weights in `method.target`. In a run with an
    EMA, "best" also loads best.safetensors' EMA weights: the model its check measured."""
    cfg, method, _ = load_checkpoint(run_dir, which)
    return cfg, method


def load_checkpoint(run_dir: str | Path, which: str = "last") -> tuple[Config, Method, dict]:
    """`load_run` and the checkpoint's metadata (epoch, content sha256, EMA), all from the one
    read of its bytes: a trainer renaming a newer checkpoint into place meanwhile cannot make
    one checkpoint's weights carry another's epoch or hash."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = resolve(run_dir / "config.yaml")
    # the checkpoint holds every model: no `weights` file is read
    method = build_method(cfg, run_data_info(run_dir, cfg.data), initial_weights=False)
    path = checkpoint.checkpoint_path(run_dir, which)
    tensors, meta = checkpoint.load(path)
    checkpoint.load_models(method.models(), tensors, meta, path)
    if checkpoint.target_weights(meta, which) == "ema":
        load_ema_target(method.target, tensors, meta, path)
    return cfg, method.eval(), meta


def load_ema_target(
    target: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any], path: Path
) -> None:
    if "ema" not in meta:
        raise ValueError(
            f"{str(path)!r} holds no EMA weights (the run trained with train.ema_decay=0); "
            "use --checkpoint last or best"
        )
    load_weights(target, checkpoint.unprefixed(checkpoint.EMA_PREFIX, tensors), f"{path}:ema")
