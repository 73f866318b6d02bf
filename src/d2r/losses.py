"""Training losses as pure functions of logits (the drop-in API for people with their own loop).

One argument order for every loss: the adversarial logits first, then the clean ones, then
the guide's (two-model losses), then the labels: `(logits_adv, logits_clean[, logits_guide],
y, *, options)`. Each logits argument is also a keyword of that name, so a call by keyword
reads the same whatever the order. Each returns a dict: a scalar `"loss"` to backpropagate and
detached terms for logging.
KL (docs/method.md, "The KL convention"): `kl_elem(log_q, p)` summed over classes is KL(p || q)
(a building block of probabilities, not a loss of logits: it keeps that order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from d2r.registry import check_choice

KL_REDUCTIONS = ("mean_bc", "batchmean")
GapMean = Callable[[Tensor], Tensor]
SYM_RULES = ("abs", "sign")


def kl_elem(log_q: Tensor, p: Tensor) -> Tensor:
    """Element-wise (B, C) KL terms p * (log(p + 1e-5) - log q), as the reference computes them
    (the 1e-5 keeps log finite where p underflows). Nothing is detached."""
    return p * (torch.log(p + 1e-5) - log_q)


def _reduce(kl: Tensor, reduction: str) -> Tensor:
    # mean_bc: mean over all B*C elements (the reference); batchmean: sum over C, mean over B.
    return kl.mean() if reduction == "mean_bc" else kl.sum() / kl.shape[0]


def _symmetric_term(
    zn: Tensor, zg: Tensor, sym_rule: str, reduction: str, gap_mean: GapMean
) -> Tensor:
    """|KL(p_t(x) || p_g(x)) - KL(p_g(x) || p_t(x))|.

    `abs` (the released code): both models get gradients. `sign` (the paper's text): when
    K1 - K2 > 0 only the target is optimized (guide outputs detached), otherwise only the guide.
    Both branches are computed and selected with torch.where, so no host sync is needed."""

    def gap(zt: Tensor, zg_: Tensor) -> Tensor:
        k1 = _reduce(kl_elem(F.log_softmax(zg_, 1), F.softmax(zt, 1)), reduction)
        k2 = _reduce(kl_elem(F.log_softmax(zt, 1), F.softmax(zg_, 1)), reduction)
        return gap_mean(k1 - k2)

    diff = gap(zn, zg)
    if sym_rule == "abs":
        return diff.abs()
    target_only = gap(zn, zg.detach()).abs()
    guide_only = gap(zn.detach(), zg).abs()
    return torch.where(diff > 0, target_only, guide_only)


def d2r_loss(
    logits_adv: Tensor,
    logits_clean: Tensor,
    logits_guide: Tensor,
    y: Tensor,
    *,
    lam: float = 1.0,
    alpha: float = 30.0,
    beta: float = 20.0,
    sym_rule: str = "abs",
    kl_reduction: str = "mean_bc",
    gap_mean: GapMean | None = None,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """Dual Regularization loss (D2R paper, eq. for L_total; docs/method.md, "The D2R loss").

    logits_adv = z_t(x'), logits_clean = z_t(x), logits_guide = z_g(x), each (B, C), in the
    order of every loss here:
        lam * CE(z_g(x), y) + MSE(z_t(x'), z_g(x))
        + alpha * KL(p_t(x') || p_g(x)) + beta * |KL(p_t(x) || p_g(x)) - KL(p_g(x) || p_t(x))|
    with KL means over B*C (`kl_reduction="mean_bc"`, the reference). `batchmean` sums over
    classes instead and divides alpha and beta by C, so the total loss is the same.

    `gap_mean` maps the batch's K1 - K2 to the one the absolute value is taken of: the identity
    by default; data-parallel training passes the mean over ranks (d2r.distributed), since the
    absolute value of a mean is not the mean of the per-shard absolute values.
    `label_smoothing`: of the CE term (Szegedy et al. 2016; 0.1 in Wang et al. 2023)."""
    check_choice("sym_rule", sym_rule, SYM_RULES)
    check_choice("kl_reduction", kl_reduction, KL_REDUCTIONS)
    if kl_reduction == "batchmean":  # per-class weights keep the total loss the same
        alpha, beta = (weight / logits_clean.shape[1] for weight in (alpha, beta))
    ce = F.cross_entropy(logits_guide, y, label_smoothing=label_smoothing)
    mse = F.mse_loss(logits_adv, logits_guide)
    p_adv, log_p_guide = F.softmax(logits_adv, 1), F.log_softmax(logits_guide, 1)
    kl_adv = _reduce(kl_elem(log_p_guide, p_adv), kl_reduction)  # KL(p_t(x') || p_g(x))
    sym = _symmetric_term(
        logits_clean, logits_guide, sym_rule, kl_reduction, gap_mean or (lambda gap: gap)
    )
    loss = lam * ce + mse + alpha * kl_adv + beta * sym
    return {"loss": loss, **_detached(ce=ce, mse=mse, kl_adv=kl_adv, sym=sym)}


def trades_loss(
    logits_adv: Tensor,
    logits_clean: Tensor,
    y: Tensor,
    *,
    beta: float = 6.0,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """TRADES (Zhang et al. 2019, arXiv:1901.08573, and its released code), with
    logits_adv = z(x'), logits_clean = z(x) (adversarial first, as every loss here):
        CE(z(x), y) + beta * batchmean KL(p(x) || p(x'))
    with the exact KL (as nn.KLDivLoss computes it, no 1e-5) and gradients into both arguments.
    `label_smoothing` applies to the CE term only, as in Wang et al. 2023 (arXiv:2302.04638)."""
    ce = F.cross_entropy(logits_clean, y, label_smoothing=label_smoothing)
    kl_adv = _kl_batchmean(logits_clean, logits_adv)
    return {"loss": ce + beta * kl_adv, **_detached(ce=ce, kl_adv=kl_adv)}


def mart_loss(
    logits_adv: Tensor,
    logits_clean: Tensor,
    y: Tensor,
    *,
    beta: float = 6.0,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """MART (Wang et al. ICLR 2020, "Improving adversarial robustness requires revisiting
    misclassified examples"), with logits_adv = z(x'), logits_clean = z(x) (adversarial first,
    as every loss here) and the numerical guards of the released code:
        BCE(p(x'), y) = -log p_y(x') - log(1.0001 - max_{k != y} p_k(x') + 1e-12)
        loss = BCE + beta * mean_i [KL(p(x_i) || p(x'_i)) * (1.0000001 - p_y(x_i))]
    The KL uses log(p(x') + 1e-12) and the exact p log p, as the code's nn.KLDivLoss does.
    `label_smoothing` applies to the BCE's cross-entropy -log p_y(x'), not to its margin."""
    probs_adv, probs_clean = F.softmax(logits_adv, 1), F.softmax(logits_clean, 1)
    wrong = probs_adv.masked_fill(F.one_hot(y, probs_adv.shape[1]).bool(), float("-inf"))
    margin = -torch.log(1.0001 - wrong.amax(1) + 1e-12)  # (B,) pushes the top wrong class down
    bce = F.cross_entropy(logits_adv, y, label_smoothing=label_smoothing) + margin.mean()
    kl = F.kl_div(torch.log(probs_adv + 1e-12), probs_clean, reduction="none").sum(1)  # (B,)
    true_clean = probs_clean.gather(1, y[:, None]).squeeze(1)  # (B,) p_y(x)
    kl_adv = (kl * (1.0000001 - true_clean)).mean()  # weight: misclassified samples count more
    return {"loss": bce + beta * kl_adv, **_detached(bce=bce, kl_adv=kl_adv)}


def lbgat_loss(
    logits_adv: Tensor,
    logits_clean: Tensor,
    logits_guide: Tensor,
    y: Tensor,
    *,
    beta: float = 0.0,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """LBGAT (Cui et al. ICCV 2021, arXiv:2011.11164, and its released code), with
    logits_adv = z_t(x'), logits_clean = z_t(x), logits_guide = z_g(x) (adversarial first, as
    every loss here):
        MSE(z_t(x'), z_g(x)) + CE(z_g(x), y) + beta * batchmean KL(p_t(x) || p_t(x'))
    beta = 0 is "LBGAT0", beta = 6 "LBGAT6" (TRADES' weight). `label_smoothing`: the CE term."""
    mse = F.mse_loss(logits_adv, logits_guide)
    ce = F.cross_entropy(logits_guide, y, label_smoothing=label_smoothing)
    kl_adv = _kl_batchmean(logits_clean, logits_adv)
    return {"loss": mse + ce + beta * kl_adv, **_detached(ce=ce, mse=mse, kl_adv=kl_adv)}


GAIR_FUNCTIONS = ("tanh", "sigmoid", "discrete")


def gair_weights(kappa: Tensor, steps: int, *, lam: float = -1.0, function: str = "tanh") -> Tensor:
    """GAIRAT's instance weights (Zhang et al. ICLR 2021, arXiv:2010.01736, Sec. 3.2 and the
    released code's `GAIR`) from the geometry values `kappa` (B,) of a `steps`-step attack:
        tanh:     w = (1 + tanh(lam + 5 (1 - 2 kappa / K))) / 2
        sigmoid:  w = sigmoid(lam + 1 - 2 kappa / K)
        discrete: w = (K + 1 - kappa) / (K + 1)
    then normalized to sum to B: w * B / sum(w). K / 2 is real, as in the paper's formula (the
    code's int(K / 2) is the same for an even K, 10 by default). Not differentiated."""
    check_choice("weight_assignment_function", function, GAIR_FUNCTIONS)
    kappa = kappa.detach().float()
    if function == "discrete":
        weights = (steps + 1 - kappa) / (steps + 1)
    elif function == "tanh":
        margin = 1 - 2 * kappa / steps  # the code's (int(K/2) - kappa) / int(K/2)
        weights = (1 + torch.tanh(lam + 5 * margin)) / 2
    else:
        weights = torch.sigmoid(lam + 1 - 2 * kappa / steps)
    return weights * len(weights) / weights.sum()


def gairat_loss(
    logits_adv: Tensor,
    y: Tensor,
    kappa: Tensor,
    *,
    steps: int = 10,
    lam: float = -1.0,
    weight_assignment_function: str = "tanh",
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """GAIRAT (Zhang et al. ICLR 2021, arXiv:2010.01736), with logits_adv = z(x') of a
    `steps`-step PGD and `kappa` its geometry values (attacks.Geometry):
        (1/B) sum_i w_i CE(z(x'_i), y_i),  w = gair_weights(kappa, steps, lam=, function=)
    (the released code's `loss.mul(normalized_reweight).mean()`). `label_smoothing`: the CE."""
    weights = gair_weights(kappa, steps, lam=lam, function=weight_assignment_function)
    ce = F.cross_entropy(logits_adv, y, reduction="none", label_smoothing=label_smoothing)
    loss = (ce * weights.to(ce.dtype)).mean()
    return {"loss": loss, **_detached(ce=loss, kappa=kappa.float().mean())}


def sat_loss(
    logits_adv: Tensor,
    logits_clean: Tensor,
    y: Tensor,
    *,
    lam: float = 1.0,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """The dual-domain loss of SAT's lambda curriculum (Sitawarin, Chakraborty, Wagner, AISec
    2021, arXiv:2003.09347), with logits_adv = z(x'), logits_clean = z(x):
        (1 - lam) * CE(z(x), y) + lam * CE(z(x'), y)
    lam = 1 is PGD-AT's loss, lam = 0 clean training. `label_smoothing`: both CE terms."""
    ce_clean = F.cross_entropy(logits_clean, y, label_smoothing=label_smoothing)
    ce_adv = F.cross_entropy(logits_adv, y, label_smoothing=label_smoothing)
    loss = (1 - lam) * ce_clean + lam * ce_adv
    return {"loss": loss, **_detached(ce_clean=ce_clean, ce_adv=ce_adv)}


def rat_soft_labels(gap: Tensor, cc: float) -> Tensor:
    """RAT's soft labels from a per-class gap (C,) of head gradients (Jin et al. CVPR 2023,
    arXiv:2303.10653, Appendix D; the released code's `reg_gap`): the gap shifted to a minimum
    of 0 and normalized, then a (C, C) matrix whose row i puts 1 - cc on class i and spreads cc
    over the other classes in proportion to their gap. Row y is the target of a sample of
    label y. Not differentiated."""
    gap = gap.detach() - gap.detach().min()
    gap = gap / gap.sum()
    rows = gap.expand(len(gap), -1).clone()
    rows.fill_diagonal_(0.0)
    rows = cc * rows / rows.sum(1, keepdim=True)
    rows.fill_diagonal_(1.0 - cc)
    return rows


def rat_trades_loss(
    logits_adv: Tensor,
    logits_clean: Tensor,
    y: Tensor,
    head_grads: tuple[Tensor, Tensor],
    *,
    beta: float = 6.0,
    alpha: float = 0.2,
    cc: float = 0.8,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """RAT on TRADES (Jin et al. CVPR 2023, arXiv:2303.10653, Ineq. (8) and Appendix D, as the
    released `TRADES_first_second/trades_first_second.py` computes it), with logits_adv =
    z(x'), logits_clean = z(x), and head_grads = (g_adv, g_clean), each (C,): the last linear
    layer's weight gradient of CE(z(x'), y) and of CE(z(x), y), summed over its inputs:
        loss = (1 - alpha) CE(z(x), y) + alpha first + alpha / 2 second
               + beta KL(p(x) || p(x'))
    with `rat_taylor_terms`' first and second, each KL summed over classes and averaged over
    the batch. `label_smoothing`: the CE term only (not the CEs behind head_grads)."""
    first, second = rat_taylor_terms(logits_adv, logits_clean, y, head_grads, cc)
    ce = F.cross_entropy(logits_clean, y, label_smoothing=label_smoothing)
    kl_adv = _kl_batchmean(logits_clean, logits_adv)
    loss = (1 - alpha) * ce + alpha * first + 0.5 * alpha * second + beta * kl_adv
    return {"loss": loss, **_detached(ce=ce, kl_adv=kl_adv, first=first, second=second)}


def rat_taylor_terms(
    logits_adv: Tensor,
    logits_clean: Tensor,
    y: Tensor,
    head_grads: tuple[Tensor, Tensor],
    cc: float,
) -> tuple[Tensor, Tensor]:
    """RAT's first- and second-order Taylor terms (the code's first_loss and second_loss).
    With g1 = |g|, g2 = g ** 2 (the code's Hadamard stand-in for the Kronecker product) and
    T = rat_soft_labels(., cc):
        first  = 1/2 [KL(T(g1_clean - g1_adv)[y] || p(x')) + KL(T(g1_adv - g1_clean)[y] || p(x))]
        second = 1/2 [KL(T(g2_adv - g2_clean)[y] || p(x')) + KL(T(g2_adv - g2_clean)[y] || p(x))]
    Both second-order targets use the adv - clean gap, as the code does (its clean - adv
    matrix is computed but not used)."""
    g_adv, g_clean = head_grads
    log_p_adv, log_p_clean = F.log_softmax(logits_adv, 1), F.log_softmax(logits_clean, 1)
    g1_adv, g1_clean = g_adv.abs(), g_clean.abs()
    first = 0.5 * (
        _kl_to(rat_soft_labels(g1_clean - g1_adv, cc)[y], log_p_adv)
        + _kl_to(rat_soft_labels(g1_adv - g1_clean, cc)[y], log_p_clean)
    )
    target = rat_soft_labels(g_adv**2 - g_clean**2, cc)[y]
    second = 0.5 * (_kl_to(target, log_p_adv) + _kl_to(target, log_p_clean))
    return first, second


def _kl_to(target: Tensor, log_q: Tensor) -> Tensor:
    """KL(target || q) summed over classes, mean over the batch (nn.KLDivLoss: 0 log 0 = 0)."""
    return F.kl_div(log_q, target.to(log_q.dtype), reduction="batchmean")


def las_at_loss(
    logits_adv: Tensor, y: Tensor, *, factor: float = 0.7, label_smoothing: float = 0.0
) -> dict[str, Tensor]:
    """LAS-AT's target loss (Jia et al. CVPR 2022, arXiv:2203.06616; the released code's
    `LabelSmoothLoss`): the cross-entropy of z(x') against smoothed labels that give the true
    class `factor` and each of the other C - 1 classes (1 - factor) / (C - 1):
        (1/B) sum_i -sum_c q_ic log softmax(z(x'_i))_c,
        q_i = factor e_{y_i} + (1 - factor) / (C - 1) (1 - e_{y_i})
    (factor = 1: the plain CE). `label_smoothing` e smooths q once more, as torch's does a
    one-hot label: q <- (1 - e) q + e / C (0 in the code)."""
    classes = logits_adv.shape[1]
    one_hot = F.one_hot(y, classes).to(logits_adv.dtype)
    soft = one_hot * factor + (1 - one_hot) * ((1 - factor) / (classes - 1))
    if label_smoothing:
        soft = soft * (1 - label_smoothing) + label_smoothing / classes
    loss = -(soft * F.log_softmax(logits_adv, dim=-1)).sum(dim=-1).mean()
    return {"loss": loss, **_detached(ce=loss)}


def _kl_batchmean(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(softmax(logits_p) || softmax(logits_q)) summed over classes, mean over the batch."""
    return F.kl_div(F.log_softmax(logits_q, 1), F.softmax(logits_p, 1), reduction="batchmean")


def _detached(**terms: Tensor) -> dict[str, Tensor]:
    return {name: value.detach() for name, value in terms.items()}
