"""Where an eps comes from and what it may be: `d2r eval RUN` attacks at the run's own eps and
norm unless told otherwise, `--weights` at the data set's usual eps; an L-inf eps above 1 (the
images are in [0, 1]) and an L2 eps above the image cube's diameter are refused in one line."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import save_file

from d2r import data
from d2r.attacks import PGD, check_budget, check_radius
from d2r.cli import main
from d2r.config import resolve
from d2r.models import create
from d2r.registry import OptionError
from d2r.runs import check_config
from tiny_runs import plain_run


def one_line(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def stored_eps(out) -> set[float]:
    """The radii of the attacks' results in OUT/eval.json (clean accuracy has none)."""
    results = json.loads((out / "eval.json").read_text())["results"]
    return {r["key"]["eps"] for r in results if r["key"]["attack"] != "clean"}


@pytest.mark.parametrize("eps", [1.5, 300.0])
def test_an_linf_eps_above_one_is_refused(eps):
    with pytest.raises(OptionError, match="must be <= 1 in linf"):
        check_budget(eps)
    with pytest.raises(OptionError, match="must be <= 1 in linf"):
        PGD(eps=eps)
    with pytest.raises(ValueError, match=r"config key 'method.eps': must be <= 1 in linf"):
        check_config(resolve(overrides=[f"method.eps={eps}"]))
    check_budget(1.0)  # the whole cube: allowed, if pointless


def test_an_l2_eps_above_the_cubes_diameter_is_refused():
    check_radius(8.0, "l2", (1, 8, 8))  # sqrt(64): the farthest two digits images can be
    with pytest.raises(OptionError, match=r"sqrt\(C\*H\*W\) = 8 in l2 for 1x8x8 images"):
        check_radius(8.5, "l2", (1, 8, 8))
    check_radius(300.0, "linf", (1, 8, 8))  # not its rule: check_budget bounds L-inf
    assert math.isclose(math.sqrt(3 * 32 * 32), 55.43, abs_tol=0.01)
    with pytest.raises(ValueError, match=r"config key 'method.eps': must be <= sqrt"):
        check_config(resolve(overrides=["method.norm=l2", "method.eps=9"]))
    with pytest.raises(ValueError, match=r"config key 'eval.eps': must be <= sqrt"):
        check_config(resolve(overrides=["method.norm=l2", "eval.eps=9"]))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return plain_run(tmp_path_factory)  # digits at the demo's eps, 0.1


def test_eval_refuses_a_bad_eps_in_one_line_and_writes_nothing(run, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["eval", str(run), "--out", str(out), "--attacks", "pgd1", "--n", "8"]
    assert main([*args, "--eps", "300"]) == 2
    one_line(capsys, "must be <= 1 in linf")
    assert main([*args, "--eps", "9", "--norm", "l2"]) == 2
    one_line(capsys, "must be <= sqrt(C*H*W) = 8 in l2")
    assert not out.exists()


def test_eval_of_a_run_without_eps_attacks_at_the_runs_own(run, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["eval", str(run), "--out", str(out), "--attacks", "pgd1", "--n", "8", "--no-checks"]
    assert main([*args, "--checkpoint", "last"]) == 0
    said = capsys.readouterr().out
    assert "eps 0.1 (Linf), the run's own" in said
    assert stored_eps(out) == {0.1}
    assert main([*args, "--checkpoint", "last", "--eps", "8/255"]) == 0  # told otherwise
    assert stored_eps(out) == {0.1, 8 / 255}


def test_eval_of_weights_without_eps_attacks_at_the_data_sets_usual(tmp_path, capsys):
    assert (data.info("digits").eps, data.info("mnist").eps) == (0.1, 0.3)
    assert data.info("cifar10").eps == data.info("svhn").eps == 8 / 255
    assert data.info("synthetic", "mnist").eps == 0.3  # a synthetic set takes its model's
    weights = tmp_path / "w.safetensors"
    save_file(create("tiny_cnn", in_channels=1).state_dict(), weights)
    out = tmp_path / "out"
    args = ["eval", "--model", "tiny_cnn", "--weights", str(weights), "--data", "digits"]
    assert main([*args, "--out", str(out), "--attacks", "pgd1", "--n", "8", "--no-checks"]) == 0
    assert "eps 0.1 (Linf), the usual one for digits" in capsys.readouterr().out
    assert stored_eps(out) == {0.1}
