"""SAT and RAT(TRADES) (docs/methods.md, "SAT" and "RAT(TRADES)"): the losses against direct
re-derivations of the papers' formulas (RAT's as its released code computes them), the
curriculum over epochs, the noisy-weight attack, the released code's train-mode passes, bad
options refused in one line, and a run stopped mid-epoch then resumed ending bit-identical.
(A finite loss and weights that move: test_methods, which runs every registered method.)"""

import math
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2r import data
from d2r.attacks import PGD, KLAttack
from d2r.checkpoint import load
from d2r.cli import main
from d2r.config import resolve
from d2r.losses import rat_soft_labels, rat_trades_loss, sat_loss
from d2r.methods import METHODS, RATTRADES, SAT, eval_mode
from d2r.methods.randomized import conv_parameters, weight_noise
from d2r.models import small_cnn
from d2r.trainer import build_method


def _batch(seed: int = 0, b: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)


def _softmax(z: torch.Tensor) -> list[torch.Tensor]:
    e = [torch.exp(v - z.max()) for v in z]
    return [v / sum(e) for v in e]


def _kl(t: list, p: list) -> torch.Tensor:
    """KL(t || p) = sum_c t_c log(t_c / p_c), one sample; 0 log 0 = 0."""
    return sum(tc * torch.log(tc / pc) for tc, pc in zip(t, p, strict=True) if tc > 0)


# ---- RAT's soft labels and loss ------------------------------------------------------------------


def _soft_labels_reference(gap: list[float], cc: float) -> list[list[float]]:
    """Jin et al. 2023, Appendix D (the code's reg_gap): g_j <- (g_j - min g) / sum; row i is
    1 - cc on class i and cc * g_j / sum_{k != i} g_k on every other class j."""
    low = min(gap)
    g = [v - low for v in gap]
    g = [v / sum(g) for v in g]
    rows = []
    for i in range(len(g)):
        off = sum(g[j] for j in range(len(g)) if j != i)
        rows.append([1 - cc if j == i else cc * g[j] / off for j in range(len(g))])
    return rows


@pytest.mark.parametrize("cc", [0.8, 0.98, 0.5])
def test_rat_soft_labels_match_the_papers_appendix(cc):
    gap = [0.3, -0.2, 0.0, 1.1, 0.05]
    got = rat_soft_labels(torch.tensor(gap, dtype=torch.float64), cc)
    torch.testing.assert_close(got, torch.tensor(_soft_labels_reference(gap, cc), dtype=got.dtype))
    torch.testing.assert_close(got.sum(1), torch.ones(5, dtype=got.dtype))
    assert got[0, 1] == 0  # the smallest gap's class gets no mass (0 log 0 in the KL)


def _rat_reference(za, zn, y, g_adv, g_clean, beta, alpha, cc):
    """Per sample: (1 - alpha) CE(z(x)) + alpha/2 [KL(T1[y] || p(x')) + KL(T1'[y] || p(x))]
    + alpha/4 [KL(T2'[y] || p(x')) + KL(T2'[y] || p(x))] + beta KL(p(x) || p(x')), with
    T1 from |g_clean| - |g_adv|, T1' from |g_adv| - |g_clean|, T2' from g_adv^2 - g_clean^2."""
    t1 = _soft_labels_reference((g_clean.abs() - g_adv.abs()).tolist(), cc)
    t1_ = _soft_labels_reference((g_adv.abs() - g_clean.abs()).tolist(), cc)
    t2_ = _soft_labels_reference((g_adv**2 - g_clean**2).tolist(), cc)
    total = 0.0
    for i in range(len(y)):
        p, q, k = _softmax(zn[i]), _softmax(za[i]), int(y[i])
        first = 0.5 * (_kl(t1[k], q) + _kl(t1_[k], p))
        second = 0.5 * (_kl(t2_[k], q) + _kl(t2_[k], p))
        ce = -torch.log(p[k])
        total = total + (1 - alpha) * ce + alpha * first + 0.5 * alpha * second
        total = total + beta * _kl(p, q)
    return total / len(y)


@pytest.mark.parametrize("beta,alpha,cc", [(6.0, 0.2, 0.8), (1.0, 0.5, 0.98), (0.0, 0.0, 0.8)])
def test_rat_trades_loss_matches_the_paper_and_the_code(beta, alpha, cc):
    g = torch.Generator().manual_seed(0)
    za, zn = (torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_() for _ in "ab")
    y = torch.randint(0, 5, (6,), generator=g)
    g_adv, g_clean = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g)
    g_clean = g_clean.double()
    out = rat_trades_loss(za, zn, y, (g_adv, g_clean), beta=beta, alpha=alpha, cc=cc)
    ref = _rat_reference(za, zn, y, g_adv, g_clean, beta, alpha, cc)
    torch.testing.assert_close(out["loss"], ref)
    for got, want in zip(
        torch.autograd.grad(out["loss"], (za, zn), retain_graph=True),
        torch.autograd.grad(ref, (za, zn)),
        strict=True,
    ):
        torch.testing.assert_close(got, want)
    terms = (1 - alpha) * out["ce"] + alpha * out["first"] + alpha / 2 * out["second"]
    torch.testing.assert_close(terms + beta * out["kl_adv"], out["loss"].detach())


def test_sat_loss_is_the_dual_domain_mix():
    g = torch.Generator().manual_seed(1)
    za, zn = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in "ab")
    y = torch.randint(0, 5, (6,), generator=g)
    for lam in (0.0, 0.3, 1.0):
        ce = [
            (-torch.log(_softmax(zn[i])[y[i]]), -torch.log(_softmax(za[i])[y[i]])) for i in range(6)
        ]
        ref = sum((1 - lam) * c + lam * a for c, a in ce) / 6
        torch.testing.assert_close(sat_loss(za, zn, y, lam=lam)["loss"], ref)


# ---- RAT's method: the noisy attack, the head gradients, the passes ------------------------------


def _rat(**options) -> RATTRADES:
    torch.manual_seed(0)
    return RATTRADES(small_cnn(in_channels=1), **options).train()


def test_the_attack_sees_noisy_conv_weights_and_leaves_them_exactly_as_they_were():
    method, (x, y) = _rat(noise_std=0.05), _batch()
    before = {k: v.clone() for k, v in method.target.state_dict().items()}
    torch.manual_seed(3)
    x_adv = method.generate(x, y)
    assert all(torch.equal(v, before[k]) for k, v in method.target.state_dict().items())
    convs = conv_parameters(method.target)
    assert len(convs) == 2 and all(p.dim() == 4 for p in convs)  # small_cnn's two convs
    torch.manual_seed(3)  # the same draws, in the same order: weights, then the attack start
    with eval_mode(method.target), weight_noise(convs, 0.05):
        want = KLAttack(**method.budget.kwargs())(method.target, x)
    torch.testing.assert_close(x_adv, want, rtol=0, atol=0)
    torch.manual_seed(3)
    with eval_mode(method.target):
        clean = KLAttack(**method.budget.kwargs())(method.target, x)
    assert not torch.equal(x_adv, clean)  # the noise changes the attack


def test_the_loss_uses_the_heads_ce_gradients_as_the_code_reads_fc_weight_grad():
    method, (x, y) = _rat(bn_passes="minimal"), _batch()
    x_adv = method.generate(x, y)
    out = method.loss(x, y, x_adv)
    head = method.target.head[-1]  # small_cnn's last nn.Linear
    grads = []
    for batch in (x_adv, x):  # the code: loss.backward(), then fc.weight.grad summed over dim 1
        method.target.zero_grad()
        F.cross_entropy(method.target(batch), y).backward()
        grads.append(head.weight.grad.sum(1).clone())
    logits_adv, logits_clean = method.target(x_adv), method.target(x)
    want = rat_trades_loss(logits_adv, logits_clean, y, tuple(grads), beta=6.0, alpha=0.2, cc=0.8)
    torch.testing.assert_close(out["loss"], want["loss"])
    assert out["first"] > 0 and out["second"] > 0


def test_reference_passes_are_the_codes_eight_and_change_no_gradient():
    x, y = _batch()
    results = {}
    for passes in ("reference", "minimal"):
        method = _rat(bn_passes=passes)
        torch.manual_seed(5)
        out = method(x, y)
        weight = method.target.head[-1].weight
        results[passes] = (out["loss"], torch.autograd.grad(out["loss"], weight)[0], method)
    (loss_r, grad_r, ref), (loss_m, grad_m, minimal) = results["reference"], results["minimal"]
    torch.testing.assert_close(loss_r, loss_m)
    torch.testing.assert_close(grad_r, grad_m)
    tracked = [
        m.num_batches_tracked.item() for m in (ref.target.body[0][1], minimal.target.body[0][1])
    ]
    assert tracked == [8, 2]  # z(x), z(x') then x', x three times; the minimal form's two


# ---- SAT's curriculum ----------------------------------------------------------------------------


def test_the_difficulty_ramps_linearly_then_stays_and_scales_with_the_run():
    method = SAT(small_cnn(in_channels=1))
    values = []
    for epoch in range(10):
        method.start_epoch(epoch, 10)  # ramp_at 0.5: 5 epochs
        values.append(method.difficulty())
    assert values == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    method.start_epoch(0, 100)
    assert method.difficulty() == pytest.approx(1 / 50)
    method.start_epoch(0, 1)  # round(0.5) = 0: no ramp
    assert method.difficulty() == 1.0
    budget = method.budget
    method.start_epoch(1, 10)
    scaled = method.current_budget()
    assert (scaled.eps, scaled.step_size, scaled.steps) == pytest.approx(
        (0.4 * budget.eps, 0.4 * budget.step_size, budget.steps)
    )


def test_eps_sat_attacks_inside_the_epochs_ball_and_is_pgd_at_once_ramped():
    torch.manual_seed(0)
    method, (x, y) = SAT(small_cnn(in_channels=1), eps=0.1, step_size=0.025).train(), _batch()
    method.start_epoch(0, 10)
    x_adv = method.generate(x, y)
    assert (x_adv - x).abs().max() <= 0.02 + 1e-6  # c = 0.2 of eps 0.1
    method.start_epoch(9, 10)
    torch.manual_seed(4)
    x_adv = method.generate(x, y)
    torch.manual_seed(4)
    with eval_mode(method.target):
        pgd = PGD(eps=0.1, step_size=0.025, steps=10, early_stop=False)(method.target, x, y)
    torch.testing.assert_close(x_adv, pgd, rtol=0, atol=0)
    out = method.loss(x, y, x_adv)
    torch.testing.assert_close(out["loss"], F.cross_entropy(method.target(x_adv), y))
    assert out["difficulty"] == 1.0


def test_lambda_sat_mixes_clean_and_adversarial_ce_by_the_difficulty():
    torch.manual_seed(0)
    method, (x, y) = SAT(small_cnn(in_channels=1), curriculum="lambda").train(), _batch()
    method.start_epoch(1, 10)  # c = 0.4
    x_adv = method.generate(x, y)
    out = method.loss(x, y, x_adv)
    z, za = method.target(x), method.target(x_adv)
    torch.testing.assert_close(
        out["loss"], 0.6 * F.cross_entropy(z, y) + 0.4 * F.cross_entropy(za, y)
    )
    assert out["difficulty"].item() == pytest.approx(0.4)


# ---- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.name=sat", "method.curriculum=hessian"], "choose one of"),
        (["method.name=sat", "method.ramp_at=1.0"], "ramp_at"),
        (["method.name=sat", "method.ramp_at=-0.5"], "ramp_at"),
        (["method.name=rat_trades", "method.alpha=-0.1"], "alpha"),
        (["method.name=rat_trades", "method.noise_std=-1e-4"], "noise_std"),
        (["method.name=rat_trades", "method.cc=1.5"], "cc"),
        (["method.name=rat_trades", "method.beta=-1"], "beta"),
        (["method.name=rat_trades", "method.bn_passes=all"], "bn_passes"),
    ],
)
def test_bad_options_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        build_method(resolve(overrides=overrides), data.info("digits"))
    assert "\n" not in str(err.value)


def test_rat_needs_cc_for_another_class_count_and_a_linear_head():
    with pytest.raises(ValueError, match="cc=None invalid; give it for 7 classes") as err:
        RATTRADES(small_cnn(num_classes=7, in_channels=1))
    assert "\n" not in str(err.value)
    assert RATTRADES(small_cnn(num_classes=7, in_channels=1), cc=0.9).cc == 0.9
    assert RATTRADES(small_cnn(num_classes=100, in_channels=1)).cc == 0.98
    conv_only = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())
    with pytest.raises(ValueError, match=r"nn\.Linear"):
        RATTRADES(conv_only)
    for value in (math.nan, math.inf):
        with pytest.raises(ValueError, match="noise_std"):
            RATTRADES(small_cnn(in_channels=1), noise_std=value)


# ---- resume --------------------------------------------------------------------------------------

# 3 epochs of 4 steps: SAT's difficulty changes each epoch (ramp over round(1.5) = 2 epochs:
# 0.5, 1, 1), RAT draws weight noise every step; the run is stopped in the second epoch.
RUN = [
    "train.epochs=3",
    "data.train_subset=256",
    "data.batch_size=64",
    "eval.subset=50",
    "method.steps=3",
    "eval.attack=pgd3",
]


@pytest.mark.parametrize("name", ["sat", "rat_trades"])
def test_a_run_stopped_mid_epoch_resumes_bit_identical(name, tmp_path, monkeypatch):
    args = [a for kv in [*RUN, f"method.name={name}"] for a in ("--set", kv)] + ["-q"]
    assert main(["train", "--out", str(tmp_path / "ref"), *args]) == 0
    cls, after_step, steps = METHODS.get(name), METHODS.get(name).after_step, []

    def signalled_after_step(self):  # a SIGTERM during step 6: the run stops after step 7
        after_step(self)
        steps.append(len(steps) + 1)
        if len(steps) == 6:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(cls, "after_step", signalled_after_step)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 128 + signal.SIGTERM
    monkeypatch.setattr(cls, "after_step", after_step)
    assert load(out / "last.safetensors")[1]["epoch"] == 1  # stopped inside the second epoch
    assert main(["train", "--resume", str(out), "-q"]) == 0
    got, want = load(out / "last.safetensors")[0], load(tmp_path / "ref" / "last.safetensors")[0]
    keys = [k for k in want if k.startswith("target.")]
    assert keys and all(torch.equal(got[k], want[k]) for k in keys)
