"""Command line: d2r train | eval | list | data. Errors at the boundary are one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from d2r import checkpoint
from d2r.config import parse_number, resolve


def _train(args: argparse.Namespace) -> int:
    from d2r.trainer import Trainer

    cfg = resolve(args.config, args.set)
    trainer = Trainer(cfg, args.out, progress=not args.quiet)
    print(f"training {cfg.method['name']} on {cfg.data.name} ({trainer.device}); "
          f"run directory: {trainer.run_dir}")
    run = trainer.fit()
    print(_summary_table(run.history, cfg.eval.attack, cfg.eval.eps))
    print(f"run directory: {run.dir}")
    return 0


def _summary_table(history: list[dict], attack: str, eps: float) -> str:
    evaluated = [r for r in history if "robust_acc" in r]
    if not evaluated:
        return "no evaluation recorded"
    last = evaluated[-1]
    best = max(evaluated, key=lambda r: r["robust_acc"])
    lines = [f"| checkpoint | epoch | clean | {attack.upper()} (eps={eps:.4g}) |", "|---|---|---|---|"]
    for name, r in (("last", last), ("best", best)):
        lines.append(f"| {name} | {r['epoch']} | {100 * r['clean_acc']:.2f}% | "
                     f"{100 * r['robust_acc']:.2f}% |")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    from d2r import data
    from d2r.evaluate import evaluate
    from d2r.trainer import load_run

    cfg, method = load_run(args.run_dir, args.checkpoint)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    x, y = data.load(cfg.data.name, cfg.data.root, "test", verify=cfg.data.verify)
    if args.n:
        x, y = x[: args.n], y[: args.n]
    result = evaluate(method.target, x, y, attacks=attacks, eps=args.eps, seed=args.seed,
                      batch_size=args.batch_size)
    result["checkpoint"] = args.checkpoint
    out = Path(args.run_dir) / "eval.json"
    checkpoint.atomic_write_text(out, json.dumps(result, indent=2))
    for name in ["clean", *attacks, "worst_case"]:
        print(f"{name:>12}: {100 * result[name]:.2f}%")
    print(f"eps={args.eps:.4g} (Linf), n={len(y)}, seed={args.seed}; wrote {out}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from d2r.attacks import ATTACKS
    from d2r.data import DATASETS
    from d2r.methods import METHODS
    from d2r.models import MODELS

    for title, registry in (("models", MODELS), ("methods", METHODS), ("attacks", ATTACKS),
                            ("data sets", DATASETS)):
        print(f"{title}: {', '.join(registry.names())}")
    print("evaluation attacks: pgdK, cwK (any K >= 1, e.g. pgd20, cw20)")
    return 0


def _data(args: argparse.Namespace) -> int:
    from d2r.data import download

    for path in download(args.name, args.root):
        print(path)
    return 0


def _number(text: str) -> float:
    try:
        return parse_number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 0.031 or 8/255, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2r", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train a model (default: D2R-CAG on the embedded digits)")
    train.add_argument("-c", "--config", help="YAML config (default: the embedded demo)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. train.epochs=2 or method.eps=8/255")
    train.add_argument("--out", help="run directory (default: runs/<time>-<data>-<method>)")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="evaluate a run's target model")
    ev.add_argument("run_dir")
    ev.add_argument("--attacks", default="pgd20,cw20", help="comma-separated, e.g. pgd20,pgd50,cw20")
    ev.add_argument("--eps", type=_number, default=8 / 255, help="Linf radius, e.g. 8/255")
    ev.add_argument("--checkpoint", choices=["last", "best"], default="last")
    ev.add_argument("--n", type=int, default=None, help="first N test images (default: all)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=256)
    ev.set_defaults(func=_eval)

    ls = sub.add_parser("list", help="registered models, methods, attacks and data sets")
    ls.set_defaults(func=_list)

    dat = sub.add_parser("data", help="data set files")
    dsub = dat.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dl = dsub.add_parser("download", help="download and verify a data set")
    dl.add_argument("name")
    dl.add_argument("--root", default="data")
    dl.set_defaults(func=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split())  # one line, whatever the message
        print(f"d2r: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("d2r: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
