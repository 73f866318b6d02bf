"""The run's whole state, in one place: what `last.safetensors` / `best.safetensors` hold (every
model of the method, the optimizer by parameter name and the method's own optimizers (LAS-AT's),
every RNG, the loader position, the loop's counters, the config), one `save_run` and one
`restore_run` (`runs.load_run` rebuilds a run from them for evaluation and export).

File format: tensors in safetensors, metadata as JSON inside the same file (one atomic rename
writes both, with a sha256 over the content) and beside it as `<name>.json` for people.
Nothing is ever unpickled."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from d2r.files import atomic_write, atomic_write_text
from d2r.models import load_weights

if TYPE_CHECKING:
    from d2r.data import DeviceLoader
    from d2r.ema import EMA
    from d2r.methods import Method

FORMAT = "d2r-checkpoint"
FORMAT_VERSION = 2  # 2: content sha256 and the full training state (1 never left 0.1.0 dev)
_META_KEY = "d2r"


def save(
    path: str | Path,
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    also: Sequence[str | Path] = (),
) -> None:
    """Write `tensors` and JSON-able `meta` to `path` (.safetensors) and `meta` to `path`.json;
    then the same bytes to each path of `also` (best.safetensors when the epoch improved),
    serialized and hashed once."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta["sha256"] = content_sha256(cpu, meta)  # a flipped bit anywhere is refused on load
    data = st_save(cpu, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    sidecar = json.dumps(meta, indent=2, sort_keys=True)
    for target in [path, *also]:
        try:
            atomic_write(target, data)
        except OSError as err:  # full disk, read-only mount: the previous file is still whole
            raise ValueError(
                f"could not write checkpoint {str(target)!r} ({err.strerror or err}); the "
                "previous checkpoint there is intact; free disk space or fix permissions, then "
                "resume"
            ) from None
        atomic_write_text(Path(target).with_suffix(".json"), sidecar)


def load(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a checkpoint written by `save`; ValueError naming the file if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        meta = json.loads(_read_metadata(data).get(_META_KEY, "{}"))
    except (SafetensorError, ValueError, OSError) as err:
        raise ValueError(
            f"checkpoint {str(path)!r} is truncated or not a safetensors file ({err}); "
            "use another checkpoint (e.g. best.safetensors) or retrain"
        ) from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is a safetensors file but not a d2r checkpoint")
    _verify(path, tensors, meta)
    return tensors, meta


def is_run_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a safetensors file whose metadata says d2r wrote it as a checkpoint."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
    except (SafetensorError, OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def stored_sha256(path: str | Path) -> str | None:
    """The content sha256 a checkpoint carries in its header (what `load` verifies), read
    without loading the tensors; None if `path` is missing or not a d2r checkpoint."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
    except (SafetensorError, OSError, ValueError):
        return None
    return meta.get("sha256") if isinstance(meta, dict) else None


def content_sha256(tensors: dict[str, Tensor], meta: dict[str, Any]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and the metadata without the hash."""
    digest = hashlib.sha256()
    rest = {k: v for k, v in meta.items() if k != "sha256"}
    digest.update(json.dumps(rest, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _verify(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has checkpoint format version {version!r}; this d2r "
            f"reads {FORMAT_VERSION}: use the d2r version that wrote it"
        )
    if meta.get("sha256") != content_sha256(tensors, meta):
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupted (its sha256 does not match its content); "
            "use another checkpoint (e.g. best.safetensors) or retrain"
        )


def _read_metadata(data: bytes) -> dict[str, str]:
    # safetensors layout: 8-byte little-endian header length, then a JSON header.
    if len(data) < 8:
        raise ValueError("file shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__", {}) or {}


def prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    start = f"{prefix}."
    return {k[len(start) :]: v for k, v in tensors.items() if k.startswith(start)}


# The run's state ------------------------------------------------------------------------------
STATE = "state"  # tensor-key prefix of the training state, beside one prefix per model
EMA_PREFIX = "ema"  # tensor-key prefix of the target's EMA weights (train.ema_decay > 0)
# What `runs.load_run` loads: a file's models, or (ema) last.safetensors' target EMA weights
CHECKPOINTS = ("last", "best", "ema")


@dataclass
class TrainState:
    """The loop's counters: what, beside models, optimizer, RNGs and loader, a resume needs.
    `sums`/`count` are the current epoch's loss terms so far (on the device)."""

    epoch: int = 0  # epochs completed
    step: int = 0
    best: float = -1.0  # the best per-epoch robust accuracy, which picks best.safetensors
    history: list[dict[str, Any]] = field(default_factory=list)
    sums: dict[str, Tensor] = field(default_factory=dict)
    count: int = 0  # batches in `sums`
    skipped: int = 0  # batches skipped for a non-finite loss
    metrics_bytes: int = 0  # metrics.jsonl's size when the checkpoint was taken

    def counters(self) -> dict[str, Any]:
        names = ("epoch", "step", "best", "history", "count", "skipped", "metrics_bytes")
        return {k: getattr(self, k) for k in names}


@dataclass
class RunObjects:
    """The live objects whose state a run checkpoint holds beside the counters: the method
    (every model), the optimizer, the loader (its position and RNG) and the target's EMA."""

    method: Method
    optimizer: torch.optim.Optimizer
    loader: DeviceLoader
    ema: EMA | None = None


def save_run(
    path: Path,
    objects: RunObjects,
    state: TrainState,
    config: dict[str, Any],
    record: dict[str, Any] | None,
    also: Sequence[Path] = (),
) -> None:
    """Write everything an exact resume needs to `path` (atomic). `record`: the epoch's log
    line at an epoch end, None mid-epoch. The EMA of the target (if any) is stored under its
    own prefix "ema", outside the models (it is not trained), and described in meta["ema"].
    `also`: more paths that get the same file (best.safetensors)."""
    method, optimizer, loader, ema = objects.method, objects.optimizer, objects.loader, objects.ema
    models = method.models()
    tensors = {}
    for name, model in models.items():
        tensors.update(prefixed(name, model.state_dict()))
    optim_tensors, optim_meta = optimizer_state(optimizer, models)
    own_tensors, own_meta = method_optimizers_state(method, models)
    rng_tensors, rng_meta = capture_rng()
    position = loader.state_dict()
    generators = [k for k, v in position.items() if isinstance(v, Tensor)]
    extra = {f"loader.{k}": position.pop(k) for k in generators}  # the loader's RNG states
    extra.update({**optim_tensors, **own_tensors, **rng_tensors})
    extra.update(prefixed("sums", {k: torch.as_tensor(v) for k, v in state.sums.items()}))
    tensors.update(prefixed(STATE, extra))
    # "terms": the file keeps tensors sorted; the log keeps this order
    train_state = {**state.counters(), "terms": list(state.sums), "loader": position}
    train_state.update(optimizer=optim_meta, rng=rng_meta)
    if own_meta:  # only a method with optimizers of its own (LAS-AT) writes the key
        train_state["method_optimizers"] = own_meta
    meta = {"epoch": state.epoch, "step": state.step, "record": record, "config": config}
    meta.update(models=list(models), train_state=train_state)
    if ema is not None:
        tensors.update(prefixed(EMA_PREFIX, ema.state_dict()))
        meta["ema"] = {"of": "target", "decay": ema.decay, "updates": ema.updates}
    save(path, tensors, meta, also)


def restore_run(path: Path, objects: RunObjects) -> TrainState:
    """Load `path` into the method, optimizer, loader and EMA, restore every RNG, and return
    the counters. The RNGs come last: building the models drew from the global RNG. An EMA
    that the checkpoint lacks (train.ema_decay set on resume) starts from the loaded weights."""
    method, optimizer, loader, ema = objects.method, objects.optimizer, objects.loader, objects.ema
    tensors, meta = load(path)  # format, integrity hash
    models = method.models()
    load_models(models, tensors, meta, path)
    if ema is not None and "ema" in meta:
        ema.load_state_dict(unprefixed(EMA_PREFIX, tensors), meta["ema"]["updates"], str(path))
    elif ema is not None:
        ema.reset()
    extra = unprefixed(STATE, tensors)
    ts = meta["train_state"]
    load_optimizer_state(optimizer, models, extra, ts["optimizer"], str(path))
    load_method_optimizers(method, models, extra, ts.get("method_optimizers", {}), str(path))
    loader.load_state_dict({**ts["loader"], **unprefixed("loader", extra)})
    device = next(method.parameters()).device
    sums = unprefixed("sums", extra)
    sums = {k: sums[k].to(device) for k in ts.get("terms", sorted(sums))}
    counters = {k: ts[k] for k in TrainState().counters()}
    restore_rng(extra, ts["rng"])
    return TrainState(**counters, sums=sums)


def load_models(
    models: dict[str, nn.Module], tensors: dict[str, Tensor], meta: dict[str, Any], path: Path
) -> None:
    """Each model's weights from a run checkpoint, strictly (a missing model is an error)."""
    for name, model in models.items():
        if name not in meta.get("models", []):
            raise ValueError(f"{str(path)!r} holds no {name} model (it has {meta.get('models')})")
        load_weights(model, model_weights(tensors, name), f"{path}:{name}")


def model_weights(tensors: dict[str, Tensor], name: str) -> dict[str, Tensor]:
    """One model's state dict out of a run checkpoint's tensors (keys `<name>.<key>`)."""
    return unprefixed(name, tensors)


def checkpoint_path(run_dir: str | Path, which: str) -> Path:
    """The file of checkpoint `which` (CHECKPOINTS); "ema" lives in last.safetensors."""
    if which not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {which!r}; choose one of {', '.join(CHECKPOINTS)}")
    return Path(run_dir) / f"{'last' if which == 'ema' else which}.safetensors"


def target_weights(meta: dict[str, Any], which: str) -> str:
    """Which weights `runs.load_run(..., which)` puts in the target: "ema" or "target"."""
    return "ema" if which == "ema" or (which == "best" and "ema" in meta) else "target"


def run_checkpoints(run_dir: str | Path) -> list[str]:
    """The checkpoints a run directory holds, in CHECKPOINTS order (read from the JSON copies
    of the metadata): last, best when written, ema when last.safetensors has an EMA."""
    run_dir = Path(run_dir)
    found = ["last"] + (["best"] if (run_dir / "best.safetensors").is_file() else [])
    return found + (["ema"] if "ema" in read_sidecar(run_dir, "last") else [])


def read_sidecar(run_dir: str | Path, which: str) -> dict[str, Any]:
    """Checkpoint `which`'s metadata from its JSON copy (last.json for "ema"); {} when missing
    or unreadable. For labels and listings only: loading reads the safetensors header."""
    try:
        meta = json.loads(checkpoint_path(run_dir, which).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def remove_stale_temps(run_dir: Path) -> None:
    """Temp files of a write that was killed (atomic_write's `.<name>.*.tmp`) are debris."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# RNG ------------------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every generator a step may draw from: torch CPU and CUDA, numpy, Python `random`.
    (The data pipeline's own generator is saved with the loader state.)"""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["rng.python"] = torch.tensor(internal, dtype=torch.int64)  # 625 words < 2**32
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [version, gauss_next],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state(
        (kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss)
    )
    version, gauss_next = meta["python"]
    random.setstate((version, tuple(tensors["rng.python"].tolist()), gauss_next))


# Optimizer ------------------------------------------------------------------------------------
def optimizer_state(
    optimizer: torch.optim.Optimizer, models: dict[str, nn.Module]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Per-parameter state keyed `optim.<model>.<parameter name>.<slot>` (e.g. momentum_buffer),
    not by position, so a reordered model fails loudly instead of loading the wrong buffers;
    group hyper-parameters (lr, momentum, ...) as JSON."""
    tensors, scalars = {}, {}
    for name, model in models.items():
        for pname, param in model.named_parameters():
            for slot, value in optimizer.state.get(param, {}).items():
                key = f"optim.{name}.{pname}.{slot}"
                if isinstance(value, Tensor):
                    tensors[key] = value
                else:
                    scalars[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return tensors, {"groups": groups, "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    models: dict[str, nn.Module],
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    source: str,
) -> None:
    if len(meta["groups"]) != len(optimizer.param_groups):
        raise ValueError(
            f"{source}: optimizer has {len(meta['groups'])} parameter groups in the "
            f"file, {len(optimizer.param_groups)} here; resume with the same models"
        )
    for group, saved in zip(optimizer.param_groups, meta["groups"], strict=True):
        group.update(saved)
    params = {
        f"optim.{n}.{p}": param for n, m in models.items() for p, param in m.named_parameters()
    }
    slots = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    for key, value in {**slots, **meta["scalars"]}.items():
        pname, slot = key.rsplit(".", 1)
        if pname not in params:
            raise ValueError(
                f"{source}: optimizer state for unknown parameter {pname[6:]!r}; "
                "the checkpoint is from another architecture"
            )
        optimizer.state[params[pname]][slot] = _like_param(value, params[pname])


METHOD_OPTIM = "method_optim"  # tensor-key prefix of a method's own optimizers (`optimizers`)


def method_optimizers_state(
    method: Method, models: dict[str, nn.Module]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state of each of `method.optimizers()`, as `optimizer_state` writes the trainer's,
    its tensors under `method_optim.<name>.`: ({}, {}) for a method without any."""
    tensors, meta = {}, {}
    for name, opt in method.optimizers().items():
        opt_tensors, meta[name] = optimizer_state(opt, models)
        tensors.update(prefixed(f"{METHOD_OPTIM}.{name}", opt_tensors))
    return tensors, meta


def load_method_optimizers(
    method: Method,
    models: dict[str, nn.Module],
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    source: str,
) -> None:
    """Each of `method.optimizers()` back from a run checkpoint; one the file lacks is refused
    (the run was trained by another method or options)."""
    for name, opt in method.optimizers().items():
        if name not in meta:
            raise ValueError(
                f"{source}: holds no state of the method's optimizer {name!r}; resume with the "
                "config the run was trained with"
            )
        own = unprefixed(f"{METHOD_OPTIM}.{name}", tensors)
        load_optimizer_state(opt, models, own, meta[name], source)


def _like_param(value: Any, param: Tensor) -> Any:
    """A restored buffer in its parameter's memory format and device (the file holds contiguous
    NCHW): fused SGD walks a channels_last parameter and its momentum buffer as flat memory."""
    if isinstance(value, Tensor) and value.shape == param.shape:
        return torch.empty_like(param, dtype=value.dtype).copy_(value)
    if isinstance(value, Tensor):
        return value.to(param.device)
    return value
