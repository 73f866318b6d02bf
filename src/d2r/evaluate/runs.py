"""What `d2r eval` calls: a run's checkpoints (`evaluate_run`) or a weights file
(`evaluate_weights`) on the test split, each result kept in the eval.json store
(d2r.evalstore) as its attack finishes, resumable batch by batch, never dropped when the store
cannot be written.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from d2r import data as data_mod
from d2r.attacks import check_radius, norm_label
from d2r.checkpoint import (
    run_checkpoints,
    target_weights,
)
from d2r.config import Config, format_eps, parse_number
from d2r.distributed import pick_device
from d2r.evalstore import (
    CLEAN,
    TARGET,
    Store,
    StoreLedger,
    commit,
    images_id,
    result_key,
)
from d2r.evaluate.core import (
    Attack,
    EvalOptions,
    attack_norm,
    attack_settings,
    build_suite,
    evaluate_with,
)
from d2r.files import check_writable, describe, file_sha256, new_temp_dir
from d2r.guard import Preempted, SignalGuard
from d2r.models import MODELS, add_normalization, check_model, check_normalize
from d2r.registry import build
from d2r.runs import eval_eps, eval_norm, load_checkpoint, read_config, training_now
from d2r.weights import load_foreign, read_card


@dataclass(frozen=True)
class EvalData:
    """Where the test images come from: data set `name` in `root`, its files' checksums
    checked when `verify`, and `like`, the real set a "synthetic" set imitates (data.like);
    `image_size` and `channels` for a data set from files (data.image_size, data.channels)."""

    name: str
    root: str | Path = "data"
    verify: bool = True
    like: str | None = None
    image_size: int | None = None
    channels: int | None = None

    @classmethod
    def of(cls, d: Any) -> EvalData:
        """The test split of a config's `data` section `d`."""
        return cls(d.name, d.root, d.verify, d.like, d.image_size, d.channels)

    def info(self) -> data_mod.DatasetInfo:
        files = {"image_size": self.image_size, "channels": self.channels}
        return data_mod.info(self.name, self.like, root=self.root, **files)

    def load(self, n: int | None = None) -> tuple[Tensor, Tensor]:
        """The first `n` test images and labels (None: all)."""
        files = {"image_size": self.image_size, "channels": self.channels}
        x, y = data_mod.load(
            self.name, self.root, "test", verify=self.verify, like=self.like, **files
        )
        return (x[:n], y[:n]) if n else (x, y)


def attack_plan(
    attacks: Sequence[str] | str, eps: float | Sequence[float], norm: str | None = None
) -> dict[float, list[str]]:
    """Which attacks run at which eps: a plain name ('pgd20') at every eps of `eps`, a name
    with its own eps ('aa@0.031') only at that one: `pgd20,cw20,aa@0.031` with eps 8/255 is
    the reference protocol. Without attacks, clean accuracy only. Bad names fail here."""
    if isinstance(attacks, str):
        attacks = [a.strip() for a in attacks.split(",") if a.strip()]
    radii = [float(eps)] if isinstance(eps, (int, float)) else [float(e) for e in eps]
    if not radii:
        raise ValueError("no eps given; give one or more, e.g. --eps 8/255,0.031")
    plan: dict[float, list[str]] = {}
    for item in attacks:
        name, at, text = item.partition("@")
        for e in [_own_eps(item, text)] if at else radii:
            plan.setdefault(e, [])
            plan[e] += [] if name in plan[e] else [name]
    plan = plan or {e: [] for e in radii}
    for e, names in plan.items():
        build_suite(names, e, norm=norm)  # unknown names, a bad eps or norm, no AutoAttack: now
    return plan


def _own_eps(item: str, text: str) -> float:
    try:
        return parse_number(text)
    except ValueError:
        raise ValueError(f"attack {item!r}: write NAME@EPS, e.g. aa@0.031 or pgd20@8/255") from None


def evaluate_run(
    run_dir: str | Path,
    attacks: Sequence[str] = ("pgd20", "cw20"),
    eps: float | Sequence[float] | None = None,
    *,
    checkpoint: str | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`d2r eval RUN`: the run's target at each checkpoint ("last", "best", "ema" (the EMA
    weights of last.safetensors), "both" for last and best; default: every one the run holds),
    on its data set's test split, with `attacks` at each eps (see `attack_plan`; default: the
    run's own, eval.eps or else method.eps) in the run's norm (unless `norm` says another).
    Results go into the store in `out` (default: the run directory; see `evaluate_models`);
    returns eval.json's content. `options`: the fields of `EvalOptions` (n, seed, batch_size,
    device (default "auto"), norm, checks, progress, force)."""
    settings = EvalOptions(**options)
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    eps, settings = _run_budget(read_config(run_dir)[0], eps, settings)
    attack_plan(attacks, eps, settings.norm)  # bad names or eps fail before loading
    out = check_writable(out or run_dir, "eval output directory (--out)")  # not after hours
    keys = {None: run_checkpoints(run_dir), "both": ["last", "best"]}.get(checkpoint)
    _say_if_training(run_dir)
    models = {}
    for key in keys or [checkpoint]:
        cfg, method, meta = load_checkpoint(run_dir, key)  # weights, epoch, hash: one read
        models[key] = (method.target, *_describe_checkpoint(key, meta))
    data = EvalData.of(cfg.data)
    return evaluate_models(models, data, attacks, eps, out, settings, fallback=run_dir)


def _run_budget(
    cfg: Config, eps: float | Sequence[float] | None, options: EvalOptions
) -> tuple[float | Sequence[float], EvalOptions]:
    """The eps and norm to evaluate a run at: those given, else the run's own (the radius its
    per-epoch validation attacked at, in its training norm), said when `options.progress`."""
    options = dataclasses.replace(options, norm=options.norm or eval_norm(cfg))
    if eps is None:
        eps = eval_eps(cfg)
        _say_eps(eps, options, "the run's own (eval.eps, else method.eps)")
    return eps, options


def _say_eps(eps: float, options: EvalOptions, source: str) -> None:
    if options.progress:
        norm = norm_label(options.norm or "linf")
        print(f"d2r eval: eps {format_eps(eps)} ({norm}), {source}; --eps chooses another")


def _say_if_training(run_dir: Path) -> None:
    """One line when a trainer still writes `run_dir`: its checkpoints move on meanwhile, and
    each result names the epoch of the bytes it measured."""
    holder = training_now(run_dir)
    if holder is not None:
        print(
            f"d2r: warning: {str(run_dir)!r} is still training ({holder}); each checkpoint is "
            "evaluated as it is now and labelled with the epoch it holds",
            file=sys.stderr,
        )


def _describe_checkpoint(key: str, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A checkpoint's row label and what identifies it, from the metadata of the bytes that
    were loaded: its epoch, content sha256 and which weights of it were evaluated (the
    target's, or its EMA)."""
    epoch, weights = meta.get("epoch"), target_weights(meta, key)
    parts = [] if epoch is None else [f"epoch {epoch}"]
    if weights == "ema" and key != "ema":
        parts.append("EMA")  # best of a run with an EMA: the weights its check picked
    label = f"{key} ({', '.join(parts)})" if parts else key
    # the content sha256 load_checkpoint just verified (no rehashing)
    extra = {"checkpoint": key, "epoch": epoch, "sha256": meta["sha256"], "weights": weights}
    return label, extra


def evaluate_weights(
    model_name: str | Mapping[str, Any] | None,
    weights: str | Path,
    attacks: Sequence[str] = ("pgd20", "cw20"),
    eps: float | Sequence[float] | None = None,
    *,
    data: str | None = None,
    num_classes: int | None = None,
    out: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`d2r eval --model ARCH --weights FILE`: an architecture (a registered name, an import
    path MODULE:CALLABLE, timm:NAME or torchvision:NAME; or a spec {name, **options,
    normalize: {mean, std}}) with a foreign state dict (loaded strictly after key mapping) on
    `data`'s test split (default cifar10); results go into the store in `out` (default:
    WEIGHTS_STEM-eval/ beside the file), keyed by the file's sha256. `model_name` None: a d2r
    export, whose model card names the architecture, its options and normalization, and the
    data set. `eps` defaults to the data set's usual L-inf radius (8/255 for CIFAR, SVHN and
    Tiny ImageNet, 0.3 for MNIST, 0.1 for digits). `options`: root (the data directory,
    default "data") and like (the real set data="synthetic" imitates, as data.like) for the
    `EvalData`, and the fields of `EvalOptions` as for `evaluate_run`."""
    spec, images = _weights_source(model_name, weights, data, options)
    settings, info = EvalOptions(**options), images.info()
    if eps is None:
        eps = info.eps
        _say_eps(eps, settings, f"the usual one for {info.name}")
    attack_plan(attacks, eps, settings.norm)
    model, spec = weights_model(spec, info, num_classes)
    out = check_writable(out or weights_eval_dir(weights), "eval output directory (--out)")
    load_foreign(model, weights)
    weights = Path(weights)
    extra = {"checkpoint": weights.name, "model": spec["name"], "sha256": file_sha256(weights)}
    if len(spec) > 1:  # options or a normalization beyond the architecture's name
        extra["model_spec"] = spec
    # a freshly built model is in train mode; evaluate() would warn about it
    models = {weights.name: (model.eval(), weights.name, extra)}
    fallback = weights_eval_dir(weights)
    return evaluate_models(models, images, attacks, eps, out, settings, fallback=fallback)


def _weights_source(
    model_name: str | Mapping[str, Any] | None,
    weights: str | Path,
    data: str | None,
    options: dict[str, Any],
) -> tuple[str | Mapping[str, Any], EvalData]:
    """The model spec and the test images: those given, else those the card of a d2r export
    names (its data set and data.like unless `data` says another); pops root and like."""
    spec, card_data = (model_name, {}) if model_name is not None else _card_spec(weights)
    like = options.pop("like", None) or (card_data.get("like") if not data else None)
    name = data or card_data.get("name") or "cifar10"
    files = (
        {k: card_data.get(k) for k in ("image_size", "channels")}
        if name in data_mod.FILE_SETS
        else {}
    )
    return spec, EvalData(name, options.pop("root", "data"), like=like, **files)


def _card_spec(weights: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model spec, {name, like} of the data set) a d2r export's card names."""
    try:
        card = read_card(weights)
    except ValueError as err:
        raise ValueError(f"{err}; or give --model ARCH for foreign weights") from None
    arch = card["architecture"]
    spec = {"name": arch["name"], **arch.get("options", {})}
    if arch.get("normalize") is not None:
        spec["normalize"] = arch["normalize"]
    trained = card.get("training", {}).get("config", {}).get("data", {})
    files = {k: trained.get(k) for k in ("image_size", "channels")}  # folder and npz
    return spec, {"name": card["data"]["name"], "like": trained.get("like"), **files}


def weights_model(
    spec: str | Mapping[str, Any], info: data_mod.DatasetInfo, num_classes: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """(the model, the spec it was built from) for weights to be loaded: sized for the data set
    (`num_classes` overrides), with its `normalize` layer, never fetching pretrained weights,
    and an external model's logits checked on 2 images."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    normalize = spec.pop("normalize", None)
    sizes = {"num_classes": num_classes or info.num_classes, "in_channels": info.channels}
    full = {**sizes, **spec, **({"num_classes": num_classes} if num_classes else {})}
    if MODELS.is_external(spec["name"]) and full.get("pretrained"):
        full["pretrained"] = False  # the weights file holds the weights
    model = build(MODELS, full, key="model")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec['name']!r} returned {type(model).__name__!r}, not a Module")
    if normalize is not None:
        normalize = check_normalize(normalize, info.channels, "normalize")
        add_normalization(model, normalize)
        spec["normalize"] = normalize
    if MODELS.is_external(spec["name"]):
        shape = (info.channels, info.size, info.size)
        check_model(model, spec["name"], int(full["num_classes"]), shape)
    return model, spec


class EvaluationStopped(Preempted):
    """SIGINT/SIGTERM during `d2r eval`: the batch finished and every finished batch is saved;
    the same command continues it. The CLI exits with 128 + the signal (130 / 143)."""

    def __init__(self, signum: int, message: str) -> None:
        Exception.__init__(self, message)
        self.signum = signum


def evaluate_models(
    models: Mapping[str, tuple[nn.Module, str, dict[str, Any]]],
    data: EvalData,
    attacks: Sequence[str],
    eps: float | Sequence[float],
    out: Path,
    options: EvalOptions | None = None,
    *,
    fallback: Path | None = None,
) -> dict[str, Any]:
    """Each model ({key: (model, row label, identity incl. "sha256")}) on the first
    `options.n` test images of `data`, `attacks` at each eps (`attack_plan`), with `options`
    (default: EvalOptions(), on device "auto"); each result goes into the store in `out` as
    its attack finishes (stored keys reused unless `options.force`; a stopped run resumes;
    SIGINT/SIGTERM: EvaluationStopped after the batch). A result `out` refuses goes to
    `fallback` or a temp dir (ResultsNotWritten)."""
    options = options or EvalOptions()
    plan = attack_plan(attacks, eps, options.norm)
    info = data.info()
    for e in plan:  # an L2 radius past the image cube's diameter: before any image is read
        check_radius(e, options.norm or "linf", (info.channels, info.size, info.size))
    x, y = data.load(options.n)
    options = dataclasses.replace(options, device=pick_device(str(options.device or "auto")))
    guard = SignalGuard(action="finishing the batch and saving the evaluation's progress")
    images = images_id(data.name, x, y)
    jobs = _jobs(models, plan, out, images, options, guard)  # partial states checked here
    commit(out, checkpoints=(checkpoints := [{**e, "label": lb} for _, lb, e in models.values()]))
    with guard:
        try:
            for job in jobs:
                _run_job(job, x, y, data.name, options)
        except OSError as err:  # a result the store refused is kept elsewhere, never dropped
            raise save_elsewhere(Store(checkpoints), jobs, out, err, fallback) from None
    return commit(out).content()


class ResultsNotWritten(OSError):
    """Results could not be written to `out` (a disk filled, a mount went away); `place` is
    where they were written instead (None: nowhere), `store` those results. The CLI prints
    their table before the error line."""

    def __init__(self, out: Path, err: OSError, place: Path | None, store: Store) -> None:
        self.out, self.place, self.store = out, place, store
        saved = f"written to {place} instead" if place else "not written anywhere else"
        super().__init__(
            f"could not write results to {str(out)!r} ({describe(err)}); the results computed "
            f"are {saved} and printed above; rerun once {str(out)!r} is writable to go on"
        )


def save_elsewhere(
    unsaved: Store, jobs: list[tuple], out: Path, err: OSError, fallback: Path | None
) -> OSError:
    """The results the jobs' ledgers could not write (none: `err` itself, nothing is lost) into
    the store in `fallback` (the run directory; beside the weights) or a new temp directory:
    results that took hours are never dropped. Returns the error to raise."""
    unsaved.results = [entry for *_, ledger in jobs for entry in ledger.unsaved]
    if not unsaved.results:
        return err
    for place in [fallback, None]:
        if place is not None and Path(place).resolve() == Path(out).resolve():
            continue
        try:
            place = Path(place) if place is not None else new_temp_dir("d2r-eval-")
            commit(place, unsaved.checkpoints, unsaved.results)
        except (OSError, ValueError):  # unwritable, or a foreign eval.json there
            continue
        return ResultsNotWritten(out, err, place, unsaved)
    return ResultsNotWritten(out, err, None, unsaved)


def _run_job(job: tuple, x: Tensor, y: Tensor, data: str, options: EvalOptions) -> None:
    """One model at one eps: nothing when the store holds every key, else `evaluate` through
    the job's ledger, then the evaluation's warnings onto its results."""
    model, label, eps, suite, ledger = job
    where = f"{label} at eps {format_eps(eps)} on {data} ({len(y)} test images"
    say = print if options.progress else lambda *a, **k: None  # -q: no status lines either
    if all(ledger.cached(name) is not None for name in [CLEAN, *suite]):
        say(f"{where}): already in {ledger.out / 'eval.json'} (--force reruns)", file=sys.stderr)
        return
    say(f"evaluating {where}, {options.device})", file=sys.stderr)
    model = model.to(options.device)
    result = evaluate_with(model, x, y, suite, eps, options, ledger=ledger)
    ledger.add_warnings(result["warnings"])


def _jobs(models, plan, out, images, options: EvalOptions, guard) -> list[tuple]:
    """(model, label, eps, suite, ledger) for each model and eps of the plan; building each
    ledger checks its partial state, so a refusal comes before any work."""
    redone: set[str] = set()  # with `force`: the keys computed again in this call
    seed, norm, force, meta = options.seed, options.norm, options.force, _meta(options)
    jobs = []
    for model, label, extra in models.values():
        for e, names in plan.items():
            suite = build_suite(names, e, seed, norm)
            weights = extra.get("weights", TARGET)
            keys = suite_keys(extra["sha256"], suite, model, images, seed, weights)
            stop = _stopper(guard, label, e, out)
            ledger = StoreLedger(out, keys, meta, force=force, redone=redone, stop=stop)
            jobs.append((model, label, e, suite, ledger))
    return jobs


def _meta(options: EvalOptions) -> dict[str, Any]:
    """What each result records beside its key (not keyed: another batch size or device gives
    the same result up to the attacks' random starts and the hardware)."""
    device = options.device
    meta = {"batch_size": options.batch_size, "device": str(device), "dtype": "float32"}
    meta["checks"] = options.checks
    meta["tf32"] = uses_tf32(device)  # recorded, not keyed (as batch size and device are)
    return meta


def suite_keys(
    sha256: str,
    suite: Mapping[str, Attack],
    model: nn.Module,
    images: Mapping[str, Any],
    seed: int,
    weights: str = TARGET,
) -> dict[str, dict[str, Any]]:
    """The store key of clean accuracy and of each attack of `suite` (d2r.evalstore), for the
    `weights` ("target" or "ema") of the file with content `sha256`."""
    keys = {CLEAN: result_key(sha256, CLEAN, {}, None, None, images, seed, weights)}
    for name, attack in suite.items():
        settings = attack_settings(attack, model)
        norm = attack_norm(attack)
        keys[name] = result_key(sha256, name, settings, attack.eps, norm, images, seed, weights)
    return keys


def _stopper(
    guard: SignalGuard, label: str, eps: float, out: Path
) -> Callable[[str, int | None], None]:
    """After each saved batch (batches=None: after a stored result): stop if a signal came."""

    def stop(name: str, batches: int | None) -> None:
        if guard.signum is None:
            return
        where = f"{name} finished" if batches is None else f"batch {batches} of {name}"
        raise EvaluationStopped(
            guard.signum,
            f"stopped by {signal.Signals(guard.signum).name} after {where} at eps "
            f"{format_eps(eps)} on {label}; every finished batch is saved in {out} (results "
            "in eval.json, progress in eval-partial-*.json); run the same d2r eval command "
            "again to continue from there",
        )

    return stop


def uses_tf32(device: torch.device) -> bool:
    """Whether float32 convolutions or matmuls on `device` run in TF32 (10-bit mantissa): on
    CUDA, cuDNN's convolutions do by default (torch.backends.cudnn.allow_tf32); matmuls when
    torch.set_float32_matmul_precision is not "highest"."""
    if device.type != "cuda":
        return False
    matmul = torch.get_float32_matmul_precision() != "highest"
    return bool(torch.backends.cudnn.allow_tf32) or matmul


def weights_eval_dir(weights: str | Path) -> Path:
    """Where eval.json goes for a weights file by default: WEIGHTS_STEM-eval/ beside it."""
    return Path(weights).parent / f"{Path(weights).stem}-eval"
