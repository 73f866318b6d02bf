"""A run's method built from its config: the models (own weights, normalization, a frozen guide),
the method, and every check a run makes of its config before any work; the resolved config a
run records."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from d2r import data
from d2r.attacks import check_radius
from d2r.config import (
    Config,
    TrainConfig,
    coerce,
    replace,
)
from d2r.files import file_sha256
from d2r.methods import METHODS, Method
from d2r.models import (
    MODELS,
    ForwardFailed,
    add_normalization,
    check_model,
    check_normalize,
)
from d2r.registry import OptionError, build, resolve_spec
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
