"""Run configuration: typed dataclasses, YAML in/out, `--set a.b=c` overrides, "8/255" parsing.

Component sections (`target`, `guide`, `method`) are plain dicts `{name: ..., **options}`: the
registered constructor's signature is their schema, so a new model or method needs no edit here.
Every error is a one-line ValueError naming the key and what is valid.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"
    verify: bool = True
    batch_size: int = 128
    augment: bool = True
    train_subset: int | None = None  # first N training images (or a seeded sample, see subset_seed)
    test_subset: int | None = None
    subset_seed: int | None = None
    # data.name=synthetic only: the real set whose image shape, classes and split sizes it takes
    # (cifar10 when unset); see d2r.data.synthetic
    like: str | None = None


@dataclass
class TrainConfig:
    epochs: int = 15
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    nesterov: bool = False
    # The reference schedule, scaled to `epochs`: lr * warmup_factor in the first epoch, then
    # x0.1 at each fraction of the run in `decay_at` (75% and 90%, i.e. epochs 76 and 91 of 100).
    warmup_factor: float = 0.2
    decay_at: list[float] = field(default_factory=lambda: [0.75, 0.9])
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 20  # steps between metrics.jsonl lines (the only host sync of the loop)
    tensorboard: bool = False  # mirror metrics.jsonl to RUN_DIR/tensorboard (d2r[tensorboard])
    # Speed (d2r.speed; README "Speed"). "auto": on for CUDA (and, except compile, for CPUs with
    # native bf16), off elsewhere; true/false force a flag. Evaluation always runs in fp32.
    amp: str | bool = "auto"  # auto | bf16 | off: bf16 autocast of the training step and attack
    channels_last: str | bool = "auto"  # auto | on | off: NHWC models and batches
    compile: str | bool = "auto"  # auto | on | off: torch.compile of both models (CUDA only)
    optimizer_impl: str = "auto"  # auto | fused | foreach | for_loop (SGD's implementation)
    # torchrun: BatchNorm statistics over the global batch (torch's SyncBatchNorm on CUDA, else
    # d2r.distributed.GlooSyncBatchNorm)
    sync_bn: bool = False
    # last.safetensors is also written mid-epoch every this many minutes (0: at epoch ends only),
    # so a preemption or crash loses at most that much work.
    checkpoint_minutes: float = 10.0
    nonfinite: str = "stop"  # a NaN/inf loss: stop (error) | skip (no update for that batch)


@dataclass
class EvalConfig:
    """Per-epoch check of the target on the held-out split (the full protocol is `d2r eval`)."""

    eps: float = 0.1
    attack: str = "pgd20"
    subset: int | None = 1000  # test images used per epoch (None: all)
    batch_size: int = 500
    every: int = 1  # epochs between evaluations (the last epoch is always evaluated)


@dataclass
class Config:
    """The embedded default: D2R-CAG on scikit-learn's digits (1x8x8), small CNN target and a
    smaller CNN guide. eps = 0.1: digits has 17 grey levels (steps of 1/16), so 0.1 moves each
    pixel by about 1.6 levels - visible but not enough to turn one digit into another."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    target: dict[str, Any] = field(default_factory=lambda: {"name": "small_cnn"})
    guide: dict[str, Any] | None = field(default_factory=lambda: {"name": "tiny_cnn"})
    method: dict[str, Any] = field(
        default_factory=lambda: {"name": "d2r", "eps": 0.1, "step_size": 0.025, "steps": 10}
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Range rules by option name, applied wherever the name appears (sections and component dicts).
_POSITIVE = {"lr", "batch_size", "steps", "epochs", "log_every", "every", "restarts"}
_NON_NEGATIVE = {
    "eps",
    "step_size",
    "weight_decay",
    "momentum",
    "lam",
    "alpha",
    "beta",
    "awp_gamma",
    "train_subset",
    "test_subset",
    "subset",
    "warmup_factor",
    "checkpoint_minutes",
}
_COMPONENT_SECTIONS = ("target", "guide", "method")
_CHOICES = {
    "train.nonfinite": ("stop", "skip"),
    "train.amp": ("auto", "bf16", "off", True, False),
    "train.channels_last": ("auto", "on", "off", True, False),
    "train.compile": ("auto", "on", "off", True, False),
    "train.optimizer_impl": ("auto", "fused", "foreach", "for_loop"),
}


def parse_number(text: str) -> float:
    """'8/255' -> 0.0313..., '0.031' -> 0.031; ValueError otherwise."""
    match = _FRACTION.match(text)
    if match:
        num, den = float(match.group(1)), float(match.group(2))
        if den == 0:
            raise ValueError(f"{text!r}: division by zero")
        return num / den
    return float(text)


def format_eps(eps: float | None) -> str:
    """The inverse of parse_number for radii: 8/255 for eps that are k/255 (to 1e-6), else the
    decimal, so 0.031 never reads as 8/255; "—" when there is none."""
    if eps is None:
        return "—"
    k = round(eps * 255)
    return f"{k}/255" if k and abs(eps - k / 255) < 1e-6 else f"{eps:.4g}"


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars/lists ('3', 'true', '[1, 2]', 'null') or a fraction '8/255'."""
    if _FRACTION.match(text):
        try:
            return parse_number(text)
        except ValueError:  # '1/0', './.': left as text, so the error names the key
            return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(key: str, value: Any, like: Any) -> Any:
    """Convert `value` to the type of the default `like`, or raise a one-line error. null is
    only valid where the default is None (an optional setting)."""
    if like is None:
        return value
    if value is None:
        raise ValueError(f"config key {key!r}: expected {type(like).__name__}, got null")
    if isinstance(value, str) and isinstance(like, (int, float)) and not isinstance(like, bool):
        try:
            value = parse_number(value)
        except ValueError:
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"config key {key!r}: must be a finite number, got {value}")
    if isinstance(like, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected true or false, got {value!r}")
        return value
    if isinstance(like, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(like, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(like, list) and isinstance(value, tuple):
        value = list(value)
    if type(value) is not type(like):
        raise ValueError(
            f"config key {key!r}: expected {type(like).__name__}, got {type(value).__name__} "
            f"{value!r}"
        )
    if isinstance(like, list) and like and isinstance(like[0], float):  # e.g. train.decay_at
        value = [coerce(f"{key}[{i}]", v, like[0]) for i, v in enumerate(value)]
        for i, v in enumerate(value):
            _check_range(f"{key}[{i}]", v)
    return value


def _check_range(key: str, value: Any) -> None:
    name = key.rsplit(".", 1)[-1]
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ValueError(
            f"config key {key!r}: choose one of {', '.join(map(str, _CHOICES[key]))}, got {value!r}"
        )
    if isinstance(value, list):  # e.g. a component option given as a list: each item
        for item in value:
            _check_range(key, item)
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if not math.isfinite(value):  # nan/inf would only surface as a NaN loss hours later
        raise ValueError(f"config key {key!r}: must be a finite number, got {value}")
    if name in _POSITIVE and value <= 0:
        raise ValueError(f"config key {key!r}: must be > 0, got {value}")
    if name in _NON_NEGATIVE and value < 0:
        raise ValueError(f"config key {key!r}: must be >= 0, got {value}")


def _section_defaults(section: Any) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in fields(section)}


def _fill_section(prefix: str, section: Any, raw: dict[str, Any]) -> None:
    defaults = _section_defaults(section)
    for key, value in raw.items():
        full = f"{prefix}.{key}"
        if key not in defaults:
            raise ValueError(f"unknown config key {full!r}; valid keys: {', '.join(defaults)}")
        like = defaults[key]
        if like is None and value is None:  # an optional setting switched off again
            setattr(section, key, None)
            continue
        if like is None:  # Optional fields: the annotation says which type
            like = _optional_like(section, key, value)
        elif isinstance(value, bool) and _accepts_bool(section, key):
            like = False  # "auto"-or-switch fields (train.amp, ...): true/false also valid
        value = coerce(full, value, like)
        _check_range(full, value)
        setattr(section, key, value)


def _accepts_bool(section: Any, key: str) -> bool:
    annotation = str(next(f.type for f in fields(section) if f.name == key))
    return "bool" in annotation


def _optional_like(section: Any, key: str, value: Any) -> Any:
    annotation = str(next(f.type for f in fields(section) if f.name == key))
    if "int" in annotation and not isinstance(value, bool):
        return 0
    if "float" in annotation:
        return 0.0
    if "str" in annotation:
        return ""
    return None


def _component(key: str, raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ValueError(f"config key {key!r}: expected a mapping with a 'name', got {raw!r}")
    for option, value in raw.items():
        _check_range(f"{key}.{option}", value)
    return dict(raw)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a Config from nested plain data, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ValueError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    cfg = Config()
    valid = [f.name for f in fields(Config)]
    for key, value in raw.items():
        if key not in valid:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(valid)}")
        if key == "seed":
            cfg.seed = coerce("seed", value, 0)
        elif key in _COMPONENT_SECTIONS:
            setattr(cfg, key, _component(key, value))
        elif not isinstance(value, dict):
            raise ValueError(f"config key {key!r}: expected a mapping, got {value!r}")
        else:
            _fill_section(key, getattr(cfg, key), value)
    if cfg.target is None:
        raise ValueError("config key 'target': a target model is required")
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return copy.deepcopy(asdict(cfg))


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found; pass an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of sections")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` strings to nested plain data (validation happens in from_dict)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=2")
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = _child(node, part, key)
        node[parts[-1]] = parse_value(text)
    return raw


def _child(node: dict[str, Any], part: str, key: str) -> dict[str, Any]:
    if node.get(part) is None:
        node[part] = {}
        if part in _COMPONENT_SECTIONS:  # start from the default component, e.g. its name
            node[part] = dict(getattr(Config(), part) or {})
    if not isinstance(node[part], dict):
        raise ValueError(f"--set {key!r}: {part!r} is not a section")
    return node[part]


def resolve(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `--set` overrides. Component dicts given in the YAML replace
    the default component whole (a different method has different options)."""
    raw = load_yaml(path) if path else {}
    if path:  # validate the file alone first, so its errors name it
        try:
            from_dict(raw)
        except ValueError as err:
            raise ValueError(f"config file {str(path)!r}: {err}") from None
    return from_dict(apply_overrides(raw, overrides or []))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: Config, **changes: Any) -> Config:
    return dataclasses.replace(cfg, **changes)
