"""Batches per second of the device loader with generated data mixed in (`data.extra`, a
memory-mapped .npz read one batch ahead in a thread, into pinned memory on a GPU) against the
same loader on the real set alone, side by side in one run. Prints one JSON line.

    PYTHONPATH=src python benchmarks/generated_data.py [--batches 50] [--device cuda]

Data: random CIFAR-shaped uint8 images, the real set in memory and the generated set written
to a temporary uncompressed .npz (the layout of the public generated CIFAR sets) on the disk
this script runs on: the figure includes that disk's page cache, so run it twice for a warm
cache (the second run is what a long training sees). `read_ms_per_batch` times the reading
thread's work alone (gather from the memory map into host memory); `ratio` is the mixed
loader's batches per second over the real-only loader's: close to 1 means the read-ahead hides
the reading."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from d2r.data import DeviceLoader, info, open_extra
from data_pipeline import best_of


def write_generated(path: Path, n: int, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % 10  # every class present, as open_extra checks
    np.savez(path, image=images, label=labels)
    return path


def read_ms(extra, per_batch: int, batches: int, pin: bool) -> float:
    """The reading thread's work per batch: a random gather from the memory map."""
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(batches):
        extra.read(rng.integers(0, len(extra), per_batch), pin)
    return 1000 * (time.perf_counter() - start) / batches


def measure(
    size: int,
    extra_size: int,
    *,
    fraction: float = 0.7,
    batch_size: int = 128,
    batches: int = 50,
    repeats: int = 3,
    device: torch.device,
    directory: str | None = None,
) -> dict:
    """The figures of one side-by-side run (see the module's docstring), with its setup."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (size, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (size,), generator=g)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = write_generated(Path(tmp) / "generated.npz", extra_size)
        extra = open_extra(path, fraction, info("cifar10"), batch_size)
        common = {"crop_padding": 4, "flip": True, "device": device}
        real = DeviceLoader(x, y, batch_size, **common)
        mixed = DeviceLoader(x, y, batch_size, extra=extra, extra_fraction=fraction, **common)
        ours = best_of(repeats, mixed, batches, device)  # after 3 batches (the reads start)
        base = best_of(repeats, real, batches, device)
        read = read_ms(extra, mixed.extra_per_batch, batches, device.type == "cuda")
    setup = {"device": str(device), "batch_size": batch_size, "fraction": fraction}
    setup |= {"generated_per_batch": mixed.extra_per_batch, "real_images": size}
    setup |= {"generated_images": extra_size, "batches": batches, "repeats": repeats}
    figures = {"with_generated_batches_per_s": round(ours, 1)}
    figures |= {"real_only_batches_per_s": round(base, 1), "ratio": round(ours / base, 3)}
    return setup | figures | {"read_ms_per_batch": round(read, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=50, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per loader; the best counts")
    parser.add_argument("--size", type=int, default=20000, help="real images (in memory)")
    parser.add_argument("--extra-size", type=int, default=50000, help="generated images (disk)")
    parser.add_argument("--fraction", type=float, default=0.7, help="data.extra_fraction")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dir", help="where to write the .npz (default: a temp directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    needed = (args.batches + 3) * args.batch_size  # one run (3 warm-up batches) in one epoch
    if needed > args.size:
        parser.error(f"{args.batches} batches of {args.batch_size} need --size >= {needed}")
    figures = measure(
        args.size, args.extra_size, fraction=args.fraction, batch_size=args.batch_size,
        batches=args.batches, repeats=args.repeats, device=torch.device(args.device),
        directory=args.dir,
    )  # fmt: skip
    print(json.dumps({"benchmark": "generated_data", **figures}))


if __name__ == "__main__":
    main()
