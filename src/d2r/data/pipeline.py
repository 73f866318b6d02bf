"""The device-resident pipeline: the whole split sits on the training device as uint8, and each
batch is gathered, cropped, flipped and converted to float there, with one seeded generator.
No per-image Python, no DataLoader workers, no host round trip per batch."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

Batch = tuple[torch.Tensor, torch.Tensor]


def crop_flip(
    x: torch.Tensor, offsets: torch.Tensor | None, flips: torch.Tensor | None, padding: int
) -> torch.Tensor:
    """Random-crop-and-flip of a batch by index arithmetic: one gather, any dtype.

    x (B, C, H, W); offsets (B, 2) row/column of each window in the image zero-padded by
    `padding`, in 0..2*padding; flips (B,) bool, True = mirror left-right. Returns (B, C, H, W)."""
    b, c, h, w = x.shape
    rows = torch.arange(h, device=x.device).expand(b, h)  # (B, H) source rows
    cols = torch.arange(w, device=x.device).expand(b, w)  # (B, W) source columns
    if flips is not None:
        cols = torch.where(flips[:, None], w - 1 - cols, cols)  # a mirror reads right to left
    if offsets is not None and padding > 0:
        x = F.pad(x, (padding, padding, padding, padding))  # zeros, like RandomCrop(padding=4)
        rows, cols = rows + offsets[:, :1], cols + offsets[:, 1:]
    width = x.shape[3]
    flat = (rows[:, :, None] * width + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return x.reshape(b, c, -1).gather(2, flat).view(b, c, h, w)


def _check_loader_args(x, y, batch_size, crop_padding, rank, world_size) -> None:
    if x.dtype != torch.uint8 or x.ndim != 4 or len(x) != len(y):
        raise ValueError(
            f"DeviceLoader takes uint8 images (N, C, H, W) and N labels, got {x.dtype} "
            f"{tuple(x.shape)} and {len(y)} labels; pass d2r.data.load's output."
        )
    if batch_size < 1 or crop_padding < 0:
        raise ValueError(f"batch_size {batch_size} must be >= 1, crop_padding >= 0")
    if not 0 <= rank < world_size or batch_size < world_size:
        raise ValueError(
            f"rank {rank} of {world_size} processes with a global batch of "
            f"{batch_size}: need 0 <= rank < world_size <= batch_size"
        )


class DeviceLoader:
    """Batches `(x float32 (B, C, H, W) in [0, 1], y int64 (B,))` on `device` from uint8 images.

    Each `iter()` is a new epoch: a random permutation without replacement (`shuffle=True`),
    random crops of the image zero-padded by `crop_padding` and random horizontal flips, all
    drawn from one seeded CPU torch.Generator, so a seed fixes every batch on every device. The
    whole epoch's randomness is drawn when it starts; `state_dict()` saves the generator state from
    then plus the batches consumed, so `load_state_dict()` resumes at exactly the next batch."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        crop_padding: int = 0,
        flip: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _check_loader_args(x, y, batch_size, crop_padding, rank, world_size)
        # Data parallel: every rank draws the same plan (same seed) and keeps its own
        # contiguous slice of each global batch, so the union of the slices is that batch.
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.x, self.y = x.to(self.device), y.to(self.device, torch.int64)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.crop_padding, self.flip = crop_padding, flip
        # On the CPU whatever the device: a CUDA generator's state is another kind (Philox seed
        # and offset, not Mersenne Twister), so a checkpoint written on a GPU could not resume
        # on a CPU or the other way; and the batches are the same on every device. Drawing the
        # epoch's plan there costs about a millisecond per 50,000 images, once per epoch.
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch, self._batch, self._resume_at = 0, 0, None
        self._epoch_start = self.generator.get_state()

    def __len__(self) -> int:
        n = len(self.x)
        if self.world_size == 1:
            return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        # A last batch too small to give every rank an example is dropped on all ranks.
        rest = n % self.batch_size
        return n // self.batch_size + (not self.drop_last and rest >= self.world_size)

    def _plan(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The epoch's order (N,), crop offsets (N, 2) and flip mask (N,), drawn at once so that
        resuming at batch k is a slice, not a replay of k batches' draws."""
        n, g = len(self.x), self.generator
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        span = 2 * self.crop_padding + 1
        offsets = torch.randint(0, span, (n, 2), generator=g) if span > 1 else None
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else None
        order, offsets, flips = (
            None if t is None else t.to(self.device) for t in (order, offsets, flips)
        )
        return order, offsets, flips

    def _start_epoch(self) -> int:
        """First batch index of the epoch now starting: 0, or where a loaded state stopped."""
        if self._resume_at is not None:  # the generator already holds that epoch's start
            start, self._resume_at = self._resume_at, None
        else:
            self._epoch_start = self.generator.get_state()
            self._epoch, start = self._epoch + 1, 0
        self._batch = start
        return start

    def __iter__(self) -> Iterator[Batch]:
        start = self._start_epoch()  # here, not in the generator, so state_dict sees it at once
        return self._batches(start, *self._plan())

    def _batches(
        self,
        start: int,
        order: torch.Tensor,
        offsets: torch.Tensor | None,
        flips: torch.Tensor | None,
    ) -> Iterator[Batch]:
        for i in range(start, len(self)):
            part = self._shard(i * self.batch_size, min((i + 1) * self.batch_size, len(order)))
            index = order[part]
            x = self.x[index]
            if offsets is not None or flips is not None:
                x = crop_flip(
                    x,
                    None if offsets is None else offsets[part],
                    None if flips is None else flips[part],
                    self.crop_padding,
                )
            self._batch = i + 1  # counted as consumed once handed out
            yield x.float().div_(255), self.y[index]

    def _shard(self, lo: int, hi: int) -> slice:
        """This rank's contiguous part of the global batch [lo, hi) (sizes differ by <= 1)."""
        size, extra = divmod(hi - lo, self.world_size)
        begin = lo + self.rank * size + min(self.rank, extra)
        return slice(begin, begin + size + (self.rank < extra))

    def state_dict(self) -> dict[str, Any]:
        """Epochs started, batches consumed in the current one, the generator state at its start
        (uint8 CPU tensor), and the sizes a resume must match."""
        return {
            "epoch": self._epoch,
            "batch": self._batch,
            "generator": self._epoch_start.clone(),
            "num_examples": len(self.x),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output: the next `iter()` continues the interrupted epoch
        at its next batch (or starts the following epoch if it had finished)."""
        sizes = (state["num_examples"], state["batch_size"])
        if sizes != (len(self.x), self.batch_size):
            raise ValueError(
                f"loader state is for {sizes[0]} examples in batches of {sizes[1]}, this loader "
                f"has {len(self.x)} in batches of {self.batch_size}; resume with the same data "
                f"and batch size."
            )
        generator = torch.as_tensor(state["generator"], dtype=torch.uint8).cpu()
        self.generator.set_state(generator)
        self._epoch_start, self._epoch, self._batch = generator.clone(), state["epoch"], 0
        self._resume_at = None
        if self._epoch > 0 and state["batch"] < len(self):
            self._resume_at = self._batch = state["batch"]
        elif self._epoch > 0:
            self._batch = state["batch"]
            self._plan()  # the epoch had finished: move the generator past its draws
