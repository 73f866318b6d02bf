"""Batches per second of d2r's device-resident pipeline against a torchvision-style DataLoader
(per-image PIL pad + random crop + horizontal flip + ToTensor in worker processes) on the same
data, with the same augmentation. Prints one JSON line.

    PYTHONPATH=src python benchmarks/data_pipeline.py [--batches 50] [--size 20000] [--device cuda]

Data: the real MNIST training set when ../shared/data/mnist holds it, else random CIFAR-shaped
uint8 images. Both pipelines do the CIFAR augmentation (4-pixel pad, crop, flip), so they do the
same work whatever the data set's own augmentation is. torchvision is not needed: its
RandomCrop/RandomHorizontalFlip/ToTensor are written out below with Pillow."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from d2r.data import DeviceLoader, load

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


class PILCropFlip(Dataset):
    """torchvision's CIFAR10 dataset + RandomCrop(size, padding) + RandomHorizontalFlip +
    ToTensor, per image: HWC uint8 -> PIL -> pad -> crop -> maybe mirror -> float CHW."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, padding: int) -> None:
        self.images = x.permute(0, 2, 3, 1).squeeze(3).numpy()  # (N, H, W[, C]) as torchvision
        self.labels, self.padding = y.tolist(), padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[i])
        w, h = image.size
        image = ImageOps.expand(image, border=self.padding, fill=0)
        left, top = (random.randint(0, 2 * self.padding) for _ in range(2))
        image = image.crop((left, top, left + w, top + h))
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = torch.from_numpy(np.array(image, copy=True)).view(h, w, -1)
        return array.permute(2, 0, 1).contiguous().float().div(255), self.labels[i]


def data(size: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    if MNIST.is_dir():
        # cache=False: the shared directory is read-only and this reads 10 MB in half a second.
        x, y = load("mnist", MNIST, "train", cache=False)
        return "mnist", x[:size], y[:size]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (size, 3, 32, 32), generator=g, dtype=torch.uint8)
    return "random_cifar_shaped", x, torch.randint(0, 10, (size,), generator=g)


def batches_per_second(loader, batches: int, device: torch.device, warmup: int = 3) -> float:
    """Batches per second after `warmup` batches (worker start-up excluded), moved to `device`."""
    iterator, done = iter(loader), 0
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for x, y in iterator:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        done += 1
        if done == batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return done / (time.perf_counter() - start)


def best_of(repeats: int, loader, batches: int, device: torch.device) -> float:
    # The best of a few runs: a shared machine only ever makes a run slower, never faster.
    return max(batches_per_second(loader, batches, device) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=50, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per pipeline; the best counts")
    parser.add_argument("--size", type=int, default=20000, help="examples in the data")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads of the main process (each "
        "DataLoader worker has 1); more than 1 stalls in OpenMP when the cores are shared"
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name, x, y = data(args.size)
    needed = (args.batches + 3) * args.batch_size  # one run stays inside one epoch
    if needed > len(x):
        parser.error(f"{args.batches} batches of {args.batch_size} need --size >= {needed}")
    ours = DeviceLoader(x, y, args.batch_size, crop_padding=4, flip=True, device=device)
    reference = DataLoader(
        PILCropFlip(x, y, padding=4),
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,  # start-up once, not once per repeat
    )
    fast = best_of(args.repeats, ours, args.batches, device)
    slow = best_of(args.repeats, reference, args.batches, device)
    setup = {"benchmark": "data_pipeline", "data": name, "shape": list(x.shape)}
    setup |= {"device": str(device), "batch_size": args.batch_size, "workers": args.workers}
    setup |= {"batches": args.batches, "repeats": args.repeats, "threads": args.threads}
    figures = {"device_loader_batches_per_s": round(fast, 1)}
    figures |= {"pil_dataloader_batches_per_s": round(slow, 1), "speedup": round(fast / slow, 2)}
    print(json.dumps(setup | figures))


if __name__ == "__main__":
    main()
