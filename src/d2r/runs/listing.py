"""`d2r list`: the names a run's config picks from, and the plugins that provide some."""

from __future__ import annotations

from typing import Any

from d2r import data
from d2r.attacks import EVAL_ATTACKS
from d2r.methods import METHODS
from d2r.models import (
    MODELS,
)
from d2r.plugins import PLUGINS


def add_command(sub: Any) -> None:
    """`d2r list` (called by cli.build_parser): the names a run's config picks from (model.name,
    method.name, data.name: the registries `build_method` reads, all below this layer) and the
    attacks `d2r eval --attacks` takes."""
    ls = sub.add_parser("list", help="registered models, methods, attacks and data sets")
    ls.set_defaults(func=_list)


def _list(args: Any) -> int:
    for title, registry in (
        ("models", MODELS),
        ("methods", METHODS),
        ("data sets", data.DATASETS),
    ):
        names = [_with_origin(name, registry.origin(name)) for name in registry.names()]
        print(f"{title}: {', '.join(names)}")
    print(f"evaluation attacks (d2r eval --attacks): {EVAL_ATTACKS.help()}")
    for plugin in PLUGINS.values():
        state = f"not loaded: {plugin.error}" if plugin.error else "loaded"
        print(f"plugin {plugin.name} ({plugin.value}) from {plugin.package}: {state}")
    return 0


def _with_origin(name: str, origin: str | None) -> str:
    return f"{name} (plugin from {origin})" if origin else name
