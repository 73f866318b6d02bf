"""The L2 threat model (issue 14): every attack keeps the L2 ball and [0, 1], PGD-L2 equals a
hand-written one, the start is uniform in the ball, every method trains in L2, and evaluation
records the norm beside every number (eval.json, eval.md, report, per-epoch check)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

import d2r
from conftest import Rounded, classified_batch, mlp
from d2r import data
from d2r.attacks import (
    AA_INSTALL,
    FGSM,
    PGD,
    AutoAttack,
    Budget,
    KLAttack,
    attack_loop,
    cag,
    ce_objective,
    from_name,
    project,
    random_start,
)
from d2r.cli import main
from d2r.config import resolve
from d2r.evaluate import EvaluationWarning, markdown_table
from d2r.logs import read_metrics
from d2r.methods import METHODS
from d2r.runs import build_method
from tiny_runs import TINY, evaluated_run

EPS = 0.5


@pytest.fixture()
def batch():
    """A tiny undefended model and 16 images it classifies correctly (labels = its own)."""
    return classified_batch(16)


def _l2(delta: torch.Tensor) -> torch.Tensor:
    return delta.flatten(1).norm(dim=1)


def _aa_l2() -> AutoAttack:
    pytest.importorskip("pyautoattack", reason=AA_INSTALL)
    return AutoAttack(eps=EPS, version="custom", attacks=("apgd-ce",), norm="l2")


def _guide_reference(model, x, y):
    return cag(model, mlp(1), x, eps=EPS, step_size=EPS / 4, steps=5, norm="l2")


def _mart_start(model, x, y):
    start = x + 0.001 * torch.randn_like(x)  # MART's released start, then the one loop in L2
    budget = Budget(eps=EPS, step_size=EPS / 4, steps=5, norm="l2")
    return attack_loop(model, x, start, ce_objective(y), budget)


ATTACKS = {
    "pgd": lambda: PGD(eps=EPS, step_size=EPS / 4, steps=10, norm="l2"),
    "cw": lambda: PGD(eps=EPS, step_size=EPS / 4, steps=10, loss="cw", norm="l2"),
    "pgd_restarts": lambda: PGD(eps=EPS, step_size=EPS / 4, steps=5, restarts=2, norm="l2"),
    "fgsm": lambda: FGSM(eps=EPS, norm="l2"),
    "kl": lambda: KLAttack(eps=EPS, step_size=EPS / 4, steps=5, norm="l2"),
    "cag": lambda: _guide_reference,
    "mart_start": lambda: _mart_start,
    "aa": _aa_l2,
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_l2_attacks_keep_the_ball_and_range_and_lower_accuracy(batch, name):
    model, x, y = batch
    torch.manual_seed(0)
    x_adv = ATTACKS[name]()(model, x, y)
    assert _l2(x_adv - x).max() <= EPS * (1 + 1e-5)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert _l2(x_adv - x).max() > EPS / 4  # it moved: not a no-op that passes trivially
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).sum() < len(y)
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_the_l2_ball_is_reached_and_linf_would_leave_it(batch):
    """The same budget in L-inf moves far outside the L2 ball: the norm is really applied."""
    model, x, y = batch
    torch.manual_seed(0)
    linf = PGD(eps=EPS, step_size=EPS / 4, steps=10, early_stop=False)(model, x, y)
    torch.manual_seed(0)
    l2 = PGD(eps=EPS, step_size=EPS / 4, steps=10, early_stop=False, norm="l2")(model, x, y)
    assert _l2(linf - x).max() > 2 * EPS
    # no early stop: every sample ends on the sphere, or just inside where [0, 1] clipped it
    assert _l2(l2 - x).min() > 0.95 * EPS and _l2(l2 - x).max() <= EPS * (1 + 1e-5)


def _hand_project(x_adv, x, eps):
    delta = x_adv - x
    norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    delta = delta * torch.minimum(torch.ones_like(norms), eps / norms)
    return (x + delta).clamp(0, 1)


def _hand_pgd_l2(model, x, y, loss, eps, alpha, steps):
    """PGD-L2 written out: uniform start in the ball (Gaussian direction, radius eps * U^(1/d)),
    normalized-gradient steps, per-sample early stop, L2 projection then [0, 1]."""
    direction = torch.randn_like(x)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    radius = eps * torch.rand(len(x)) ** (1 / x[0].numel())
    x_adv = _hand_project(x + direction * radius.view(-1, 1, 1, 1), x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        logits = model(x_adv)
        if loss == "ce":
            objective = F.cross_entropy(logits, y, reduction="sum")
        else:  # the CW margin max_{j != y} z_j - z_y
            other = logits.clone()
            other[torch.arange(len(y)), y] = -math.inf
            objective = (other.max(1).values - logits[torch.arange(len(y)), y]).sum()
        (grad,) = torch.autograd.grad(objective, x_adv)
        unit = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        still_right = (logits.argmax(1) == y).float().view(-1, 1, 1, 1)
        x_adv = _hand_project(x_adv.detach() + alpha * unit * still_right, x, eps)
    return x_adv.detach()


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_l2_equals_a_hand_written_one(batch, loss):
    model, x, y = batch
    torch.manual_seed(7)
    ours = PGD(eps=EPS, step_size=0.1, steps=10, loss=loss, norm="l2")(model, x, y)
    torch.manual_seed(7)
    theirs = _hand_pgd_l2(model, x, y, loss, EPS, 0.1, 10)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(ours, x, atol=1e-3)


def test_l2_random_start_is_uniform_in_the_ball():
    """In d = 2 a uniform point of the disc lies within half its radius with probability 1/4
    (a uniform radius, the other common choice, would give 1/2)."""
    x = torch.full((20000, 1, 1, 2), 0.5)  # the [0, 1] clip never binds at eps = 0.3
    torch.manual_seed(0)
    radii = _l2(random_start(x, 0.3, "l2") - x)
    assert radii.max() <= 0.3 * (1 + 1e-6)
    assert (radii <= 0.15).float().mean().item() == pytest.approx(0.25, abs=0.015)


def test_l2_projection_shrinks_only_what_leaves_the_ball():
    x = torch.full((3, 1, 2, 2), 0.5)
    step = torch.tensor([0.1, 0.3, 2.0]).view(-1, 1, 1, 1) * torch.ones_like(x)  # norms .2 .6 4
    out = project(x + step, x, 0.5, "l2")
    assert torch.allclose(out[0], x[0] + step[0])  # inside: unchanged
    assert _l2(out[1:2] - x[1:2]).item() == pytest.approx(0.5)  # on the sphere, same direction
    assert torch.allclose(out[1] - x[1], (step[1] / step[1].norm()) * 0.5)
    assert out[2].max() <= 1 and _l2(out[2:] - x[2:]).item() <= 0.5 + 1e-6  # clip: shorter


def test_from_name_builds_each_evaluation_attack_in_l2():
    for name in ("pgd20", "cw20", "pgd10r3", "fgsm", "aa", "aa_plus", "aa_rand"):
        attack = from_name(name, EPS, norm="l2")
        assert attack.norm == "l2" and attack.eps == EPS, name
    with pytest.raises(ValueError, match="norm='l1' invalid; choose one of linf, l2"):
        from_name("pgd20", EPS, norm="l1")


def test_autoattack_runs_the_packages_l2_version():
    pytest.importorskip("pyautoattack", reason=AA_INSTALL)
    adversary = from_name("aa", EPS, norm="l2").build(mlp())
    assert adversary.norm == "L2" and adversary.epsilon == EPS
    assert adversary.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]


# Every method in L2 ------------------------------------------------------------------------------


# LAS-AT's candidate radii are L-inf ones (the released code's, in 1/255): refused in l2
@pytest.mark.parametrize("name", [n for n in METHODS.names() if n != "las_at"])
def test_every_method_attacks_in_the_l2_ball(name):
    sets = [f"method.name={name}", "method.norm=l2", f"method.eps={EPS}", "method.step_size=0.125"]
    cfg = resolve(overrides=sets)
    torch.manual_seed(0)
    method = build_method(cfg, data.info("digits")).train()
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8)
    x_adv = method.generate(x, y)
    assert _l2(x_adv - x).max() <= EPS * (1 + 1e-5) and 0 <= x_adv.min() <= x_adv.max() <= 1
    assert _l2(x_adv - x).max() > EPS / 2  # the attack used its budget (L-inf's would be > 1)
    assert torch.isfinite(method(x, y)["loss"])


def test_a_bad_norm_is_a_one_line_error_naming_the_key():
    cfg = resolve(overrides=["method.norm=l1"])
    with pytest.raises(ValueError, match=r"config key 'method.norm': choose one of linf, l2"):
        build_method(cfg, data.info("digits"))


def test_the_demo_trains_in_l2(tmp_path, capsys):
    out = tmp_path / "l2"
    sets = [*TINY, "data.train_subset=128", "train.epochs=1", "eval.subset=50"]
    sets += ["method.norm=l2", f"method.eps={EPS}", "method.step_size=0.1"]
    assert main(["train", "--out", str(out), *[a for s in sets for a in ("--set", s)]]) == 0
    assert "eps=0.5, L2" in capsys.readouterr().out  # the summary names the check's norm
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"]["norm"] == "l2" and saved["method"]["eps"] == EPS
    (record,) = read_metrics(out, "epoch")
    assert record["check_norm"] == "L2" and record["check_eps"] == EPS
    assert math.isfinite(record["loss"]) and 0 <= record["robust_acc"] <= record["clean_acc"]


# Evaluation records the norm ---------------------------------------------------------------------


def test_evaluate_l2_records_the_norm_beside_every_number(batch):
    model, x, y = batch
    result = d2r.evaluate(model, x, y, attacks=["pgd10", "pgd20", "cw20"], eps=EPS, norm="l2")
    settings = result["settings"]
    assert settings["norm"] == "L2" and settings["eps"] == EPS
    assert {a["norm"] for a in settings["attacks"].values()} == {"l2"}
    assert 0 <= result["worst_case"] <= result["pgd20"] <= result["clean"] == 1.0
    assert result["worst_case"] < 1.0 and result["warnings"] == []  # the sanity checks hold
    table = markdown_table({"model": result})
    assert "| eps (L2) |" in table and "norm=l2" in table


def test_a_suite_of_l2_attacks_is_evaluated_as_l2_and_mixed_norms_are_refused(batch):
    model, x, y = batch
    suite = {"pgd5": PGD(eps=EPS, step_size=0.1, steps=5, norm="l2")}
    assert (
        d2r.evaluate(model, x, y, attacks=suite, eps=EPS, checks=False)["settings"]["norm"] == "L2"
    )
    mixed = {**suite, "pgd5_inf": PGD(eps=0.03, steps=5)}
    with pytest.raises(ValueError, match="mixes norms"):
        d2r.evaluate(model, x, y, attacks=mixed, eps=EPS)
    with pytest.raises(ValueError, match="mixes norms"):
        d2r.evaluate(model, x, y, attacks=suite, eps=EPS, norm="linf")


def test_the_large_eps_check_reaches_any_image_in_l2(batch):
    """eps = sqrt(d) (8 for 1x8x8) breaks every sample of an honest model, and a masked model
    is caught in L2 as in L-inf."""
    model, x, y = batch
    x_adv = PGD(eps=8.0, step_size=1.0, steps=20, loss="cw", norm="l2")(model, x, y)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).sum() == 0
    with pytest.warns(EvaluationWarning) as record:
        d2r.evaluate(Rounded(model), x, y, attacks=["pgd10"], eps=EPS, norm="l2")
    assert any("eps=8.0 (L2: any image is reachable)" in str(w.message) for w in record)


def test_cli_eval_l2_writes_the_norm(tmp_path_factory, tmp_path, capsys):
    run = evaluated_run(tmp_path_factory)
    args = ["eval", str(run), "--norm", "l2", "--eps", "0.5", "--attacks", "pgd10,fgsm"]
    options = ["--n", "30", "--no-checks", "-q", "--checkpoint", "last", "--out", str(tmp_path)]
    assert main([*args, *options]) == 0
    from d2r.evalstore import Store, summary

    entry = summary(Store.read(tmp_path), "last", EPS, "L2")
    assert entry is not None and summary(Store.read(tmp_path), "last", EPS, "Linf") is None
    assert entry["settings"]["norm"] == "L2" and entry["settings"]["eps"] == EPS
    assert entry["settings"]["attacks"]["fgsm"] == {"type": "FGSM", "eps": EPS, "norm": "l2"}
    assert "| eps (L2) |" in (tmp_path / "eval.md").read_text()
    with pytest.raises(SystemExit):  # argparse's choices: exit 2, before any work
        main(["eval", str(run), "--norm", "l1"])
    assert "invalid choice: 'l1'" in capsys.readouterr().err


def test_report_names_the_norm_when_rows_differ(tmp_path):
    from d2r.config import dump_yaml
    from d2r.report import report
    from d2r.runs import resolved_config

    runs = []
    for seed, norm in enumerate(["Linf", "L2"]):
        run = tmp_path / norm
        run.mkdir()
        (run / "config.yaml").write_text(
            dump_yaml(resolved_config(resolve(None, [f"seed={seed}"])))
        )
        # the per-epoch check's record (no eval.json): it names its eps and norm
        record = {"kind": "epoch", "epoch": 1, "clean_acc": 0.9, "robust_acc": 0.5}
        record.update({"check_eps": 0.1, "check_norm": norm, "check_n": 10})
        (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
        runs.append(run)
    md = report(runs, curves=False)["md"]
    assert "| eps |" in md and "| 0.1 (Linf) |" in md and "| 0.1 (L2) |" in md  # two rows
    assert "| eps (Linf) |" in report(runs[:1], curves=False)["md"]
