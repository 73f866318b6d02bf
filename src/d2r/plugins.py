"""Plugins: installed packages that register names through the entry-point group `d2r.plugins`.

An entry point names a module (`mypkg.d2r_plugin`: importing it registers its names with
`@MODELS.register(...)` and the like) or a callable (`mypkg:register`: called with no
arguments). `load` runs each once per process; `d2r/__init__.py` calls it, so every process
that imports d2r (the CLI, a sweep's cells, a Slurm job) has them. Each name a plugin registers
is recorded with its package (`Registry.origin`, shown by `d2r list`). A plugin that fails, or
takes a name already registered, keeps none of its names and the rest of d2r works; every d2r
command says so in one warning line on stderr (`warn`; not under -q), `d2r list` says why, and
an unknown name's error names the failed plugins. Importing d2r as a library prints nothing."""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass

from d2r.registry import NameTaken, note_failed_plugin, registering_for

GROUP = "d2r.plugins"


@dataclass(frozen=True)
class Plugin:
    name: str  # the entry point's name
    value: str  # what it names: MODULE or MODULE:CALLABLE
    package: str  # the distribution providing it, with its version: "mypkg 1.2"
    error: str | None = None  # why it was not loaded; None when it was


PLUGINS: dict[str, Plugin] = {}  # entry-point name -> what became of it, filled by `load`


def _package(entry: importlib.metadata.EntryPoint) -> str:
    dist = entry.dist
    if dist is None:
        return "an unknown package"
    return f"{dist.name} {dist.version}"


def _load_one(entry: importlib.metadata.EntryPoint, package: str) -> str | None:
    """Load one entry point; the reason it was refused, or None."""
    try:
        with registering_for(package):
            obj = entry.load()
            if entry.attr:
                obj()
    except NameTaken as err:
        return f"refused: {err}"
    except (Exception, SystemExit) as err:  # a plugin's failure must not stop d2r
        message = " ".join(str(err).split())  # one line, whatever the plugin raised
        return f"failed to load ({type(err).__name__}: {message})"
    return None


def load() -> dict[str, Plugin]:
    """Load every `d2r.plugins` entry point not loaded yet. Silent: a failure is recorded (in
    PLUGINS, and for the unknown-name errors of every registry); `warn` says it."""
    for entry in importlib.metadata.entry_points(group=GROUP):
        if entry.name in PLUGINS:
            continue
        package = _package(entry)
        error = _load_one(entry, package)
        PLUGINS[entry.name] = Plugin(entry.name, entry.value, package, error)
        if error:
            note_failed_plugin(f"{entry.name!r} from {package}")
    return PLUGINS


def warn() -> None:
    """One warning line on stderr per plugin that failed: the CLI's, unless -q."""
    for plugin in PLUGINS.values():
        if plugin.error:
            where = f"({plugin.value}) from {plugin.package}"
            print(f"d2r: warning: plugin {plugin.name!r} {where} {plugin.error}", file=sys.stderr)
