"""Every method makes its reference's train-mode passes, in its order (issue 18): BatchNorm's
running statistics after one step equal a hand computation over the expected sequence of
batches, and `bn_passes: minimal` changes those statistics only, never a gradient."""

import copy

import pytest
import torch
from torch import Tensor, nn

from d2r.methods import METHODS, TRADES, Method
from d2r.models import small_cnn, tiny_cnn

MOMENTUM = 0.5  # the probe's: large, so that the order of two batches shows in its mean
GAMMA = 5e-3
STEPS = 3
BUDGET = {"eps": 0.3, "step_size": 0.1, "steps": STEPS}  # x' far from x: distinct batch means


def _probed(model: nn.Module) -> nn.Sequential:
    """A BatchNorm on the input first: its running statistics are those of the batches the
    model saw in train mode, whatever the weights."""
    return nn.Sequential(nn.BatchNorm2d(1, momentum=MOMENTUM), model)


def _method(name: str, **options) -> Method:
    torch.manual_seed(0)
    cls = METHODS.get(name)
    target = _probed(small_cnn(in_channels=1))
    models = (target, _probed(tiny_cnn(in_channels=1))) if cls.uses_guide else (target,)
    return cls(*models, **BUDGET, **options).train()


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def _step(method: Method, x: Tensor, y: Tensor) -> None:
    """One training step as the trainer takes it: forward, backward, SGD step, after_step."""
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    torch.manual_seed(1)
    out = method(x, y)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    method.after_step()


def _folded(batches: list[Tensor]) -> tuple[Tensor, Tensor]:
    """By hand: BatchNorm's running mean and (unbiased) variance after these train-mode
    batches, in this order, from the initial (0, 1)."""
    mean, var = torch.zeros(1), torch.ones(1)
    for u in batches:
        mean = (1 - MOMENTUM) * mean + MOMENTUM * u.mean((0, 2, 3))
        var = (1 - MOMENTUM) * var + MOMENTUM * u.var((0, 2, 3), unbiased=True)
    return mean, var


def _attack_batches(method: Method, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
    """x' and the inputs of the attack's train-mode passes, from a copy with the step's seed."""
    twin = copy.deepcopy(method)
    seen: list[Tensor] = []

    def record(probe: nn.Module, args: tuple[Tensor]) -> None:
        if probe.training:
            seen.append(args[0].detach().clone())

    hook = twin.target[0].register_forward_pre_hook(record)
    torch.manual_seed(1)
    x_adv = twin.generate(x, y)
    hook.remove()
    return x_adv, seen[:STEPS]


# (method, options) -> the train-mode batches of the target's and the guide's passes, in order;
# "attack" = each of the PGD steps' inputs, x after "|" = after the optimizer step.
PASSES = {
    ("pgd_at", ()): (["adv"], None),
    ("pgd_at", (("attack_mode", "train"),)): (["attack", "adv", "adv", "|x"], None),
    ("pgd_at", (("attack_mode", "train"), ("awp_gamma", GAMMA))): (
        ["attack", "adv", "adv", "|x"],
        None,
    ),
    ("trades", ()): (["x", "adv", "x"], None),
    ("trades", (("bn_passes", "minimal"),)): (["x", "adv"], None),
    ("trades", (("awp_gamma", GAMMA),)): (["adv", "x", "x"], None),
    ("trades", (("awp_gamma", GAMMA), ("bn_passes", "minimal"))): (["x", "adv"], None),
    ("mart", ()): (["x", "adv"], None),
    ("mart", (("awp_gamma", GAMMA),)): (["x", "adv"], None),
    ("fat", ()): (["adv"], None),
    ("fat", (("awp_gamma", GAMMA),)): (["adv"], None),
    ("gairat", ()): (["adv"], None),
    ("gairat", (("awp_gamma", GAMMA),)): (["adv"], None),
    ("lbgat", ()): (["adv", "x"], ["x"]),
    ("d2r", ()): (["adv", "x"], ["x"]),
}


def _expand(labels: list[str], x: Tensor, x_adv: Tensor, attack: list[Tensor]) -> list[Tensor]:
    out: list[Tensor] = []
    for label in labels:
        label = label.lstrip("|")
        out += attack if label == "attack" else [x if label == "x" else x_adv]
    return out


def _tracked(model: nn.Module) -> set[int]:
    return {int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}


@pytest.mark.parametrize("key", PASSES, ids=[f"{n}-{dict(o)}" for n, o in PASSES])
def test_one_step_makes_the_reference_passes_in_order(key):
    name, options = key
    method = _method(name, **dict(options))
    x, y = _batch()
    x_adv, attack = _attack_batches(method, x, y)
    assert len(attack) == (STEPS if dict(options).get("attack_mode") == "train" else 0)
    _step(method, x, y)
    for model_name, labels in zip(("target", "guide"), PASSES[key], strict=True):
        if labels is None:
            continue
        model = method.models()[model_name]
        batches = _expand(labels, x, x_adv, attack)
        assert _tracked(model) == {len(batches)}, f"{model_name}: one update per pass, each BN"
        mean, var = _folded(batches)
        probe = model[0]
        torch.testing.assert_close(probe.running_mean, mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(probe.running_var, var, rtol=0, atol=1e-6)


def test_pgd_at_train_clean_pass_follows_the_step_at_the_restored_weights():
    method = _method("pgd_at", attack_mode="train", awp_gamma=GAMMA)
    weight = next(p for p in method.target.parameters() if p.dim() > 1)  # AWP perturbs it
    seen: list[Tensor] = []
    method.target.register_forward_pre_hook(lambda m, args: seen.append(weight.detach().clone()))
    _step(method, *_batch())
    assert len(seen) == STEPS + 4  # the attack, selection, AWP's (rolled back), loss, clean
    assert torch.equal(seen[-1], weight) and not torch.equal(seen[-2], weight)


def test_the_probe_tells_the_orders_apart():
    """Otherwise the test above could not see TRADES' order from AWP's. The orders' running
    statistics differ by MOMENTUM**3 = 1/8 of x' - x's: in the mean, a sum of +-eps steps whose
    signs nearly cancel (the mean of x' - x is -6.6e-4 here, its sign and size set by which
    near-zero gradients round to which sign, as the CPU's kernels decide: 8.3e-5 apart on this
    project's AVX-512 machine with torch 2.11.0 and 2.14.1 alike); in the variance, the spread
    those steps add whatever their signs (x' is clipped to [0, 1]). The test above checks
    both."""
    x, y = _batch()
    x_adv, _ = _attack_batches(_method("trades"), x, y)
    trades, awp = _folded([x, x_adv, x]), _folded([x_adv, x, x])
    # the variance alone: 2.9e-3 apart, 2,900 times the test's atol of 1e-6
    assert (trades[1] - awp[1]).abs().item() > 1e-3


@pytest.mark.parametrize("awp_gamma", [0.0, GAMMA])
def test_minimal_changes_the_running_statistics_only(awp_gamma):
    x, y = _batch()
    steps = {}
    for bn_passes in ("reference", "minimal"):
        method = _method("trades", bn_passes=bn_passes, awp_gamma=awp_gamma)
        _step(method, x, y)
        steps[bn_passes] = method
    ref, minimal = steps["reference"], steps["minimal"]
    for (pname, p), q in zip(ref.named_parameters(), minimal.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-8, msg=pname)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8, msg=pname)
    assert _tracked(ref.target) == {3} and _tracked(minimal.target) == {2}
    assert not torch.allclose(ref.target[0].running_mean, minimal.target[0].running_mean)


@pytest.mark.parametrize(
    "name,option", [("trades", {"bn_passes": "all"}), ("pgd_at", {"attack_mode": "test"})]
)
def test_bad_choices_are_one_line_errors(name, option):
    with pytest.raises(ValueError, match=f"{next(iter(option))}=") as error:
        _method(name, **option)
    assert "\n" not in str(error.value) and "choose one of" in str(error.value)


def test_trades_defaults_to_the_reference_passes():
    assert TRADES(small_cnn()).bn_passes == "reference"
    assert METHODS.get("pgd_at")(small_cnn()).attack_mode == "eval"
