"""`d2r train`: its parser and what it runs, a `Trainer` from the config (or the run's own
config.yaml with --resume); cli.build_parser calls `add_command`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from d2r import distributed
from d2r.config import check_resume_config, earlier_defaults, load_yaml, resolve, to_dict
from d2r.logs import overfit_warning, read_metrics
from d2r.runs import resolved_config
from d2r.tables import markdown
from d2r.trainer import Trainer


def add_command(sub: Any) -> None:
    """`d2r train [-c CONFIG] [--set KEY=VALUE ...] [--out DIR | --resume RUN_DIR]`."""
    train = sub.add_parser("train", help="train a model (default: D2R-CAG on the embedded digits)")
    train.add_argument("-c", "--config", help="YAML config (default: the embedded demo)")
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. train.epochs=2 or method.eps=8/255",
    )
    train.add_argument("--out", help="run directory (default: runs/<time>-<data>-<method>)")
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue an interrupted run exactly where its last checkpoint "
        "stopped; --set KEY=VALUE names the keys allowed to change",
    )
    train.add_argument(
        "--wait",
        action="store_true",
        help="with --resume: wait for a trainer that holds the run directory to end, then go on "
        "(default: refuse, naming it)",
    )
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    cfg = _train_config(args)
    try:
        trainer = Trainer(
            cfg,
            args.resume or args.out,
            progress=not args.quiet,
            resume=bool(args.resume),
            wait=args.wait,
        )
        main_rank = trainer.dist.is_main  # under torchrun only rank 0 prints
        if main_rank and (trainer.already_finished or not args.quiet):
            print(_train_header(trainer))  # "nothing to do" is the result: said under -q too
        run = trainer.fit()
    finally:
        distributed.cleanup()
    if main_rank:  # -q: the run directory alone, one line for scripts to read
        if not args.quiet:
            print(_summary_table(run.history, cfg.eval.attack))
        print(f"run directory: {run.dir}")
        warning = overfit_warning(read_metrics(run.dir, "epoch"))  # a resumed run's too
        if warning:
            print(warning, file=sys.stderr)
    return 0


def _train_header(trainer: Any) -> str:
    cfg, run_dir = trainer.cfg, trainer.run_dir
    if trainer.already_finished:  # a requeued job resuming a finished run: success, not work
        epochs = trainer.state.epoch
        return (
            f"{run_dir} already finished its {epochs} epochs; nothing to do (to train "
            f"longer: d2r train --resume {run_dir} --set train.epochs=N with N > {epochs})"
        )
    ranks = trainer.dist.world_size
    where = f"{trainer.device}" + (f", {ranks} processes" if ranks > 1 else "")
    return f"training {cfg.method['name']} on {cfg.data.name} ({where}); run directory: {run_dir}"


def _train_config(args: argparse.Namespace):
    """The config to train with. With --resume: the run's own config.yaml, where only keys
    named with --set may change (a -c file that differs elsewhere is refused)."""
    if not args.resume:
        return resolve(args.config, args.set)

    if args.out:
        raise ValueError("--resume continues in the run's own directory; drop --out")
    saved_path = Path(args.resume) / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(
            f"cannot resume {args.resume!r}: no config.yaml there; give a "
            "run directory written by `d2r train`"
        )
    earlier = earlier_defaults(load_yaml(saved_path))  # a run of an older d2r keeps its values
    cfg = resolve(args.config or saved_path, [*earlier, *args.set])
    # both sides resolved (defaults filled) alike: a config.yaml records every option
    old, new = (to_dict(resolved_config(c)) for c in (resolve(saved_path, earlier), cfg))
    check_resume_config(old, new, args.set, saved_path)
    return cfg


def _summary_table(history: list[dict], attack: str) -> str:
    evaluated = [r for r in history if "robust_acc" in r]
    if not evaluated:
        return "no evaluation recorded"
    last = evaluated[-1]
    best = max(evaluated, key=lambda r: r["robust_acc"])
    # which images and weights the check measured (older logs: the test split, the target)
    where = f"{last.get('check_split', 'test')}, n={last['check_n']}"
    where += ", EMA" if last.get("check_model") == "ema" else ""
    budget = f"eps={last['check_eps']:.4g}, {last.get('check_norm', 'Linf')}"
    head = ["checkpoint", "epoch", f"clean ({where})", f"{attack.upper()} ({budget})"]
    rows = [
        [name, str(r["epoch"]), f"{100 * r['clean_acc']:.2f}%", f"{100 * r['robust_acc']:.2f}%"]
        for name, r in (("last", last), ("best", best))
    ]
    return "\n".join(markdown(head, rows))
