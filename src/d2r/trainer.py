"""The one training loop. It knows nothing about adversarial examples: a Method turns a batch
into a loss dict; the Trainer owns data, optimizer, schedule, evaluation, logs and checkpoints."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from d2r import checkpoint, data, distributed, speed
from d2r.attacks import from_name
from d2r.config import Config, dump_yaml, to_dict
from d2r.evaluate import correct_flags
from d2r.logs import TensorBoardLog
from d2r.methods import eval_mode
from d2r.progress import Progress
from d2r.resume import (
    STATE,
    StepChecks,
    capture_rng,
    file_size,
    load_optimizer_state,
    optimizer_state,
    remove_stale_temps,
    restore_rng,
    truncate_log,
)
from d2r.runs import (  # noqa: F401  (re-exported: the public home of these names so far)
    Run,
    build_method,
    default_run_dir,
    environment,
    load_run,
    prepare_run_dir,
)


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


class Trainer:
    def __init__(
        self,
        cfg: Config,
        out: str | Path | None = None,
        *,
        progress: bool = True,
        resume: bool = False,
    ):
        self.cfg, self.progress = cfg, progress
        self.dist = distributed.from_env()  # one process, or a rank under torchrun
        self.device = pick_device(distributed.device_name(cfg.train.device, self.dist))
        distributed.setup(self.dist, self.device)
        torch.manual_seed(cfg.seed)
        self.info = data.info(cfg.data.name, cfg.data.like)
        self.method = build_method(cfg, self.info).to(self.device)  # bad options fail here
        # a missing tensorboard package fails here too, before any data or directory
        self.tensorboard = TensorBoardLog() if cfg.train.tensorboard else None
        # what the user sees: a bar on a terminal, log lines otherwise, nothing when quiet
        shown = progress and self.dist.is_main  # under torchrun only rank 0 reports
        self.display = Progress(cfg.train.epochs, "auto" if shown else "off")
        self.fast = speed.resolve(cfg.train, self.device)
        self.model = self._prepare_model()  # what the step calls: the method, or DDP around it
        self.train_loader, self.x_test, self.y_test = self._load_data()
        self.optimizer = self.fast.sgd(
            [{"params": m.parameters(), "name": name} for name, m in self.method.models().items()],
            lr=cfg.train.lr,
            momentum=cfg.train.momentum,
            weight_decay=cfg.train.weight_decay,
            nesterov=cfg.train.nesterov,
        )
        self.eval_attack = from_name(cfg.eval.attack, cfg.eval.eps)
        # Only rank 0 writes; the other ranks keep the path for Run.dir.
        run_dir = Path(out) if out else default_run_dir(cfg)
        self.run_dir = prepare_run_dir(run_dir, resume) if self.dist.is_main else run_dir
        self.step, self.best = 0, -1.0
        self.history: list[dict[str, Any]] = []
        self.epoch = 0  # epochs completed
        self.sums: dict[str, torch.Tensor] = {}  # the current epoch's loss terms, on the device
        self.count = 0  # batches in self.sums
        self.checks, self.resumed = StepChecks(self.device, cfg.train.nonfinite), resume
        self._last_save, self._saved_step = time.monotonic(), None
        if resume:
            self._restore()
            if self.epoch >= cfg.train.epochs:  # nothing to do: leave the finished run as it is
                raise ValueError(
                    f"{str(self.run_dir)!r} already finished its {self.epoch} epochs; to train "
                    f"longer: d2r train --resume {self.run_dir} --set train.epochs=N (N > "
                    f"{self.epoch})"
                )

    def _prepare_model(self) -> torch.nn.Module:
        """The fast path (channels_last, bf16 logits hook, compile) on both models, then DDP
        under torchrun. Ranks share the models' init (DDP also broadcasts rank 0's) but draw
        different attack noise."""
        self.fast.prepare(self.method.models().values())
        model = distributed.wrap(self.method, self.dist, self.device, self.cfg.train.sync_bn)
        if self.dist.enabled:
            torch.manual_seed(self.cfg.seed + self.dist.rank)
        return model

    def _load_data(self) -> tuple[data.DeviceLoader, torch.Tensor, torch.Tensor]:
        d = self.cfg.data
        for split in ("train", "test"):  # a missing file fails before any reading
            data.require(d.name, d.root, split)
        x, y = data.load(d.name, d.root, "train", verify=d.verify, like=d.like)
        x_test, y_test = data.load(d.name, d.root, "test", verify=d.verify, like=d.like)
        if d.train_subset:
            x, y = data.subset(x, y, d.train_subset, seed=d.subset_seed)
        if d.test_subset:
            x_test, y_test = data.subset(x_test, y_test, d.test_subset, seed=d.subset_seed)
        if self.cfg.eval.subset:
            x_test, y_test = x_test[: self.cfg.eval.subset], y_test[: self.cfg.eval.subset]
        loader = data.DeviceLoader(
            x,
            y,
            d.batch_size,
            shuffle=True,
            seed=self.cfg.seed,
            device=self.device,
            crop_padding=self.info.crop_padding if d.augment else 0,
            flip=self.info.flip and d.augment,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        return loader, x_test.to(self.device), y_test.to(self.device)

    def fit(self) -> Run:
        """Train from epoch `self.epoch` (0, or where a resumed run stopped). SIGINT/SIGTERM
        end the current step, write last.safetensors and raise Preempted."""
        self._write_header()
        with self.checks.guard:
            for epoch in range(self.epoch, self.cfg.train.epochs):
                self._set_lr(epoch)
                terms, seconds = self._train_epoch(epoch)
                record = {
                    "kind": "epoch",
                    "epoch": epoch + 1,
                    "step": self.step,
                    "seconds": seconds,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "skipped_batches": self.checks.skipped,
                    **terms,
                }
                if self._should_evaluate(epoch):
                    record.update(self._evaluate())
                self._log(record)
                self.display.end_epoch(record)
                self.history.append(record)
                self.epoch, self.sums, self.count = epoch + 1, {}, 0
                self._checkpoint(record)
                self.checks.finite(self.checks.flags(None))  # a signal during the evaluation
                self.checks.stop_if_signalled(self.run_dir, self.step)
        self._finish()
        return Run(self.run_dir, self.cfg, self.method, self.history)

    def _finish(self) -> None:
        """curves.png (the paper's Fig. 2 for this run) and the TensorBoard files closed."""
        from d2r.curves import write_curves  # matplotlib is imported only here
        from d2r.logs import read_metrics

        # from the log, not self.history: a resumed run's curves start at epoch 1 too
        if self.dist.is_main and read_metrics(self.run_dir, "epoch"):
            write_curves(self.run_dir)
        if self.tensorboard is not None:
            self.tensorboard.close()

    def _write_header(self) -> None:
        if not self.dist.is_main:
            return
        checkpoint.atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
        env = {
            **environment(self.device),
            "fast_path": self.fast.describe(),
            "world_size": self.dist.world_size,
        }
        if self.resumed:  # keep the original start; list each resume after it
            old = json.loads((self.run_dir / "env.json").read_text())
            env = {**old, "resumes": [*old.get("resumes", []), {**env, "step": self.step}]}
        checkpoint.atomic_write_text(self.run_dir / "env.json", json.dumps(env, indent=2))

    def _set_lr(self, epoch: int) -> None:
        t = self.cfg.train
        factor = lr_factor(epoch, t.epochs, t.warmup_factor, t.decay_at)
        for group in self.optimizer.param_groups:
            group["lr"] = t.lr * factor

    def _train_epoch(self, epoch: int) -> tuple[dict[str, float], float]:
        self.method.train()
        start = time.perf_counter()  # self.sums/count carry over into a resumed epoch
        bar = self.display.epoch(self.train_loader, epoch)
        for x, y in bar:
            with self.fast.autocast():  # bf16 for the attack and the loss when enabled
                out = self.model(self.fast.batch(x), y)
            flags = self.checks.flags(out["loss"])
            self.fast.update(self.optimizer, out["loss"], flags)  # no update for a bad loss
            finite = self.checks.check(flags, out, epoch, self.step, self._last_checkpoint)
            self.method.after_step()
            self.step += 1
            if finite:
                self.count += 1
                for name, value in out.items():  # accumulate on the device: no extra sync
                    self.sums[name] = self.sums.get(name, 0.0) + value.detach()
            if self.step % self.cfg.train.log_every == 0:
                means = self._means(self.sums, self.count)
                bar.log(self.step, means)
                self._log(
                    {
                        "kind": "step",
                        "epoch": epoch + 1,
                        "step": self.step,
                        "skipped_batches": self.checks.skipped,
                        **means,
                    }
                )
            self._between_steps()
        return self._means(self.sums, self.count), time.perf_counter() - start

    def _last_checkpoint(self) -> str:
        if self._saved_step is None:
            return "none written yet"
        return f"{self.run_dir / 'last.safetensors'} (step {self._saved_step})"

    def _between_steps(self) -> None:
        """A mid-epoch checkpoint when train.checkpoint_minutes have passed or a signal came.
        Not after an epoch's last batch: the epoch-end checkpoint follows its evaluation."""
        minutes = self.cfg.train.checkpoint_minutes
        due = minutes > 0 and time.monotonic() - self._last_save >= 60 * minutes
        if not (due or self.checks.stop_signum):
            return
        if self.train_loader.state_dict()["batch"] >= len(self.train_loader):
            return
        self._checkpoint(None)
        self.checks.stop_if_signalled(self.run_dir, self.step)

    def _means(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """Per-step means of the accumulated terms, averaged over ranks: one host sync."""
        if not sums:
            return {}
        stacked = torch.stack([v.float() for v in sums.values()]) / max(count, 1)
        return dict(zip(sums, distributed.all_mean(stacked).tolist(), strict=True))

    def _should_evaluate(self, epoch: int) -> bool:
        last = epoch + 1 == self.cfg.train.epochs
        return self.dist.is_main and (last or (epoch + 1) % self.cfg.eval.every == 0)

    def _evaluate(self) -> dict[str, float]:
        """Target only, eval mode, fp32: clean and the per-epoch attack on the held-out split."""
        target, bs = self.method.target, self.cfg.eval.batch_size
        with eval_mode(target):
            clean = correct_flags(target, self.x_test, self.y_test, batch_size=bs)
            robust = correct_flags(
                target, self.x_test, self.y_test, self.eval_attack, batch_size=bs
            )
        result = {
            "clean_acc": clean.float().mean().item(),
            "robust_acc": robust.float().mean().item(),
        }
        if self.method.uses_guide:
            with eval_mode(self.method.guide):
                guide = correct_flags(self.method.guide, self.x_test, self.y_test, batch_size=bs)
            result["guide_clean_acc"] = guide.float().mean().item()
        return result

    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        path = self.run_dir / "metrics.jsonl"
        try:
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise ValueError(
                f"could not append to {str(path)!r} ({err.strerror}); free disk "
                f"space, then: d2r train --resume {self.run_dir}"
            ) from None
        if self.tensorboard is not None:
            self.tensorboard.write(self.run_dir, record)

    def _checkpoint(self, record: dict[str, Any] | None) -> None:
        """last.safetensors gets the complete state (at an epoch end, `record` is its log line;
        mid-epoch, None); best.safetensors the same when the evaluated robust accuracy improved.
        Each write is an atomic rename: a kill leaves the previous complete file."""
        if not self.dist.is_main:
            return
        improved = record is not None and record.get("robust_acc", -1.0) > self.best
        if improved:
            self.best = record["robust_acc"]
        tensors, meta = self._state(record)
        checkpoint.save(self.run_dir / "last.safetensors", tensors, meta)
        self._last_save, self._saved_step = time.monotonic(), self.step
        if improved:
            checkpoint.save(self.run_dir / "best.safetensors", tensors, meta)

    def _state(self, record: dict[str, Any] | None) -> tuple[dict[str, torch.Tensor], dict]:
        """Both models, optimizer (by parameter name), loader position, every RNG, counters,
        history and the config: what an exact resume needs. Tensors here, the rest JSON."""
        models = self.method.models()
        tensors = {}
        for name, model in models.items():
            tensors.update(checkpoint.prefixed(name, model.state_dict()))
        optim_tensors, optim_meta = optimizer_state(self.optimizer, models)
        rng_tensors, rng_meta = capture_rng()
        loader = self.train_loader.state_dict()
        sums = {k: torch.as_tensor(v) for k, v in self.sums.items()}
        state = {
            **optim_tensors,
            **rng_tensors,
            "loader.generator": loader.pop("generator"),
            **checkpoint.prefixed("sums", sums),
        }
        tensors.update(checkpoint.prefixed(STATE, state))
        scaler = getattr(self, "scaler", None)  # an AMP GradScaler, if the loop uses one
        train_state = {
            "epoch": self.epoch,
            "step": self.step,
            "loader": loader,
            "optimizer": optim_meta,
            "rng": rng_meta,
            "best": self.best,
            "history": self.history,
            "count": self.count,
            "skipped": self.checks.skipped,
            "scaler": scaler.state_dict() if scaler else None,
            "metrics_bytes": file_size(self.run_dir / "metrics.jsonl"),
        }
        meta = {
            "epoch": self.epoch,
            "step": self.step,
            "record": record,
            "config": to_dict(self.cfg),
            "models": list(models),
            "train_state": train_state,
        }
        return tensors, meta

    def _restore(self) -> None:
        """Load last.safetensors completely and cut metrics.jsonl back to the checkpoint."""
        path = self.run_dir / "last.safetensors"
        tensors, meta = checkpoint.load(path)  # format, integrity hash
        ts = meta.get("train_state")
        if not isinstance(ts, dict):
            raise ValueError(
                f"{str(path)!r} holds weights but no training state (an older "
                "d2r wrote it): it can be evaluated, not resumed"
            )
        models = self.method.models()
        for name, model in models.items():
            checkpoint.load_weights(model, checkpoint.unprefixed(name, tensors), f"{path}:{name}")
        state = checkpoint.unprefixed(STATE, tensors)
        load_optimizer_state(self.optimizer, models, state, ts["optimizer"], str(path))
        self.train_loader.load_state_dict({**ts["loader"], "generator": state["loader.generator"]})
        self.sums = {k: v.to(self.device) for k, v in checkpoint.unprefixed("sums", state).items()}
        self.epoch, self.step, self.best = ts["epoch"], ts["step"], ts["best"]
        self.history, self.count = ts["history"], ts["count"]
        self.checks.skipped = ts["skipped"]
        scaler = getattr(self, "scaler", None)
        if scaler and ts["scaler"]:
            scaler.load_state_dict(ts["scaler"])
        self._saved_step = self.step
        restore_rng(state, ts["rng"])  # last: building the models drew from the global RNG
        if self.dist.enabled:
            # The checkpoint holds rank 0's RNG; give every rank its own attack-noise stream
            # again (deterministic, but not the stream an uninterrupted DDP run would draw).
            torch.manual_seed(self.cfg.seed + self.dist.rank + 7919 * self.step)
        truncate_log(self.run_dir / "metrics.jsonl", ts["metrics_bytes"])
        remove_stale_temps(self.run_dir)
