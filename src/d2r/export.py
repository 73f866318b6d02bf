"""Hand a robust model on: `export` writes a run's target weights as plain safetensors (keys of
the model's own state_dict, loadable anywhere) with a JSON model card in the file's metadata
and beside it as `<name>.json`; `load_model` rebuilds the architecture from the card and loads
the weights strictly, refusing any file whose card or tensors do not fit.

    d2r export runs/my-run --out robust.safetensors        # or: d2r.export_model(...)
    model = d2r.load_model("robust.safetensors")            # eval mode, inputs in [0, 1]
    d2r export runs/my-run --format hf --out hf-model       # then: hf upload OWNER/REPO hf-model .
    model = d2r.load_model("hf://OWNER/REPO")               # with huggingface_hub ([hf])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from d2r import hubs
from d2r.attacks import norm_label
from d2r.checkpoint import checkpoint_path, read_sidecar, target_weights
from d2r.config import to_dict
from d2r.evalstore import Store, rows
from d2r.files import atomic_write, atomic_write_text, check_writable
from d2r.models import MODELS, add_normalization, check_normalize, load_weights
from d2r.runs import (
    external_sources,
    load_checkpoint,
    load_run,
    read_config,
    resolved_config,
    run_data_info,
    split_model_spec,
)
from d2r.version import __version__
from d2r.weights import CARD_FORMAT, CARD_VERSION, META_KEY, card_source, read_card

NORMALIZATION = "none: float images (B, C, H, W) in [0, 1]; no mean/std to apply"


FORMATS = ("d2r", "hf")  # d2r: one .safetensors file and its .json; hf: the hub's directory


def export_model(
    run_dir: str | Path,
    out: str | Path | None = None,
    checkpoint: str = "last",
    *,
    format: str = "d2r",
) -> dict[str, Any]:
    """Write the target of `run_dir`'s `checkpoint` ('last', 'best', or 'ema': the EMA weights
    of last.safetensors; see runs.load_run) and return its card. format "d2r": to `out`
    (default RUN_DIR/model-<checkpoint>.safetensors) and its card to `out` with .json; "hf":
    the Hugging Face hub's layout in the directory `out` (d2r.hubs: model.safetensors,
    config.json, README.md). Every refusal comes before anything is written."""
    run_dir = Path(run_dir)
    out = _checked_out(run_dir, out, checkpoint, format)
    _, method, meta = load_checkpoint(run_dir, checkpoint)  # strict: a broken one fails here
    card = model_card(run_dir, checkpoint, *read_config(run_dir), meta=meta)
    state = {k: v.detach().cpu().contiguous() for k, v in method.target.state_dict().items()}
    weights = st_save(state, metadata={META_KEY: json.dumps(card, sort_keys=True)})
    if format == "hf":
        hubs.write_export(out, weights, card, run_dir.resolve().name)
        return card
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, weights)
    atomic_write_text(out.with_suffix(".json"), json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card


def _checked_out(run_dir: Path, out: str | Path | None, checkpoint: str, format: str) -> Path:
    """Where the export goes, refused (one line) before the checkpoint is read."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if format == "hf":
        if out is None:
            raise ValueError("--format hf writes a directory for the hub: give --out DIR")
        hubs.check_out(Path(out), run_dir, checkpoint)
        return Path(out)
    out = Path(out) if out is not None else run_dir / f"model-{checkpoint}.safetensors"
    _check_out(out, run_dir, checkpoint)
    return out


def _check_out(out: Path, run_dir: Path, checkpoint: str) -> None:
    """Before the checkpoint is read: a model-file name, not one of the run's checkpoints, not
    another model's export (re-exporting the same checkpoint refreshes it), a writable place."""
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {str(out)!r}: the model file must end in .safetensors")
    checkpoints = {(run_dir / f"{k}.safetensors").resolve() for k in ("last", "best")}
    if out.resolve() in checkpoints:
        raise ValueError(
            f"--out {str(out)!r} would overwrite the run's checkpoint; "
            "choose another name, e.g. model.safetensors"
        )
    held = _export_source(out) if out.exists() else None
    if out.exists() and held != (run_dir.resolve(), checkpoint):
        what = (
            f"the export of {held[1]} of {str(held[0])!r}" if held else "a file not exported by d2r"
        )
        raise ValueError(
            f"--out {str(out)!r} already holds {what}; choose another name or delete it first "
            "(only the same checkpoint of the same run is replaced)"
        )
    check_writable(out.parent, "export directory (--out)")


def _export_source(path: Path) -> tuple[Path, str] | None:
    """`weights.card_source` of the d2r export at `path`; None if it is none."""
    try:
        return card_source(read_card(path))
    except (ValueError, OSError, KeyError, TypeError):
        return None


def model_card(
    run_dir: Path,
    checkpoint: str,
    cfg: Any,
    not_recorded: list[str] | tuple = (),
    *,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything needed to rebuild and trust the model, as plain JSON; `training.config` is the
    resolved config without the `not_recorded` keys (listed instead of guessed). `meta`: the
    metadata of the checkpoint bytes the weights came from (default: its JSON copy), so the
    card's epoch and evaluations are those of the exported weights."""
    meta = read_sidecar(run_dir, checkpoint) if meta is None else meta
    cfg = resolved_config(cfg)
    info = run_data_info(run_dir, cfg.data)
    # every option of the architecture, as built: the card rebuilds it alone (load_model)
    # (target.weights, where the training started from, is no option of the architecture)
    arch, extra = split_model_spec("target", cfg.target)
    options = {"num_classes": info.num_classes, "in_channels": info.channels}
    options.update({k: v for k, v in arch.items() if k != "name"})
    config = _without(to_dict(cfg), list(not_recorded))
    source = {"run_dir": str(run_dir), "checkpoint": checkpoint_path(run_dir, checkpoint).name}
    return {
        "format": CARD_FORMAT,
        "format_version": CARD_VERSION,
        "d2r_version": __version__,
        "architecture": _architecture(cfg, options, extra["normalize"]),
        "data": _data(info, options["num_classes"]),
        "normalization": _normalization(extra["normalize"]),
        "eps": config["method"].get("eps"),
        "norm": norm_label(config["method"].get("norm", "linf")),  # before norm existed: linf
        "training": _training(config, meta, checkpoint, list(not_recorded)),
        "evaluation": _evaluation(run_dir, checkpoint, meta.get("sha256")),
        "source": source,
    }


def _data(info: Any, num_classes: int) -> dict[str, Any]:
    """The card's data section; the class names of a data set from files (folder, npz)."""
    shape = {"in_channels": info.channels, "input_size": [info.channels, info.size, info.size]}
    named = {"classes": list(info.classes)} if info.classes else {}
    return {"name": info.name, "num_classes": num_classes, **shape, **named}


def _architecture(
    cfg: Any, options: dict[str, Any], normalize: dict[str, Any] | None
) -> dict[str, Any]:
    """The card's {name, options}, with `normalize` (the mean/std layer in front) when the
    model has one and `source` (module file, distribution, version) for an import path."""
    arch: dict[str, Any] = {"name": cfg.target["name"], "options": options}
    if normalize is not None:
        arch["normalize"] = normalize
    source = external_sources(cfg).get("target")
    if source is not None:
        arch["source"] = source
    return arch


def _normalization(normalize: dict[str, Any] | None) -> str:
    if normalize is None:
        return NORMALIZATION
    return (
        f"inside the model: it takes float images (B, C, H, W) in [0, 1] and applies "
        f"(x - mean) / std itself (mean {normalize['mean']}, std {normalize['std']}); "
        "its state_dict keys are the architecture's own"
    )


def _training(
    config: dict[str, Any], meta: dict[str, Any], checkpoint: str, not_recorded: list[str]
) -> dict[str, Any]:
    """How the model was trained: the method, guide, length and seed at a glance, which
    checkpoint and which of its weights (the target's, or its EMA), then the whole resolved
    config."""
    return {
        "method": config["method"],
        "guide": config["guide"],
        "epochs": config["train"].get("epochs"),
        "seed": config.get("seed"),
        "checkpoint": checkpoint,
        "weights": target_weights(meta, checkpoint),
        "epoch": meta.get("epoch"),
        "config": config,
        "not_recorded": not_recorded,
    }


def _without(config: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """`config` without the dotted `keys`: a value the run's config.yaml does not record would
    be this version's default, not necessarily what was trained."""
    for key in keys:
        *parents, last = key.split(".")
        node: Any = config
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return config


def _evaluation(run_dir: Path, checkpoint: str, sha256: str | None) -> list[dict] | None:
    """Every stored evaluation of this checkpoint's bytes (eval.json rows of its sha256: one per
    eps and norm, with the worst case and what it covers), or None if it was never evaluated."""
    found = [
        {k: v for k, v in row.items() if k not in ("label", "warnings")}
        for row in rows(Store.read(run_dir))
        if row["checkpoint"] == checkpoint and row["sha256"] == sha256
    ]
    return found or None


# Loading ------------------------------------------------------------------------------------


def load_model(path: str | Path, *, checkpoint: str = "last") -> nn.Module:
    """An eval-mode nn.Module from an exported file, an hf export directory (`d2r export
    --format hf`), "hf://OWNER/REPO[@REVISION]" (the same, fetched by huggingface_hub) or a run
    directory's `checkpoint`, taking float images in [0, 1] and returning logits: ready for any
    attack library. Its card is attached as `model.d2r_card`. Refuses files without a valid
    card and weights that do not fit the card's architecture exactly."""
    if hubs.is_hub_uri(path):
        files = hubs.download(str(path))
        return _card_model(files.weights, hubs.read_export(files), files.where)
    path = Path(path)
    if hubs.is_export_dir(path):  # config.json with the d2r marker, no config.yaml
        files = hubs.local_files(path)
        return _card_model(files.weights, hubs.read_export(files), files.where)
    if path.is_dir():  # a run directory: its target, as the trainer saved it
        _, method = load_run(path, checkpoint)
        return method.target.eval()
    return _card_model(path, read_card(path), str(path))


def _card_model(weights: Path, card: dict[str, Any], source: str) -> nn.Module:
    model = build_card_model(card, source)
    load_weights(model, st_load(weights.read_bytes()), source)
    model.d2r_card = card
    return model.eval()


def build_card_model(card: dict[str, Any], source: str) -> nn.Module:
    """The architecture a model card names, with its options and its normalization (never
    fetching pretrained weights: the file holds the weights); one-line ValueError otherwise."""
    arch = card["architecture"]
    options = dict(arch.get("options", {}))
    if MODELS.is_external(arch["name"]) and options.get("pretrained"):
        options["pretrained"] = False
    try:
        model = MODELS.create(arch["name"], **options)
        if arch.get("normalize") is not None:
            channels = int(options.get("in_channels", 3))
            add_normalization(model, check_normalize(arch["normalize"], channels))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source!r}: cannot build the card's architecture ({err})") from None
    return model


def add_command(sub: Any) -> None:
    """`d2r export RUN_DIR [--format d2r|hf] --out FILE|DIR [--checkpoint last|best|ema]`
    (cli.build_parser calls it)."""
    p = sub.add_parser(
        "export",
        help="write a run's target as safetensors with a JSON model card",
        description="Write the target model's weights (plain state_dict keys) with a model card "
        "(architecture, data set, input size, normalization, eps, method, evaluation) embedded "
        "in the safetensors metadata and beside it as .json. Load with d2r.load_model(FILE). "
        "--format hf writes the Hugging Face hub's layout in --out DIR (model.safetensors, "
        "config.json, README.md), to upload as it is: docs/hubs.md.",
    )
    p.add_argument("run_dir", help="run directory written by `d2r train`")
    p.add_argument(
        "--out",
        help="model file (default: RUN_DIR/model-<checkpoint>.safetensors); with --format hf, "
        "the directory (required)",
    )
    p.add_argument(
        "--checkpoint",
        choices=["last", "best", "ema"],
        default="last",
        help="ema: the EMA weights of last.safetensors (a run with train.ema_decay > 0)",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="d2r",
        help="d2r: one .safetensors file and its .json card (default); hf: a directory in the "
        "Hugging Face hub's layout (model.safetensors, config.json, README.md)",
    )
    p.set_defaults(func=_command)


def _command(args: Any) -> int:
    out = Path(args.out) if args.out else None
    card = export_model(args.run_dir, out, args.checkpoint, format=args.format)
    what = f"{card['architecture']['name']}, {card['data']['name']}, eps {card['eps']}"
    if args.format == "hf":
        print(
            f"wrote {out}/ ({', '.join(hubs.FILES)}; {what}); upload it as it is: "
            f"hf upload OWNER/REPO {out} ."
        )
        return 0
    out = out or Path(args.run_dir) / f"model-{args.checkpoint}.safetensors"
    print(f"wrote {out} ({what}) and {out.with_suffix('.json')}")
    return 0


__all__ = [
    "add_command",
    "build_card_model",
    "export_model",
    "load_model",
    "model_card",
    "read_card",
]
