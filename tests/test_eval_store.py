"""eval.json as a store (issue 16): results accumulate across `d2r eval` calls and eps, a repeat
is a cache hit, an evaluation stopped mid-way (exception, SIGTERM, SIGKILL) resumes to exactly
the numbers of one run straight through, and `d2r report --eps` picks the eps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from d2r import data
from d2r.attacks import PGD, from_name
from d2r.cli import main
from d2r.evalstore import CLEAN, Store, key_id, result_key, rows, summary, unpack_flags
from d2r.evaluate import attack_plan, suite_flags
from d2r.models import create
from d2r.report import report
from tiny_runs import evaluated_run


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """An MLP fitted to digits for a moment (clean ~100 %, PGD-3 at 0.1 ~70 % on 48 images:
    flags that a wrong random start changes)."""
    torch.manual_seed(0)
    model = create("mlp", in_channels=1)
    x, y = data.load("digits", "data", "train")
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(150):
        index = torch.randint(0, len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[index].float() / 255), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("weights") / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def _eval(weights: Path, out: Path, *args: str) -> list[str]:
    base = ["eval", "--model", "mlp", "--weights", str(weights), "--data", "digits"]
    return [*base, "--n", "48", "--batch-size", "8", "--no-checks", "-q", "--out", str(out), *args]


def _flags(out: Path) -> dict[tuple, torch.Tensor]:
    """Every stored result's per-sample flags by (attack, eps)."""
    return {
        (r["key"]["attack"], r["key"]["eps"]): unpack_flags(r["correct"], r["n"])
        for r in Store.read(out).results
    }


class CountCalls:
    """Counts PGD calls (each is one batch of one attack); optionally acts on call `at`."""

    def __init__(self, monkeypatch, at: int | None = None, action=None):
        self.calls, self.at, self.action = 0, at, action
        original = PGD.__call__

        def call(attack, model, x, y):
            self.calls += 1
            result = original(attack, model, x, y)
            if self.calls == self.at:
                self.action()
            return result

        monkeypatch.setattr(PGD, "__call__", call)


def test_two_calls_at_two_eps_both_survive_and_a_repeat_is_a_cache_hit(
    weights, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    assert main(_eval(weights, out, "--attacks", "pgd3", "--eps", "0.1")) == 0
    assert main(_eval(weights, out, "--attacks", "pgd3,cw3", "--eps", "0.05")) == 0
    stored = _flags(out)
    assert set(stored) == {(CLEAN, None), ("pgd3", 0.1), ("pgd3", 0.05), ("cw3", 0.05)}
    table = (out / "eval.md").read_text()
    assert "## eps = 0.1 (Linf)" in table and "## eps = 0.05 (Linf)" in table
    at_01 = summary(Store.read(out), "mlp.safetensors", 0.1)
    at_005 = summary(Store.read(out), "mlp.safetensors", 0.05)
    assert at_01["worst_case_over"] == [CLEAN, "pgd3"]  # never the results at 0.05
    assert at_005["worst_case_over"] == [CLEAN, "pgd3", "cw3"]
    worst = stored[(CLEAN, None)] & stored[("pgd3", 0.05)] & stored[("cw3", 0.05)]
    assert at_005["worst_case"] == worst.float().mean().item()
    assert at_01["pgd3"] == stored[("pgd3", 0.1)].float().mean().item()
    assert "| Clean, PGD-3, C&W-3 |" in table

    before = (out / "eval.json").read_bytes()
    counter = CountCalls(monkeypatch)
    capsys.readouterr()
    quiet = _eval(weights, out, "--attacks", "pgd3", "--eps", "0.1")
    assert main(quiet) == 0
    assert counter.calls == 0 and (out / "eval.json").read_bytes() == before
    assert capsys.readouterr().err == ""  # -q: no status lines
    assert main([arg for arg in quiet if arg != "-q"]) == 0
    assert "already in" in capsys.readouterr().err and counter.calls == 0
    assert main(_eval(weights, out, "--attacks", "pgd3", "--eps", "0.1", "--force")) == 0
    assert counter.calls == 6  # 48 images in batches of 8, computed again
    assert all(torch.equal(stored[k], v) for k, v in _flags(out).items())
    assert len(Store.read(out).results) == 4  # replaced in place, nothing added or removed


def test_several_eps_and_per_attack_eps_in_one_call(weights, tmp_path):
    out = tmp_path / "out"
    assert main(_eval(weights, out, "--attacks", "pgd3,fgsm@0.05", "--eps", "0.1,8/255")) == 0
    assert set(_flags(out)) == {(CLEAN, None), ("pgd3", 0.1), ("pgd3", 8 / 255), ("fgsm", 0.05)}
    by_eps = {r["eps"]: r for r in rows(Store.read(out))}
    assert by_eps[0.05]["worst_case_over"] == [CLEAN, "fgsm"]
    assert by_eps[8 / 255]["settings"]["eps_text"] == "8/255"
    assert "## eps = 8/255 (Linf)" in (out / "eval.md").read_text()


def test_attack_plan_reads_name_at_eps_and_refuses_bad_ones():
    plan = attack_plan(["pgd20", "cw20", "fgsm@0.031"], [8 / 255])
    assert plan == {8 / 255: ["pgd20", "cw20"], 0.031: ["fgsm"]}
    assert attack_plan("pgd5", [0.1, 0.2]) == {0.1: ["pgd5"], 0.2: ["pgd5"]}
    assert attack_plan([], [0.1]) == {0.1: []}  # clean accuracy only
    with pytest.raises(ValueError, match="NAME@EPS"):
        attack_plan(["fgsm@x"], [0.1])
    with pytest.raises(ValueError, match="attack 'pgdx' unknown"):
        attack_plan(["pgdx@0.1"], [0.1])


def test_an_evaluation_stopped_by_an_exception_resumes_to_the_straight_numbers(
    weights, tmp_path, monkeypatch, capsys
):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--attacks", "pgd3,cw3", "--eps", "0.1")
    assert main(_eval(weights, straight, *args)) == 0

    def crash():
        raise RuntimeError("killed")

    CountCalls(monkeypatch, at=6 + 2, action=crash)  # pgd3 done (6 batches), cw3 at batch 2
    with pytest.raises(RuntimeError, match="killed"):
        main(_eval(weights, resumed, *args))
    assert set(_flags(resumed)) == {(CLEAN, None), ("pgd3", 0.1)}
    (partial,) = resumed.glob("eval-partial-*.json")
    state = json.loads(partial.read_text())
    assert (state["key"]["attack"], state["batches"], state["n"]) == ("cw3", 1, 8)

    assert main(_eval(weights, resumed, *args, "--batch-size", "16")) == 2  # other seeds
    assert "--batch-size 8" in capsys.readouterr().err and partial.is_file()
    counter = CountCalls(monkeypatch)
    assert main(_eval(weights, resumed, *args)) == 0
    assert counter.calls == 6 - 1  # only cw3's batches not saved
    _assert_same(straight, resumed)


def _assert_same(straight: Path, resumed: Path) -> None:
    a, b = _flags(straight), _flags(resumed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(resumed.glob("eval-partial-*")), "a finished key leaves no partial state"


def test_sigterm_finishes_the_batch_saves_and_exits_143(weights, tmp_path, monkeypatch, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ("--attacks", "pgd3", "--eps", "0.1")
    assert main(_eval(weights, straight, *args)) == 0
    CountCalls(monkeypatch, at=3, action=lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert main(_eval(weights, resumed, *args)) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after batch 3 of pgd3" in err
    assert "run the same d2r eval command again" in err
    (partial,) = resumed.glob("eval-partial-*.json")
    assert json.loads(partial.read_text())["batches"] == 3  # the batch under way was finished
    monkeypatch.undo()
    assert main(_eval(weights, resumed, *args)) == 0
    _assert_same(straight, resumed)

    # a signal during an attack's last batch: its result is stored first, nothing is left over
    last = tmp_path / "last"
    CountCalls(monkeypatch, at=6, action=lambda: os.kill(os.getpid(), signal.SIGINT))
    assert main(_eval(weights, last, *args)) == 130
    assert "stopped by SIGINT after pgd3 finished" in capsys.readouterr().err
    _assert_same(straight, last)
    # d2r.evaluate in memory draws the same starts; another seed draws others, and changes
    # the flags: a resume that did not seed each batch from (seed, index) would not match
    stored = _flags(straight)[("pgd3", 0.1)]
    model, x, y = _model_and_images(weights)
    suite = {"pgd3": from_name("pgd3", 0.1)}
    assert torch.equal(suite_flags(model, x, y, suite, seed=0, batch_size=8)[0]["pgd3"], stored)
    assert not torch.equal(suite_flags(model, x, y, suite, seed=1, batch_size=8)[0]["pgd3"], stored)


def _model_and_images(weights: Path):
    from d2r.weights import load_foreign

    model = create("mlp", in_channels=1)
    load_foreign(model, weights)
    x, y = data.load("digits", "data", "test")
    return model.eval(), x[:48], y[:48]


def test_a_sigkilled_evaluation_resumes_to_the_straight_numbers(weights, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = _eval(weights, resumed, "--attacks", "pgd30", "--eps", "0.1", "--batch-size", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "d2r", *args], env=env)
    try:
        _wait_for_partial(resumed, "pgd30", process)
        process.kill()  # SIGKILL: no handler, no last save
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    (partial,) = resumed.glob("eval-partial-*.json")
    assert 1 <= json.loads(partial.read_text())["batches"] < 24  # killed mid-way
    assert ("pgd30", 0.1) not in _flags(resumed)
    assert main(args) == 0
    straight_args = _eval(weights, straight, "--attacks", "pgd30", "--eps", "0.1")
    assert main([*straight_args, "--batch-size", "2"]) == 0
    _assert_same(straight, resumed)


def _wait_for_partial(out: Path, attack: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        for path in out.glob("eval-partial-*.json"):
            try:  # written by atomic rename: always whole, but gone once its attack finishes
                state = json.loads(path.read_text())
            except FileNotFoundError:
                continue
            if state["key"]["attack"] == attack and state["batches"] >= 1:
                return
        time.sleep(0.005)
    pytest.fail(f"no partial state of {attack} appeared (exit code {process.poll()})")


def test_report_at_each_eps(tmp_path_factory, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(evaluated_run(tmp_path_factory), run)  # pgd20, cw20 at 0.1 on 50 images
    eval_args = ["eval", str(run), "--checkpoint", "last", "--n", "50", "--no-checks", "-q"]
    assert main([*eval_args, "--attacks", "pgd5", "--eps", "0.05"]) == 0
    store = Store.read(run)
    at_01, at_005 = summary(store, "last", 0.1), summary(store, "last", 0.05)

    default = json.loads(report([run], curves=False)["json"])  # the training eps: 0.1
    (row,) = default["groups"]
    assert row["eps"] == 0.1 and row["metrics"]["pgd20"]["mean"] == at_01["pgd20"]
    assert row["metrics"]["worst_case"]["mean"] == at_01["worst_case"]
    assert "pgd5" not in row["metrics"]

    texts = report([run], curves=False, eps=0.05)
    (row,) = json.loads(texts["json"])["groups"]
    assert row["eps"] == 0.05 and set(row["metrics"]) == {CLEAN, "pgd5", "worst_case"}
    assert row["metrics"]["worst_case"]["mean"] == at_005["worst_case"]
    assert "Every run at eps = 0.05 (--eps)" in texts["md"]
    assert "worst case of Clean, PGD-5" in texts["md"]

    assert main(["report", str(run), "--eps", "8//255", "--no-curves"]) == 2  # before any work
    texts = report([run], curves=False, eps=0.2)
    (row,) = json.loads(texts["json"])["groups"]
    assert row["source"] == "no result at this eps" and row["metrics"] == {}
    assert "--eps '8//255': give one number" in capsys.readouterr().err
    line = next(x for x in texts["md"].splitlines() if x.startswith("| digits"))
    assert "| — | — |" in line and "no result (at eps 0.2)" in line  # not "51/255"


def test_eval_md_shows_every_result_and_never_mixes_eps(tmp_path):
    """Two seeds of one checkpoint, an attack stored twice under one name (other settings),
    and two eps: every result has its row; each worst case covers its own row only."""
    from d2r.evalstore import commit, make_entry, result_key

    images, sha = {"data": "digits", "split": "test", "n": 4, "sha256": "0" * 64}, "a" * 64

    def entry(attack, settings, eps, seed, *bits):
        key = result_key(sha, attack, settings, eps, None if eps is None else "Linf", images, seed)
        return make_entry(key, torch.tensor(bits, dtype=torch.bool), 1.0)

    entries = [
        entry(CLEAN, {}, None, 0, 1, 1, 1, 0),
        entry(CLEAN, {}, None, 1, 1, 1, 0, 1),
        entry("aa", {"package": "0.2.0"}, 0.031, 0, 1, 1, 0, 0),
        entry("aa", {"package": "0.3.0"}, 0.031, 0, 1, 0, 0, 0),
        entry("aa", {"package": "0.3.0"}, 0.031, 1, 0, 1, 0, 1),
        entry("pgd20", {"steps": 20}, 8 / 255, 0, 1, 0, 1, 0),
    ]
    commit(tmp_path, [{"checkpoint": "last", "label": "last", "sha256": sha}], entries)
    lines = (tmp_path / "eval.md").read_text().splitlines()
    at_aa = {r.split(" | ")[0][2:]: r for r in lines if "| 0.031 |" in r}
    worst = {label: r.split(" | ")[-2] for label, r in at_aa.items()}
    assert worst == {"last": "50.00", "last #2": "25.00", "last (seed 1)": "50.00"}
    (pgd,) = [r for r in lines if "| 8/255 |" in r]  # clean and PGD-20: never AA at 0.031
    assert pgd.startswith("| last | 4 | 8/255 | 0 | 75.00 | 50.00 |")
    assert pgd.endswith("| 50.00 | Clean, PGD-20 |")


def test_a_key_names_ema_weights_and_leaves_the_target_keys_of_earlier_versions():
    images = {"data": "digits", "split": "test", "n": 3, "sha256": "0" * 64}
    target = result_key("a" * 64, CLEAN, {}, None, None, images, 0)
    assert "weights" not in target  # the ids of results stored before the EMA existed hold
    assert result_key("a" * 64, CLEAN, {}, None, None, images, 0, "target") == target
    ema = result_key("a" * 64, CLEAN, {}, None, None, images, 0, "ema")
    assert ema == {**target, "weights": "ema"} and key_id(ema) != key_id(target)


def test_foreign_weights_on_synthetic_data_take_the_shape_of_like(weights, tmp_path, capsys):
    args = ["eval", "--model", "mlp", "--weights", str(weights), "--data", "synthetic"]
    args += ["--n", "16", "--attacks", "pgd3", "--eps", "0.1", "--no-checks", "-q"]
    out = tmp_path / "synthetic"
    assert main([*args, "--like", "digits", "--out", str(out)]) == 0  # 1x8x8 like the MLP's
    (entry,) = [e for e in Store.read(out).results if e["key"]["attack"] == CLEAN]
    assert entry["key"]["images"]["data"] == "synthetic" and entry["n"] == 16
    assert main([*args, "--out", str(tmp_path / "cifar")]) == 2  # cifar10-shaped: no fit
    assert "do not fit the model" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--like", "digits", "-q"]) == 2  # checked first
    assert "--like is for --weights" in capsys.readouterr().err


def test_every_result_records_whether_tf32_was_on(weights, tmp_path, monkeypatch):
    from d2r.evaluate.runs import uses_tf32

    out = tmp_path / "out"
    assert main(_eval(weights, out, "--attacks", "pgd3", "--eps", "0.1")) == 0
    assert {e["tf32"] for e in Store.read(out).results} == {False}  # CPU: plain float32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # CUDA's default
    assert uses_tf32(torch.device("cuda")) and not uses_tf32(torch.device("cpu"))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert not uses_tf32(torch.device("cuda"))  # matmuls stay "highest" (torch's default)


def test_eval_md_says_which_rows_are_of_an_earlier_last(tmp_path):
    """`last` is rewritten every epoch: rows of the files it held before stay in the store and
    in eval.md, said to be earlier, beside the one evaluated last."""
    from d2r.evalstore import commit, make_entry, result_key

    images = {"data": "digits", "split": "test", "n": 4, "sha256": "x"}
    flags = torch.ones(4, dtype=torch.bool)
    for epoch, sha in ((1, "old"), (2, "new")):
        checkpoints = [{"checkpoint": "last", "label": f"last (epoch {epoch})", "sha256": sha,
                        "epoch": epoch}]  # fmt: skip
        keys = [result_key(sha, a, {}, e, n, images, 0) for a, e, n in
                (("clean", None, None), ("pgd1", 0.1, "Linf"))]  # fmt: skip
        commit(tmp_path, checkpoints=checkpoints, results=[make_entry(k, flags, 1.0) for k in keys])
    text = (tmp_path / "eval.md").read_text()
    assert "| last (epoch 1), an earlier last |" in text and "| last (epoch 2) |" in text
