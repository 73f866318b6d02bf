"""A tiny name -> constructor registry, so configs pick components by name (no if/elif, no eval)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from d2r.config import coerce


class OptionError(ValueError):
    """A constructor refusing the value of one of its options. Raised directly it reads
    "eps=-1.0 invalid; must be >= 0"; `build` names the config key instead."""

    def __init__(self, option: str, value: Any, rule: str) -> None:
        self.option, self.value, self.rule = option, value, rule
        super().__init__(f"{option}={value!r} invalid; {rule}")


def check_range(
    option: str,
    value: float,
    *,
    positive: bool = False,
    below: float | None = None,
    hint: str = "",
) -> None:
    """The one range rule of numeric options: a finite number >= 0 (> 0 with `positive`), and
    < `below` when given."""
    ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    ok = ok and (below is None or value < below)
    if not ok:
        rule = "must be > 0" if positive else "must be >= 0"
        rule += f" and < {below:g}" if below is not None else ""
        raise OptionError(option, value, rule + (f" ({hint})" if hint else ""))


def check_choice(option: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise OptionError(option, value, f"choose one of {', '.join(map(str, choices))}")


class View(Mapping[str, Any]):
    """A read-only mapping recomputed by `make` at every use: a table derived from a registry
    (Table 1's columns from the attacks') that follows entries registered after import."""

    def __init__(self, make: Callable[[], Mapping[str, Any]]) -> None:
        self._make = make

    def __getitem__(self, key: str) -> Any:
        return self._make()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._make())

    def __len__(self) -> int:
        return len(self._make())

    def __repr__(self) -> str:
        return f"View({dict(self._make())!r})"


class Registry:
    """Maps names to constructors; `create` builds one from keyword arguments, checked against
    the constructor's signature so a typo in a config is an error, not a silent default."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = fn
            return fn

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            )
        return self._entries[name]

    def check_kwargs(self, name: str, kwargs: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
        """Raise ValueError naming any keyword the constructor does not accept."""
        params = inspect.signature(self.get(name)).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        valid = [p for p in params if p not in skip]
        for key in kwargs:
            if key not in valid:
                raise ValueError(
                    f"{self.kind} {name!r} has no option {key!r}; valid options: {', '.join(valid)}"
                )

    def create(self, name: str, /, *args: Any, **kwargs: Any) -> Any:
        """Build `name` from its signature's keywords (others: ValueError listing the valid)."""
        self.check_kwargs(name, kwargs)
        return self.get(name)(*args, **kwargs)


def build(registry: Registry, spec: dict[str, Any], *args: Any, key: str = "") -> Any:
    """Build from a config dict `{name: ..., **options}`, converting each option to the type of
    the constructor's default (YAML says 30 where the default is 30.0) with a one-line error."""
    name = spec["name"]
    params = inspect.signature(registry.get(name)).parameters
    options = _options(registry, spec, key, skip=tuple(params)[: len(args)])
    try:
        return registry.get(name)(*args, **options)
    except OptionError as err:  # the constructor's own check, named by its config key
        where = f"{key}.{err.option}" if key else err.option
        raise ValueError(f"config key {where!r}: {err.rule}, got {err.value!r}") from None


def resolve_spec(
    registry: Registry, spec: dict[str, Any], *, skip: tuple[str, ...] = (), key: str = ""
) -> dict[str, Any]:
    """`spec` with every keyword option of its constructor, in the signature's order: the given
    ones converted as `build` converts them, the others at their default. This is what a run
    records (config.yaml, checkpoints, model cards), so it says what was trained even after a
    default changes. `skip`: options the caller fills, not the config (a model's data-set
    sizes); they stay out unless given. Options without a default (a method's models) too."""
    name = spec["name"]
    params = inspect.signature(registry.get(name)).parameters
    options = _options(registry, spec, key)
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    defaults = {
        p.name: p.default
        for p in params.values()
        if p.kind in keyword and p.default is not p.empty and p.name not in skip
    }
    return {"name": name, **defaults, **options}


def _options(
    registry: Registry, spec: dict[str, Any], key: str, skip: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The options of `spec` checked against the constructor (`skip`: positional arguments the
    caller passes) and converted to the type of each default."""
    options = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    params = inspect.signature(registry.get(name)).parameters
    registry.check_kwargs(name, options, skip=skip)
    for option, value in options.items():
        default = params[option].default if option in params else None
        like = None if default is inspect.Parameter.empty else default
        options[option] = coerce(f"{key}.{option}" if key else option, value, like)
    return options
