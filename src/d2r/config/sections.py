"""The config's sections: `data`, `train`, `eval` as dataclasses whose annotations are their
types (Literal for choices) and whose numeric fields carry their range (`_num`); `Config` holds
them and the component sections `target`, `guide`, `method` (plain dicts)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def _num(
    default: Any = dataclasses.MISSING,
    *,
    positive: bool = False,
    below: float | None = None,
    **kwargs: Any,
) -> Any:
    """A numeric field and its range: >= 0, or > 0 with `positive`, and < `below` when given
    (checked by `_fill_section`)."""
    metadata = {"positive": positive, "below": below, "range": True}
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class DataConfig:
    name: str = "digits"
    root: str = "data"
    verify: bool = True
    batch_size: int = _num(128, positive=True)
    augment: bool = True
    # first N training images (or a seeded sample, see subset_seed), after val_size is held out
    train_subset: int | None = _num(None, positive=True)
    # first N test images for the per-epoch check of a run without a validation split
    test_subset: int | None = _num(None, positive=True)
    # Seeds the subsets' samples (None: the first N images) and the validation split (None: 0,
    # so every run of an experiment, whatever its `seed`, holds out the same images).
    subset_seed: int | None = None
    # data.name=synthetic only: the real set whose image shape, classes and split sizes it takes
    # (cifar10 when unset); see d2r.data.synthetic
    like: str | None = None
    # Images held out of the training split, stratified by class: the per-epoch check and the
    # choice of best.safetensors read them, so the test split is only ever read by `d2r eval`.
    # null: no validation split; the check then reads the test split (as the AWP and LBGAT
    # releases picked their best epoch). 300 for the demo: digits' 1,497 training images keep
    # 1,197 (10 batches, the last of 45); with 200 the last batch of 17 made the first
    # full-lr epoch diverge for seeds 0 and 1 (checked over 3 epochs).
    val_size: int | None = _num(300, positive=True)
    # Generated training data (Wang et al. 2023): an uncompressed .npz with image (N, H, W, C)
    # uint8 and label (N,) integers, memory-mapped; extra_fraction of every batch comes from it.
    extra: str | None = None
    extra_fraction: float = _num(0.0, below=1.0)
    # Training augmentation: the random crop's zero padding (0: no crop) and the horizontal flip.
    # null: the data set's own (docs/training.md); 0 and false for folder and npz, since d2r
    # cannot know what is safe for your images.
    crop_padding: int | None = _num(None)
    flip: bool | None = None
    # data.name=folder or npz only (your own files in data.root; d2r.data.own): resize every
    # image to image_size x image_size (folder; null: all must have one size), 1 or 3 channels
    # (null: the first image's), and the class names, label i = classes[i] (filled in when the
    # run starts: a folder's sorted class folders, an npz's 0..K-1 unless given).
    image_size: int | None = _num(None, positive=True)
    channels: int | None = _num(None, positive=True)
    classes: list[str] | None = None


@dataclass
class TrainConfig:
    epochs: int = _num(15, positive=True)
    lr: float = _num(0.1, positive=True)
    momentum: float = _num(0.9)
    weight_decay: float = _num(2e-4)
    nesterov: bool = False
    # The reference schedule, scaled to `epochs`: lr * warmup_factor in the first epoch (not in a
    # one-epoch run), then x0.1 at each fraction of the run in `decay_at` (75% and 90%, i.e.
    # epochs 76 and 91 of 100).
    warmup_factor: float = _num(0.2)
    decay_at: list[float] = _num(default_factory=lambda: [0.75, 0.9])
    # "cosine": lr * half a cosine from 1 to 0 over the run, per step, after a linear warm-up
    # over warmup_epochs (cosine only; the step schedule's warm-up is warmup_factor).
    schedule: Literal["step", "cosine"] = "step"
    warmup_epochs: float = _num(0.0)
    # EMA of the target's weights after every step (0: none; 0.995 in Wang et al. 2023): the
    # per-epoch check and best.safetensors then use it, and `d2r eval` evaluates it (d2r.ema).
    ema_decay: float = _num(0.0, below=1.0)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # steps between metrics.jsonl lines (the only host sync of the loop)
    log_every: int = _num(20, positive=True)
    tensorboard: bool = False  # mirror metrics.jsonl to RUN_DIR/tensorboard (extra: tensorboard)
    # Speed (d2r.speed; README "Speed"). "auto": on for CUDA (and, except compile, for CPUs with
    # native bf16), off elsewhere; true/false force a flag. Evaluation always runs in fp32.
    amp: Literal["auto", "bf16", "off"] | bool = "auto"  # bf16 autocast of the step and attack
    channels_last: Literal["auto", "on", "off"] | bool = "auto"  # NHWC models and batches
    compile: Literal["auto", "on", "off"] | bool = "auto"  # torch.compile of both models
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"  # SGD's kernels
    # torchrun: BatchNorm statistics over the global batch (torch's SyncBatchNorm on CUDA, else
    # d2r.distributed.GlooSyncBatchNorm)
    sync_bn: bool = False
    # last.safetensors is also written mid-epoch every this many minutes (0: at epoch ends only),
    # so a preemption or crash loses at most that much work.
    checkpoint_minutes: float = _num(10.0)
    nonfinite: Literal["stop", "skip"] = "stop"  # a NaN/inf loss: stop (error) | skip the batch


@dataclass
class EvalConfig:
    """The per-epoch check of the target on the held-out images (the full protocol is
    `d2r eval`)."""

    eps: float | None = _num(None)  # None: the method's training eps
    attack: str = "pgd20"
    # first N images of the validation split (or, with data.val_size null, of the test split)
    subset: int | None = _num(1000, positive=True)
    batch_size: int = _num(500, positive=True)
    every: int = _num(1, positive=True)  # epochs between checks (the last is always checked)


@dataclass
class Config:
    """The embedded default: D2R-CAG on scikit-learn's digits (1x8x8), small CNN target and a
    smaller CNN guide. eps = 0.1: digits has 17 grey levels (steps of 1/16), so 0.1 moves each
    pixel by about 1.6 levels - visible but not enough to turn one digit into another."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    target: dict[str, Any] = field(default_factory=lambda: {"name": "small_cnn"})
    guide: dict[str, Any] | None = field(default_factory=lambda: {"name": "tiny_cnn"})
    method: dict[str, Any] = field(
        default_factory=lambda: {"name": "d2r", "eps": 0.1, "step_size": 0.025, "steps": 10}
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Component sections: {name, **options}, checked by the registered constructor (registry.build).
_COMPONENT_SECTIONS = ("target", "guide", "method")
