"""d2r_loss against a direct re-derivation of docs/method.md, "The D2R loss" (value, gradients)."""

import pytest
import torch
import torch.nn.functional as F

from d2r.losses import d2r_loss, kl_elem


def _logits(seed: int, b: int = 6, c: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    za, zn, zg = (torch.randn(b, c, generator=g, dtype=torch.float64) * 2 for _ in range(3))
    y = torch.randint(0, c, (b,), generator=g)
    return za.requires_grad_(), zn.requires_grad_(), zg.requires_grad_(), y


def _reference(za, zn, zg, y, lam, alpha, beta):
    """docs/method.md, "The D2R loss", written out with explicit loops over the formula's pieces."""
    pa, pn, pg = za.softmax(1), zn.softmax(1), zg.softmax(1)
    b, c = za.shape
    k_adv = (pa * (torch.log(pa + 1e-5) - torch.log(pg))).sum() / (b * c)
    k1 = (pn * (torch.log(pn + 1e-5) - torch.log(pg))).sum() / (b * c)
    k2 = (pg * (torch.log(pg + 1e-5) - torch.log(pn))).sum() / (b * c)
    ce = -torch.log(pg[torch.arange(b), y]).mean()
    mse = ((za - zg) ** 2).sum() / (b * c)
    return lam * ce + mse + alpha * k_adv + beta * (k1 - k2).abs()


@pytest.mark.parametrize(
    "lam,alpha,beta",
    [(1.0, 30.0, 20.0), (0.1, 30.0, 20.0), (1.0, 0.0, 1.0), (1.0, 1.0, 0.0), (1.0, 20.0, 1.0)],
)
def test_value_and_gradients_match_spec(lam, alpha, beta):
    za, zn, zg, y = _logits(0)
    out = d2r_loss(za, zn, zg, y, lam=lam, alpha=alpha, beta=beta)
    ref = _reference(za, zn, zg, y, lam, alpha, beta)
    torch.testing.assert_close(out["loss"], ref)
    grads = torch.autograd.grad(out["loss"], (za, zn, zg))
    ref_grads = torch.autograd.grad(ref, (za, zn, zg))
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_logged_terms_are_detached_and_consistent():
    za, zn, zg, y = _logits(1)
    out = d2r_loss(za, zn, zg, y, lam=0.5, alpha=30, beta=20)
    for name in ("ce", "mse", "kl_adv", "sym"):
        assert not out[name].requires_grad
    total = 0.5 * out["ce"] + out["mse"] + 30 * out["kl_adv"] + 20 * out["sym"]
    torch.testing.assert_close(total, out["loss"].detach())


def test_both_models_receive_gradients_through_every_term():
    za, zn, zg, y = _logits(2)
    loss = d2r_loss(za, zn, zg, y)["loss"]
    ga, gn, gg = torch.autograd.grad(loss, (za, zn, zg))
    assert ga.abs().sum() > 0 and gn.abs().sum() > 0 and gg.abs().sum() > 0


def test_ablation_alpha0_ignores_adv_kl_and_beta0_ignores_symmetric_term():
    za, zn, zg, y = _logits(3)
    no_alpha = d2r_loss(za, zn, zg, y, alpha=0.0, beta=1.0)
    # with alpha = 0 and beta = 1 the clean target logits still matter only through the sym term
    expected = no_alpha["ce"] + no_alpha["mse"] + no_alpha["sym"]
    torch.testing.assert_close(no_alpha["loss"].detach(), expected)
    no_beta = d2r_loss(za, zn, zg, y, alpha=1.0, beta=0.0)
    (grad_clean,) = torch.autograd.grad(no_beta["loss"], zn)
    assert torch.count_nonzero(grad_clean) == 0  # z_t(x) only enters through beta's term


def test_batchmean_reduction_gives_the_same_total_loss():
    za, zn, zg, y = _logits(4)
    a = d2r_loss(za, zn, zg, y, kl_reduction="mean_bc")
    b = d2r_loss(za, zn, zg, y, kl_reduction="batchmean")
    torch.testing.assert_close(a["loss"], b["loss"])
    torch.testing.assert_close(b["kl_adv"], a["kl_adv"] * za.shape[1])


def test_kl_elem_sums_to_kl_divergence():
    p = torch.tensor([[0.2, 0.3, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.4, 0.2]], dtype=torch.float64)
    expected = (p * (p / q).log()).sum()
    torch.testing.assert_close(kl_elem(q.log(), p).sum(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        kl_elem(q.log(), p).sum(), F.kl_div(q.log(), p, reduction="sum"), atol=1e-4, rtol=0
    )


def test_bad_options_are_refused():
    za, zn, zg, y = _logits(5)
    with pytest.raises(ValueError, match="sym_rule"):
        d2r_loss(za, zn, zg, y, sym_rule="max")
    with pytest.raises(ValueError, match="kl_reduction"):
        d2r_loss(za, zn, zg, y, kl_reduction="sum")


def test_gap_mean_is_applied_before_the_absolute_value():
    za, zn, zg, y = _logits(6)
    plain = d2r_loss(za, zn, zg, y)
    gaps = []
    shifted = d2r_loss(za, zn, zg, y, gap_mean=lambda g: gaps.append(g) or g + 1.0)
    (gap,) = gaps
    torch.testing.assert_close(plain["sym"], gap.detach().abs())
    torch.testing.assert_close(shifted["sym"], (gap.detach() + 1.0).abs())
