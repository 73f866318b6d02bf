"""LAS-AT (docs/methods.md, "LAS-AT"): the per-sample budgets of the one ascent loop on hand-made
cases, the target's loss and the strategy network's reward and REINFORCE step against direct
re-derivations of the paper's formulas, when the strategy network is updated, bad options
refused in one line, and a run stopped mid-epoch then resumed ending bit-identical to an
unbroken one (target, strategy network and its optimizer), evaluated and exported as the target
alone. (A finite loss and a target that moves: test_methods, which runs every method.)"""

import copy
import json
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from d2r import data
from d2r.attacks import Budget, SampleBudget, attack_loop, ce_objective
from d2r.checkpoint import load
from d2r.cli import main
from d2r.config import resolve
from d2r.losses import las_at_loss
from d2r.methods import LASAT, METHODS
from d2r.models import small_cnn
from d2r.trainer import build_method

STEP = 1 / 64  # exact in float32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _threshold_model() -> nn.Module:
    """Two classes of 1x2x2 images, logit_0 - logit_1 = 2 (mean pixel - 0.5): for label 0
    every pixel's CE gradient is negative, so each L-inf step lowers every pixel by its size."""
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.25] * 4, [-0.25] * 4]))
        linear.bias.copy_(torch.tensor([-0.5, 0.5]))
    return nn.Sequential(nn.Flatten(), linear).eval()


def _method(seed: int = 0, **options) -> LASAT:
    torch.manual_seed(seed)
    return LASAT(small_cnn(in_channels=1), strategy="tiny_cnn", **options).train()


def _batch(seed: int = 0, b: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)


# ---- per-sample budgets in the one loop ---------------------------------------------------------


def test_each_sample_takes_its_own_steps_of_its_own_size_inside_its_own_ball():
    x = torch.full((4, 1, 2, 2), 0.75)
    y = torch.zeros(4, dtype=torch.long)
    budget = SampleBudget(
        eps=torch.tensor([1.0, 1.0, 1.0, 2 * STEP]),
        step_size=torch.tensor([STEP, 2 * STEP, STEP, STEP]),
        steps=torch.tensor([3, 2, 5, 5]),
    )
    x_adv = attack_loop(_threshold_model(), x, x, ce_objective(y), budget)
    moved = torch.tensor([3 * STEP, 4 * STEP, 5 * STEP, 2 * STEP])  # the last one: its eps
    assert torch.equal(x_adv, x - moved.view(-1, 1, 1, 1))


def test_equal_per_sample_budgets_are_the_shared_budgets_loop():
    model, x = small_cnn(in_channels=1).eval(), torch.rand(6, 1, 8, 8)
    y = torch.randint(0, 10, (6,))
    shared = attack_loop(model, x, x, ce_objective(y), Budget(0.05, 0.01, 4))
    same = SampleBudget(torch.full((6,), 0.05), torch.full((6,), 0.01), torch.full((6,), 4))
    torch.testing.assert_close(attack_loop(model, x, x, ce_objective(y), same), shared)


@pytest.mark.parametrize(
    "eps,step,steps,message",
    [
        ([0.1, -0.1], [0.1, 0.1], [1, 1], "eps"),
        ([0.1, 0.1], [0.1, float("nan")], [1, 1], "step_size"),
        ([0.1, 0.1], [0.1, 0.1], [1, 0], "steps"),
        ([0.1], [0.1, 0.1], [1, 1], r"\(B,\)"),
    ],
)
def test_bad_per_sample_budgets_are_refused(eps, step, steps, message):
    with pytest.raises(ValueError, match=message):
        SampleBudget(torch.tensor(eps), torch.tensor(step), torch.tensor(steps))


def test_the_target_attack_keeps_each_sample_in_the_ball_of_its_sampled_eps():
    method, (x, y) = _method(), _batch()
    x_adv = method.generate(x, y)
    chosen = method._chosen
    gap = (x_adv - x).abs().flatten(1).amax(1)
    assert (gap <= chosen.eps + 1e-6).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    assert set(chosen.eps.mul(255).round().long().tolist()) <= set(range(3, 15))
    assert set(chosen.steps.tolist()) <= set(range(3, 14))
    assert set(chosen.step_size.mul(255).round().long().tolist()) <= set(range(1, 5))


# ---- the target's loss --------------------------------------------------------------------------


@pytest.mark.parametrize("factor,smoothing", [(0.7, 0.0), (0.6, 0.0), (0.7, 0.1), (1.0, 0.0)])
def test_the_target_loss_is_the_ce_of_the_codes_smoothed_labels(factor, smoothing):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (5,), generator=g)
    out = las_at_loss(logits, y, factor=factor, label_smoothing=smoothing)
    total = 0.0
    for i in range(5):  # q_ic = factor at y_i, (1 - factor) / (C - 1) elsewhere; then e / C
        log_p = torch.log_softmax(logits[i], 0)
        for c in range(4):
            q = factor if c == y[i] else (1 - factor) / 3
            total = total - ((1 - smoothing) * q + smoothing / 4) * log_p[c]
    ref = total / 5
    torch.testing.assert_close(out["loss"], ref)
    got, want = torch.autograd.grad(out["loss"], logits), torch.autograd.grad(ref, logits)
    torch.testing.assert_close(got[0], want[0])
    if factor == 1.0:
        torch.testing.assert_close(out["loss"], F.cross_entropy(logits, y))


def test_label_smoothing_moves_the_loss_by_its_ce_term():
    x, y = _batch()
    outs = []
    for smoothing in (0.0, 0.1):
        method = _method(label_smoothing=smoothing)
        torch.manual_seed(1)
        outs.append(method(x, y))
    assert (outs[1]["ce"] - outs[0]["ce"]).abs() > 1e-4
    assert all(torch.equal(o["loss"].detach(), o["ce"]) for o in outs)


# ---- the strategy network's reward and update ---------------------------------------------------


def _code_attack(model, x, y, eps, alpha, steps, eps0):
    """Attack_policy_batch written from the paper: delta from U(-eps0, eps0) clipped to the
    image, then per sample `steps` steps of alpha * sign(grad CE), each clipped to its own
    eps and the image (delta space, mean CE: the code's)."""
    delta = (x + torch.empty_like(x).uniform_(-eps0, eps0)).clamp(0, 1) - x
    eps, alpha = eps.view(-1, 1, 1, 1), alpha.view(-1, 1, 1, 1)
    left = steps.view(-1, 1, 1, 1).clone()
    for _ in range(int(steps.max())):
        delta.requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)[0]
        delta = torch.max(torch.min(delta.detach() + (left >= 1) * alpha * grad.sign(), eps), -eps)
        delta = (x + delta).clamp(0, 1) - x
        left = left - 1
    return x + delta


def _code_pgd(model, x, y, eps, alpha, steps, restarts):
    """attack_pgd: each restart from U(-eps, eps), steps for the samples still right until
    none is, and per sample the restart of the larger final CE."""
    best, best_loss = x.clone(), torch.zeros(len(y))
    for _ in range(restarts):
        delta = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1) - x
        for _ in range(steps):
            delta.requires_grad_(True)
            logits = model(x + delta)
            right = (logits.argmax(1) == y).view(-1, 1, 1, 1)
            if not right.any():
                break
            grad = torch.autograd.grad(F.cross_entropy(logits, y), delta)[0]
            moved = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
            delta = torch.where(right, (x + moved).clamp(0, 1) - x, delta.detach())
        with torch.no_grad():
            loss = F.cross_entropy(model(x + delta), y, reduction="none")
        keep = (loss >= best_loss).view(-1, 1, 1, 1)
        best, best_loss = torch.where(keep, x + delta, best), torch.max(best_loss, loss)
    return best


def _code_reward(method: LASAT, x, y, budget, lr, wd):
    """Get_reward: R1 = CE of the target on its strategy attack (clipped to [0, 10]); a copy of
    the target takes one SGD step (momentum 0.9, first step) on the smoothed CE of that attack
    in train mode, is PGD-attacked in train mode, then R2 = alpha * robust accuracy, R3 =
    beta * clean accuracy, in eval mode."""
    target = method.target.eval()
    x_adv = _code_attack(target, x, y, budget.eps, budget.step_size, budget.steps, 8 / 255)
    with torch.no_grad():
        r1 = F.cross_entropy(target(x_adv), y).clamp(0, 10)
    target.train()
    ahead = copy.deepcopy(target).train()
    sgd = torch.optim.SGD(ahead.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    las_at_loss(ahead(x_adv), y, factor=0.7)["loss"].backward()
    sgd.step()
    x_pgd = _code_pgd(ahead, x, y, 8 / 255, 2 / 255, 10, 2)
    ahead.eval()
    with torch.no_grad():
        r2 = (ahead(x_pgd).argmax(1) == y).float().mean() * 4
        r3 = (ahead(x).argmax(1) == y).float().mean() * 2
    return r1 + r2.clamp(-10, 10) + r3.clamp(-10, 10)


def test_the_reward_is_the_papers_with_the_codes_weights_and_clipping():
    method, (x, y) = _method(), _batch(b=32)
    method.start_step(0, lr=0.1, weight_decay=5e-4)
    budget = method.sample_budget([torch.randint(0, len(t), (32,)) for t in method.types])
    twin = copy.deepcopy(method)
    torch.manual_seed(5)
    got = method.reward(x, y, budget)
    torch.manual_seed(5)
    want = _code_reward(twin, x, y, budget, 0.1, 5e-4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert 0 < got.item() <= 10 + 4 + 2
    for a, b in zip(
        method.target.state_dict().values(), twin.target.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)  # the target itself is untouched: only its copy took a step


def test_the_strategy_update_is_one_clipped_reinforce_step():
    x, y = _batch()
    method = _method(interval_num=1, clip_grad_norm=0.05, policy_model_lr=0.01)
    twin = copy.deepcopy(method)
    torch.manual_seed(3)
    reward = method.update_strategy(x, y)
    # by hand: pi's three heads on x in train mode, actions, R, loss = sum_j mean(-log pi R)
    torch.manual_seed(3)
    params = list(twin.strategy.parameters())
    for p in params:
        p.requires_grad_(True)
    logits = twin.strategy(x).split([12, 11, 4], dim=1)
    dists = [torch.distributions.Categorical(probs=F.softmax(z, -1)) for z in logits]
    actions = [d.sample() for d in dists]
    r = twin.reward(x, y, twin.sample_budget(actions))
    torch.testing.assert_close(r, reward, rtol=0, atol=0)
    loss = sum((-d.log_prob(a) * r).mean() for d, a in zip(dists, actions, strict=True))
    grads = torch.autograd.grad(loss, params)
    norm = torch.cat([g.flatten() for g in grads]).norm()
    assert norm > 0.05  # the clipping acts
    for p, q, g in zip(method.strategy.parameters(), params, grads, strict=True):
        want = q.detach() - 0.01 * g * (0.05 / (norm + 1e-6))
        torch.testing.assert_close(p.detach(), want, atol=1e-7, rtol=1e-5)
    assert not any(p.requires_grad for p in method.strategy.parameters())


def test_the_strategy_is_updated_every_interval_num_steps_before_the_targets_step():
    x, y = _batch()
    method, moved = _method(interval_num=3), []
    for step in range(7):
        before = [p.clone() for p in method.strategy.parameters()]
        method.start_step(step, 0.1, 5e-4)
        method(x, y)
        moved.append(
            any(
                not torch.equal(a, b)
                for a, b in zip(before, method.strategy.parameters(), strict=True)
            )
        )
    assert moved == [False, False, True, False, False, True, False]  # the code's step 3, 6
    before = [p.clone() for p in method.eval().strategy.parameters()]
    method.start_step(8, 0.1, 5e-4)  # due, but in eval mode: the loss only, no update
    method(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, method.strategy.parameters(), strict=True))


def test_the_policy_lr_follows_the_codes_milestones_counted_in_policy_updates():
    every = _method(interval_num=1)
    lrs = []
    for epoch in range(110):
        every.start_epoch(epoch, 110)
        lrs.append(every.policy_lr())
    assert lrs == pytest.approx([1e-4] * 99 + [1e-5] * 5 + [1e-6] * 6)
    sparse = _method()  # interval_num 20: the milestones lie past the run's end
    sparse.start_epoch(109, 110)
    assert sparse.policy_lr() == 1e-4


# ---- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.epsilon_types=[]"], "epsilon_types"),
        (["method.attack_iters_types=[0, 3]"], "attack_iters_types"),
        (["method.factor=0"], "factor"),
        (["method.factor=1.5"], "factor"),
        (["method.interval_num=0"], "interval_num"),
        (["method.policy_optimizer=adam"], "choose one of"),
        (["method.norm=l2"], "choose one of linf"),
        (["method.alpha=-1"], "alpha"),
        (["method.clip_grad_norm=-1"], "clip_grad_norm"),
        (["method.strategy=nonet"], "strategy"),
    ],
)
def test_bad_options_are_one_line_errors(overrides, message):
    cfg = resolve(overrides=["method.name=las_at", *overrides])
    with pytest.raises(ValueError, match=message) as err:
        build_method(cfg, data.info("digits"))
    assert "\n" not in str(err.value)


def test_a_target_without_convolution_is_refused():
    from d2r.models import mlp

    with pytest.raises(ValueError, match="first convolution") as err:
        LASAT(mlp())
    assert "\n" not in str(err.value)


def test_the_strategy_network_is_a_model_outside_the_trainers_optimizer():
    method = build_method(resolve(overrides=["method.name=las_at"]), data.info("digits"))
    assert set(method.models()) == {"target", "strategy"}
    assert set(method.trained_models()) == {"target"}
    assert set(method.optimizers()) == {"policy"} and METHODS.get("las_at") is LASAT
    assert method.strategy.linear.out_features == 12 + 11 + 4  # resnet18_std, one per choice


# ---- resume, eval, export -----------------------------------------------------------------------

RUN = [
    "method.name=las_at",
    "method.strategy=tiny_cnn",
    "method.interval_num=2",
    "method.policy_optimizer=SGD_with_momentum",  # a state to checkpoint (the CIFAR-100 code's)
    "train.epochs=2",
    "data.train_subset=256",
    "data.batch_size=64",
    "eval.subset=50",
    "eval.attack=pgd3",
]


def test_a_run_stopped_mid_epoch_resumes_bit_identical(tmp_path, monkeypatch):
    args = [a for kv in RUN for a in ("--set", kv)] + ["-q"]
    assert main(["train", "--out", str(tmp_path / "ref"), *args]) == 0
    after_step, steps = LASAT.after_step, []

    def signalled_after_step(self):  # a SIGTERM during step 5: the run stops after step 6
        after_step(self)
        steps.append(len(steps) + 1)
        if len(steps) == 5:
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(LASAT, "after_step", signalled_after_step)
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 128 + signal.SIGTERM
    monkeypatch.setattr(LASAT, "after_step", after_step)
    stopped, meta = load(out / "last.safetensors")
    assert meta["epoch"] == 1 and meta["step"] == 6
    momentum = [k for k in stopped if k.startswith("state.method_optim.policy.optim.strategy.")]
    assert momentum and all(k.endswith(".momentum_buffer") for k in momentum)
    assert main(["train", "--resume", str(out), "-q"]) == 0
    got, want = load(out / "last.safetensors")[0], load(tmp_path / "ref" / "last.safetensors")[0]
    for prefix in ("target.", "strategy.", "state.method_optim."):
        keys = [k for k in want if k.startswith(prefix)]
        assert keys and all(torch.equal(got[k], want[k]) for k in keys), prefix
    torch.manual_seed(0)  # the run's seed: the strategy network as built, before training
    strategy0 = build_method(resolve(overrides=RUN), data.info("digits")).strategy.state_dict()
    assert any(not torch.equal(want[f"strategy.{k}"], v) for k, v in strategy0.items())

    # evaluated and exported as the target alone
    rc = main(
        ["eval", str(out), "--attacks", "pgd5", "--eps", "0.1", "--n", "20", "--no-checks", "-q"]
    )
    assert rc == 0 and json.loads((out / "eval.json").read_text())
    exported = tmp_path / "model.safetensors"
    assert main(["export", str(out), "--out", str(exported), "-q"]) == 0
    from safetensors.torch import load_file

    weights = load_file(exported)
    assert set(weights) == set(small_cnn(in_channels=1).state_dict())
