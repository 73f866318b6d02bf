"""Command line: d2r train | eval | report | export | list | data. Errors at the boundary are
one line, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from d2r import checkpoint
from d2r.config import parse_number, resolve
from d2r.resume import Preempted


def _train(args: argparse.Namespace) -> int:
    from d2r import distributed
    from d2r.trainer import Trainer

    cfg = _train_config(args)
    try:
        trainer = Trainer(
            cfg, args.resume or args.out, progress=not args.quiet, resume=bool(args.resume)
        )
        main_rank = trainer.dist.is_main  # under torchrun only rank 0 prints
        if main_rank:
            ranks = trainer.dist.world_size
            where = f"{trainer.device}" + (f", {ranks} processes" if ranks > 1 else "")
            print(
                f"training {cfg.method['name']} on {cfg.data.name} ({where}); "
                f"run directory: {trainer.run_dir}"
            )
        run = trainer.fit()
    finally:
        distributed.cleanup()
    if main_rank:
        print(_summary_table(run.history, cfg.eval.attack, cfg.eval.eps))
        print(f"run directory: {run.dir}")
    return 0


def _train_config(args: argparse.Namespace):
    """The config to train with. With --resume: the run's own config.yaml, where only keys
    named with --set may change (a -c file that differs elsewhere is refused)."""
    if not args.resume:
        return resolve(args.config, args.set)
    from d2r.config import to_dict
    from d2r.resume import check_resume_config

    if args.out:
        raise ValueError("--resume continues in the run's own directory; drop --out")
    saved_path = Path(args.resume) / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(
            f"cannot resume {args.resume!r}: no config.yaml there; give a "
            "run directory written by `d2r train`"
        )
    cfg = resolve(args.config or saved_path, args.set)
    check_resume_config(to_dict(resolve(saved_path)), to_dict(cfg), args.set, saved_path)
    return cfg


def _summary_table(history: list[dict], attack: str, eps: float) -> str:
    evaluated = [r for r in history if "robust_acc" in r]
    if not evaluated:
        return "no evaluation recorded"
    last = evaluated[-1]
    best = max(evaluated, key=lambda r: r["robust_acc"])
    lines = [
        f"| checkpoint | epoch | clean | {attack.upper()} (eps={eps:.4g}) |",
        "|---|---|---|---|",
    ]
    for name, r in (("last", last), ("best", best)):
        lines.append(
            f"| {name} | {r['epoch']} | {100 * r['clean_acc']:.2f}% | "
            f"{100 * r['robust_acc']:.2f}% |"
        )
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> int:
    """Evaluate a run's checkpoints (last, best) or foreign weights; write eval.json, eval.md."""
    from d2r.evaluate import build_suite, evaluate, markdown_table
    from d2r.trainer import pick_device

    device = pick_device(args.device)
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    build_suite(attacks, args.eps, args.seed)  # bad names or eps fail before any loading
    if args.weights:
        models, (name, root, verify), out = _eval_foreign(args)
    else:
        models, (name, root, verify), out = _eval_run(args)
    x, y = _eval_data(name, root, verify, args.n)
    results, rows = {}, {}
    for key, (model, label, extra) in models.items():
        same = [r for r in results.values() if r["sha256"] == extra["sha256"]]
        if same:  # best.safetensors often is last.safetensors: the same bytes, the same numbers
            results[key] = rows[label] = {**same[0], **extra}
            continue
        print(f"evaluating {label} on {name} ({len(y)} test images, {device})", file=sys.stderr)
        result = evaluate(
            model.to(device),
            x,
            y,
            attacks=attacks,
            eps=args.eps,
            seed=args.seed,
            batch_size=args.batch_size,
            device=device,
            checks=not args.no_checks,
            progress=not args.quiet,
        )
        results[key] = {**extra, "data": name, "argv": sys.argv[1:], **result}
        rows[label] = results[key]
    out.mkdir(parents=True, exist_ok=True)
    warned = [f"{key}: {w}" for key, r in results.items() for w in r["warnings"]]
    report = {**results, "warnings": warned}  # one entry per checkpoint, then all warnings
    checkpoint.atomic_write_text(out / "eval.json", json.dumps(report, indent=2))
    table = markdown_table(rows)
    checkpoint.atomic_write_text(out / "eval.md", table)
    print(table)
    print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0


def _eval_run(args: argparse.Namespace) -> tuple[dict, tuple, Path]:
    """The run's target at each requested checkpoint, named "last" / "best" (with its epoch)."""
    from d2r.trainer import load_run

    if not args.run_dir:
        raise ValueError("give a run directory, or --model ARCH --weights FILE")
    run_dir = Path(args.run_dir)
    which = args.checkpoint or ("both" if (run_dir / "best.safetensors").is_file() else "last")
    names = ["last", "best"] if which == "both" else [which]
    models = {}
    for key in names:
        cfg, method = load_run(run_dir, key)
        epoch = _checkpoint_epoch(run_dir / f"{key}.json")
        label = f"{key} (epoch {epoch})" if epoch is not None else key
        digest = _sha256(run_dir / f"{key}.safetensors")
        extra = {"checkpoint": key, "epoch": epoch, "sha256": digest}
        models[key] = (method.target, label, extra)
    return models, (cfg.data.name, cfg.data.root, cfg.data.verify), Path(args.out or run_dir)


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint_epoch(sidecar: Path) -> int | None:
    try:
        return json.loads(sidecar.read_text()).get("epoch")
    except (OSError, ValueError):
        return None


def _eval_foreign(args: argparse.Namespace) -> tuple[dict, tuple, Path]:
    """A registered architecture with a foreign state dict, loaded strictly after key mapping."""
    from d2r import data
    from d2r.models import MODELS

    if not args.model:
        raise ValueError("--weights needs --model ARCH (see `d2r list` for the architectures)")
    if args.run_dir:
        raise ValueError("give either a run directory or --model/--weights, not both")
    info = data.info(args.data)
    model = MODELS.create(
        args.model, num_classes=args.num_classes or info.num_classes, in_channels=info.channels
    )
    checkpoint.load_foreign(model, args.weights)
    model.eval()  # a freshly built model is in train mode; evaluate() would warn about it
    weights = Path(args.weights)
    extra = {"checkpoint": str(weights), "model": args.model, "sha256": _sha256(weights)}
    out = Path(args.out) if args.out else weights.parent / f"{weights.stem}-eval"
    return {weights.name: (model, weights.name, extra)}, (args.data, args.root, True), out


def _eval_data(name: str, root: str, verify: bool, n: int | None):
    from d2r import data

    x, y = data.load(name, root, "test", verify=verify)
    return (x[:n], y[:n]) if n else (x, y)


def _list(args: argparse.Namespace) -> int:
    from d2r.attacks import ATTACKS, EVAL_NAMES
    from d2r.data import DATASETS
    from d2r.methods import METHODS
    from d2r.models import MODELS

    for title, registry in (
        ("models", MODELS),
        ("methods", METHODS),
        ("attacks", ATTACKS),
        ("data sets", DATASETS),
    ):
        print(f"{title}: {', '.join(registry.names())}")
    print(f"evaluation attacks (d2r eval --attacks): {EVAL_NAMES}")
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
        raise argparse.ArgumentTypeError(
            f"expected a number like 0.031 or 8/255, got {text!r}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2r", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_train)

    ev = sub.add_parser(
        "eval",
        help="worst-case robust accuracy of a run's target, or of foreign weights",
        description="Evaluate a run directory's checkpoints, or any state dict of a registered "
        "architecture (--model ARCH --weights FILE). Writes eval.json and eval.md.",
    )
    ev.add_argument("run_dir", nargs="?", help="run directory (or use --model/--weights)")
    ev.add_argument(
        "--attacks",
        default="pgd20,cw20",
        help="comma-separated: pgdK, cwK, pgdKrR (R restarts), fgsm, aa, aa_plus, "
        "aa_rand; e.g. pgd20,pgd50,cw20,aa",
    )
    ev.add_argument("--eps", type=_number, default=8 / 255, help="Linf radius, e.g. 8/255")
    ev.add_argument(
        "--checkpoint",
        choices=["last", "best", "both"],
        default=None,
        help="which checkpoint(s) of the run (default: both when both exist)",
    )
    ev.add_argument("--model", help="architecture of foreign weights (see `d2r list`)")
    ev.add_argument("--weights", help="foreign weights: .safetensors or .pt (weights only)")
    ev.add_argument("--data", default="cifar10", help="data set for --weights (default cifar10)")
    ev.add_argument("--root", default="data", help="data directory for --weights")
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
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_eval)

    ls = sub.add_parser("list", help="registered models, methods, attacks and data sets")
    ls.set_defaults(func=_list)

    dat = sub.add_parser("data", help="data set files")
    dsub = dat.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dl = dsub.add_parser("download", help="download and verify a data set")
    dl.add_argument("name")
    dl.add_argument("--root", default="data")
    dl.set_defaults(func=_data)

    from d2r import export, report, sweep  # each defines its subcommand beside its code

    report.add_command(sub)
    export.add_command(sub)
    sweep.add_command(sub)
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
    except Preempted as err:  # SIGINT/SIGTERM: checkpoint written; 128 + signal, as shells do
        print(f"d2r: {err}", file=sys.stderr)
        return err.exit_code
    except (ValueError, FileNotFoundError) as err:
        message = " ".join(str(err).split())  # one line, whatever the message
        print(f"d2r: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # A second Ctrl-C during training lands here: files are written by atomic rename, so
        # the last checkpoint on disk is whole.
        print(
            "d2r: interrupted; the last checkpoint written is intact (for a training run: "
            "d2r train --resume RUN_DIR continues from it)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
