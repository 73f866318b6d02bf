"""Data sets as uint8 tensors held on the training device; official-archive readers with
verified downloads; augmentation on the batch.

    x, y = d2r.data.load("cifar10", root, "train")          # verified, cached after the first run
    info = d2r.data.info("cifar10")                        # crop_padding=4, flip=True, ...
    loader = d2r.data.DeviceLoader(x, y, 128, crop_padding=info.crop_padding, flip=info.flip,
                                   seed=0, device="cuda")
    for x_batch, y_batch in loader: ...                   # float (B, C, H, W) in [0, 1]
    x, y = d2r.data.load("synthetic", root, "train", like="cifar10")  # generated, no file

`load_splits` is what a training run reads (the validation split held out of the training
split); `open_extra` opens generated data (`data.extra`) for the loader to mix into batches.
"""

from d2r.data import (
    own,  # registers `folder` and `npz`: data sets from your own files
    synthetic,  # registers `synthetic`; synthetic.generate(like, split, n)
)
from d2r.data.download import add_command, download, md5sum, require
from d2r.data.extra import ExtraData, open_extra
from d2r.data.loading import CACHE_DIR, Splits, load, load_splits, subset, validation_split
from d2r.data.pipeline import DeviceLoader, crop_flip
from d2r.data.sources import (
    DATASETS,
    FILE_SETS,
    SPLITS,
    SYNTHETIC,
    DatasetInfo,
    RemoteFile,
    augmentation,
    digits_split,
    info,
    section_info,
)

__all__ = [
    "CACHE_DIR",
    "DATASETS",
    "FILE_SETS",
    "SPLITS",
    "SYNTHETIC",
    "DatasetInfo",
    "DeviceLoader",
    "ExtraData",
    "RemoteFile",
    "Splits",
    "add_command",
    "augmentation",
    "crop_flip",
    "digits_split",
    "download",
    "info",
    "load",
    "load_splits",
    "md5sum",
    "open_extra",
    "own",
    "require",
    "section_info",
    "subset",
    "synthetic",
    "validation_split",
]
