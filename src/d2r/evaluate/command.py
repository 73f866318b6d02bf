"""`d2r eval`: its parser and what it runs, `evaluate_run` on a run directory or
`evaluate_weights` on a weights file, then eval.md's table; cli.build_parser calls
`add_command`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from d2r import evalstore
from d2r.attacks import EVAL_ATTACKS
from d2r.config import parse_number, parse_value
from d2r.evaluate.runs import ResultsNotWritten, evaluate_run, evaluate_weights, weights_eval_dir


def add_command(sub: Any) -> None:
    """`d2r eval RUN_DIR | [--model ARCH [--model-opt K=V] [--normalize M,S]] --weights FILE
    [--attacks ...] [--eps ...] ...`."""
    # the --attacks help names every registered attack; argparse formats help with %
    attack_names = EVAL_ATTACKS.help().replace("%", "%%")
    ev = sub.add_parser(
        "eval",
        help="worst-case robust accuracy of a run's target, or of foreign weights",
        description="Evaluate a run directory's checkpoints, or any state dict of a registered "
        "architecture (--model ARCH --weights FILE; ARCH may be MODULE:CALLABLE, timm:NAME or "
        "torchvision:NAME, with --model-opt and --normalize), or a d2r export (--weights FILE). "
        "Every result is kept in eval.json (a result already there is reused) and shown in "
        "eval.md; an evaluation stopped by "
        "Ctrl-C, SIGTERM or a kill continues where it stopped when run again.",
    )
    ev.add_argument("run_dir", nargs="?", help="run directory (or use --model/--weights)")
    ev.add_argument(
        "--attacks",
        default="pgd20,cw20",
        help=f"comma-separated: {attack_names}; e.g. pgd20,pgd50,cw20,aa; NAME@EPS "
        "runs it at that eps only, e.g. pgd20,cw20,aa@0.031 (the reference protocol with "
        "--eps 8/255)",
    )
    ev.add_argument(
        "--eps",
        type=_numbers,
        default=None,
        help="radius, or several: 8/255,0.031 runs the suite at each (default: a run's own "
        "eps, eval.eps or else method.eps; for --weights the data set's usual one: 8/255 for "
        "CIFAR, SVHN and Tiny ImageNet, 0.3 for MNIST, 0.1 for digits)",
    )
    ev.add_argument(
        "--norm",
        choices=["linf", "l2"],
        default=None,
        help="threat model of every attack: linf or l2 (PGD-L2, CW-L2, AutoAttack L2); "
        "default: a run's own training norm, linf for --weights",
    )
    ev.add_argument(
        "--checkpoint",
        choices=["last", "best", "ema", "both"],
        default=None,
        help="which checkpoint(s) of the run: ema is the EMA weights of last (train.ema_decay "
        "> 0), both is last and best (default: every one the run has)",
    )
    ev.add_argument(
        "--model",
        help="architecture of foreign weights: a name (see `d2r list`), MODULE:CALLABLE, "
        "timm:NAME or torchvision:NAME (default for a d2r export: the one its card names)",
    )
    ev.add_argument(
        "--model-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of --model, e.g. depth=28 (repeatable; values as for --set)",
    )
    ev.add_argument(
        "--normalize",
        metavar="MEAN,STD",
        help="the model's input normalization, applied inside it (images stay in [0, 1], eps "
        "in pixel units): MEAN,STD or the means then the stds, e.g. "
        "0.4914,0.4822,0.4465,0.247,0.243,0.261",
    )
    ev.add_argument(
        "--weights",
        help="a d2r export (its card names the model and the data set), or foreign weights: "
        ".safetensors or .pt (weights only)",
    )
    ev.add_argument(
        "--data", default=None, help="data set for --weights (default: the card's, else cifar10)"
    )
    ev.add_argument("--root", default="data", help="data directory for --weights")
    ev.add_argument(
        "--like", help="with --data synthetic: the real set it imitates (as data.like; cifar10)"
    )
    ev.add_argument(
        "--num-classes", type=int, default=None, help="classes of --model (default: the data set's)"
    )
    ev.add_argument(
        "--out",
        help="where eval.json/eval.md go (default: the run directory, or "
        "WEIGHTS_STEM-eval/ beside the weights)",
    )
    ev.add_argument("--n", type=int, default=None, help="first N test images (default: all)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    ev.add_argument("--no-checks", action="store_true", help="skip the cheap sanity checks")
    ev.add_argument(
        "--force",
        action="store_true",
        help="evaluate again what eval.json already holds (and drop any partial progress)",
    )
    ev.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    """Evaluate a run's checkpoints (last, best) or foreign weights into eval.json / eval.md."""
    try:
        _evaluate(args)
    except ResultsNotWritten as err:  # hours of attacks: their numbers first, then the error
        print(evalstore.markdown(err.store))
        raise
    out = Path(args.out or args.run_dir or weights_eval_dir(args.weights))
    print(evalstore.markdown(evalstore.Store.read(out)))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'} (every result kept there)")
    return 0


def _evaluate(args: argparse.Namespace) -> None:
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    options = {
        "n": args.n,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "device": args.device,
        "norm": args.norm,
        "checks": not args.no_checks,
        "progress": not args.quiet,
        "force": args.force,
    }
    if args.weights:
        if args.run_dir:
            raise ValueError("give either a run directory or --model/--weights, not both")
        evaluate_weights(
            model_spec(args.model, args.model_opt, args.normalize), args.weights, attacks,
            args.eps, data=args.data, root=args.root, like=args.like,
            num_classes=args.num_classes, out=args.out, **options,
        )  # fmt: skip
    elif args.model or args.model_opt or args.normalize:
        raise ValueError("--model, --model-opt and --normalize are for --weights FILE")
    elif args.like:
        raise ValueError("--like is for --weights; a run directory's data.like is in its config")
    elif args.run_dir:
        evaluate_run(
            args.run_dir, attacks, args.eps, checkpoint=args.checkpoint, out=args.out, **options
        )
    else:
        raise ValueError("give a run directory, or --model ARCH --weights FILE")


def model_spec(
    name: str | None, opts: list[str], normalize: str | None
) -> str | dict[str, Any] | None:
    """--model NAME, its --model-opt KEY=VALUE items and --normalize MEAN,STD as one spec
    (None: the card of a d2r export names it)."""
    if name is None:
        if opts or normalize:
            raise ValueError("--model-opt and --normalize need --model ARCH")
        return None
    spec: dict[str, Any] = {"name": name}
    for item in opts:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or key.strip() in ("name", "normalize"):
            raise ValueError(f"--model-opt {item!r}: write KEY=VALUE, e.g. depth=28")
        spec[key.strip()] = parse_value(value.strip())
    if normalize is not None:
        numbers = _numbers(normalize)
        if not numbers or len(numbers) % 2:
            raise ValueError(
                f"--normalize {normalize!r}: give MEAN,STD or the means then as many stds"
            )
        half = len(numbers) // 2
        spec["normalize"] = {"mean": numbers[:half], "std": numbers[half:]}
    return spec


def _number(text: str) -> float:
    try:
        return parse_number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number like 0.031 or 8/255, got {text!r}"
        ) from None


def _numbers(text: str) -> list[float]:
    """'8/255,0.031' -> [0.0313..., 0.031]."""
    return [_number(part.strip()) for part in text.split(",") if part.strip()]
