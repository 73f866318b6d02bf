"""Model hubs: the Hugging Face hub's layout of an exported model (`d2r export RUN --format hf
--out DIR`) and loading it back, from that directory or from the hub itself.

    DIR/model.safetensors   the target's state_dict, the model card in its metadata (the very
                            file `d2r export --out FILE` writes)
    DIR/config.json         the d2r marker, the architecture and what a reader needs at a
                            glance (num_classes, input size, mean/std, eps, norm, method), and
                            the whole model card under "model_card"
    DIR/README.md           the hub's model card: YAML front matter (library_name, tags,
                            datasets, model-index with each stored result at the run's eps)
                            and a page saying how to load and what was measured

The hub's upload takes DIR as it is (`hf upload OWNER/REPO DIR .`); `d2r.load_model(DIR)` and,
with huggingface_hub installed (extra [hf]), `d2r.load_model("hf://OWNER/REPO[@REVISION]")`
read it back. huggingface_hub is imported only there, inside the function.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from d2r.attacks import label
from d2r.config import format_eps
from d2r.files import atomic_write, atomic_write_text, check_writable
from d2r.weights import card_source, read_card

HF_FORMAT = "d2r-hf"  # config.json's marker: what tells an hf export from any config.json
HF_VERSION = 1
WEIGHTS, CONFIG, README = "model.safetensors", "config.json", "README.md"
FILES = (WEIGHTS, CONFIG, README)
HF_SCHEME = "hf://"
HF_EXTRA = 'pip install "d2r-robust[hf]"'
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class HubFiles:
    """The two files of an hf export that loading reads, wherever they lie (a directory, or
    huggingface_hub's cache); `where`: how messages name them."""

    config: Path
    weights: Path
    where: str


# Writing ------------------------------------------------------------------------------------


def check_out(out: Path, run_dir: Path, checkpoint: str) -> None:
    """Before the checkpoint is read: `out` is a directory that is new, empty (but for hidden
    entries: a clone's .git and .gitattributes), or an earlier hf export of the same checkpoint
    of the same run (refreshed), in a writable place."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; --format hf writes a directory")
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        held = _export_source(out)
        if held != (run_dir.resolve(), checkpoint):
            what = (
                f"the hf export of checkpoint {held[1]!r} of {str(held[0])!r}"
                if held
                else "files that are not a d2r hf export"
            )
            raise ValueError(
                f"--out {str(out)!r} already holds {what}; choose another directory or empty it "
                "first (only an hf export of the same checkpoint of the same run is replaced)"
            )
    check_writable(out, "export directory (--out)")


def _export_source(out: Path) -> tuple[Path, str] | None:
    """`weights.card_source` of the hf export in `out`, per its config.json; else None."""
    try:
        return card_source(json.loads((out / CONFIG).read_text())["model_card"])
    except (ValueError, OSError, KeyError, TypeError):
        return None


def write_export(out: Path, weights: bytes, card: dict[str, Any], name: str) -> None:
    """The three files of the hub's layout; config.json, the marker, last."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS, weights)
    atomic_write_text(out / README, readme(card, name))
    atomic_write_text(out / CONFIG, json.dumps(hf_config(card), indent=2) + "\n")


def hf_config(card: dict[str, Any]) -> dict[str, Any]:
    """config.json: the marker, the card's facts a hub reader wants at a glance, the card."""
    arch = card["architecture"]
    normalize = arch.get("normalize") or {}
    return {
        "d2r_format": HF_FORMAT,
        "d2r_format_version": HF_VERSION,
        "library_name": "d2r",
        "d2r_version": card["d2r_version"],
        "architecture": arch["name"],
        "options": arch.get("options", {}),
        "num_classes": card["data"]["num_classes"],
        "input_size": card["data"]["input_size"],
        "dataset": card["data"]["name"],
        "mean": normalize.get("mean"),  # None: the model takes [0, 1] images as they are
        "std": normalize.get("std"),
        "eps": card["eps"],
        "norm": card["norm"],
        "method": card["training"]["method"].get("name"),
        "model_card": card,
    }


def results_at_eps(card: dict[str, Any]) -> list[dict[str, Any]]:
    """The card's evaluations (eval.json rows) at the run's own eps and norm."""
    eps, norm = card.get("eps"), str(card.get("norm") or "").lower()
    return [
        row
        for row in card.get("evaluation") or []
        if row.get("eps") is not None
        and eps is not None
        and math.isclose(row["eps"], eps, rel_tol=1e-9, abs_tol=1e-12)
        and str(row.get("norm") or "").lower() == norm
    ]


def _metric_name(attack: str, row: dict[str, Any]) -> str:
    if attack == "clean":
        return "clean accuracy"
    what = "worst case over " + ", ".join(map(label, row["worst_case_over"]))
    text = what if attack == "worst_case" else f"{label(attack)} robust accuracy"
    return f"{text} ({row['norm']}, eps {row['settings']['eps_text']})"


def _heading(attack: str) -> str:
    return "worst case" if attack == "worst_case" else label(attack)


def _columns(row: dict[str, Any]) -> list[str]:
    return [*row["worst_case_over"], "worst_case"]


def model_index(card: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The hub's `model-index`: one result per stored evaluation at the run's eps, its metrics
    clean, each attack and the per-sample worst case, in percent."""
    results = []
    for row in results_at_eps(card):
        metrics = [
            {
                "type": "accuracy" if attack == "clean" else "robust_accuracy",
                "name": _metric_name(attack, row),
                "value": round(100 * row[attack], 2),
            }
            for attack in _columns(row)
        ]
        settings = row["settings"]
        dataset = {"name": settings["data"], "type": settings["data"], "split": settings["split"]}
        task = {"type": "image-classification", "name": "Image Classification"}
        results.append({"task": task, "dataset": dataset, "metrics": metrics})
    return [{"name": name, "results": results}]


def front_matter(card: dict[str, Any], name: str) -> dict[str, Any]:
    method = card["training"]["method"].get("name")
    tags = ["d2r", "adversarial-robustness", "robust-image-classification", "safetensors"]
    tags += [t for t in (method, card["architecture"]["name"], card.get("norm")) if t]
    return {
        "library_name": "d2r",
        "pipeline_tag": "image-classification",
        "tags": [str(t).lower().replace(":", "-") for t in dict.fromkeys(tags)],
        "datasets": [card["data"]["name"]],
        "metrics": ["accuracy"],
        "model-index": model_index(card, name),
    }


def readme(card: dict[str, Any], name: str) -> str:
    """README.md: the front matter, then how to load it, its results and its training."""
    training = card["training"]
    eps = card["eps"]
    eps_text = format_eps(eps) if isinstance(eps, (int, float)) else str(eps)
    head = yaml.safe_dump(front_matter(card, name), sort_keys=False, allow_unicode=True)
    lines = [
        f"---\n{head}---",
        "",
        f"# {name}",
        "",
        f"A {card['architecture']['name']} for {card['data']['name']}, adversarially trained "
        f"with d2r {card['d2r_version']} (method {training['method'].get('name')}, "
        f"{card['norm']} eps {eps_text}, {training.get('epochs')} epochs, seed "
        f"{training.get('seed')}; checkpoint {training['checkpoint']}, epoch "
        f"{training.get('epoch')}, weights {training['weights']}).",
        "",
        "```python",
        f"import d2r  # {HF_EXTRA}",
        'model = d2r.load_model("hf://OWNER/REPO")  # eval mode, returns logits',
        "```",
        "",
        f"Input: images of shape (C, H, W) = {tuple(card['data']['input_size'])}; "
        f"normalization {card['normalization']}.",
        "",
        *_results_section(card, eps_text),
        "config.json holds the whole d2r model card (`model_card`: architecture and options, "
        "the resolved training config, every stored evaluation at every eps).",
    ]
    return "\n".join(lines) + "\n"


def _results_section(card: dict[str, Any], eps_text: str) -> list[str]:
    """Accuracy in percent at the run's eps, one line per stored evaluation."""
    rows = results_at_eps(card)
    if not rows:
        return [
            f"No evaluation at {card['norm']} eps {eps_text} was stored when this was exported "
            "(`d2r eval RUN`, then export again).",
            "",
        ]
    lines = [f"## Accuracy (%) at {card['norm']} eps {eps_text}", ""]
    for row in rows:
        names = _columns(row)
        settings = row["settings"]
        lines += [
            f"{settings['data']} {settings['split']}, n = {settings['n']}, seed "
            f"{settings['seed']}, d2r {settings['version']}:",
            "",
            "| " + " | ".join(map(_heading, names)) + " |",
            "|" + " --- |" * len(names),
            "| " + " | ".join(f"{100 * row[n]:.2f}" for n in names) + " |",
            "",
        ]
    return lines


# Reading ------------------------------------------------------------------------------------


def is_hub_uri(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(HF_SCHEME)


def is_export_dir(path: Path) -> bool:
    """An hf export directory, not a run directory: config.json and no config.yaml."""
    return path.is_dir() and (path / CONFIG).is_file() and not (path / "config.yaml").exists()


def local_files(path: Path) -> HubFiles:
    return HubFiles(path / CONFIG, path / WEIGHTS, str(path))


def read_export(files: HubFiles) -> dict[str, Any]:
    """The model card of an hf export: config.json must carry the d2r marker and the card that
    model.safetensors carries; one-line ValueError otherwise."""
    where = files.where
    try:
        config = json.loads(files.config.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{where!r}: {CONFIG} is not readable JSON ({err})") from None
    if not isinstance(config, dict) or config.get("d2r_format") != HF_FORMAT:
        raise ValueError(
            f"{where!r}: {CONFIG} has no d2r_format {HF_FORMAT!r}: not a d2r export for the hub "
            "(write one with `d2r export RUN --format hf --out DIR`)"
        )
    version = config.get("d2r_format_version")
    if not isinstance(version, int) or version > HF_VERSION:
        raise ValueError(
            f"{where!r}: d2r_format_version {version!r} is newer than this d2r reads "
            f"({HF_VERSION}); upgrade d2r"
        )
    if not files.weights.is_file():
        raise FileNotFoundError(f"{where!r}: {WEIGHTS} not found beside {CONFIG}")
    card = read_card(files.weights)
    if config.get("model_card") != card:
        raise ValueError(
            f"{where!r}: the model card in {CONFIG} differs from the one in {WEIGHTS}; "
            "export again rather than mixing files of two exports"
        )
    return card


def parse_uri(uri: str) -> tuple[str, str | None]:
    """'hf://OWNER/REPO[@REVISION]' -> (repo id, revision or None); ValueError otherwise."""
    repo_id, at, revision = uri[len(HF_SCHEME) :].partition("@")
    if not _REPO_ID.fullmatch(repo_id) or (at and not revision):
        raise ValueError(f"{uri!r}: expected hf://OWNER/REPO or hf://OWNER/REPO@REVISION")
    return repo_id, revision or None


def download(uri: str) -> HubFiles:
    """config.json and model.safetensors of `uri` through huggingface_hub.hf_hub_download (its
    cache, its token, HF_HUB_OFFLINE); one line for a missing package or a failed fetch."""
    repo_id, revision = parse_uri(uri)
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ImportError(
            f"{uri!r}: loading from the Hugging Face hub needs huggingface_hub: {HF_EXTRA}"
        ) from None
    paths = {}
    for name in (CONFIG, WEIGHTS):
        try:
            paths[name] = Path(hf_hub_download(repo_id, name, revision=revision))
        except Exception as err:  # huggingface_hub's errors, told apart by name below
            raise fetch_error(err, uri, name) from None
    return HubFiles(paths[CONFIG], paths[WEIGHTS], uri)


def fetch_error(err: Exception, uri: str, filename: str) -> Exception:
    """huggingface_hub's failure as one line: by class name (its errors module moves between
    versions), the cache-only miss before the missing file (a subclass of it)."""
    names = {cls.__name__ for cls in type(err).__mro__}
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "RepositoryNotFoundError" in names:
        return ValueError(
            f"{uri!r}: no such model repository on the Hugging Face hub (a private or gated one "
            "needs `hf auth login` first)"
        )
    if "RevisionNotFoundError" in names:
        return ValueError(f"{uri!r}: the repository has no such revision ({first})")
    offline = {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}
    if names & offline or isinstance(err, (ConnectionError, TimeoutError)):
        return ConnectionError(
            f"{uri!r}: cannot reach the Hugging Face hub for {filename} and it is not in the "
            "local cache (offline? HF_HUB_OFFLINE=1 reads only the cache)"
        )
    if "EntryNotFoundError" in names:
        return ValueError(
            f"{uri!r} has no {filename}: not a d2r export for the hub (write one with "
            "`d2r export RUN --format hf --out DIR` and upload DIR)"
        )
    return OSError(f"{uri!r}: fetching {filename} failed ({type(err).__name__}: {first})")


__all__ = [
    "CONFIG",
    "FILES",
    "HF_FORMAT",
    "README",
    "WEIGHTS",
    "HubFiles",
    "check_out",
    "download",
    "hf_config",
    "is_export_dir",
    "is_hub_uri",
    "model_index",
    "parse_uri",
    "read_export",
    "readme",
]
