"""eval.md's tables: every stored result in rows (one per checkpoint, images, seed and version
at each eps and norm), the worst case per sample, and `summary` of one checkpoint at one eps."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from d2r.config import format_eps
from d2r.evalstore.keys import CLEAN, TARGET, unpack_flags
from d2r.tables import markdown_table

if TYPE_CHECKING:
    from d2r.evalstore.store import Store

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
