"""The one training loop. It knows nothing about adversarial examples: a Method turns a batch
into a loss dict; the Trainer owns data, optimizer, schedule, the per-epoch validation, the
step's guard (non-finite loss, signals), logs and checkpoints. The step itself is
`train_step`, read top to bottom like nanoGPT's loop."""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from d2r import checkpoint, curves, data, distributed, speed
from d2r.attacks import from_name, norm_label
from d2r.checkpoint import TrainState
from d2r.config import Config, dump_yaml, to_dict
from d2r.distributed import pick_device
from d2r.ema import EMA
from d2r.files import atomic_write_text
from d2r.guard import DeviceFlags, StepGuard
from d2r.logs import MetricsLog, read_metrics
from d2r.measure import correct_flags
from d2r.methods import Method, eval_mode
from d2r.progress import Progress
from d2r.runs import (
    Run,
    build_method,
    check_external_models,
    check_schedule,
    data_record,
    default_run_dir,
    eval_eps,
    eval_norm,
    external_sources,
    own_run_dir,
    prepare_run_dir,
    resolved_config,
    weight_files,
    write_env,
)


def lr_factor(epoch: int, epochs: int, warmup_factor: float, decay_at: list[float]) -> float:
    """The reference step schedule scaled to `epochs` (0-based epoch): x warmup_factor in the
    first epoch, then x0.1 for each fraction in `decay_at` already reached. A one-epoch run has
    no warm-up (it would be the whole run): it trains at the full lr."""
    if epoch == 0 and epochs > 1:
        return warmup_factor
    return 0.1 ** sum(epoch >= round(f * epochs) for f in decay_at)


def cosine_factor(step: int, total: int, warmup: float) -> float:
    """Cosine annealing without restarts (Loshchilov & Hutter, SGDR, arXiv:1608.03983) per step
    (0-based, of `total`), after a linear warm-up over `warmup` steps: (step + 1) / warmup
    there, then half a cosine from 1 down to 0 at the end of the run."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def seed_everything(seed: int) -> None:
    """torch, numpy and Python's `random` from `seed`: the checkpoint saves all three, so two
    runs with one seed end with the same checkpoint, not only the same weights."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def train_step(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    fast: speed.FastPath,
    guard: StepGuard,
    x: Tensor,
    y: Tensor,
) -> tuple[dict[str, Tensor], DeviceFlags]:
    """One batch: the method's forward (attack, then loss), backward, optimizer step. A
    non-finite loss updates nothing; the caller reads the flags (`guard.accept`) afterwards."""
    with fast.autocast():  # bf16 for the attack and the loss when enabled
        out = model(fast.batch(x), y)  # the method: adversarial batch, then its loss terms
    flags = guard.flags(out["loss"])  # [non-finite, signal] on any rank; queued, no sync
    optimizer.zero_grad(set_to_none=True)
    if fast.skips_on_device:  # fused SGD skips a bad update in its kernel: no host read first
        optimizer.found_inf = flags.tensor[0]
    if fast.skips_on_device or flags.values()[0] == 0:  # other SGDs read the flag first
        out["loss"].backward()
        optimizer.step()
    method.after_step()  # AWP: take the weight perturbation off again
    return out, flags


class Trainer:
    def __init__(
        self,
        cfg: Config,
        out: str | Path | None = None,
        *,
        progress: bool = True,
        resume: bool = False,
        wait: bool = False,
    ):
        self.cfg = cfg = resolved_config(cfg)  # every option's value, defaults included
        check_schedule(cfg.train)
        self.dist = distributed.from_env()  # one process, or a rank under torchrun
        self.device = pick_device(distributed.device_name(cfg.train.device, self.dist))
        distributed.setup(self.dist, self.device)
        seed_everything(cfg.seed)
        # bad options fail here; a resumed run takes its weights from its checkpoint instead
        info = data.section_info(cfg.data)
        self.method = build_method(cfg, info, initial_weights=not resume).to(self.device)
        check_external_models(cfg, info, self.method)  # an import path's logits, on 2 images
        self.fast = speed.resolve(cfg.train, self.device)
        self.model = self._prepare_model()  # what the step calls: the method, or DDP around it
        t, run_dir = cfg.train, Path(out) if out else default_run_dir(cfg)
        # No tensorboard package or an unwritable run directory fails before the data is read;
        # only rank 0 writes (the other ranks keep the path for Run.dir)
        self.log = MetricsLog(run_dir, tensorboard=t.tensorboard, enabled=self.dist.is_main)
        self.run_dir = prepare_run_dir(run_dir, resume) if self.dist.is_main else run_dir
        # the EMA of the target's weights (after _prepare_model: it reads the final tensors)
        self.ema = EMA(self.method.target, t.ema_decay) if t.ema_decay > 0 else None
        # missing files or a bad data.extra: refused here, before the run directory exists
        self.loader, self.x_val, self.y_val, self.val_split = self._load_data()
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # until fit ends; `wait`: for a trainer that holds it now, instead of refusing
        self.owner = own_run_dir(self.run_dir, wait) if self.dist.is_main else None
        self.optimizer = self._make_optimizer()
        self.val_attack = from_name(cfg.eval.attack, eval_eps(cfg), norm=eval_norm(cfg))
        # what the user sees: a bar on a terminal, log lines otherwise, nothing when quiet
        shown = progress and self.dist.is_main  # under torchrun only rank 0 reports
        self.display = Progress(t.epochs, "auto" if shown else "off")
        self.guard, self.resumed = StepGuard(self.device, t.nonfinite), resume
        self.state = self._restore() if resume else TrainState()
        self.already_finished = self.state.epoch >= t.epochs  # a --resume with nothing to do
        self._last_save, self._saved_step = time.monotonic(), self.state.step if resume else None

    def _prepare_model(self) -> nn.Module:
        """The fast path (channels_last, bf16 logits hook, compile) on both models, then DDP
        under torchrun. Ranks share the models' init (DDP also broadcasts rank 0's) but draw
        different attack noise."""
        self.fast.prepare(self.method.models().values())
        model = distributed.wrap(self.method, self.dist, self.device, self.cfg.train.sync_bn)
        if self.dist.enabled:
            torch.manual_seed(self.cfg.seed + self.dist.rank)
        return model

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """SGD over the trained models, one parameter group each; a frozen guide is no group:
        the optimizer never touches it (it is still checkpointed)."""
        t, trained = self.cfg.train, self.method.trained_models()
        groups = [{"params": m.parameters(), "name": n} for n, m in trained.items()]
        return self.fast.sgd(
            groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov
        )

    def _load_data(self) -> tuple[data.DeviceLoader, Tensor, Tensor, str]:
        """The training loader (uint8 on the device, augmented per batch, generated data mixed
        in when asked) and the images of the per-epoch validation, with their split's name."""
        d, info = self.cfg.data, data.section_info(self.cfg.data)
        extra = data.open_extra(d.extra, d.extra_fraction, info, d.batch_size)  # checked first
        x, y, x_val, y_val, split = data.load_splits(d, self.cfg.eval.subset)
        crop_padding, flip = data.augmentation(d, info)
        loader = data.DeviceLoader(
            x,
            y,
            d.batch_size,
            shuffle=True,
            seed=self.cfg.seed,
            device=self.device,
            crop_padding=crop_padding,
            flip=flip,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            extra=extra,
            extra_fraction=d.extra_fraction,
        )
        return loader, x_val.to(self.device), y_val.to(self.device), split

    def fit(self) -> Run:
        """Train from epoch `state.epoch` (0, or where a resumed run stopped). SIGINT/SIGTERM
        end the current step, write last.safetensors and raise Preempted; after the last
        epoch's checkpoint the run is finished, and a signal no longer stops it (a scheduler's
        time limit during the final writes must not turn a finished run into a failed one)."""
        try:
            return self._fit()
        finally:  # the run directory is free for the next trainer however this one ends
            if self.owner is not None:
                self.owner.close()

    def _fit(self) -> Run:
        if self.already_finished:
            return Run(self.run_dir, self.cfg, self.method, self.state.history)
        self._write_header()
        epochs = self.cfg.train.epochs
        with self.guard.signals:
            for epoch in range(self.state.epoch, epochs):
                record = self._train_epoch(epoch)
                if self._should_validate(epoch):
                    record.update(self._validate())
                self.log.write(record)
                self.display.end_epoch(record)
                self.state.history.append(record)
                self.state.epoch, self.state.sums, self.state.count = epoch + 1, {}, 0
                self._checkpoint(record)
                self.guard.finite(self.guard.flags(None))  # a signal during the validation
                if epoch + 1 < epochs:
                    self.guard.stop_if_signalled(self.run_dir, self.state.step)
            self._finish()
        return Run(self.run_dir, self.cfg, self.method, self.state.history)

    def _finish(self) -> None:
        """curves.png (the paper's Fig. 2 for this run) and the TensorBoard files closed."""
        # from the log, not the history: a resumed run's curves start at epoch 1 too
        if self.dist.is_main and read_metrics(self.run_dir, "epoch"):
            curves.write_curves(self.run_dir)
        self.log.close()
        signum = self.guard.stop_signum or self.guard.signals.signum
        if signum and self.dist.is_main:
            name = signal.Signals(signum).name
            print(f"d2r: {name} came after the last epoch: the run is finished", file=sys.stderr)

    def _write_header(self) -> None:
        if self.dist.is_main:
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
            extra = {"fast_path": self.fast.describe(), "world_size": self.dist.world_size}
            if not self.resumed and weight_files(self.cfg):  # the bytes the models start from
                extra["weights"] = weight_files(self.cfg)
            if external_sources(self.cfg):  # import paths: what provided them, its version
                extra["sources"] = external_sources(self.cfg)
            if self.cfg.data.name in data.FILE_SETS:  # rebuilt later without data.root's files
                extra["data"] = data_record(data.section_info(self.cfg.data))
            resumed_step = self.state.step if self.resumed else None
            write_env(self.run_dir, self.device, extra, resumed_step)

    def _set_lr(self, epoch: int) -> None:
        """The one place the lr is set, before every step (a Python float, no sync): the step
        schedule's for `epoch`, or the cosine schedule's for the next step."""
        t = self.cfg.train
        if t.schedule == "cosine":
            batches = len(self.loader)
            factor = cosine_factor(self.state.step, t.epochs * batches, t.warmup_epochs * batches)
        else:
            factor = lr_factor(epoch, t.epochs, t.warmup_factor, t.decay_at)
        for group in self.optimizer.param_groups:
            group["lr"] = t.lr * factor

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        """The epoch's steps; its log line (mean loss terms, seconds, lr) is returned."""
        self.method.start_epoch(epoch, self.cfg.train.epochs)  # a method's schedule over epochs
        self.method.train()
        start, state = time.perf_counter(), self.state  # sums/count carry over into a resume
        bar = self.display.epoch(self.loader, epoch)
        for x, y in bar:
            self._set_lr(epoch)
            target_group = self.optimizer.param_groups[0]
            self.method.start_step(state.step, target_group["lr"], target_group["weight_decay"])
            out, flags = train_step(
                self.model, self.method, self.optimizer, self.fast, self.guard, x, y
            )
            # the step's one host read: a non-finite loss is skipped (counted) or stops the run
            finite = self.guard.accept(flags, out, epoch, state.step, self._last_checkpoint)
            if finite and self.ema is not None:  # a skipped batch changed no weight
                self.ema.update()  # the target's EMA, after the optimizer step, on the device
            self._account(out, finite)
            if state.step % self.cfg.train.log_every == 0:
                means = self._means()
                bar.log(state.step, means)
                self.log.write({"kind": "step", **self._position(epoch), **means})
            self._between_steps()
        seconds = time.perf_counter() - start
        lr = self.optimizer.param_groups[0]["lr"]
        return {
            "kind": "epoch",
            **self._position(epoch),
            "seconds": seconds,
            "lr": lr,
            **self._means(),
        }

    def _account(self, out: dict[str, Tensor], finite: bool) -> None:
        """After a step: the counters and the epoch's loss sums, without a host sync."""
        state = self.state
        state.step, state.skipped = state.step + 1, state.skipped + (not finite)
        if not finite:
            return
        state.count += 1
        for name, value in out.items():  # accumulate on the device: no extra sync
            state.sums[name] = state.sums.get(name, 0.0) + value.detach()

    def _position(self, epoch: int) -> dict[str, int]:
        return {"epoch": epoch + 1, "step": self.state.step, "skipped_batches": self.state.skipped}

    def _last_checkpoint(self) -> str:
        if self._saved_step is None:
            return "none written yet"
        return f"{self.run_dir / 'last.safetensors'} (step {self._saved_step})"

    def _between_steps(self) -> None:
        """A mid-epoch checkpoint when train.checkpoint_minutes have passed or a signal came.
        Not after an epoch's last batch: the epoch-end checkpoint follows its evaluation."""
        minutes = self.cfg.train.checkpoint_minutes
        due = minutes > 0 and time.monotonic() - self._last_save >= 60 * minutes
        if not (due or self.guard.stop_signum):
            return
        if self.loader.state_dict()["batch"] >= len(self.loader):
            return
        self._checkpoint(None)
        self.guard.stop_if_signalled(self.run_dir, self.state.step)

    def _means(self) -> dict[str, float]:
        """Per-step means of the accumulated terms, averaged over ranks: one host sync."""
        sums, count = self.state.sums, self.state.count
        if not sums:
            return {}
        stacked = torch.stack([v.float() for v in sums.values()]) / max(count, 1)
        return dict(zip(sums, distributed.all_mean(stacked).tolist(), strict=True))

    def _should_validate(self, epoch: int) -> bool:
        last = epoch + 1 == self.cfg.train.epochs
        return self.dist.is_main and (last or (epoch + 1) % self.cfg.eval.every == 0)

    def _validate(self) -> dict[str, Any]:
        """The per-epoch validation: the target alone (its EMA weights when train.ema_decay >
        0), eval mode, fp32, clean and the validation attack (the guide's clean accuracy too),
        on the validation split (the test split in a run without one)."""
        target, x, y, bs = self.method.target, self.x_val, self.y_val, self.cfg.eval.batch_size
        with eval_mode(target), self.ema.applied() if self.ema else nullcontext():
            clean = correct_flags(target, x, y, batch_size=bs)
            robust = correct_flags(target, x, y, self.val_attack, batch_size=bs)
        result = {
            "clean_acc": clean.float().mean().item(),
            "robust_acc": robust.float().mean().item(),
            "check_eps": self.val_attack.eps,
            "check_norm": norm_label(self.val_attack.norm),
            "check_n": len(y),
            "check_split": self.val_split,
            "check_model": "ema" if self.ema else "target",
        }
        if self.method.uses_guide:
            with eval_mode(self.method.guide):
                guide = correct_flags(self.method.guide, x, y, batch_size=bs)
            result["guide_clean_acc"] = guide.float().mean().item()
        return result

    def _checkpoint(self, record: dict[str, Any] | None) -> None:
        """last.safetensors gets the complete state (at an epoch end, `record` is its log line;
        mid-epoch, None); best.safetensors the same when the validated robust accuracy improved
        (on the validation split, of the EMA weights when there is an EMA).
        Each write is an atomic rename: a kill leaves the previous complete file."""
        if not self.dist.is_main:
            return
        improved = record is not None and record.get("robust_acc", -1.0) > self.state.best
        if improved:
            self.state.best = record["robust_acc"]
        self.state.metrics_bytes = self.log.size()
        best = [self.run_dir / "best.safetensors"] if improved else []  # the same bytes
        last, config = self.run_dir / "last.safetensors", to_dict(self.cfg)
        checkpoint.save_run(last, self._objects(), self.state, config, record, also=best)
        self._last_save, self._saved_step = time.monotonic(), self.state.step

    def _objects(self) -> checkpoint.RunObjects:
        return checkpoint.RunObjects(self.method, self.optimizer, self.loader, self.ema)

    def _restore(self) -> TrainState:
        """Everything from last.safetensors; metrics.jsonl cut back to the checkpoint."""
        path = self.run_dir / "last.safetensors"
        state = checkpoint.restore_run(path, self._objects())
        if state.epoch >= self.cfg.train.epochs:  # nothing to do: leave the finished run as is
            return state
        if self.dist.enabled:
            # The checkpoint holds rank 0's RNG; give every rank its own attack-noise stream
            # again (deterministic, but not the stream an uninterrupted DDP run would draw).
            torch.manual_seed(self.cfg.seed + self.dist.rank + 7919 * state.step)
        self.log.truncate(state.metrics_bytes)
        checkpoint.remove_stale_temps(self.run_dir)
        return state
