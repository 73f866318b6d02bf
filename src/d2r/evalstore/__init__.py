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

`keys` (what identifies a result, the flags), `store` (eval.json under its lock), `tables`
(eval.md, `summary`), `resume` (the partial files).
"""

from d2r.evalstore.keys import (
    CLEAN,
    EVAL_JSON,
    EVAL_LOCK,
    EVAL_MD,
    FORMAT,
    FORMAT_VERSION,
    PARTIAL_FORMAT,
    TARGET,
    images_id,
    key_id,
    make_entry,
    pack_flags,
    result_key,
    unpack_flags,
)
from d2r.evalstore.resume import Ledger, StoreLedger, partial_path
from d2r.evalstore.store import Store, commit, update
from d2r.evalstore.tables import markdown, row_entries, rows, summary

__all__ = [
    "CLEAN",
    "EVAL_JSON",
    "EVAL_LOCK",
    "EVAL_MD",
    "FORMAT",
    "FORMAT_VERSION",
    "PARTIAL_FORMAT",
    "TARGET",
    "Ledger",
    "Store",
    "StoreLedger",
    "commit",
    "images_id",
    "key_id",
    "make_entry",
    "markdown",
    "pack_flags",
    "partial_path",
    "result_key",
    "row_entries",
    "rows",
    "summary",
    "unpack_flags",
    "update",
]
