"""The device-resident pipeline: the whole split sits on the training device as uint8, and each
batch is gathered, cropped, flipped and converted to float there, with one seeded generator.
No per-image Python, no DataLoader workers, no host round trip per batch."""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from d2r.data.extra import ExtraData

Batch = tuple[torch.Tensor, torch.Tensor]
# The generated data's stream: another seed than the real set's, so the two never coincide.
EXTRA_SEED_OFFSET = 1_000_003


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
    then plus the batches consumed, so `load_state_dict()` resumes at exactly the next batch.

    With `extra` (generated data, `d2r.data.extra`), each global batch holds
    floor(batch_size * extra_fraction) generated images (drawn with replacement, as the
    reference's sampler does) and the rest from the real set, which stays on the device. The
    epoch keeps its number of batches (the real set's), so it sees 1 - extra_fraction of the
    real images. The generated images are read from disk one batch ahead in a thread, into
    pinned memory, and copied asynchronously; their draws come from a second CPU generator
    that the state saves too. Each rank takes its slice of both parts."""

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
        extra: ExtraData | None = None,
        extra_fraction: float = 0.0,
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
        self._add_extra(extra, extra_fraction, seed)
        self._epoch, self._batch, self._resume_at = 0, 0, None
        self._epoch_start = self._generator_states()

    def _add_extra(self, extra: ExtraData | None, fraction: float, seed: int) -> None:
        self.extra, self.extra_per_batch = extra, int(self.batch_size * fraction) if extra else 0
        self.real_per_batch = self.batch_size - self.extra_per_batch
        self.extra_generator = torch.Generator().manual_seed(seed + EXTRA_SEED_OFFSET)
        self._reader: ThreadPoolExecutor | None = None  # the thread that reads generated images

    def __len__(self) -> int:
        n = len(self.x)
        if self.world_size == 1:
            return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        # A last batch too small to give every rank an example is dropped on all ranks.
        rest = n % self.batch_size
        return n // self.batch_size + (not self.drop_last and rest >= self.world_size)

    def _plan(self) -> tuple[Plan, Plan | None]:
        """The epoch's draws at once, so that resuming at batch k is a slice, not a replay of k
        batches' draws: the real set's order (N,), crop offsets (N, 2) and flip mask (N,), and
        the same for the generated images of every batch. Drawn on the CPU generators and moved
        to the device, except the generated images' indices: they are read on the host."""
        n, g = len(self.x), self.generator
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        real = tuple(_to(t, self.device) for t in (order, *self._augmentation(n, g)))
        if self.extra is None:
            return real, None
        count, g = len(self) * self.extra_per_batch, self.extra_generator
        index = torch.randint(len(self.extra), (count,), generator=g)
        offsets, flips = (_to(t, self.device) for t in self._augmentation(count, g))
        return real, (index, offsets, flips)

    def _augmentation(
        self, n: int, g: torch.Generator
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        span = 2 * self.crop_padding + 1
        offsets = torch.randint(0, span, (n, 2), generator=g) if span > 1 else None
        flips = torch.rand(n, generator=g) < 0.5 if self.flip else None
        return offsets, flips

    def _generator_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.generator.get_state(), self.extra_generator.get_state()

    def _start_epoch(self) -> int:
        """First batch index of the epoch now starting: 0, or where a loaded state stopped."""
        if self._resume_at is not None:  # the generator already holds that epoch's start
            start, self._resume_at = self._resume_at, None
        else:
            self._epoch_start = self._generator_states()
            self._epoch, start = self._epoch + 1, 0
        self._batch = start
        return start

    def __iter__(self) -> Iterator[Batch]:
        start = self._start_epoch()  # here, not in the generator, so state_dict sees it at once
        return self._batches(start, *self._plan())

    def _batches(self, start: int, real: Plan, extra: Plan | None) -> Iterator[Batch]:
        order, offsets, flips = real
        size, reading = self.real_per_batch, self._read_extra(start, extra)
        for i in range(start, len(self)):
            part = self._shard(i * size, min((i + 1) * size, len(order)))
            index = order[part]
            x, y = self.x[index], self.y[index]
            offsets_i, flips_i = _take(offsets, part), _take(flips, part)
            if extra is not None:  # this batch's generated images, read ahead; then the next's
                x_extra, y_extra = self.extra.to_device(next(reading).result(), self.device)
                part = self._shard(i * self.extra_per_batch, (i + 1) * self.extra_per_batch)
                x, y = torch.cat([x, x_extra]), torch.cat([y, y_extra])
                offsets_i = _cat(offsets_i, _take(extra[1], part))
                flips_i = _cat(flips_i, _take(extra[2], part))
            if offsets_i is not None or flips_i is not None:
                x = crop_flip(x, offsets_i, flips_i, self.crop_padding)
            self._batch = i + 1  # counted as consumed once handed out
            yield x.float().div_(255), y

    def _read_extra(self, start: int, extra: Plan | None) -> Iterator[Future]:
        """Futures of each batch's generated images from batch `start` on, the next one always
        submitted before the current one is used: a thread reads batch i + 1 from disk while
        the device trains on batch i."""
        if extra is None:
            return
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2r-extra")
        pin, e = self.device.type == "cuda", self.extra_per_batch
        indices = [extra[0][self._shard(i * e, (i + 1) * e)].numpy() for i in range(len(self))]
        pending = None
        for i in range(start, len(self)):
            current = pending or self._reader.submit(self.extra.read, indices[i], pin)
            if i + 1 < len(self):
                pending = self._reader.submit(self.extra.read, indices[i + 1], pin)
            yield current

    def _shard(self, lo: int, hi: int) -> slice:
        """This rank's contiguous part of the global batch [lo, hi) (sizes differ by <= 1)."""
        size, extra = divmod(hi - lo, self.world_size)
        begin = lo + self.rank * size + min(self.rank, extra)
        return slice(begin, begin + size + (self.rank < extra))

    def state_dict(self) -> dict[str, Any]:
        """Epochs started, batches consumed in the current one, the generator state at its start
        (uint8 CPU tensor; with generated data, the second generator's too), and the sizes a
        resume must match."""
        state = {
            "epoch": self._epoch,
            "batch": self._batch,
            "generator": self._epoch_start[0].clone(),
            "num_examples": len(self.x),
            "batch_size": self.batch_size,
        }
        if self.extra is not None:
            state["extra_generator"] = self._epoch_start[1].clone()
            state.update(extra_examples=len(self.extra), extra_per_batch=self.extra_per_batch)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s output: the next `iter()` continues the interrupted epoch
        at its next batch (or starts the following epoch if it had finished)."""
        self._check_sizes(state)
        generator = torch.as_tensor(state["generator"], dtype=torch.uint8).cpu()
        self.generator.set_state(generator)
        if "extra_generator" in state:  # absent from checkpoints of older versions
            self.extra_generator.set_state(torch.as_tensor(state["extra_generator"]).cpu())
        self._epoch_start, self._epoch, self._batch = self._generator_states(), state["epoch"], 0
        self._resume_at = None
        if self._epoch > 0 and state["batch"] < len(self):
            self._resume_at = self._batch = state["batch"]
        elif self._epoch > 0:
            self._batch = state["batch"]
            self._plan()  # the epoch had finished: move the generator past its draws

    def _check_sizes(self, state: dict[str, Any]) -> None:
        saved = [state["num_examples"], state["batch_size"]]
        saved += [state.get("extra_examples", 0), state.get("extra_per_batch", 0)]
        extra = len(self.extra) if self.extra is not None else 0
        here = [len(self.x), self.batch_size, extra, self.extra_per_batch]
        if saved != here:
            raise ValueError(
                f"loader state is for {saved[0]} examples in batches of {saved[1]} with "
                f"{saved[3]} of {saved[2]} generated images each, this loader has {here[0]} in "
                f"batches of {here[1]} with {here[3]} of {here[2]}; resume with the same data and "
                "batch size (and the same data.extra and data.extra_fraction)."
            )


Plan = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # index, offsets, flips


def _take(values: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if values is None else values[part]


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])


def _to(values: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if values is None else values.to(device)
