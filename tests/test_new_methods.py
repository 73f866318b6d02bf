"""FAT and GAIRAT (docs/methods.md, "FAT" and "GAIRAT"): the early stop and the geometry
values on hand-made cases where they are known, the weights and the loss against the papers'
formulas, the schedules over epochs against the released code's, bad options refused in one
line, and a run stopped mid-epoch then resumed ending bit-identical to an unbroken one.
(A finite loss and weights that move: test_methods, which runs every registered method.)"""

import math
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2r import data
from d2r.attacks import (
    PGD,
    Budget,
    EarlyStoppedPGD,
    FriendlyStop,
    Geometry,
    attack_loop,
    ce_objective,
    kl_objective,
)
from d2r.checkpoint import load
from d2r.cli import main
from d2r.config import resolve
from d2r.losses import gair_weights, gairat_loss
from d2r.methods import FAT, GAIRAT, METHODS, eval_mode
from d2r.models import small_cnn
from d2r.trainer import build_method

STEP = 1 / 64  # exact in float32: the hand-made iterates below are exact
K = 10


def _threshold_model() -> nn.Module:
    """Two classes of 1x2x2 images: logit_0 - logit_1 = 2 (mean pixel - 0.5), so label 0 is
    right while the mean pixel is above 0.5. For label 0 every pixel's CE gradient is
    negative: each L-inf step lowers the mean by exactly `step_size`."""
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.25] * 4, [-0.25] * 4]))
        linear.bias.copy_(torch.tensor([-0.5, 0.5]))
    return nn.Sequential(nn.Flatten(), linear).eval()


def _fooled_at(first_wrong: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (label 0) the threshold model first misclassifies at iterate k of the loop (k =
    0: at the start; k >= K: never within K steps)."""
    means = torch.tensor([0.5 + STEP * k - STEP / 2 for k in first_wrong])
    return means.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous(), torch.zeros(
        len(first_wrong), dtype=torch.long
    )


FIRST_WRONG = [0, 1, 3, 6, 9, 12]


@pytest.mark.parametrize("tau", [0, 1, 2, 5])
def test_the_early_stop_leaves_each_sample_tau_steps_after_it_first_fools_the_model(tau):
    x, y = _fooled_at(FIRST_WRONG)
    rule = FriendlyStop(y, tau)
    budget = Budget(eps=1.0, step_size=STEP, steps=K)
    x_adv = attack_loop(_threshold_model(), x, x, ce_objective(y), budget, step_rule=rule)
    taken = torch.tensor([min(k + tau, K) for k in FIRST_WRONG])
    assert torch.equal(rule.taken, taken)
    assert torch.equal(x_adv, x - STEP * taken.float().view(-1, 1, 1, 1))


def test_the_early_stop_counts_misclassified_checks_as_the_released_code():
    """FAT's `earlystop` decrements a sample's budget only at misclassified iterates and never
    resets it: wrong, right, wrong with tau = 1 stops at the third check."""
    y, step = torch.zeros(1, dtype=torch.long), torch.ones(1, 1)
    right, wrong = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    rule = FriendlyStop(y, tau=1)
    moved = [rule(logits, step).item() for logits in (wrong, right, wrong, right)]
    assert moved == [1.0, 1.0, 0.0, 0.0]  # stopped for good, even once right again


def test_the_geometry_value_is_the_step_of_the_first_misclassification():
    x, y = _fooled_at(FIRST_WRONG)
    geometry = Geometry(y)
    budget = Budget(eps=1.0, step_size=STEP, steps=K)
    x_adv = attack_loop(_threshold_model(), x, x, ce_objective(y), budget, step_rule=geometry)
    assert geometry.kappa.tolist() == [min(k, K) for k in FIRST_WRONG]
    assert torch.equal(x_adv, x - STEP * K)  # counting moves nothing: PGD's K steps


def test_the_geometry_value_counts_correct_iterates_as_the_released_code():
    """GA_PGD adds 1 at every correctly classified iterate: right, wrong, right -> 2."""
    y, step = torch.zeros(1, dtype=torch.long), torch.ones(1, 1)
    geometry = Geometry(y)
    for logits in ([[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]):
        assert torch.equal(geometry(torch.tensor(logits), step), step)
    assert geometry.kappa.tolist() == [2]


def test_fat_x_adv_is_pgd_with_the_early_stop_and_uniform_start():
    model, x = small_cnn(in_channels=1).eval(), torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    torch.manual_seed(0)
    never = EarlyStoppedPGD(tau=K)(model, x, y)  # tau >= K: no sample stops
    torch.manual_seed(0)
    pgd = PGD(eps=0.031, step_size=0.007, steps=K, early_stop=False)(model, x, y)
    torch.testing.assert_close(never, pgd, rtol=0, atol=0)


def test_the_fat_for_trades_attack_is_the_kl_attack_from_a_clipped_normal_start():
    model, x = small_cnn(in_channels=1).eval(), torch.rand(8, 1, 8, 8)
    y = torch.randint(0, 10, (8,))
    torch.manual_seed(0)
    got = EarlyStoppedPGD(tau=K, start="normal", loss="kl")(model, x, y)
    torch.manual_seed(0)
    start = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    with torch.no_grad():
        objective = kl_objective(F.softmax(model(x), 1))
    want = attack_loop(model, x, start, objective, Budget())
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- GAIRAT's weights and loss against the paper ----------------------------------------------


def _gair_reference(kappa: list[int], steps: int, lam: float) -> torch.Tensor:
    """Zhang et al. 2021, Eq. (7) and the released GAIR(): w_i = (1 + tanh(lam + 5 (1 - 2
    kappa_i / K))) / 2, then w_i * B / sum_j w_j."""
    w = [(1 + math.tanh(lam + 5 * (1 - 2 * k / steps))) / 2 for k in kappa]
    return torch.tensor([wi * len(w) / sum(w) for wi in w], dtype=torch.float64)


@pytest.mark.parametrize("lam", [-1.0, 0.0, 2.0])
def test_gair_weights_match_the_paper_and_the_released_code(lam):
    kappa = [0, 1, 5, 9, 10, 10]
    weights = gair_weights(torch.tensor(kappa), K, lam=lam).double()
    torch.testing.assert_close(weights, _gair_reference(kappa, K, lam), rtol=1e-6, atol=1e-6)
    assert weights.sum().item() == pytest.approx(len(kappa))
    half = K // 2  # the code's int(num_steps / 2), the same for an even K
    code = ((lam + (half - torch.tensor(kappa)) * 5 / half).tanh() + 1) / 2
    torch.testing.assert_close(weights.float(), code * len(kappa) / code.sum())
    assert weights[0] > weights[-1]  # an example fooled at once weighs most


def test_the_other_weight_functions_follow_the_released_code():
    kappa = torch.tensor([0, 2, 5, 10])
    sig = torch.sigmoid(-1.0 + (5 - kappa) / 5)
    torch.testing.assert_close(gair_weights(kappa, K, function="sigmoid"), sig * 4 / sig.sum())
    disc = (11 - kappa) / 11
    torch.testing.assert_close(gair_weights(kappa, K, function="discrete"), disc * 4 / disc.sum())


def test_gairat_loss_is_the_reweighted_ce_of_the_paper():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    y, kappa = torch.randint(0, 5, (6,), generator=g), [0, 2, 4, 7, 10, 10]
    out = gairat_loss(logits, y, torch.tensor(kappa), steps=K, lam=-1.0)
    w = _gair_reference(kappa, K, -1.0)
    ref = sum(w[i] * -torch.log_softmax(logits[i], 0)[y[i]] for i in range(6)) / 6
    torch.testing.assert_close(out["loss"], ref)
    got, want = torch.autograd.grad(out["loss"], logits), torch.autograd.grad(ref, logits)
    torch.testing.assert_close(got[0], want[0])
    assert out["kappa"].item() == pytest.approx(sum(kappa) / 6)


def test_gairat_loss_smooths_each_weighted_ce():
    g = torch.Generator().manual_seed(1)
    logits, y = torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)
    kappa = torch.tensor([0, 2, 4, 7, 10, 10])
    out = gairat_loss(logits, y, kappa, label_smoothing=0.1)
    ce = F.cross_entropy(logits, y, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(out["loss"], (gair_weights(kappa, K) * ce).mean())


def _gairat(epoch: int, epochs: int, **options) -> GAIRAT:
    torch.manual_seed(0)
    method = GAIRAT(small_cnn(in_channels=1), **options).train()
    method.start_epoch(epoch, epochs)
    return method


def test_the_gairat_step_weights_ce_by_its_attacks_geometry_after_the_burn_in():
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for epoch, weighted in ((58, False), (59, True)):  # GAIRAT.py: from (epoch + 1) = 60 on
        method = _gairat(epoch, 120)
        torch.manual_seed(1)
        x_adv = method.generate(x, y)
        torch.manual_seed(1)
        with eval_mode(method.target):  # GA_PGD's x' is PGD's, kappa aside
            pgd = PGD(**method.budget.kwargs(), early_stop=False)(method.target, x, y)
        torch.testing.assert_close(pgd, x_adv, rtol=0, atol=0)
        kappa = method._geometry[1]
        out = method.loss(x, y, x_adv)
        ce = F.cross_entropy(method.target(x_adv), y, reduction="none")
        w = gair_weights(kappa, K) if weighted else torch.ones(16)
        torch.testing.assert_close(out["loss"], (ce * w).mean())
        assert out["ce"] == out["loss"].detach() and out["kappa"] == kappa.float().mean()


def test_gairat_refuses_an_x_adv_it_did_not_make():
    method = _gairat(0, 1)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="its own generate"):
        method.loss(x, y, x)


# ---- schedules over epochs: the released code's, scaled ---------------------------------------


def _adjust_tau(epoch: int) -> int:
    """FAT.py's adjust_tau(epoch + 1, dynamictau=True), of its 120 epochs."""
    return 0 if epoch <= 50 else 1 if epoch <= 90 else 2


def test_the_tau_schedule_is_fats_at_120_epochs_and_scales_with_the_run():
    method = FAT(small_cnn(in_channels=1))
    for epoch in range(120):
        method.start_epoch(epoch, 120)
        assert method.current_tau() == _adjust_tau(epoch + 1), epoch
    taus = []
    for epoch in range(100):
        method.start_epoch(epoch, 100)
        taus.append(method.current_tau())
    assert taus == [0] * 42 + [1] * 33 + [2] * 25  # 50/120 and 90/120 of 100, rounded
    fixed = FAT(small_cnn(in_channels=1), tau=3, dynamictau=False)
    fixed.start_epoch(99, 100)
    assert fixed.current_tau() == 3


def test_the_burn_in_is_gairats_at_120_epochs_and_scales_with_the_run():
    method = _gairat(0, 1)
    for epochs, first in ((120, 59), (100, 49), (3, 1)):  # GAIRAT.py: (epoch + 1) >= 60 of 120
        weighted = []
        for epoch in range(epochs):
            method.start_epoch(epoch, epochs)
            weighted.append(method.reweighting())
        assert weighted == [False] * first + [True] * (epochs - first), epochs


# ---- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.name=fat", "method.tau=2"], "dynamictau sets it"),
        (["method.name=fat", "method.dynamictau=false", "method.tau=-1"], "tau"),
        (["method.name=fat", "method.omega=-0.1"], "omega"),
        (["method.name=gairat", "method.weight_assignment_function=relu"], "choose one of"),
        (["method.name=gairat", "method.begin_at=1.5"], "begin_at"),
        (["method.name=gairat", "method.begin_at=-0.1"], "begin_at"),
    ],
)
def test_bad_options_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message) as err:
        build_method(resolve(overrides=overrides), data.info("digits"))
    assert "\n" not in str(err.value)


def test_nonfinite_lam_and_fractional_tau_are_refused():
    for lam in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="lam"):
            GAIRAT(small_cnn(in_channels=1), lam=lam)
    with pytest.raises(ValueError, match="whole number"):
        FAT(small_cnn(in_channels=1), tau=1.5, dynamictau=False)


def test_a_step_rule_and_y_stop_are_refused_together():
    x, y = torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="not both"):
        attack_loop(
            small_cnn(in_channels=1),
            x,
            x,
            ce_objective(y),
            Budget(),
            y_stop=y,
            step_rule=Geometry(y),
        )


# ---- resume --------------------------------------------------------------------------------------

# 3 epochs of 4 steps: the schedules change at each epoch (FAT's tau 0, 1, 2; GAIRAT's weights
# from the second epoch), and the run is stopped in the second.
RUN = [
    "train.epochs=3",
    "data.train_subset=256",
    "data.batch_size=64",
    "eval.subset=50",
    "method.steps=3",
    "eval.attack=pgd3",
]


@pytest.mark.parametrize("name", ["fat", "gairat"])
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
