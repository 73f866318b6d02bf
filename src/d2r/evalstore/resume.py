"""A stopped evaluation resumes: each attack's flags of the batches it finished, in a partial
file beside eval.json (`Ledger`, `StoreLedger`), deleted once its result is stored."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from d2r.evalstore.keys import PARTIAL_FORMAT, key_id, make_entry, pack_flags, unpack_flags
from d2r.evalstore.store import Store, commit, update
from d2r.files import atomic_write_text

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
