"""Test-wide settings, and the small helpers several test files share (`from conftest import
mlp, classified_batch, Rounded, write_spec, cli_error`)."""

from pathlib import Path

import torch
import yaml
from torch import nn

from d2r.cli import main

# Tiny models gain nothing from intra-op threads, and on a 2-core machine two threads per
# process stall badly when anything else runs (subprocess tests, DDP workers).
torch.set_num_threads(1)


def mlp(seed: int = 0, classes: int = 10) -> nn.Module:
    """A tiny classifier of 8x8 one-channel images (the digits' size), in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, classes)).eval()


def classified_batch(n: int = 16) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """`mlp()` and `n` random images it classifies correctly (the labels are its own)."""
    model = mlp()
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


class Rounded(nn.Module):
    """Gradient masking by construction: torch.round has a zero gradient everywhere."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


def write_spec(path: Path, **spec) -> Path:
    """A sweep spec at `path` (an empty file when `spec` is empty)."""
    path.write_text(yaml.safe_dump(spec, sort_keys=False) if spec else "")
    return path


def cli_error(capsys, *args: str) -> str:
    """`d2r ARGS` refused as bad input: exit 2 and one `d2r: error:` line, returned."""
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("d2r: error:") and "\n" not in err, err
    return err


# A sweep cell that takes seconds: 1 epoch of 128 images, a 3-step attack, a 50-image per-epoch
# check (tests/test_sweep.py, tests/test_sweep_state.py)
SWEEP_TINY = {
    "train.epochs": 1,
    "data.train_subset": 128,
    "method.steps": 3,
    "eval.subset": 50,
    "eval.attack": "pgd3",
}
SWEEP_PGD_AT = {"name": "pgd_at", "eps": 0.1, "step_size": 0.025, "steps": 3}
