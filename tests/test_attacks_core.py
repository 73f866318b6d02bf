"""CAG (docs/method.md, "CAG") and the attack contract: ball, range, modes, no parameter grads."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2r.attacks import PGD, KLAttack, cag, from_name, kl_objective


def _net(seed: int, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, classes),
    )


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(8, 3, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def _cag_objective(target, guide, x_adv, x):
    with torch.no_grad():
        return kl_objective(F.softmax(guide(x), 1))(target(x_adv)).sum()


def test_cag_keeps_the_ball_and_range_and_increases_its_objective(batch):
    x, _ = batch
    target, guide = _net(0).eval(), _net(1).eval()
    x_adv = cag(target, guide, x, eps=0.05, step_size=0.01, steps=10)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    start_obj = _cag_objective(target, guide, x, x)
    assert _cag_objective(target, guide, x_adv, x) > start_obj


def test_cag_is_deterministic_under_a_seed(batch):
    x, _ = batch
    target, guide = _net(0).eval(), _net(1).eval()
    torch.manual_seed(5)
    a = cag(target, guide, x)
    torch.manual_seed(5)
    b = cag(target, guide, x)
    assert torch.equal(a, b)


def test_cag_leaves_modes_and_parameter_grads_untouched(batch):
    x, _ = batch
    target, guide = _net(0).train(), _net(1).eval()
    cag(target, guide, x)
    assert target.training and not guide.training
    for p in [*target.parameters(), *guide.parameters()]:
        assert p.grad is None


def test_cag_computes_the_guide_softmax_once(batch):
    x, _ = batch
    target, guide = _net(0).eval(), _net(1).eval()
    calls = []
    guide.register_forward_hook(lambda *a: calls.append(1))
    cag(target, guide, x, steps=7)
    assert len(calls) == 1


def test_cag_equals_the_kl_attack_with_the_guide_reference(batch):
    x, _ = batch
    target, guide = _net(0).eval(), _net(1).eval()
    torch.manual_seed(3)
    a = cag(target, guide, x, steps=4)
    torch.manual_seed(3)
    with torch.no_grad():
        q = F.softmax(guide(x), 1)
    b = KLAttack(steps=4)(target, x, ref_probs=q)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "attack", [PGD(eps=0.1, steps=5), PGD(eps=0.1, steps=5, loss="cw"), KLAttack(eps=0.1, steps=5)]
)
def test_attacks_keep_ball_and_range_and_never_write_grads(batch, attack):
    x, y = batch
    model = _net(0).eval()
    x_adv = attack(model, x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert all(p.grad is None for p in model.parameters()) and not model.training


def test_pgd_lowers_accuracy_and_early_stop_freezes_misclassified(batch):
    x, y = batch
    model = _net(0).eval()
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    x_adv = PGD(eps=0.5, step_size=0.1, steps=10, random_start=False)(model, x, y)
    with torch.no_grad():
        adv = model(x_adv).argmax(1) == y
    assert adv.sum() <= clean.sum()
    # samples already wrong at the start never move (no random start)
    assert torch.equal(x_adv[~clean], x[~clean])


def test_from_name_parses_and_refuses():
    a = from_name("pgd50", 8 / 255)
    assert a.steps == 50 and a.loss == "ce" and a.step_size == pytest.approx(2 / 255)
    assert from_name("cw20", 0.031).loss == "cw"
    with pytest.raises(ValueError, match="pgdK"):
        from_name("pgdx", 0.1)
