"""The one training loop. It knows nothing about adversarial examples: a Method turns a batch
into a loss dict; the Trainer owns data, optimizer, schedule, evaluation, logs and checkpoints."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import d2r
from d2r import checkpoint, data
from d2r.attacks import from_name
from d2r.config import Config, dump_yaml, to_dict
from d2r.evaluate import correct_flags
from d2r.methods import METHODS, Method, eval_mode
from d2r.models import MODELS
from d2r.registry import build


def lr_factor(epoch: int, epochs: int, warmup_factor: float, decay_at: list[float]) -> float:
    """The reference step schedule scaled to `epochs` (0-based epoch): x warmup_factor in the
    first epoch, then x0.1 for each fraction in `decay_at` already reached."""
    if epoch == 0 and epochs > 1:
        return warmup_factor
    return 0.1 ** sum(epoch >= round(f * epochs) for f in decay_at)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but CUDA is not available; use train.device=cpu")
    return torch.device(name)


def build_method(cfg: Config, info: data.DatasetInfo) -> Method:
    """Models from the registry (sized for the data set), then the method around them."""
    sizes = {"num_classes": info.num_classes, "in_channels": info.channels}
    method_cls = METHODS.get(cfg.method["name"])
    target = build(MODELS, {**sizes, **cfg.target}, key="target")
    guide = None
    if method_cls.uses_guide:
        if cfg.guide is None:
            raise ValueError(f"method {cfg.method['name']!r} needs a guide: set guide.name")
        guide = build(MODELS, {**sizes, **cfg.guide}, key="guide")
    args = (target, guide) if method_cls.uses_guide else (target,)
    return build(METHODS, cfg.method, *args, key="method")


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "d2r": d2r.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "platform": platform.platform(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "git": _git_hash(), "argv": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _git_hash() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def prepare_run_dir(out: str | Path) -> Path:
    """Create the run directory, refusing one that already holds a run (never overwrite a
    result) and checking it is writable before any training starts."""
    run_dir = Path(out)
    if (run_dir / "config.yaml").exists():
        raise ValueError(
            f"{str(run_dir)!r} already holds a run; choose another --out (or resume it)"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to run directory {str(run_dir)!r}: {err.strerror}") from None
    return run_dir


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


class Trainer:
    def __init__(self, cfg: Config, out: str | Path | None = None, *, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.device = pick_device(cfg.train.device)
        torch.manual_seed(cfg.seed)
        self.info = data.info(cfg.data.name)
        self.method = build_method(cfg, self.info).to(self.device)  # bad options fail here
        self.train_loader, self.x_test, self.y_test = self._load_data()
        self.optimizer = torch.optim.SGD(
            [{"params": m.parameters(), "name": name} for name, m in self.method.models().items()],
            lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay,
            nesterov=cfg.train.nesterov,
        )
        self.eval_attack = from_name(cfg.eval.attack, cfg.eval.eps)
        self.run_dir = prepare_run_dir(out or default_run_dir(cfg))
        self.step, self.best = 0, -1.0
        self.history: list[dict[str, Any]] = []

    def _load_data(self) -> tuple[data.DeviceLoader, torch.Tensor, torch.Tensor]:
        d = self.cfg.data
        for split in ("train", "test"):  # a missing file fails before any reading
            data.require(d.name, d.root, split)
        x, y = data.load(d.name, d.root, "train", verify=d.verify)
        x_test, y_test = data.load(d.name, d.root, "test", verify=d.verify)
        if d.train_subset:
            x, y = data.subset(x, y, d.train_subset, seed=d.subset_seed)
        if d.test_subset:
            x_test, y_test = data.subset(x_test, y_test, d.test_subset, seed=d.subset_seed)
        if self.cfg.eval.subset:
            x_test, y_test = x_test[: self.cfg.eval.subset], y_test[: self.cfg.eval.subset]
        loader = data.DeviceLoader(
            x, y, d.batch_size, shuffle=True, seed=self.cfg.seed, device=self.device,
            crop_padding=self.info.crop_padding if d.augment else 0,
            flip=self.info.flip and d.augment,
        )
        return loader, x_test.to(self.device), y_test.to(self.device)

    def fit(self) -> Run:
        self._write_header()
        for epoch in range(self.cfg.train.epochs):
            self._set_lr(epoch)
            terms, seconds = self._train_epoch(epoch)
            record = {"kind": "epoch", "epoch": epoch + 1, "step": self.step, "seconds": seconds,
                      "lr": self.optimizer.param_groups[0]["lr"], **terms}
            if self._should_evaluate(epoch):
                record.update(self._evaluate())
            self._log(record)
            self.history.append(record)
            self._checkpoint(record)
        return Run(self.run_dir, self.cfg, self.method, self.history)

    def _write_header(self) -> None:
        checkpoint.atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
        env = environment(self.device)
        checkpoint.atomic_write_text(self.run_dir / "env.json", json.dumps(env, indent=2))

    def _set_lr(self, epoch: int) -> None:
        t = self.cfg.train
        factor = lr_factor(epoch, t.epochs, t.warmup_factor, t.decay_at)
        for group in self.optimizer.param_groups:
            group["lr"] = t.lr * factor

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], float]:
        self.method.train()
        start, sums, count = time.perf_counter(), {}, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}",
                   disable=not self.progress, leave=False, unit="batch")
        for x, y in bar:
            out = self.method(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            self.optimizer.step()
            self.method.after_step()
            self.step += 1
            count += 1
            for name, value in out.items():  # accumulate on the device: no host sync per step
                sums[name] = sums.get(name, 0.0) + value.detach()
            if self.step % self.cfg.train.log_every == 0:
                means = {k: (v / count).item() for k, v in sums.items()}
                bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()})
                self._log({"kind": "step", "epoch": epoch + 1, "step": self.step, **means})
        means = {k: (v / max(count, 1)).item() for k, v in sums.items()}
        return means, time.perf_counter() - start

    def _should_evaluate(self, epoch: int) -> bool:
        last = epoch + 1 == self.cfg.train.epochs
        return last or (epoch + 1) % self.cfg.eval.every == 0

    def _evaluate(self) -> dict[str, float]:
        """Target only, eval mode, fp32: clean and the per-epoch attack on the held-out split."""
        target, bs = self.method.target, self.cfg.eval.batch_size
        with eval_mode(target):
            clean = correct_flags(target, self.x_test, self.y_test, batch_size=bs)
            robust = correct_flags(target, self.x_test, self.y_test, self.eval_attack, batch_size=bs)
        result = {"clean_acc": clean.float().mean().item(), "robust_acc": robust.float().mean().item()}
        if self.method.uses_guide:
            with eval_mode(self.method.guide):
                guide = correct_flags(self.method.guide, self.x_test, self.y_test, batch_size=bs)
            result["guide_clean_acc"] = guide.float().mean().item()
        return result

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _checkpoint(self, record: dict[str, Any]) -> None:
        tensors = {}
        for name, model in self.method.models().items():
            tensors.update(checkpoint.prefixed(name, model.state_dict()))
        meta = {"epoch": record["epoch"], "step": self.step, "record": record,
                "config": to_dict(self.cfg), "models": list(self.method.models())}
        checkpoint.save(self.run_dir / "last.safetensors", tensors, meta)
        if record.get("robust_acc", -1.0) > self.best:
            self.best = record["robust_acc"]
            checkpoint.save(self.run_dir / "best.safetensors", tensors, meta)


def load_run(run_dir: str | Path, which: str = "last") -> tuple[Config, Method]:
    """Rebuild a run's method from its config.yaml and load the `which` checkpoint (strictly)."""
    from d2r.config import resolve

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    cfg = resolve(run_dir / "config.yaml")
    method = build_method(cfg, data.info(cfg.data.name))
    path = run_dir / f"{which}.safetensors"
    tensors, _ = checkpoint.load(path)
    for name, model in method.models().items():
        checkpoint.load_weights(model, checkpoint.unprefixed(name, tensors), f"{path}:{name}")
    method.eval()
    return cfg, method
