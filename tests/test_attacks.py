"""Evaluation attacks (docs/method.md): PGD with restarts, CW-inf, FGSM and the AutoAttack
adapter. The contract tests of test_attacks_core.py (CAG, KL, modes, grads) are not repeated."""

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import classified_batch, mlp
from d2r.attacks import AA_INSTALL, FGSM, PGD, AutoAttack, from_name


@pytest.fixture()
def data():
    """A tiny undefended model and 16 inputs it classifies correctly (labels = its own)."""
    return classified_batch(16)


def _aa_fast(eps: float) -> AutoAttack:
    pytest.importorskip("pyautoattack", reason=AA_INSTALL)
    return AutoAttack(eps=eps, version="custom", attacks=("apgd-ce",))


def _attacks(eps: float) -> dict:
    return {
        "pgd": PGD(eps=eps, step_size=eps / 4, steps=20),
        "pgd_restarts": PGD(eps=eps, step_size=eps / 4, steps=10, restarts=3),
        "cw": PGD(eps=eps, step_size=eps / 4, steps=20, loss="cw"),
        "fgsm": FGSM(eps=eps),
        "aa": "aa",  # built lazily: skipped when the extra is missing
    }


def _build(name: str, eps: float):
    attack = _attacks(eps)[name]
    return _aa_fast(eps) if attack == "aa" else attack


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("name", list(_attacks(0.1)))
def test_attack_keeps_ball_and_range_and_never_beats_clean(data, name):
    model, x, y = data
    x_adv = _build(name, 0.1)(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert _accuracy(model, x_adv, y) <= _accuracy(model, x, y)
    assert all(p.grad is None for p in model.parameters()) and not model.training


@pytest.mark.parametrize("name", [n for n in _attacks(1.0) if n != "fgsm"])
def test_attack_reaches_zero_at_large_eps(data, name):
    model, x, y = data
    assert _accuracy(model, _build(name, 1.0)(model, x, y), y) == 0


def test_fgsm_reaches_zero_on_a_linear_two_class_model():
    # With two classes the CE gradient's sign is the optimal Linf direction, so one step of
    # eps = 1 reaches the box corner that maximizes the other class.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval()
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    assert _accuracy(model, FGSM(eps=1.0)(model, x, y), y) == 0


def test_fgsm_is_one_signed_step_from_the_clean_input(data):
    model, x, y = data
    x_req = x.clone().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(model(x_req), y, reduction="sum"), x_req)[0]
    expected = (x + 0.05 * grad.sign()).clamp(0, 1)
    assert torch.allclose(FGSM(eps=0.05)(model, x, y), expected)


def test_restarts_only_remove_robust_samples_and_keep_the_first_success(data):
    model, x, y = data
    one, three = PGD(eps=0.05, steps=5), PGD(eps=0.05, steps=5, restarts=3)
    torch.manual_seed(0)
    x_one = one(model, x, y)
    torch.manual_seed(0)
    x_three = three(model, x, y)
    with torch.no_grad():
        robust_one, robust_three = model(x_one).argmax(1) == y, model(x_three).argmax(1) == y
    assert not (robust_three & ~robust_one).any()  # never more robust than one restart
    # samples the first restart broke keep exactly that example
    assert torch.equal(x_three[~robust_one], x_one[~robust_one])
    with pytest.raises(ValueError, match="restarts"):
        PGD(restarts=0)


def test_from_name_covers_every_evaluation_attack():
    assert from_name("fgsm", 0.1) == FGSM(eps=0.1)
    assert from_name("pgd20r5", 8 / 255).restarts == 5
    assert from_name("cw30", 8 / 255).steps == 30
    for name, version in (("aa", "standard"), ("aa_plus", "plus"), ("aa_rand", "rand")):
        attack = from_name(name, 0.031, seed=7)
        assert isinstance(attack, AutoAttack) and attack.version == version
        assert attack.eps == 0.031 and attack.seed == 7
    for bad in ("aa_fast", "pgd0", "pgd20r0", "fgsm2"):
        with pytest.raises(ValueError, match="aa_plus"):
            from_name(bad, 0.1)


def test_autoattack_versions_map_to_the_original_attack_lists():
    pytest.importorskip("pyautoattack", reason=AA_INSTALL)
    model = mlp()
    standard = AutoAttack(eps=8 / 255).build(model)
    assert standard.attacks_to_run == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert standard.apgd_targeted.n_target_classes == 9 and standard.fab.n_target_classes == 9
    assert standard.square.n_queries == 5000 and standard.norm == "Linf"
    assert standard.epsilon == 8 / 255 and standard.seed == 0
    plus = AutoAttack(version="plus").build(model).attacks_to_run
    assert set(plus) == {"apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"}
    assert AutoAttack(version="rand").build(model).attacks_to_run == ["apgd-ce", "apgd-dlr"]
    with pytest.raises(ValueError, match="custom"):
        AutoAttack(attacks=("apgd-ce",))


def test_autoattack_is_reproducible_and_leaves_rng_and_grads_alone(data):
    model, x, y = data
    attack = _aa_fast(0.05)
    state = torch.random.get_rng_state()
    a = attack(model, x[:8], y[:8])
    assert torch.equal(torch.random.get_rng_state(), state)
    b = attack(model, x[:8], y[:8])
    assert torch.equal(a, b)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_missing_autoattack_package_says_how_to_install(data, monkeypatch):
    model, x, y = data
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "d2r-robust\[autoattack\]"'):
        AutoAttack()(model, x, y)
