"""Command line: d2r train | eval | report | export | list | data. Every subcommand takes the
common flags (-q/--quiet, --debug) before or after its name. Errors are one line: bad input
exit 2, a failure of the environment (network, disk, permissions, a missing package) exit 1;
--debug or D2R_DEBUG=1 shows the traceback instead."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from d2r import distributed, evalstore, export, plan, report, sweep
from d2r.attacks import EVAL_ATTACKS
from d2r.config import (
    check_resume_config,
    earlier_defaults,
    load_yaml,
    parse_number,
    resolve,
    to_dict,
)
from d2r.data import DATASETS, download
from d2r.evaluate import ResultsNotWritten, evaluate_run, evaluate_weights, weights_eval_dir
from d2r.files import describe
from d2r.guard import Preempted
from d2r.methods import METHODS
from d2r.models import MODELS
from d2r.runs import resolved_config
from d2r.tables import markdown
from d2r.trainer import Trainer


def _train(args: argparse.Namespace) -> int:
    cfg = _train_config(args)
    try:
        trainer = Trainer(
            cfg, args.resume or args.out, progress=not args.quiet, resume=bool(args.resume)
        )
        main_rank = trainer.dist.is_main  # under torchrun only rank 0 prints
        if main_rank:
            print(_train_header(trainer))
        run = trainer.fit()
    finally:
        distributed.cleanup()
    if main_rank:
        print(_summary_table(run.history, cfg.eval.attack))
        print(f"run directory: {run.dir}")
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
        if not args.model:
            raise ValueError("--weights needs --model ARCH (see `d2r list` for the architectures)")
        if args.run_dir:
            raise ValueError("give either a run directory or --model/--weights, not both")
        evaluate_weights(
            args.model, args.weights, attacks, args.eps, data=args.data, root=args.root,
            like=args.like,
            num_classes=args.num_classes, out=args.out, **options,
        )  # fmt: skip
    elif args.like:
        raise ValueError("--like is for --weights; a run directory's data.like is in its config")
    elif args.run_dir:
        evaluate_run(
            args.run_dir, attacks, args.eps, checkpoint=args.checkpoint, out=args.out, **options
        )
    else:
        raise ValueError("give a run directory, or --model ARCH --weights FILE")


def _list(args: argparse.Namespace) -> int:
    for title, registry in (
        ("models", MODELS),
        ("methods", METHODS),
        ("data sets", DATASETS),
    ):
        print(f"{title}: {', '.join(registry.names())}")
    print(f"evaluation attacks (d2r eval --attacks): {EVAL_ATTACKS.help()}")
    return 0


def _data(args: argparse.Namespace) -> int:
    for path in download(args.name, args.root):
        print(path)
    return 0


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


def common_flags(default: Any) -> argparse.ArgumentParser:
    """-q/--quiet and --debug, for the main parser (default False) and as a parent of every
    subcommand (default SUPPRESS: given before the subcommand's name, the flag is not reset
    by the subcommand's default)."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "-q", "--quiet", action="store_true", default=default, help="no progress bar or log lines"
    )
    flags.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the traceback of an error instead of one line (or set D2R_DEBUG=1)",
    )
    return flags


class Subcommands(argparse._SubParsersAction):
    """Every subcommand takes the common flags, wherever it is defined (cli.py, the modules'
    add_command functions): add_parser adds them as a parent."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parents = [*kwargs.pop("parents", []), common_flags(default=argparse.SUPPRESS)]
        return super().add_parser(name, parents=parents, **kwargs)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside training (whose guard checkpoints first): raised in the main thread, so
    temp files are removed on the way out and the exit status is 143."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handle(signum: int, frame: object) -> None:
        raise Terminated(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _failure(err: BaseException) -> tuple[str, int] | None:
    """The one line and exit status for an expected failure; None for a bug (its traceback)."""
    if isinstance(err, Terminated):
        return (
            "d2r: stopped by SIGTERM; no file is left half-written (each is renamed into place)",
            143,
        )
    if isinstance(err, KeyboardInterrupt):
        # a second Ctrl-C during training lands here too: files are written by atomic rename
        return (
            "d2r: interrupted; no file is left half-written (each is renamed into place); a "
            "training run continues from its last checkpoint with: d2r train --resume RUN_DIR; "
            "d2r eval continues from its last saved batch when run again",
            130,
        )
    if isinstance(err, (ValueError, FileNotFoundError)):  # bad input: what to change
        return f"d2r: error: {err}", 2
    hint = "(--debug shows the traceback)"
    if isinstance(err, OSError):  # network, disk, permissions
        return f"d2r: error: {describe(err)} {hint}", 1
    if isinstance(err, ImportError):  # an optional package (its message says which extra)
        return f"d2r: error: {err} {hint}", 1
    if _is_out_of_memory(err):  # torch's message is a page: its first two sentences
        first = ". ".join(str(err).split(". ")[:2]).strip(". ") or "out of memory"
        return f"d2r: error: {first}; lower data.batch_size (train) or --batch-size (eval)", 1
    return None


def _is_out_of_memory(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # never imported here just to ask
    cuda = torch is not None and isinstance(err, torch.cuda.OutOfMemoryError)
    return cuda or isinstance(err, MemoryError)


def build_parser() -> argparse.ArgumentParser:
    # the --attacks help names every registered attack; argparse formats help with %
    attack_names = EVAL_ATTACKS.help().replace("%", "%%")

    parser = argparse.ArgumentParser(
        prog="d2r",
        description=__doc__,
        parents=[common_flags(default=False)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=Subcommands)
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
    train.set_defaults(func=_train)

    ev = sub.add_parser(
        "eval",
        help="worst-case robust accuracy of a run's target, or of foreign weights",
        description="Evaluate a run directory's checkpoints, or any state dict of a registered "
        "architecture (--model ARCH --weights FILE). Every result is kept in eval.json (a "
        "result already there is reused) and shown in eval.md; an evaluation stopped by "
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
        default=[8 / 255],
        help="Linf radius, or several: 8/255,0.031 runs the suite at each (default 8/255)",
    )
    ev.add_argument(
        "--norm",
        choices=["linf", "l2"],
        default="linf",
        help="threat model of every attack: linf (default) or l2 (PGD-L2, CW-L2, AutoAttack L2)",
    )
    ev.add_argument(
        "--checkpoint",
        choices=["last", "best", "ema", "both"],
        default=None,
        help="which checkpoint(s) of the run: ema is the EMA weights of last (train.ema_decay "
        "> 0), both is last and best (default: every one the run has)",
    )
    ev.add_argument("--model", help="architecture of foreign weights (see `d2r list`)")
    ev.add_argument("--weights", help="foreign weights: .safetensors or .pt (weights only)")
    ev.add_argument("--data", default="cifar10", help="data set for --weights (default cifar10)")
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

    ls = sub.add_parser("list", help="registered models, methods, attacks and data sets")
    ls.set_defaults(func=_list)

    dat = sub.add_parser("data", help="data set files")
    dsub = dat.add_subparsers(
        dest="data_command", metavar="ACTION", required=True, action=Subcommands
    )
    dl = dsub.add_parser("download", help="download and verify a data set")
    dl.add_argument("name")
    dl.add_argument("--root", default="data")
    dl.set_defaults(func=_data)

    report.add_command(sub)
    export.add_command(sub)
    sweep.add_command(sub)
    plan.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    func: Callable[[argparse.Namespace], int] = args.func
    debug = args.debug or os.environ.get("D2R_DEBUG", "") not in ("", "0")
    try:
        with _sigterm_raises():
            return func(args)
    except Preempted as err:  # SIGINT/SIGTERM: checkpoint written; 128 + signal, as shells do
        print(f"d2r: {err}", file=sys.stderr)
        return err.exit_code
    except (Exception, KeyboardInterrupt) as err:
        failure = None if debug else _failure(err)
        if failure is None:
            raise
        message, code = failure
        print(" ".join(message.split()), file=sys.stderr)  # one line, whatever the message
        return code


if __name__ == "__main__":
    sys.exit(main())
