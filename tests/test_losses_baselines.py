"""trades_loss, mart_loss, lbgat_loss against direct re-derivations of their papers' formulas
(written per sample, with explicit softmax), value and gradients, on fixed float64 logits."""

import inspect

import pytest
import torch

from d2r.losses import d2r_loss, lbgat_loss, mart_loss, trades_loss


def _logits(seed: int, n: int, b: int = 6, c: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logits = [
        (torch.randn(b, c, generator=g, dtype=torch.float64) * 2).requires_grad_() for _ in range(n)
    ]
    return (*logits, torch.randint(0, c, (b,), generator=g))


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_c p_c log(p_c / q_c), one sample."""
    return sum(p[c] * torch.log(p[c] / q[c]) for c in range(len(p)))


def _trades_reference(zn, za, y, beta):
    """Zhang et al. 2019: mean_i CE(f(x_i), y_i) + beta * mean_i KL(f(x_i) || f(x'_i))."""
    terms = [
        -torch.log(_softmax(zn[i])[y[i]]) + beta * _kl(_softmax(zn[i]), _softmax(za[i]))
        for i in range(len(y))
    ]
    return sum(terms) / len(y)


def _mart_reference(zn, za, y, beta):
    """Wang et al. 2020, with the released code's guards (1.0001, 1e-12, 1.0000001)."""
    total = 0.0
    for i in range(len(y)):
        p, p_adv = _softmax(zn[i]), _softmax(za[i])
        k = max((c for c in range(len(p)) if c != y[i]), key=lambda c: p_adv[c].item())
        bce = -torch.log(p_adv[y[i]]) - torch.log(1.0001 - p_adv[k] + 1e-12)
        kl = sum(p[c] * (torch.log(p[c]) - torch.log(p_adv[c] + 1e-12)) for c in range(len(p)))
        total = total + bce + beta * kl * (1.0000001 - p[y[i]])
    return total / len(y)


def _lbgat_reference(za, zn, zg, y, beta):
    """Cui et al. 2021: MSE(z_t(x'), z_g(x)) + CE(z_g(x), y) + beta KL(p_t(x)||p_t(x'))."""
    b, c = za.shape
    mse = sum(((za[i] - zg[i]) ** 2).sum() for i in range(b)) / (b * c)
    ce = sum(-torch.log(_softmax(zg[i])[y[i]]) for i in range(b)) / b
    kl = sum(_kl(_softmax(zn[i]), _softmax(za[i])) for i in range(b)) / b
    return mse + ce + beta * kl


def _assert_same(out, ref, inputs):
    torch.testing.assert_close(out["loss"], ref)
    for got, want in zip(
        torch.autograd.grad(out["loss"], inputs, retain_graph=True),
        torch.autograd.grad(ref, inputs),
        strict=True,
    ):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("beta", [6.0, 1.0, 0.0])
def test_trades_loss_matches_the_paper(beta):
    zn, za, y = _logits(0, 2)
    out = trades_loss(logits_clean=zn, logits_adv=za, y=y, beta=beta)  # by keyword: any order
    _assert_same(out, _trades_reference(zn, za, y, beta), (zn, za))


@pytest.mark.parametrize("beta", [6.0, 1.0])
def test_mart_loss_matches_the_paper(beta):
    zn, za, y = _logits(1, 2)
    out = mart_loss(logits_clean=zn, logits_adv=za, y=y, beta=beta)  # by keyword: any order
    _assert_same(out, _mart_reference(zn, za, y, beta), (zn, za))


@pytest.mark.parametrize("beta", [0.0, 6.0])
def test_lbgat_loss_matches_the_paper(beta):
    za, zn, zg, y = _logits(2, 3)
    out = lbgat_loss(za, zn, zg, y, beta=beta)
    _assert_same(out, _lbgat_reference(za, zn, zg, y, beta), (za, zn, zg))


def test_mart_boosts_the_most_likely_wrong_class_even_when_it_beats_the_label():
    # Sample 0: the label is the top class; sample 1: class 2 beats the label. The boosted term
    # must use the top class other than y in both (the reference's argsort rule).
    za = torch.tensor([[5.0, 1.0, 0.0], [0.0, 1.0, 5.0]], dtype=torch.float64, requires_grad=True)
    zn = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1])
    _assert_same(mart_loss(za, zn, y), _mart_reference(zn, za, y, 6.0), (zn, za))


@pytest.mark.parametrize(
    "fn,names", [(trades_loss, ("ce", "kl_adv")), (mart_loss, ("bce", "kl_adv"))]
)
def test_single_model_terms_are_detached_and_add_up(fn, names):
    zn, za, y = _logits(3, 2)
    out = fn(za, zn, y, beta=6.0)
    assert all(not out[name].requires_grad for name in names)
    torch.testing.assert_close(out[names[0]] + 6.0 * out[names[1]], out["loss"].detach())


def test_lbgat_terms_add_up_and_beta0_ignores_clean_target_logits():
    za, zn, zg, y = _logits(4, 3)
    out = lbgat_loss(za, zn, zg, y, beta=6.0)
    torch.testing.assert_close(out["mse"] + out["ce"] + 6.0 * out["kl_adv"], out["loss"].detach())
    (grad_clean,) = torch.autograd.grad(lbgat_loss(za, zn, zg, y, beta=0.0)["loss"], zn)
    assert torch.count_nonzero(grad_clean) == 0  # LBGAT0: z_t(x) enters only through beta's term


def test_gradients_reach_both_clean_and_adversarial_logits():
    # TRADES and MART detach nothing: the clean branch is trained through the KL term too.
    zn, za, y = _logits(5, 2)
    for fn in (trades_loss, mart_loss):
        gn, ga = torch.autograd.grad(fn(za, zn, y)["loss"], (zn, za))
        assert gn.abs().sum() > 0 and ga.abs().sum() > 0


@pytest.mark.parametrize("fn", [trades_loss, mart_loss, lbgat_loss, d2r_loss])
def test_every_loss_takes_the_adversarial_logits_first(fn):
    """One order (losses' docstring): logits_adv, logits_clean[, logits_guide], y; a call by
    keyword gives the same in any order."""
    names = list(inspect.signature(fn).parameters)
    two_model = "logits_guide" in names
    order = ["logits_adv", "logits_clean", *(["logits_guide"] if two_model else []), "y"]
    assert names[: len(order)] == order
    *logits, y = _logits(6, len(order) - 1)
    positional = fn(*logits, y)["loss"]
    by_keyword = fn(y=y, **dict(reversed(list(zip(order[:-1], logits, strict=True)))))["loss"]
    torch.testing.assert_close(positional, by_keyword, rtol=0, atol=0)
