"""A config from YAML and `--set KEY=VALUE` overrides, to a typed `Config` and back to YAML."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from d2r.config.sections import _COMPONENT_SECTIONS, Config
from d2r.config.values import _check_field, _check_finite, _typed, coerce, parse_value


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


def as_set(key: str, value: Any) -> str:
    """A `--set KEY=VALUE` string for `value`: a string as the CLI would read it, anything else
    as JSON (JSON is YAML, so 0.1, true and [0.5, 0.75] survive the parser exactly)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"
