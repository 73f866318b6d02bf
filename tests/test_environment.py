"""Failures of the environment, in one line and before any work (issue 20): an output place
that cannot be written is refused before a model is loaded or data read (train, eval, report,
export, data download), eval results survive a write that fails at the end, a download without
network or disk space leaves nothing behind, every subcommand takes -q and --debug, files follow
the umask, and a finished run stays a success whatever signal or --resume comes after it."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import d2r.data
from d2r import evalstore, export, files, runs
from d2r import report as report_mod
from d2r.checkpoint import load
from d2r.cli import build_parser, main
from d2r.data import sources
from d2r.trainer import lr_factor
from tiny_runs import plain_run

# these packages export a function of the module's name
download_mod = importlib.import_module("d2r.data.download")
evaluate_runs = importlib.import_module("d2r.evaluate.runs")
SRC = str(Path(__file__).resolve().parents[1] / "src")
# one epoch of one batch, a 1-step attack, a 20-image check: the cheapest run that finishes
TINY = [
    "train.epochs=1",
    "data.train_subset=64",
    "data.batch_size=64",
    "method.steps=1",
    "eval.subset=20",
    "eval.attack=pgd1",
]
TINY_ARGS = [a for kv in TINY for a in ("--set", kv)]


@pytest.fixture
def run(tmp_path_factory, tmp_path):
    """A private copy of a finished tiny run."""
    copy = tmp_path / "run"
    shutil.copytree(plain_run(tmp_path_factory), copy)
    return copy


@pytest.fixture
def blocked(tmp_path):
    """A path whose parent is a file: it can never be created, even by root."""
    (tmp_path / "file").write_text("in the way")
    return tmp_path / "file" / "out"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def refuse_work(monkeypatch) -> None:
    """Any model load or data read fails the test: a refusal must come before them."""

    def work(*args, **kwargs):
        pytest.fail("work started before the output was checked")

    for module in (evaluate_runs, export):  # where a run's checkpoint is loaded
        monkeypatch.setattr(module, "load_checkpoint", work)
    monkeypatch.setattr(d2r.data, "load_splits", work)
    monkeypatch.setattr(report_mod, "read_run", work)


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


# An unwritable output: refused before any work, nothing touched -----------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "{run}", "--out", "{out}", "--attacks", "pgd1", "--n", "10"],
        ["report", "{run}", "--out", "{out}"],
        ["export", "{run}", "--out", "{out}/model.safetensors"],
    ],
    ids=["eval", "report", "export"],
)
def test_an_unwritable_out_is_refused_before_any_work(command, run, blocked, monkeypatch, capsys):
    before = snapshot(run)
    refuse_work(monkeypatch)
    args = [a.format(run=run, out=blocked) for a in command]
    assert main(args) == 2
    one_line_error(capsys, "cannot write to", str(blocked), "a file, not a directory")
    assert snapshot(run) == before and not blocked.parent.is_dir()


def test_train_into_an_unwritable_out_reads_no_data(blocked, monkeypatch, capsys):
    refuse_work(monkeypatch)
    assert main(["train", "-q", "--out", str(blocked), *TINY_ARGS]) == 2
    one_line_error(capsys, "cannot write to run directory", str(blocked))


def test_a_refused_train_creates_no_directory(tmp_path, monkeypatch, capsys):
    """The check probes a write but leaves nothing: a run refused later (here: missing data)
    leaves no empty run directory behind."""
    out = tmp_path / "a" / "b" / "run"
    args = ["train", "-q", "--out", str(out), "--set", "data.name=mnist"]
    assert main([*args, "--set", f"data.root={tmp_path / 'no-data'}"]) == 2
    one_line_error(capsys, "is missing", "d2r data download mnist")
    assert not (tmp_path / "a").exists()


def test_report_refuses_run_directories_it_cannot_draw_in(run, monkeypatch, capsys):
    def read_only(directory, what="output directory"):
        if Path(directory) == run:
            raise ValueError(f"cannot write to {what} {str(directory)!r}: Permission denied")
        return Path(directory)

    monkeypatch.setattr(report_mod, "check_writable", read_only)  # where report looks it up
    monkeypatch.setattr(report_mod, "read_run", lambda *a: pytest.fail("read a run"))
    assert main(["report", str(run)]) == 2
    one_line_error(capsys, "--no-curves")


def test_check_writable_leaves_no_trace_and_names_the_fix(tmp_path, blocked):
    assert files.check_writable(tmp_path / "x" / "y") == tmp_path / "x" / "y"
    assert os.listdir(tmp_path) == ["file"]
    with pytest.raises(ValueError, match=r"cannot write to output directory .*a file, not a dir"):
        files.check_writable(blocked)


# A write that fails during an evaluation ----------------------------------------------------


def disk_fills_in(directory: Path, monkeypatch) -> None:
    """After the evaluation's first write (its store, eval.json/eval.md, passed the up-front
    check), every write into `directory` fails as on a full disk."""
    real, allowed = files.atomic_write_text, [2]

    def write(path, text):
        if Path(path).parent == directory:
            allowed[0] -= 1
            if allowed[0] < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    for module in (evalstore.store, evalstore.resume):  # eval.json and the partial files
        monkeypatch.setattr(module, "atomic_write_text", write)


EVAL = ["--attacks", "pgd1", "--n", "10", "--no-checks", "-q", "--checkpoint", "last"]


def test_results_go_beside_the_run_when_out_fills_up(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "elsewhere"
    disk_fills_in(out, monkeypatch)
    assert main(["eval", str(run), "--out", str(out), *EVAL]) == 1
    captured = capsys.readouterr()
    assert "| last (epoch 1) |" in captured.out  # the numbers computed are printed
    last = captured.err.strip().splitlines()[-1]
    assert "No space left on device" in last and f"written to {run} instead" in last
    assert "cannot save the evaluation's progress" in captured.err  # warned, went on
    saved = evalstore.Store.read(run).results
    assert [r["key"]["attack"] for r in saved] == [evalstore.CLEAN] and saved[0]["n"] == 10


def test_results_go_to_a_temp_dir_when_the_run_itself_fills_up(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    disk_fills_in(run, monkeypatch)
    assert main(["eval", str(run), *EVAL]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    saved = [p for p in tmp_path.glob("d2r-eval-*") if (p / "eval.json").is_file()]
    assert len(saved) == 1 and f"written to {saved[0]} instead" in last
    assert evalstore.Store.read(saved[0]).results


# data download --------------------------------------------------------------------------------


def no_network(*args, **kwargs):
    raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))


def test_download_without_network_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    root = tmp_path / "data"
    assert main(["data", "download", "cifar10", "--root", str(root)]) == 1
    one_line_error(capsys, "name resolution", "Check the network", "by hand", "MD5")
    assert os.listdir(root) == []


def test_download_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    args = ["data", "download", "cifar10", "--root", str(tmp_path)]
    with pytest.raises(OSError, match="could not fetch"):
        main(["--debug", *args])
    monkeypatch.setenv("D2R_DEBUG", "1")
    with pytest.raises(OSError, match="could not fetch"):
        main(args)


def test_a_full_disk_stops_the_download_at_once_without_a_partial_file(
    tmp_path, monkeypatch, capsys
):
    tried = []

    def fill_disk(url, temp):
        tried.append(url)
        temp.write_bytes(b"x" * 1000)  # part of the file arrived, then the disk was full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(download_mod, "_fetch", fill_disk)
    root = tmp_path / "data"
    assert main(["data", "download", "mnist", "--root", str(root)]) == 1
    one_line_error(capsys, "No space left on device", "free disk space", "--root")
    assert len(tried) == 1 and os.listdir(root) == []  # no other mirror tried, nothing kept


def test_download_into_an_unwritable_root_fails_before_any_fetch(blocked, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("fetched"))
    assert main(["data", "download", "mnist", "--root", str(blocked)]) == 2
    one_line_error(capsys, "cannot write to data directory")


def test_a_missing_optional_package_is_one_line(run, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import fails as if not installed
    assert main(["eval", str(run), "--attacks", "aa", "-q"]) == 1
    one_line_error(capsys, 'pip install "d2r-robust[autoattack]"')


def test_out_of_device_memory_is_one_line_naming_the_batch_size(monkeypatch, capsys):
    import torch

    message = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of ..."

    def oom(args):
        raise torch.cuda.OutOfMemoryError(message)

    monkeypatch.setattr(runs.listing, "_list", oom)  # `d2r list` is in d2r.runs.listing
    assert main(["list"]) == 1
    err = one_line_error(capsys, "CUDA out of memory. Tried to allocate 2.00 GiB;", "batch_size")
    assert "total capacity" not in err


# Common flags -------------------------------------------------------------------------------


def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every subcommand that runs something, e.g. ("data", "download")."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from leaves(sub, (*path, name))


def required_positionals(parser: argparse.ArgumentParser) -> list[str]:
    return ["x" for a in parser._actions if not a.option_strings and a.nargs not in ("?", "*")]


COMMANDS = list(leaves(build_parser()))


def test_every_command_is_found():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"train", "eval", "report", "export", "list", "data download"} <= names


def test_every_command_is_defined_beside_its_function_not_in_cli():
    """Each command's parser and handler live in the module of the public function it calls
    (its add_command); cli.py only gathers them."""
    for path, sub in COMMANDS:
        assert sub.get_default("func").__module__ != "d2r.cli", path


@pytest.mark.parametrize("path,sub", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
@pytest.mark.parametrize("flag", ["-q", "--quiet", "--debug"])
def test_every_subcommand_takes_the_common_flags_before_or_after_its_name(path, sub, flag):
    parser, rest = build_parser(), required_positionals(sub)
    dest = "debug" if flag == "--debug" else "quiet"
    for argv in ([flag, *path, *rest], [*path, *rest, flag], [*path[:1], flag, *path[1:], *rest]):
        assert getattr(parser.parse_args(argv), dest) is True, argv
    assert getattr(parser.parse_args([*path, *rest]), dest) is False


def test_list_and_data_run_quietly(capsys):
    assert main(["list", "-q"]) == 0 and main(["-q", "list"]) == 0
    assert "models:" in capsys.readouterr().out


# Modes ----------------------------------------------------------------------------------------


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def modes(directory: Path) -> dict[str, int]:
    return {
        str(p.relative_to(directory)): stat.S_IMODE(p.stat().st_mode) for p in directory.rglob("*")
    }


def test_every_file_d2r_writes_follows_the_umask(tmp_path, umask_027):
    """The run directory, eval, report and export: 0640 under umask 027, directories 0750
    (mkstemp alone gives 0600: a colleague in the group could not read the results)."""
    run = tmp_path / "run"
    assert main(["train", "-q", "--out", str(run), *TINY_ARGS]) == 0
    assert main(["eval", str(run), *EVAL]) == 0
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--csv"]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    found = modes(tmp_path)
    for name in ("run/last.safetensors", "run/config.yaml", "run/eval.json", "report/report.md"):
        assert name in found, sorted(found)
    want = {k: 0o750 if (tmp_path / k).is_dir() else umask_027 for k in found}
    assert found == want and files.umask() == 0o027


def test_downloaded_files_follow_the_umask(tmp_path, umask_027, monkeypatch):
    served = tmp_path / "served"
    served.write_bytes(b"official bytes")
    spec = d2r.data.info("mnist")
    remote = {"urls": (served.as_uri(),), "md5": d2r.data.md5sum(served)}
    spec = dataclasses.replace(
        spec, files=tuple(dataclasses.replace(f, **remote) for f in spec.files)
    )
    monkeypatch.setitem(sources.INFO, "mnist", spec)
    paths = d2r.data.download("mnist", tmp_path / "data")
    assert len(paths) == 4 and {stat.S_IMODE(p.stat().st_mode) for p in paths} == {umask_027}


# Finished runs --------------------------------------------------------------------------------

LATE_SIGTERM = """
import os, signal, sys
from d2r import checkpoint, curves
from d2r.cli import main

def late(module, name, when):
    real = getattr(module, name)
    def wrapper(*args, **kwargs):
        if when(args):
            os.kill(os.getpid(), signal.SIGTERM)  # delivered before `real` runs
        return real(*args, **kwargs)
    setattr(module, name, wrapper)

fired = []
def once(args):  # a second SIGTERM would stop at once (by design): send one
    fired.append(1)
    return len(fired) == 1

if sys.argv[1] == "checkpoint":  # during the last epoch's checkpoint
    late(checkpoint, "save_run", lambda args: args[-1] is not None and once(args))
else:  # during the final writes after it (curves.png)
    late(curves, "write_curves", once)
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("when", ["checkpoint", "curves"])
def test_a_sigterm_after_the_last_epoch_leaves_a_finished_run_that_exits_0(tmp_path, when, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", LATE_SIGTERM, when, "train", "-q", "--out", str(out), *TINY_ARGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "SIGTERM came after the last epoch: the run is finished" in proc.stderr
    assert load(out / "last.safetensors")[1]["epoch"] == 1 and (out / "curves.png").is_file()
    before = snapshot(out)
    assert main(["train", "--resume", str(out), "-q"]) == 0  # a requeued job: nothing to do
    assert "already finished its 1 epochs; nothing to do" in capsys.readouterr().out
    assert snapshot(out) == before


def test_a_sigterm_outside_training_exits_143_in_one_line(tmp_path):
    """A download stopped by a scheduler: a message, 143, no partial file left."""
    script = (
        "import importlib, os, signal, sys\n"
        "download = importlib.import_module('d2r.data.download')\n"
        "def fetch(url, temp):\n"
        "    temp.write_bytes(b'part of the file')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    temp.write_bytes(b'never reached')\n"
        "download._fetch = fetch\n"
        "from d2r.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    root = tmp_path / "data"
    cmd = [sys.executable, "-c", script, "data", "download", "mnist", "--root", str(root)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert proc.stderr.count("\n") == 1 and "stopped by SIGTERM" in proc.stderr
    assert os.listdir(root) == []


def test_a_one_epoch_run_has_no_warm_up():
    """Documented in docs/training.md, "Training": warm-up would be the whole run."""
    assert lr_factor(0, 1, 0.2, [0.75, 0.9]) == 1.0
    assert lr_factor(0, 2, 0.2, [0.75, 0.9]) == 0.2
