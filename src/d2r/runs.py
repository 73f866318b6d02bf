"""What a run is: its method built from the config, its directory and environment record.
The training loop is in `trainer`; the run's saved state in `checkpoint`; `load_run` rebuilds a
run from them for evaluation and export."""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2r import checkpoint, data
from d2r.attacks import EVAL_ATTACKS, check_radius
from d2r.config import (
    Config,
    TrainConfig,
    coerce,
    earlier_defaults,
    flatten,
    load_yaml,
    replace,
    resolve,
    to_dict,
)
from d2r.files import Lock, atomic_write_text, check_writable, file_sha256, lock_holder
from d2r.methods import METHODS, Method
from d2r.models import (
    MODELS,
    ForwardFailed,
    add_normalization,
    check_model,
    check_normalize,
    load_weights,
)
from d2r.plugins import PLUGINS
from d2r.registry import OptionError, build, resolve_spec
from d2r.version import __version__
from d2r.weights import load_foreign, read_card

# Model options that build_method fills from the data set, not from the config: a config that
# does not name them follows its data set (data.name is recorded), so they are not filled in.
DATA_SIZED = ("num_classes", "in_channels")

# Keys of a model section that are no option of the architecture: build_method consumes them
# (initial weights, a frozen guide, a mean/std normalization in front), with their defaults.
# A run records them only when they differ from the default, so runs from before they existed
# (which had no other choice) stay comparable with today's.
MODEL_KEYS: dict[str, dict[str, Any]] = {
    "target": {"weights": None, "normalize": None},
    "guide": {"weights": None, "trainable": True, "normalize": None},
}


def split_model_spec(section: str, spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the architecture's spec, MODEL_KEYS of `section` with their defaults), the latter
    checked: `weights` a file path or null, `trainable` true or false (`normalize`, whose
    length depends on the data set's channels, is checked where the model is built)."""
    keys = MODEL_KEYS[section]
    extra = {k: spec.get(k, default) for k, default in keys.items()}
    if extra["weights"] is not None and not isinstance(extra["weights"], str):
        raise ValueError(
            f"config key '{section}.weights': expected a weights file path, got "
            f"{extra['weights']!r}"
        )
    if "trainable" in extra:
        extra["trainable"] = coerce(f"{section}.trainable", extra["trainable"], True)
        if not extra["trainable"] and extra["weights"] is None:
            raise ValueError(
                f"config key '{section}.trainable': false freezes the {section} as built, at "
                f"random; give {section}.weights=FILE (a pre-trained model) or drop it"
            )
    return {k: v for k, v in spec.items() if k not in keys}, extra


def build_method(cfg: Config, info: data.DatasetInfo, *, initial_weights: bool = True) -> Method:
    """Models from the registry (sized for the data set), with their `weights` files loaded
    (`initial_weights`; False where a checkpoint's weights follow: resume, eval, export), then
    the method around them, a guide with `trainable: false` frozen."""
    method_cls = METHODS.get(cfg.method["name"])
    sections = {"target": cfg.target}
    if method_cls.uses_guide:
        if cfg.guide is None:
            raise ValueError(f"method {cfg.method['name']!r} needs a guide: set guide.name")
        sections["guide"] = cfg.guide
    models, frozen = {}, []
    for section, spec in sections.items():
        models[section], extra = _build_model(section, spec, info, initial_weights)
        if not extra.get("trainable", True):
            frozen.append(section)
    method = build(METHODS, cfg.method, *models.values(), key="method")
    for section in frozen:
        method.freeze(section)
    return method


def _build_model(
    section: str, spec: dict[str, Any], info: data.DatasetInfo, initial_weights: bool
) -> tuple[nn.Module, dict[str, Any]]:
    sizes = {"num_classes": info.num_classes, "in_channels": info.channels}
    spec, extra = split_model_spec(section, spec)
    if not initial_weights and MODELS.is_external(spec["name"]) and spec.get("pretrained"):
        spec = {**spec, "pretrained": False}  # a checkpoint's weights follow: fetch nothing
    model = build(MODELS, {**sizes, **spec}, key=section)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"config key '{section}.name': {spec['name']!r} returned "
            f"{type(model).__name__!r}, not a torch.nn.Module"
        )
    if extra["normalize"] is not None:
        add_normalization(
            model, check_normalize(extra["normalize"], info.channels, f"{section}.normalize")
        )
    if initial_weights and extra["weights"] is not None:
        load_initial_weights(model, spec["name"], extra["weights"], section)
    return model, extra


def load_initial_weights(model: nn.Module, arch: str, path: str, section: str) -> None:
    """`section.weights=FILE` into `model` (architecture `arch`), strictly: a d2r export (its
    card must name `arch`), a run's last/best.safetensors (that run's *target*: a model trained
    on the task), or a foreign state dict (.safetensors or .pt, keys mapped as `d2r eval
    --weights` maps them). On the meta device (check_config) only keys and shapes are checked.
    Errors name the config key."""
    where = f"config key '{section}.weights'"
    try:
        card_arch = _card_architecture(path)
        if card_arch is not None and card_arch != arch:
            raise ValueError(
                f"{path!r} holds a {card_arch} (its model card) but {section}.name is {arch}; "
                f"set {section}.name={card_arch} (and its options) or give another file"
            )
        load_foreign(model, path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{where}: {err}") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _card_architecture(path: str) -> str | None:
    """The architecture named by a d2r export's model card; None for any other file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path!r} not found")
    if Path(path).suffix != ".safetensors":
        return None
    try:
        return read_card(path)["architecture"]["name"]
    except ValueError:  # no card: a run checkpoint or a foreign file, read by load_foreign
        return None


def weight_files(cfg: Config) -> dict[str, dict[str, str]]:
    """{section: {"path", "sha256"}} of each `weights` file the run starts from (env.json):
    the config records the path, this the bytes it held."""
    sections = {"target": cfg.target, "guide": cfg.guide}
    files = {k: s["weights"] for k, s in sections.items() if s and s.get("weights")}
    return {k: {"path": p, "sha256": file_sha256(Path(p))} for k, p in files.items()}


def eval_eps(cfg: Config) -> float:
    """The per-epoch check's eps: `eval.eps` when given, else the method's own training eps
    (set in the config, or its constructor's default)."""
    if cfg.eval.eps is not None:
        return cfg.eval.eps
    return float(resolve_spec(METHODS, cfg.method, key="method").get("eps", 0.0))


def eval_norm(cfg: Config) -> str:
    """The per-epoch check's norm: the method's training norm ("linf" for a method without
    one); `eval.eps`, when given, is a radius in it."""
    return str(resolve_spec(METHODS, cfg.method, key="method").get("norm", "linf"))


def check_config(cfg: Config) -> None:
    """Every option a run would refuse, refused now (one-line ValueError): the models and the
    method are built on the meta device, which allocates nothing, so even WRN-34-10 is cheap."""
    info = data.section_info(cfg.data)
    with torch.device("meta"):  # weights files are read and checked against the shapes
        method = build_method(cfg, info)
    check_external_models(cfg, info, method)
    check_schedule(cfg.train)
    method = resolve_spec(METHODS, cfg.method, key="method")
    shape = (info.channels, info.size, info.size)
    radii = {"method.eps": method.get("eps"), "eval.eps": cfg.eval.eps}
    for key, eps in ((k, v) for k, v in radii.items() if v is not None):
        try:  # an L2 radius past the image cube's diameter (L-inf > 1: the attack refuses it)
            check_radius(float(eps), eval_norm(cfg), shape)
        except OptionError as err:
            raise ValueError(f"config key {key!r}: {err.rule}, got {eps!r}") from None


def check_external_models(cfg: Config, info: data.DatasetInfo, method: Method) -> None:
    """A model from an import path, timm or torchvision must give (2, num_classes) logits for
    2 images of the data set's shape: on the meta device, or on the CPU where its forward does
    not run there (built without pretrained weights)."""
    shape = (info.channels, info.size, info.size)
    for section in ("target", "guide"):
        spec, model = getattr(cfg, section), getattr(method, section, None)
        if model is None or spec is None or not MODELS.is_external(spec["name"]):
            continue
        classes = int(spec.get("num_classes", info.num_classes))
        try:
            check_model(model, spec["name"], classes, shape)
        except ForwardFailed:
            with torch.device("cpu"):
                model = _build_model(section, spec, info, initial_weights=False)[0]
            check_model(model, spec["name"], classes, shape)


def external_sources(cfg: Config) -> dict[str, dict[str, Any]]:
    """{section: provenance} of each model and method named by an import path, timm: or
    torchvision: (the spec, the module's file, the distribution providing it and its
    version): what env.json and the model card record beside the config's name."""
    sections = {"method": (METHODS, cfg.method), "target": (MODELS, cfg.target)}
    if cfg.guide is not None and METHODS.get(cfg.method["name"]).uses_guide:
        sections["guide"] = (MODELS, cfg.guide)
    found = {k: reg.provenance(spec["name"]) for k, (reg, spec) in sections.items()}
    return {k: v for k, v in found.items() if v is not None}


def check_schedule(t: TrainConfig) -> None:
    """The schedule's options that only make sense together, refused before any work."""
    if t.schedule == "step" and t.warmup_epochs > 0:
        raise ValueError(
            "train.warmup_epochs is the cosine schedule's warm-up (the step schedule's is "
            "train.warmup_factor): set train.schedule=cosine or train.warmup_epochs=0"
        )
    if t.warmup_epochs >= t.epochs > 0 and t.schedule == "cosine":
        raise ValueError(
            f"train.warmup_epochs={t.warmup_epochs} leaves no epoch of the {t.epochs} to anneal; "
            "use fewer warm-up epochs"
        )


def write_env(
    run_dir: Path, device: torch.device, extra: dict[str, Any], resumed_step: int | None
) -> None:
    """env.json: versions, git hash, device; a resumed run (resumed_step: where it resumed)
    keeps the original start and lists each resume after it."""
    env = {**environment(device), **extra}
    if resumed_step is not None:
        old = json.loads((run_dir / "env.json").read_text())
        env = {**old, "resumes": [*old.get("resumes", []), {**env, "step": resumed_step}]}
    atomic_write_text(run_dir / "env.json", json.dumps(env, indent=2))


def data_record(info: data.DatasetInfo) -> dict[str, Any]:
    """What rebuilding a run's models needs of a data set from files (env.json's "data")."""
    return {
        "name": info.name,
        "num_classes": info.num_classes,
        "channels": info.channels,
        "size": info.size,
        "classes": list(info.classes),
    }


def run_data_info(run_dir: Path, d: Any) -> data.DatasetInfo:
    """The data set's shape and classes to rebuild a run's models: for a set from files, as
    env.json recorded them (so `d2r export` and `load_model` need none of data.root's files);
    else, and for a run of an older d2r, `data.section_info`."""
    env_path = run_dir / "env.json"
    record = None
    if d.name in data.FILE_SETS and env_path.is_file():
        record = json.loads(env_path.read_text()).get("data")
    if record is None:
        return data.section_info(d)
    sizes = (record["num_classes"], record["channels"], record["size"])
    return data.DatasetInfo(d.name, *sizes, 0, False, (), classes=tuple(record["classes"]))


def resolved_config(cfg: Config) -> Config:
    """`cfg` with every option of target, guide and method at the value used, defaults included
    (the data, train and eval sections always hold every key). What a run records in
    config.yaml, its checkpoints and its model card. The guide is None for a method that trains
    none (it would not be built). Raises ValueError as building them would."""
    method = resolve_spec(METHODS, cfg.method, key="method")
    target = _resolve_model("target", cfg.target)
    guide = None
    if METHODS.get(method["name"]).uses_guide and cfg.guide is not None:
        guide = _resolve_model("guide", cfg.guide)
    d = cfg.data
    if d.name in data.FILE_SETS and d.classes is None:  # your own files: record their classes
        d = dataclasses.replace(d, classes=list(data.section_info(d).classes))
    return replace(cfg, data=d, method=method, target=target, guide=guide)


def _resolve_model(section: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Every option of the architecture, then the MODEL_KEYS that differ from their default."""
    arch, extra = split_model_spec(section, spec)
    changed = {k: v for k, v in extra.items() if v != MODEL_KEYS[section][k]}
    return {**resolve_spec(MODELS, arch, skip=DATA_SIZED, key=section), **changed}


def read_config(run_dir: str | Path) -> tuple[Config, list[str]]:
    """A run's config.yaml, resolved, and the keys it does not record (an older d2r wrote it):
    their values in the Config are this version's defaults, not what the run was known to use,
    so callers must say so (`d2r report` compares them as "not recorded")."""
    path = Path(run_dir) / "config.yaml"
    raw = load_yaml(path)
    earlier = earlier_defaults(raw)  # keys an older d2r did not write but is known to have used
    cfg = resolve(path, earlier)  # errors name the file
    try:
        cfg = resolved_config(cfg)
    except ValueError as err:
        raise ValueError(f"{str(path)!r}: {err}") from None
    given = flatten({k: {"name": v} if isinstance(v, str) else v for k, v in raw.items()})
    given |= dict.fromkeys(item.partition("=")[0] for item in earlier)
    recorded = set(given) | {k.rsplit(".", 1)[0] for k in given}  # guide.* records "guide"
    missing = [k for k in flatten(to_dict(cfg)) if k not in recorded]
    return cfg, missing


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "d2r": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor(),
        "git": _git_hash(),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def prepare_run_dir(out: str | Path, resume: bool = False) -> Path:
    """The run directory, checked before any work: refused if it already holds a run (never
    overwrite a result) unless resuming it, or if it cannot be created or written. The check
    creates nothing; the run's first write does."""
    run_dir = Path(out)
    if resume:
        for name in ("config.yaml", "last.safetensors"):
            if not (run_dir / name).is_file():
                raise FileNotFoundError(
                    f"cannot resume {str(run_dir)!r}: it has no {name}; give a run directory "
                    "written by `d2r train` (a run killed before its first checkpoint must restart)"
                )
    elif (run_dir / "config.yaml").exists():
        raise ValueError(
            f"{str(run_dir)!r} already holds a run; choose another --out (or resume it)"
        )
    return check_writable(run_dir, "run directory (--out)")


RUN_LOCK = ".run.lock"  # held by the one trainer that writes the run directory


def own_run_dir(run_dir: str | Path, wait: bool = False) -> Lock:
    """The run directory's lock, held by its trainer for the run's life (released however the
    run ends, by the kernel if the process is killed): a second trainer on it (a second
    `d2r train --resume`, another sweep's cell) would write every record twice. Refused in one
    line naming the trainer that holds it, or, with `wait`, waited for (said in one line)."""
    run_dir = Path(run_dir)

    def waiting(holder: str) -> None:
        print(f"d2r train: waiting for {holder}, which trains {run_dir}", file=sys.stderr)

    return Lock(
        run_dir / RUN_LOCK,
        wait=wait,
        what=f"run directory {str(run_dir)!r}",
        fix="wait for that trainer to end (d2r train --wait), or stop it (its checkpoint resumes)",
        waiting=waiting,
    )


def training_now(run_dir: str | Path) -> str | None:
    """Who is training `run_dir` now (the holder of its lock: pid, host, command, start), or
    None when no trainer is."""
    return lock_holder(Path(run_dir) / RUN_LOCK)


def default_run_dir(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.data.name}-{cfg.method['name']}"


@dataclass
class Run:
    """What `train` returns: the run directory, its config, the trained method, and the
    per-epoch records (the lines of metrics.jsonl with "kind": "epoch")."""

    dir: Path
    config: Config
    method: Method
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}


# Rebuilding a run ---------------------------------------------------------------------------
def load_run(run_dir: str | Path, which: str = "last") -> tuple[Config, Method]:
    """Rebuild a run's method from its config.yaml and load its `which` checkpoint (strictly),
    in eval mode: what `d2r eval` and `d2r export` start from. `which`: "last", "best", or
    "ema", last.safetensors with the target's EMA weights in `method.target`. In a run with an
    EMA, "best" also loads best.safetensors' EMA weights: the model its check measured."""
    cfg, method, _ = load_checkpoint(run_dir, which)
    return cfg, method


def load_checkpoint(run_dir: str | Path, which: str = "last") -> tuple[Config, Method, dict]:
    """`load_run` and the checkpoint's metadata (epoch, content sha256, EMA), all from the one
    read of its bytes: a trainer renaming a newer checkpoint into place meanwhile cannot make
    one checkpoint's weights carry another's epoch or hash."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = resolve(run_dir / "config.yaml")
    # the checkpoint holds every model: no `weights` file is read
    method = build_method(cfg, run_data_info(run_dir, cfg.data), initial_weights=False)
    path = checkpoint.checkpoint_path(run_dir, which)
    tensors, meta = checkpoint.load(path)
    checkpoint.load_models(method.models(), tensors, meta, path)
    if checkpoint.target_weights(meta, which) == "ema":
        load_ema_target(method.target, tensors, meta, path)
    return cfg, method.eval(), meta


def load_ema_target(
    target: nn.Module, tensors: dict[str, Tensor], meta: dict[str, Any], path: Path
) -> None:
    if "ema" not in meta:
        raise ValueError(
            f"{str(path)!r} holds no EMA weights (the run trained with train.ema_decay=0); "
            "use --checkpoint last or best"
        )
    load_weights(target, checkpoint.unprefixed(checkpoint.EMA_PREFIX, tensors), f"{path}:ema")


# `d2r list` -------------------------------------------------------------------------------------
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
