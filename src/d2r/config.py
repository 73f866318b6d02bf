"""Run configuration: typed dataclasses, YAML in/out, `--set a.b=c` overrides, "8/255" parsing.

Structure and types only. The sections `data`, `train`, `eval` are dataclasses whose
annotations are their types (Literal for choices) and whose numeric fields carry their range.
Component sections (`target`, `guide`, `method`) are plain dicts `{name: ..., **options}`: the
registered constructor's signature is their schema and the constructor checks their ranges
(`registry.build`), so a new model or method needs no edit here. Every error is a one-line
ValueError naming the key and what is valid.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

_FRACTION = re.compile(r"^\s*([0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


def _num(
    default: Any = dataclasses.MISSING,
    *,
    positive: bool = False,
    below: float | None = None,
    **kwargs: Any,
) -> Any:
    """A numeric field and its range: >= 0, or > 0 with `positive`, and < `below` when given
    (checked by `_fill_section`)."""
    metadata = {"positive": positive, "below": below, "range": True}
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"
    verify: bool = True
    batch_size: int = _num(128, positive=True)
    augment: bool = True
    # first N training images (or a seeded sample, see subset_seed), after val_size is held out
    train_subset: int | None = _num(None, positive=True)
    # first N test images for the per-epoch check of a run without a validation split
    test_subset: int | None = _num(None, positive=True)
    # Seeds the subsets' samples (None: the first N images) and the validation split (None: 0,
    # so every run of an experiment, whatever its `seed`, holds out the same images).
    subset_seed: int | None = None
    # data.name=synthetic only: the real set whose image shape, classes and split sizes it takes
    # (cifar10 when unset); see d2r.data.synthetic
    like: str | None = None
    # Images held out of the training split, stratified by class: the per-epoch check and the
    # choice of best.safetensors read them, so the test split is only ever read by `d2r eval`.
    # null: no validation split; the check then reads the test split (as the AWP and LBGAT
    # releases picked their best epoch). 300 for the demo: digits' 1,497 training images keep
    # 1,197 (10 batches, the last of 45); with 200 the last batch of 17 made the first
    # full-lr epoch diverge for seeds 0 and 1 (checked over 3 epochs).
    val_size: int | None = _num(300, positive=True)
    # Generated training data (Wang et al. 2023): an uncompressed .npz with image (N, H, W, C)
    # uint8 and label (N,) integers, memory-mapped; extra_fraction of every batch comes from it.
    extra: str | None = None
    extra_fraction: float = _num(0.0, below=1.0)
    # Training augmentation: the random crop's zero padding (0: no crop) and the horizontal flip.
    # null: the data set's own (docs/training.md); 0 and false for folder and npz, since d2r
    # cannot know what is safe for your images.
    crop_padding: int | None = _num(None)
    flip: bool | None = None
    # data.name=folder or npz only (your own files in data.root; d2r.data.own): resize every
    # image to image_size x image_size (folder; null: all must have one size), 1 or 3 channels
    # (null: the first image's), and the class names, label i = classes[i] (filled in when the
    # run starts: a folder's sorted class folders, an npz's 0..K-1 unless given).
    image_size: int | None = _num(None, positive=True)
    channels: int | None = _num(None, positive=True)
    classes: list[str] | None = None


@dataclass
class TrainConfig:
    epochs: int = _num(15, positive=True)
    lr: float = _num(0.1, positive=True)
    momentum: float = _num(0.9)
    weight_decay: float = _num(2e-4)
    nesterov: bool = False
    # The reference schedule, scaled to `epochs`: lr * warmup_factor in the first epoch (not in a
    # one-epoch run), then x0.1 at each fraction of the run in `decay_at` (75% and 90%, i.e.
    # epochs 76 and 91 of 100).
    warmup_factor: float = _num(0.2)
    decay_at: list[float] = _num(default_factory=lambda: [0.75, 0.9])
    # "cosine": lr * half a cosine from 1 to 0 over the run, per step, after a linear warm-up
    # over warmup_epochs (cosine only; the step schedule's warm-up is warmup_factor).
    schedule: Literal["step", "cosine"] = "step"
    warmup_epochs: float = _num(0.0)
    # EMA of the target's weights after every step (0: none; 0.995 in Wang et al. 2023): the
    # per-epoch check and best.safetensors then use it, and `d2r eval` evaluates it (d2r.ema).
    ema_decay: float = _num(0.0, below=1.0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # steps between metrics.jsonl lines (the only host sync of the loop)
    log_every: int = _num(20, positive=True)
    tensorboard: bool = False  # mirror metrics.jsonl to RUN_DIR/tensorboard (extra: tensorboard)
    # Speed (d2r.speed; README "Speed"). "auto": on for CUDA (and, except compile, for CPUs with
    # native bf16), off elsewhere; true/false force a flag. Evaluation always runs in fp32.
    amp: Literal["auto", "bf16", "off"] | bool = "auto"  # bf16 autocast of the step and attack
    channels_last: Literal["auto", "on", "off"] | bool = "auto"  # NHWC models and batches
    compile: Literal["auto", "on", "off"] | bool = "auto"  # torch.compile of both models
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"  # SGD's kernels
    # torchrun: BatchNorm statistics over the global batch (torch's SyncBatchNorm on CUDA, else
    # d2r.distributed.GlooSyncBatchNorm)
    sync_bn: bool = False
    # last.safetensors is also written mid-epoch every this many minutes (0: at epoch ends only),
    # so a preemption or crash loses at most that much work.
    checkpoint_minutes: float = _num(10.0)
    nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss: stop (error) | skip the batch


@dataclass
class EvalConfig:
    """The per-epoch check of the target on the held-out images (the full protocol is
    `d2r eval`)."""

    eps: float | None = _num(None)  # None: the method's training eps
    attack: str = "pgd20"
    # first N images of the validation split (or, with data.val_size null, of the test split)
    subset: int | None = _num(1000, positive=True)
    batch_size: int = _num(500, positive=True)
    every: int = _num(1, positive=True)  # epochs between checks (the last is always checked)


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


# Component sections: {name, **options}, checked by the registered constructor (registry.build).
_COMPONENT_SECTIONS = ("target", "guide", "method")


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
    """The inverse of parse_number for radii: the decimal where four digits give the number
    back (0.031, 0.2, 1: never "51/255" or "255/255"), else k/255 for eps that are one (8/255,
    to 1e-6), else four digits; "—" when there is none."""
    if eps is None:
        return "—"
    text, k = f"{eps:.4g}", round(eps * 255)
    if float(text) == eps or not (k and abs(eps - k / 255) < 1e-6):
        return text
    return f"{k}/255"


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
    if isinstance(like, list) and like:  # e.g. train.decay_at: each item as the example's
        value = [coerce(f"{key}[{i}]", v, like[0]) for i, v in enumerate(value)]
    return value


def _check_finite(key: str, value: Any) -> None:
    """nan/inf would only surface as a NaN loss hours later: refused in every option, lists too."""
    if isinstance(value, list):
        for item in value:
            _check_finite(key, item)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config key {key!r}: must be a finite number, got {value}")


def _check_field(key: str, f: dataclasses.Field, hint: Any, value: Any) -> None:
    """A section field's range (from `_num`) and choices (from a Literal annotation)."""
    _check_finite(key, value)
    choices = _literal_choices(hint)
    if choices and not isinstance(value, bool) and value not in choices:
        raise ValueError(f"config key {key!r}: choose one of {', '.join(choices)}, got {value!r}")
    if not f.metadata.get("range") or value is None:
        return
    below = f.metadata["below"]
    for v in value if isinstance(value, list) else [value]:
        if f.metadata["positive"] and v <= 0:
            raise ValueError(f"config key {key!r}: must be > 0, got {v}")
        if v < 0:
            raise ValueError(f"config key {key!r}: must be >= 0, got {v}")
        if below is not None and v >= below:
            raise ValueError(f"config key {key!r}: must be < {below:g}, got {v}")


def _literal_choices(hint: Any) -> tuple[Any, ...]:
    union = get_origin(hint) in (Union, UnionType)
    literals = [a for a in (get_args(hint) if union else (hint,)) if get_origin(a) is Literal]
    return tuple(c for lit in literals for c in get_args(lit))


def _fill_section(prefix: str, section: Any, raw: dict[str, Any]) -> None:
    by_name = {f.name: f for f in fields(section)}
    hints = get_type_hints(type(section))
    for key, value in raw.items():
        full = f"{prefix}.{key}"
        if key not in by_name:
            raise ValueError(f"unknown config key {full!r}; valid keys: {', '.join(by_name)}")
        value = _typed(full, value, hints[key])
        _check_field(full, by_name[key], hints[key], value)
        setattr(section, key, value)


def _typed(key: str, value: Any, hint: Any) -> Any:
    """`value` converted to the annotated type `hint` (int, float, str, bool, list[float], a
    Literal of strings, or a union of those with None), or a one-line error."""
    options = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
    if value is None and type(None) in options:  # an optional setting switched off
        return None
    kinds = [o for o in options if o is not type(None)]
    if isinstance(value, bool) and bool in kinds:  # "auto"-or-switch fields take true/false
        return value
    return coerce(key, value, _example(kinds[0]))


def _example(kind: Any) -> Any:
    """A value of the annotated type, for `coerce` (which converts to the type of an example)."""
    if get_origin(kind) is Literal:
        return get_args(kind)[0]
    if get_origin(kind) is list:
        return [_example(get_args(kind)[0])]
    return kind()


def _component(key: str, raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise ValueError(f"config key {key!r}: expected a mapping with a 'name', got {raw!r}")
    for option, value in raw.items():
        _check_finite(f"{key}.{option}", value)
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


# Resuming ---------------------------------------------------------------------------------------
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


def as_set(key: str, value: Any) -> str:
    """A `--set KEY=VALUE` string for `value`: a string as the CLI would read it, anything else
    as JSON (JSON is YAML, so 0.1, true and [0.5, 0.75] survive the parser exactly)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"
