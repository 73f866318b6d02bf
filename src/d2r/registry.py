"""A tiny name -> constructor registry, so configs pick components by name (no if/elif, no eval).

Besides its registered names a registry takes an import path, `MODULE:CALLABLE` (imported from
the Python path, with the working directory on it as for `python -m`), and `PREFIX:NAME` for
each prefix a layer above adds with `add_resolver` (the models package adds `timm:` and
`torchvision:`). Either is resolved afresh at each `get` (Python caches the module), so every
process that reads the same config (a sweep's cell, `d2r eval RUN`, a resume) rebuilds it."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from d2r.config import coerce

_REGISTRIES: list[Any] = []  # every registry (`track`), so a refused plugin's names are removed
_origin: list[str] = []  # the plugin being loaded (d2r.plugins), if any
_failed: list[str] = []  # "'name' from pkg 1.0": plugins that failed (`note_failed_plugin`)


def track(registry: Any) -> None:
    """Have `registry` (anything with `drop_origin(origin)`) drop a failing plugin's names."""
    _REGISTRIES.append(registry)


def current_origin() -> str | None:
    """The package of the plugin being loaded (names registered now are its), or None."""
    return _origin[-1] if _origin else None


def note_failed_plugin(what: str) -> None:
    """Record a plugin that failed, so an unknown name says it may have been that plugin's."""
    _failed.append(what)


def failed_plugins_hint() -> str:
    """ "; plugin ... failed to load (d2r list)" when some did, for an unknown-name error."""
    if not _failed:
        return ""
    return f"; plugin {', '.join(_failed)} failed to load (`d2r list` says why)"


class NameTaken(ValueError):
    """A name registered twice: a bug in d2r, or a plugin taking a name already in use."""


@contextmanager
def registering_for(origin: str) -> Iterator[None]:
    """Names registered inside are recorded as `origin`'s (`Registry.origin`, `d2r list`);
    if the block raises, every name it registered is removed again."""
    _origin.append(origin)
    try:
        yield
    except BaseException:
        for registry in _REGISTRIES:
            registry.drop_origin(origin)
        raise
    finally:
        _origin.pop()


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

    def __init__(self, kind: str, check: Callable[[str, Any], None] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}
        self._resolvers: dict[str, Callable[[str], Callable[..., Any]]] = {}
        self._check = check  # refuses an imported object that is no constructor of this kind
        self._origins: dict[str, str] = {}  # name -> the plugin that registered it
        track(self)

    def add_resolver(self, prefix: str, resolve: Callable[[str], Callable[..., Any]]) -> None:
        """`PREFIX:NAME` names resolve through `resolve(NAME)` (a constructor; ValueError in one
        line when NAME or the package providing it is missing), e.g. `timm:resnet18`."""
        if prefix in self._resolvers:
            raise ValueError(f"{self.kind} prefix {prefix!r} is added twice")
        self._resolvers[prefix] = resolve

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                taken = self._origins.get(name, "d2r")
                raise NameTaken(f"{self.kind} {name!r} is already registered (by {taken})")
            self._entries[name] = fn
            if current_origin():
                self._origins[name] = current_origin()
            return fn

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def origin(self, name: str) -> str | None:
        """The package of the plugin that registered `name` ("mypkg 1.2"); None for d2r's."""
        return self._origins.get(name)

    def drop_origin(self, origin: str) -> None:
        """Remove every name `origin` registered (a plugin refused part-way)."""
        for name in [n for n, o in self._origins.items() if o == origin]:
            del self._entries[name], self._origins[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        """The constructor of a registered name, an import path `MODULE:CALLABLE` or a
        `PREFIX:NAME` (see `add_resolver`); ValueError in one line otherwise."""
        if name in self._entries:
            return self._entries[name]
        if not isinstance(name, str) or ":" not in name:
            prefixes = "".join(f", {p}:NAME" for p in sorted(self._resolvers))
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())} "
                f"(or an import path MODULE:CALLABLE{prefixes}){failed_plugins_hint()}"
            )
        prefix, _, rest = name.partition(":")
        if prefix in self._resolvers:
            return self._resolvers[prefix](rest)
        fn = import_path(name, self.kind)
        if self._check is not None:
            self._check(name, fn)
        return fn

    def is_external(self, name: str) -> bool:
        """Whether `name` is an import path or a PREFIX:NAME, not a registered name."""
        return name not in self._entries and ":" in name

    def provenance(self, name: str) -> dict[str, Any] | None:
        """What provides an external `name` (see `provenance`) or a plugin's (its package and
        module); None for d2r's own."""
        if name in self._origins:
            module = getattr(self._entries[name], "__module__", None)
            file = getattr(sys.modules.get(module or ""), "__file__", None)
            return {"spec": name, "plugin": self._origins[name], "module": module, "file": file}
        return provenance(name) if self.is_external(name) else None

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


def import_path(spec: str, kind: str) -> Any:
    """The object `MODULE:ATTR[.ATTR]` names, imported with the working directory on the path
    (appended, as a fallback). Every failure is one ValueError naming the module and the fix."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{kind} {spec!r}: write an import path as MODULE:CALLABLE")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # as `python -m` does (there: first)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"{kind} {spec!r}: cannot import module {module_name!r} ({err}); install the "
            f"package that provides it, or put the directory holding {module_name}.py on "
            "PYTHONPATH (the working directory is on it)"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = getattr(sys.modules.get(module_name), "__file__", None) or module_name
            raise ValueError(f"{kind} {spec!r}: {where} defines no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{kind} {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def provenance(spec: str) -> dict[str, Any]:
    """What an external spec was built from: the spec, its module's file, and the installed
    distribution that provides the module with its version (None for a loose file)."""
    module_name = spec.partition(":")[0]
    module = sys.modules.get(module_name)
    top = module_name.split(".")[0]
    dists = importlib.metadata.packages_distributions().get(top, [])
    dist = dists[0] if dists else None
    try:
        version = importlib.metadata.version(dist) if dist else None
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {
        "spec": spec,
        "module": module_name,
        "file": getattr(module, "__file__", None),
        "distribution": dist,
        "version": version or getattr(module, "__version__", None),
    }


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
