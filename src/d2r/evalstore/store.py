"""eval.json itself: the Store (checkpoints and results), read, merged and written back under
the store's lock, so a concurrent `d2r eval` of the same directory loses nothing."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2r.evalstore.keys import EVAL_JSON, EVAL_LOCK, EVAL_MD, FORMAT, FORMAT_VERSION, key_id
from d2r.evalstore.tables import markdown
from d2r.files import atomic_write_text, locked

# The store --------------------------------------------------------------------------------------


@dataclass
class Store:
    """eval.json's content: `checkpoints` (which file, under which name and label, had which
    sha256) and `results` (one entry per key, see `make_entry`)."""

    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, out: str | Path) -> Store:
        """The store in directory `out` (empty if it has no eval.json); ValueError naming the
        file if it is not one this version can read."""
        path = Path(out) / EVAL_JSON
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except ValueError:
            raise ValueError(f"{str(path)!r} is not valid JSON; {_ASIDE}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a {FORMAT} results file; {_ASIDE}")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{str(path)!r} has format_version {data.get('format_version')!r}; this d2r "
                f"reads {FORMAT_VERSION}: use the d2r that wrote it, or {_ASIDE}"
            )
        return cls(list(data.get("checkpoints", [])), list(data.get("results", [])))

    def find(self, key: Mapping[str, Any]) -> dict[str, Any] | None:
        wanted = key_id(key)
        return next((r for r in self.results if key_id(r["key"]) == wanted), None)

    def merge(self, checkpoints: Iterable[dict], results: Iterable[dict]) -> None:
        """Add or replace (same key; same name and sha256) entries, keeping all others."""
        for entry in checkpoints:
            same = (entry["checkpoint"], entry["sha256"])
            old = [c for c in self.checkpoints if (c["checkpoint"], c["sha256"]) == same]
            _upsert(self.checkpoints, old[0] if old else None, entry)
        for entry in results:
            _upsert(self.results, self.find(entry["key"]), entry)

    def content(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "checkpoints": self.checkpoints,
            "results": self.results,
        }


_ASIDE = "move it aside and rerun `d2r eval` (nothing in it is changed)"


def _upsert(items: list[dict], old: dict | None, new: dict) -> None:
    if old is None:
        items.append(new)
    else:
        items[items.index(old)] = new


def commit(out: str | Path, checkpoints: Iterable[dict] = (), results: Iterable[dict] = ()):
    """Merge into the store on disk (read again now: another `d2r eval` may have added to it)
    and write eval.json and eval.md atomically; returns the store written."""
    return update(out, lambda store: store.merge(checkpoints, results))


def update(out: str | Path, change: Callable[[Store], None]) -> Store:
    """Read the store in `out`, `change` it in place and write eval.json and eval.md, all under
    the store's lock: another process's commit between the read and the write would be lost."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / EVAL_LOCK):
        store = Store.read(out)
        change(store)
        atomic_write_text(out / EVAL_JSON, json.dumps(store.content(), indent=1))
        atomic_write_text(out / EVAL_MD, markdown(store))
    return store
