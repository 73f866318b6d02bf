"""The sweep spec: loading, the cells of its grid(s), and the check of every cell before anything
runs (`check_cell`: what `d2r train` would refuse, without training)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

from d2r.attacks import from_name
from d2r.config import (
    Config,
    apply_overrides,
    as_set,
    from_dict,
    load_yaml,
    parse_number,
    resolve,
)
from d2r.evaluate import build_suite
from d2r.runs import check_config, eval_eps, eval_norm
from d2r.sweep.cell import Cell

SPEC_KEYS = ("base", "set", "grid", "eval", "slurm", "parts")
PART_KEYS = ("name", "base", "set", "grid", "eval")
EVAL_KEYS = ("attacks", "eps", "n", "seed", "batch_size", "checkpoint")
COMPONENTS = ("target", "guide", "method")  # grid keys that replace a whole config section


def load_spec(spec_path: str | Path) -> dict[str, Any]:
    spec = load_yaml(spec_path)
    _only(spec, SPEC_KEYS, f"sweep spec {str(spec_path)!r}")
    if "grid" in spec and "parts" in spec:
        raise ValueError(f"sweep spec {str(spec_path)!r}: give either grid or parts, not both")
    return spec


def _only(mapping: Any, valid: tuple[str, ...], where: str) -> None:
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected a mapping, got {mapping!r}")
    unknown = [k for k in mapping if k not in valid]
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")


def cells(spec_path: str | Path) -> list[Cell]:
    """Every cell of the spec, resolved and checked (`check_cell`), in grid order; ValueError
    naming the cell for the first one a run would refuse."""
    spec, where = load_spec(spec_path), f"sweep spec {str(spec_path)!r}"
    if not spec:
        raise ValueError(f"{where} is empty; give a grid, e.g. grid: {{seed: [0, 1, 2]}}")
    parts = spec.get("parts", [{}])
    if not isinstance(parts, list) or not parts:
        raise ValueError(f"{where}: parts must be a non-empty list of mappings")
    out: list[Cell] = []
    for i, part in enumerate(parts):
        place = f"{where}, part {i + 1}" if "parts" in spec else where
        _only(part, PART_KEYS, place)
        merged = {**spec, **part, "set": {**(spec.get("set") or {}), **(part.get("set") or {})}}
        if not merged.get("grid"):  # else one cell of the base config's defaults would train
            raise ValueError(f"{place}: no grid; a study needs one (one run: grid: {{seed: [0]}})")
        prefix = f"{part['name']}-" if part.get("name") else ""
        out += _part_cells(merged, prefix, Path(spec_path))
    names = [c.name for c in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"sweep spec {str(spec_path)!r}: two cells named {twice[0]!r}; name parts")
    return out


def _part_cells(part: dict[str, Any], prefix: str, spec_path: Path) -> list[Cell]:
    axes = _axes(part.get("grid") or {}, str(spec_path))
    evaluation = _eval_settings(part.get("eval"), str(spec_path))
    out = []
    for combo in itertools.product(*(axis for _, axis in axes)):
        choice = {key: value for (key, _), (_, value) in zip(axes, combo, strict=True)}
        name = prefix + ("_".join(label for label, _ in combo) or "run")
        try:
            cfg = cell_config(part, choice, spec_path)
            check_cell(cfg)
            own_eval = cell_eval(evaluation, cfg)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"sweep spec {str(spec_path)!r}, cell {name!r}: {err}") from None
        out.append(Cell(name, cfg, choice, own_eval))
    return out


def _axes(grid: Any, where: str) -> list[tuple[str, list[tuple[str, Any]]]]:
    """[(key, [(label, value), ...]), ...]: labels from a mapping's names, a base file's stem,
    or `<short key>-<value>`."""
    if not isinstance(grid, dict):
        raise ValueError(f"sweep spec {where!r}: grid must map keys to lists of values")
    shorts = [_short(k) for k in grid]
    axes = []
    for key, values in grid.items():
        short = _short(key) if shorts.count(_short(key)) == 1 else key
        if isinstance(values, dict):
            axis = [(_safe(str(n)), v) for n, v in values.items()]
        elif isinstance(values, list) and values:
            stem = key == "base"
            axis = [(_safe(Path(v).stem if stem else f"{short}-{_text(v)}"), v) for v in values]
        else:
            raise ValueError(f"sweep spec {where!r}: grid key {key!r} needs a non-empty list")
        axes.append((str(key), axis))
    return axes


def _short(key: str) -> str:
    parts = str(key).split(".")
    return parts[0] if parts[-1] == "name" else parts[-1]  # method.name -> method


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(map(_text, value))
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+,-]", "_", text)


def _eval_settings(raw: Any, where: str) -> dict[str, Any] | None:
    if raw is None:
        return None
    _only(raw, EVAL_KEYS, f"sweep spec {where!r}, eval")
    attacks = raw.get("attacks", ["pgd20", "cw20"])
    attacks = attacks.split(",") if isinstance(attacks, str) else list(attacks)
    eps = raw.get("eps")  # None: each cell's own (cell_eval), as `d2r eval RUN` without --eps
    settings = {"checkpoint": "last", "seed": 0, **raw, "attacks": [a.strip() for a in attacks]}
    if eps is not None:
        settings["eps"] = parse_number(eps) if isinstance(eps, str) else float(eps)
        _check_suite(settings, f"sweep spec {where!r}, eval")  # before any training
    return {**settings, "eps": settings.get("eps")}


def cell_eval(evaluation: dict[str, Any] | None, cfg: Config) -> dict[str, Any] | None:
    """The part's evaluation for a cell: an `eval` without `eps` attacks at the run's own
    (eval.eps, else method.eps: `runs.eval_eps`), the radius it trained and checked at."""
    if evaluation is None or evaluation["eps"] is not None:
        return evaluation
    own = {**evaluation, "eps": eval_eps(cfg)}
    _check_suite(own, "eval")
    return own


def _check_suite(settings: dict[str, Any], where: str) -> None:
    try:  # bad attack names or eps fail before any training
        build_suite(settings["attacks"], settings["eps"], int(settings["seed"]))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def cell_config(part: dict[str, Any], choice: dict[str, Any], spec_path: Path) -> Config:
    """base <- whole components from the grid (e.g. method: {...}) <- set <- other grid keys,
    validated as `d2r train` validates."""
    base = choice.get("base", part.get("base"))
    raw: dict[str, Any] = {}
    if base:
        path = _find(str(base), spec_path)
        resolve(path)  # the file's own errors name it
        raw = load_yaml(path)
    raw.update({k: v for k, v in choice.items() if k in COMPONENTS})
    dotted = {k: v for k, v in choice.items() if k not in COMPONENTS and k != "base"}
    sets = [as_set(k, v) for k, v in {**(part.get("set") or {}), **dotted}.items()]
    return from_dict(apply_overrides(raw, sets))


def _find(base: str, spec_path: Path) -> Path:
    """A relative base is looked up from the working directory, then beside the spec."""
    for path in (Path(base), spec_path.parent / base):
        if path.is_file():
            return path
    raise FileNotFoundError(f"base config {base!r} not found (from here nor beside the spec)")


def check_cell(cfg: Config) -> None:
    """What `d2r train` refuses before training, without training: the method and its models
    built on the meta device (no memory, no init cost even for WRN-34-10), and the per-epoch
    attack. Raises the trainer's own one-line ValueErrors."""
    check_config(cfg)
    from_name(cfg.eval.attack, eval_eps(cfg), norm=eval_norm(cfg))
