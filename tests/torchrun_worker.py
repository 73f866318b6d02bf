"""A training run under torchrun that also records how the trainer wrapped the models, for the
tests of a launched process (test_ddp on CPU with gloo, test_cuda with NCCL):

    torchrun --nproc_per_node=1 tests/torchrun_worker.py OUT [KEY=VALUE ...]

writes OUT/wrapped.json: {"model": the class the step calls, "backend": the process group's,
"norms": the normalization layer classes of the method} on rank 0, then trains as `d2r train`.
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from d2r import distributed
from d2r.config import resolve
from d2r.trainer import Trainer


def main(out: str, sets: list[str]) -> None:
    trainer = Trainer(resolve(None, sets), out, progress=False)
    norms = {type(m).__name__ for m in trainer.method.modules() if "Norm" in type(m).__name__}
    wrapped = {
        "model": type(trainer.model).__name__,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "norms": sorted(norms),
    }
    if trainer.dist.is_main:
        Path(out, "wrapped.json").write_text(json.dumps(wrapped))
    try:
        trainer.fit()
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
