"""One training step of d2r's `rat_trades` and of RAT's released TRADES step, side by side, on
the same weights, batch and random draws; prints one JSON line of their differences.

The released code is not part of d2r: fetch github.com/Alexkael/Randomized-Adversarial-Training
yourself and point --reference at its TRADES_first_second/ folder (the one holding
trades_first_second.py and models/wideresnet.py). Its `.cuda()` calls are made no-ops, so it
runs on the CPU; its WideResNet is built small (depth 10, width 1) on random 3x32x32 images.

    PYTHONPATH=src python scripts/side_by_side_rat.py --reference PATH/TRADES_first_second
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys

import torch

from d2r.methods import RATTRADES


def _reference(folder: str):  # the released module and its WideResNet module
    sys.path.insert(0, folder)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the code calls .cuda() on CPU tensors
    return importlib.import_module("trades_first_second"), importlib.import_module(
        "models.wideresnet"
    )


def _sgd(model: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def _theirs(module, model, x, y, args) -> float:
    optimizer = _sgd(model)
    model.train()
    loss = module.trades_loss(
        model=model,
        x_natural=x,
        y=y,
        optimizer=optimizer,
        step_size=args.step_size,
        epsilon=args.eps,
        perturb_steps=args.steps,
        beta=6.0,
        alpha=0.2,
    )
    loss.backward()  # as its train(): the step's gradient is the returned loss's alone
    optimizer.step()
    return loss.item()


def _ours(model, x, y, args) -> float:
    method = RATTRADES(model, eps=args.eps, step_size=args.step_size, steps=args.steps).train()
    optimizer = _sgd(model)
    out = method(x, y)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    method.after_step()
    return out["loss"].item()


def compare(module, wrn, classes: int, args) -> dict:
    torch.manual_seed(args.seed)
    model = wrn.WideResNet(depth=10, num_classes=classes, widen_factor=1)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.rand(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, classes, (args.batch,), generator=g)
    theirs, ours = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(args.seed + 2)  # the same weight noise and attack start for both
    loss_theirs = _theirs(module, theirs, x, y, args)
    torch.manual_seed(args.seed + 2)
    loss_ours = _ours(ours, x, y, args)
    state_theirs, state_ours = theirs.state_dict(), ours.state_dict()
    diffs = {k: (state_theirs[k].double() - state_ours[k].double()).abs().max().item()
             for k in state_theirs}  # fmt: skip
    params = {n for n, _ in theirs.named_parameters()}
    moved = max((state_theirs[k] - model.state_dict()[k]).abs().max().item() for k in params)
    return {
        "classes": classes,
        "loss_theirs": loss_theirs,
        "loss_ours": loss_ours,
        "loss_abs_diff": abs(loss_theirs - loss_ours),
        "max_weight_abs_diff": max(diffs[k] for k in params),
        "max_buffer_abs_diff": max(v for k, v in diffs.items() if k not in params),
        "max_weight_change": moved,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="RAT's TRADES_first_second/ folder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eps", type=float, default=0.031)
    parser.add_argument("--step-size", type=float, default=0.007)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    module, wrn = _reference(args.reference)
    rows = [compare(module, wrn, classes, args) for classes in (10, 100)]
    print(json.dumps({"side_by_side": "rat_trades", "torch": torch.__version__, "rows": rows}))


if __name__ == "__main__":
    main()
