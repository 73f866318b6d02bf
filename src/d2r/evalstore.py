"""eval.json is a store, not a snapshot: every evaluation result of a run directory (or of a
weights file's eval directory), keyed by what determines it, kept across `d2r eval` calls; eval.md
is its tables, one per eps and norm. A stopped evaluation resumes from its partial state.

A result's key: the checkpoint's content sha256, the attack's name and settings, eps and norm,
the test images (data set, split, n, and their sha256), the seed and the d2r version. Each
result holds its per-sample correct flags (bit-packed, base64), so the worst case over any set
of results at one eps and norm is computed per sample (RobustBench's rule), whenever a table
needs it. Writes are atomic and merge into what is on disk, re-read under an exclusive lock
(`.eval.json.lock` beside it), so nothing already stored, nor what a concurrent `d2r eval` of
the same directory stores, is lost.

Partial state (`eval-partial-<id>.json`, JSON): the flags of the batches an attack finished,
written after every batch and deleted when its result is stored. Batches are seeded from the
seed and their index (d2r.evaluate.batch_seed), so a resumed attack gives exactly the flags of
one run straight through.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from d2r.config import format_eps
from d2r.files import atomic_write_text, locked
from d2r.tables import markdown_table
from d2r.version import __version__

FORMAT = "d2r-eval"
FORMAT_VERSION = 2  # 1 was one snapshot per call, never released
PARTIAL_FORMAT = "d2r-eval-partial"
EVAL_JSON, EVAL_MD = "eval.json", "eval.md"
EVAL_LOCK = ".eval.json.lock"  # held while eval.json is read, merged and written
CLEAN = "clean"
TARGET = "target"  # a checkpoint's own target weights (the other: "ema", their moving average)


# Keys and flags -------------------------------------------------------------------------------


def images_id(data: str, x: Tensor, y: Tensor, split: str = "test") -> dict[str, Any]:
    """Which test images: data set, split, n, and a sha256 of their bytes and labels (a mirror
    loaded with data.verify=false, or another subset, is another key)."""
    digest = hashlib.sha256()
    for t in (x, y):
        digest.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"data": data, "split": split, "n": len(y), "sha256": digest.hexdigest()}


def result_key(
    sha256: str,
    attack: str,
    settings: Mapping[str, Any],
    eps: float | None,
    norm: str | None,
    images: Mapping[str, Any],
    seed: int,
    weights: str = TARGET,
) -> dict[str, Any]:
    """What determines a result. Clean accuracy has no attack settings, eps or norm. `weights`:
    which weights of the file, the target's or (train.ema_decay) their EMA; named in the key
    only for an EMA, so the keys of every other result stay those of earlier versions."""
    key = {
        "sha256": sha256,
        "attack": attack,
        "settings": dict(settings),
        "eps": eps,
        "norm": norm,
        "images": dict(images),
        "seed": seed,
        "version": __version__,
    }
    return key if weights == TARGET else {**key, "weights": weights}


def key_id(key: Mapping[str, Any]) -> str:
    """A short name for a key (its JSON text's sha256): the store's index and the partial file's
    name. Tuples and lists give the same text, so a key read back from JSON has the same id."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pack_flags(flags: Tensor) -> str:
    """(N,) bool -> base64 of the bits (10,000 images: 1,668 characters)."""
    bits = np.packbits(flags.cpu().numpy().astype(np.uint8))
    return base64.b64encode(bits.tobytes()).decode()


def unpack_flags(text: str, n: int) -> Tensor:
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))
    return torch.from_numpy(bits[:n].astype(bool))


def make_entry(key: Mapping[str, Any], flags: Tensor, seconds: float, **meta: Any) -> dict:
    """A stored result: its key, accuracy, per-sample flags, and how it was run (`meta`:
    batch_size, device, ...); `warnings` are the evaluation's warnings about it."""
    return {
        "id": key_id(key),
        "key": dict(key),
        "accuracy": flags.float().mean().item() if len(flags) else 0.0,
        "n": len(flags),
        "correct": pack_flags(flags),
        "seconds": seconds,
        "evaluated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "warnings": [],
        **meta,
    }


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


# Tables ----------------------------------------------------------------------------------------


def rows(store: Store) -> list[dict[str, Any]]:
    """Every result in table rows: one per checkpoint (name and sha256), test images, seed and
    d2r version at each (eps, norm), holding "clean", each attack and "worst_case" (fractions)
    with "worst_case_over" (the results it is the per-sample worst case of) and "settings",
    the shape `d2r.tables.markdown_table` takes. Results at other eps are never mixed in; an
    attack stored twice under one name (other settings, e.g. a newer pyautoattack) gets a row
    of its own."""
    groups: dict[tuple, dict[tuple, list[dict[str, dict]]]] = {}
    for entry in store.results:
        k = entry["key"]
        images = json.dumps(k["images"], sort_keys=True)
        base = (k["sha256"], k.get("weights", TARGET), images, k["seed"], k["version"])
        threat = (None, None) if k["attack"] == CLEAN else (k["eps"], k["norm"])
        sets = groups.setdefault(base, {}).setdefault(threat, [])
        free = [d for d in sets if k["attack"] not in d]
        (free[0] if free else _appended(sets))[k["attack"]] = entry
    out = []
    for base, threats in groups.items():
        clean = threats.pop((None, None), [{}])[0]
        # clean joins every eps of its group; a clean-only evaluation is a row of its own
        for (eps, norm), sets in (threats or {(None, None): [{}]}).items():
            for attacks in sets:
                row = _row({**clean, **attacks}, eps, norm)
                out += [{**_identity(c), **row} for c in _names(store, *base[:2])]
    return sorted(out, key=lambda r: (r["norm"] or "", r["eps"] or 0.0))


def _appended(items: list[dict]) -> dict:
    items.append({})
    return items[-1]


def _names(store: Store, sha256: str, weights: str) -> list[dict[str, Any]]:
    found = [
        c
        for c in store.checkpoints
        if c["sha256"] == sha256 and c.get("weights", TARGET) == weights
    ]
    name = sha256[:12] if weights == TARGET else f"{sha256[:12]} {weights}"
    return found or [{"checkpoint": name, "label": name, "sha256": sha256, "weights": weights}]


def _identity(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    names = ("checkpoint", "label", "epoch", "sha256")
    return {**{k: checkpoint.get(k) for k in names}, "weights": checkpoint.get("weights", TARGET)}


def _row(entries: Mapping[str, dict], eps: float | None, norm: str | None) -> dict[str, Any]:
    flags = {name: unpack_flags(e["correct"], e["n"]) for name, e in entries.items()}
    worst = torch.stack(list(flags.values())).all(0)
    first = next(iter(entries.values()))["key"]
    settings = {
        "eps": eps,
        "eps_text": format_eps(eps) if eps is not None else "—",
        "norm": norm,
        **{k: first["images"][k] for k in ("data", "split", "n")},
        "images_sha256": first["images"]["sha256"],
        "seed": first["seed"],
        "version": first["version"],
        "attacks": {n: e["key"]["settings"] for n, e in entries.items() if n != CLEAN},
    }
    warned = [w for e in entries.values() for w in e.get("warnings", [])]
    return {
        "eps": eps,
        "norm": norm,
        **{name: e["accuracy"] for name, e in entries.items()},
        "worst_case": worst.float().mean().item() if len(worst) else 0.0,
        "worst_case_over": list(entries),
        "settings": settings,
        "seconds": {name: e["seconds"] for name, e in entries.items()},
        "warnings": list(dict.fromkeys(warned)),
    }


def markdown(store: Store) -> str:
    """eval.md: one table per (eps, norm), every stored result in it."""
    tables: dict[tuple, dict[str, dict]] = {}
    earlier = _superseded(store)
    for row in rows(store):
        if (row["checkpoint"], row["sha256"]) in earlier:  # e.g. last before more training
            row = {**row, "label": f"{row['label']}, an earlier {row['checkpoint']}"}
        table = tables.setdefault((row["eps"], row["norm"]), {})
        table[_unique_label(table, row)] = row
    parts = ["# Evaluation results", ""]
    for (eps, norm), table in tables.items():
        title = f"eps = {format_eps(eps)} ({norm})" if eps is not None else "clean only"
        parts += [f"## {title}", "", markdown_table(table)]
    return "\n".join(parts)


def _superseded(store: Store) -> set[tuple[str, str]]:
    """(checkpoint, sha256) of the files a name held before the one evaluated last under it:
    `last` is rewritten every epoch, and its earlier results stay in the store."""
    latest = {(c["checkpoint"], c.get("weights", TARGET)): c["sha256"] for c in store.checkpoints}
    return {
        (c["checkpoint"], c["sha256"])
        for c in store.checkpoints
        if latest[(c["checkpoint"], c.get("weights", TARGET))] != c["sha256"]
    }


def _unique_label(table: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """The row's label, with what tells it apart from a row of that label already in the
    table (seed, d2r version, test images), or a number when only attack settings differ."""
    label, s = row["label"], row["settings"]
    if label not in table:
        return label
    other = table[label]["settings"]
    fields = {"seed": "seed", "version": "d2r", "n": "n", "images_sha256": "images"}
    diffs = [f"{name} {str(s[k])[:8]}" for k, name in fields.items() if s[k] != other[k]]
    base = f"{label} ({', '.join(diffs)})" if diffs else label
    unique, count = base, 1
    while unique in table:
        count += 1
        unique = f"{base} #{count}"
    return unique


def summary(
    store: Store,
    checkpoint: str,
    eps: float,
    norm: str | None = None,
    sha256: str | None = None,
) -> dict[str, Any] | None:
    """The row of `checkpoint` at `eps` (and `norm`, any case), for its current `sha256` when
    given (else the checkpoint's latest file evaluated); None if there is none."""
    found = [
        r
        for r in rows(store)
        if r["checkpoint"] == checkpoint
        and r["eps"] is not None
        and abs(r["eps"] - eps) <= 1e-9 * max(1.0, abs(eps))
        and (norm is None or str(r["norm"]).lower() == norm.lower())
    ]
    if sha256 is not None:
        found = [r for r in found if r["sha256"] == sha256]
    return found[-1] if found else None


def row_entries(store: Store, row: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The stored results a `rows`/`summary` row is made of, by attack name (clean included):
    their per-sample flags (`unpack_flags`), seconds and device."""
    s = row["settings"]
    found = {}
    for entry in store.results:
        k, name = entry["key"], entry["key"]["attack"]
        same = (k["sha256"], k.get("weights", TARGET), k["images"]["sha256"], k["seed"])
        if name not in row["worst_case_over"] or same != (
            row["sha256"],
            row["weights"],
            s["images_sha256"],
            s["seed"],
        ):
            continue
        if k["version"] == s["version"] and (
            name == CLEAN
            or (k["eps"], k["norm"], k["settings"]) == (row["eps"], row["norm"], s["attacks"][name])
        ):
            found[name] = entry
    return found


# Resume ---------------------------------------------------------------------------------------


def partial_path(out: Path, key: Mapping[str, Any]) -> Path:
    return Path(out) / f"eval-partial-{key_id(key)}.json"


class Ledger:
    """Where `d2r.evaluate.suite_flags` keeps each attack's flags. This one keeps nothing:
    `d2r.evaluate` on tensors in memory, no files."""

    def cached(self, name: str) -> tuple[Tensor, float] | None:
        return None

    def resume(self, name: str) -> tuple[Tensor, float]:
        """Flags of the batches already done (whole batches, in order), and their seconds."""
        return torch.zeros(0, dtype=torch.bool), 0.0

    def save(self, name: str, flags: Tensor, seconds: float, batches: int) -> None:
        """After each batch."""

    def finish(self, name: str, flags: Tensor, seconds: float) -> None:
        """After the attack's last batch."""


class StoreLedger(Ledger):
    """The store in `out` for one checkpoint and suite (`keys`: attack name -> key): finished
    keys come from eval.json, unless `force` and not yet in `redone` (the key ids computed
    again in this call, shared by its ledgers); partial state after every batch; `stop(name,
    batches)` is called after each save of an unfinished attack (with batches=None once a
    result is stored); it raises to stop at a signal."""

    def __init__(
        self,
        out: Path,
        keys: Mapping[str, dict[str, Any]],
        meta: Mapping[str, Any],
        *,
        force: bool = False,
        redone: set[str] | None = None,
        stop: Callable[[str, int | None], None] = lambda name, batches: None,
    ) -> None:
        self.out, self.keys, self.meta = Path(out), dict(keys), dict(meta)
        self.force, self.stop = force, stop
        self.unsaved: list[dict[str, Any]] = []  # results `out` refused (evaluate saves them)
        self.progress_saved = True
        self.redone = redone if redone is not None else set()
        for key in self.keys.values():
            self._check_partial(key)

    def _check_partial(self, key: Mapping[str, Any]) -> None:
        """Refuse, before any work, to resume with a batch size that draws other seeds."""
        path = partial_path(self.out, key)
        if self.force or not path.is_file():
            path.unlink(missing_ok=True)
            return
        state = _read_partial(path)
        if state["batch_size"] != self.meta["batch_size"]:
            raise ValueError(
                f"{str(path)!r} holds {state['batches']} batches of {key['attack']} done with "
                f"--batch-size {state['batch_size']} (each batch's random start depends on it); "
                f"rerun with --batch-size {state['batch_size']} to continue, or --force to start "
                "over"
            )

    def cached(self, name: str) -> tuple[Tensor, float] | None:
        key = self.keys[name]
        fresh = not self.force or key_id(key) in self.redone
        entry = Store.read(self.out).find(key) if fresh else None
        if entry is None:
            return None
        partial_path(self.out, key).unlink(missing_ok=True)  # a finished key leaves none
        return unpack_flags(entry["correct"], entry["n"]), entry["seconds"]

    def resume(self, name: str) -> tuple[Tensor, float]:
        path = partial_path(self.out, self.keys[name])
        if not path.is_file():
            return super().resume(name)
        state = _read_partial(path)
        return unpack_flags(state["correct"], state["n"]), state["seconds"]

    def save(self, name: str, flags: Tensor, seconds: float, batches: int) -> None:
        state = {
            "format": PARTIAL_FORMAT,
            "format_version": 1,
            "key": self.keys[name],
            "batch_size": self.meta["batch_size"],
            "batches": batches,
            "n": len(flags),
            "correct": pack_flags(flags),
            "seconds": seconds,
        }
        try:
            atomic_write_text(partial_path(self.out, self.keys[name]), json.dumps(state))
        except OSError as err:  # the attack goes on in memory; its result is kept at the end
            if self.progress_saved:
                print(
                    f"d2r: warning: cannot save the evaluation's progress in {self.out} "
                    f"({err.strerror or err}); it goes on, but a stop now loses this attack",
                    file=sys.stderr,
                )
            self.progress_saved = False
        if len(flags) < self.keys[name]["images"]["n"]:  # the last batch: store it first
            self.stop(name, batches)

    def finish(self, name: str, flags: Tensor, seconds: float) -> None:
        key = self.keys[name]
        entry = make_entry(key, flags, seconds, **self.meta)
        try:
            commit(self.out, results=[entry])
        except OSError:
            self.unsaved.append(entry)
            raise
        partial_path(self.out, key).unlink(missing_ok=True)
        self.redone.add(key_id(key))
        self.stop(name, None)

    def add_warnings(self, messages: list[str]) -> None:
        """The evaluation's warnings (checks run after the attacks) onto every result of the
        suite, beside any they had."""

        def warn(store: Store) -> None:
            for entry in filter(None, (store.find(key) for key in self.keys.values())):
                entry["warnings"] = list(dict.fromkeys([*entry.get("warnings", []), *messages]))

        update(self.out, warn)


def _read_partial(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except ValueError:
        state = None
    fields = ("batch_size", "batches", "n", "correct", "seconds")
    if (
        not isinstance(state, dict)
        or state.get("format") != PARTIAL_FORMAT
        or not all(k in state for k in fields)
    ):
        raise ValueError(
            f"{str(path)!r} is not a readable partial evaluation; delete it (or use --force) "
            "to start that attack over"
        )
    return state
