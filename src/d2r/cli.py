"""Command line: d2r train | eval | list | data | report | export | sweep | plan. Every
subcommand takes the common flags (-q/--quiet, --debug) before or after its name. Errors are
one line: bad input exit 2, a failure of the environment (network, disk, permissions, a
missing package) exit 1; --debug or D2R_DEBUG=1 shows the traceback instead."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from d2r import data, export, plan, plugins, report, runs, sweep, train_command
from d2r.evaluate import command as evaluate_command
from d2r.files import describe
from d2r.guard import Preempted


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


class Parser(argparse.ArgumentParser):
    """argparse with the one-line errors of every other d2r failure: what is wrong and where
    the usage is, not the whole usage (exit 2, as argparse's own)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"d2r: error: {message}; see `{self.prog} -h`\n")


class Subcommands(argparse._SubParsersAction):
    """Every subcommand takes the common flags, wherever it is defined (each module's
    add_command, nested actions included): add_parser adds them as a parent."""

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
    parser = Parser(
        prog="d2r",
        description=__doc__,
        parents=[common_flags(default=False)],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=Subcommands)
    # each command is defined beside the public function it calls, in the order of `d2r -h`
    for module in (train_command, evaluate_command, runs, data, report, export, sweep, plan):
        module.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    func: Callable[[argparse.Namespace], int] = args.func
    if not args.quiet:
        plugins.warn()  # a plugin that failed to load: one line each (silent under -q)
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
