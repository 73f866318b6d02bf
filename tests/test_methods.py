"""Every registered method: a finite training step that moves the models it trains, attacks that
leave modes and BatchNorm statistics alone, the D2R `sign` rule, and AWP (perturb, restore)."""

import copy

import pytest
import torch
from torch import nn

from d2r import data
from d2r.config import resolve
from d2r.logs import read_metrics
from d2r.losses import kl_elem
from d2r.methods import D2R, METHODS, Method
from d2r.models import small_cnn, tiny_cnn
from d2r.trainer import build_method

GAMMA = 5e-3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: with 2+ threads on a busy CPU, intra-op thread sync costs ~50x the compute.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _method(name: str, seed: int = 0, **options) -> Method:
    torch.manual_seed(seed)
    cls = METHODS.get(name)
    target = small_cnn(in_channels=1)
    return (
        cls(target, tiny_cnn(in_channels=1), **options)
        if cls.uses_guide
        else cls(target, **options)
    )


def _batch(seed: int = 0, b: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _moved(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(p, before[name]) for name, p in model.named_parameters())


def _sgd_step(method: Method, x, y, lr: float) -> dict[str, torch.Tensor]:
    optimizer = torch.optim.SGD(method.parameters(), lr=lr)  # no momentum, no weight decay
    out = method(x, y)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    method.after_step()
    return out


@pytest.mark.parametrize("awp_gamma", [0.0, GAMMA])
@pytest.mark.parametrize("name", METHODS.names())
def test_a_step_is_finite_and_moves_every_trained_model(name, awp_gamma):
    method = _method(name, awp_gamma=awp_gamma).train()
    before = {key: _params(model) for key, model in method.models().items()}
    out = _sgd_step(method, *_batch(), lr=0.1)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert all(torch.isfinite(v) and not v.requires_grad for k, v in out.items() if k != "loss")
    assert set(method.trained_models()) == (
        {"target", "guide"} if method.uses_guide else {"target"}
    )
    # every model the trainer's optimizer trains (LAS-AT's strategy network, trained by the
    # method's own optimizer every interval_num steps, is tested in test_las_at)
    for key, model in method.trained_models().items():
        assert _moved(model, before[key]), f"{name}: the {key} did not move"


@pytest.mark.parametrize("name", METHODS.names())
def test_generate_keeps_modes_and_running_statistics(name):
    method = _method(name, eps=0.1, step_size=0.025).train()
    x, y = _batch()
    buffers = {k: b.clone() for k, b in method.named_buffers()}
    x_adv = method.generate(x, y)
    assert all(m.training for m in method.modules())  # attacked in eval mode, mode restored
    assert all(torch.equal(b, buffers[k]) for k, b in method.named_buffers())
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize("name", METHODS.names())
def test_build_method_passes_the_models_the_method_takes(name):
    cfg = resolve(overrides=[f"method.name={name}", "method.awp_gamma=5e-3"])
    method = build_method(cfg, data.info("digits"))
    assert type(method) is METHODS.get(name) and method.awp_gamma == pytest.approx(5e-3)
    assert (method.models().get("guide") is not None) == method.uses_guide


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.name=trades", "method.alpha=1"], "alpha"),
        (["method.name=mart", "method.start=zero"], "start"),
        (["method.name=trades", "method.bn_passes=all"], "bn_passes"),
        (["method.name=pgd_at", "method.attack_mode=test"], "attack_mode"),
        (["method.name=d2r", "method.attack=pgd"], "attack"),
        (["method.name=lbgat", "guide=null"], "guide"),
    ],
)
def test_bad_method_options_are_one_line_errors(overrides, message):
    cfg = resolve(overrides=overrides)
    with pytest.raises(ValueError, match=message):
        build_method(cfg, data.info("digits"))


def test_negative_awp_gamma_is_refused():
    with pytest.raises(ValueError, match="awp_gamma"):
        _method("trades", awp_gamma=-1.0)


# ---- the paper's sign rule for the symmetric term ---------------------------------------------


def _constant(logit_bias: list[float]) -> nn.Module:
    """Logits = bias for every input (weight 0), yet gradients reach both weight and bias."""
    linear = nn.Linear(64, len(logit_bias))
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor(logit_bias))
    return nn.Sequential(nn.Flatten(), linear)


@pytest.mark.parametrize("target_peaked,moves", [(False, "target"), (True, "guide")])
def test_sign_rule_moves_only_the_model_it_should(target_peaked, moves):
    flat, peaked = [0.0] * 10, [5.0] + [0.0] * 9
    target, guide = (
        (_constant(peaked), _constant(flat))
        if target_peaked
        else (_constant(flat), _constant(peaked))
    )
    x, y = _batch()
    zt, zg = target(x), guide(x)
    k1 = kl_elem(zg.log_softmax(1), zt.softmax(1)).mean()  # KL(p_t || p_g)
    k2 = kl_elem(zt.log_softmax(1), zg.softmax(1)).mean()  # KL(p_g || p_t)
    assert (k1 > k2) == (moves == "target")  # the batch fixes the sign of K1 - K2
    for rule, expected in (("sign", {moves}), ("abs", {"target", "guide"})):
        sym = _symmetric_gradients(D2R(target, guide, lam=0.0, alpha=0.0, sym_rule=rule), x, y)
        assert {name for name, g in sym.items() if g.abs().max() > 1e-8} == expected


def _symmetric_gradients(method: D2R, x, y) -> dict[str, torch.Tensor]:
    """Gradient of beta * |K1 - K2| alone per model: the loss at beta = 1 minus at beta = 0."""
    models = method.models()
    grads = []
    for beta in (1.0, 0.0):
        method.beta = beta
        loss = method.loss(x, y, x)["loss"]
        flat = [
            torch.autograd.grad(loss, list(m.parameters()), retain_graph=True)
            for m in models.values()
        ]
        grads.append(
            {k: torch.cat([g.flatten() for g in gs]) for k, gs in zip(models, flat, strict=True)}
        )
    return {k: grads[0][k] - grads[1][k] for k in models}


# ---- AWP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS.names())
def test_awp_perturbs_target_layerwise_along_the_loss_gradient(name):
    method = _method(name, awp_gamma=GAMMA).train()
    reference = copy.deepcopy(method)
    reference.awp_gamma = 0.0
    x, y = _batch()
    before = {key: _params(model) for key, model in method.models().items()}
    torch.manual_seed(1)
    method(x, y)
    assert all(p.grad is None for p in method.parameters())  # autograd.grad, not .backward()
    torch.manual_seed(1)
    loss = reference.loss(x, y, reference.generate(x, y))["loss"]  # same x_adv, unperturbed
    grads = dict(
        zip(
            dict(reference.target.named_parameters()),
            torch.autograd.grad(loss, list(reference.target.parameters())),
            strict=True,
        )
    )
    for pname, p in method.target.named_parameters():
        w0, offset = before["target"][pname], p.detach() - before["target"][pname]
        if p.dim() > 1:  # v = gamma * ||w|| * g / ||g||, layer by layer
            expected = GAMMA * w0.norm() * grads[pname] / grads[pname].norm()
            torch.testing.assert_close(offset, expected, atol=1e-6, rtol=1e-3)
        else:  # biases and BatchNorm parameters are not perturbed
            assert torch.count_nonzero(offset) == 0
    if method.uses_guide:
        assert not _moved(method.guide, before["guide"])  # only the target is perturbed
    # one BatchNorm update per pass of the real loss: AWP's extra passes were rolled back
    assert _tracked(method) == _tracked(reference)


def _tracked(method: Method) -> list[int]:
    return [int(b) for n, b in method.named_buffers() if n.endswith("num_batches_tracked")]


@pytest.mark.parametrize("name", METHODS.names())
def test_awp_step_uses_the_perturbed_gradient_then_restores(name):
    x, y = _batch()
    method = _method(name, awp_gamma=GAMMA).train()
    w0 = _params(method)
    torch.manual_seed(1)
    _sgd_step(method, x, y, lr=0.05)
    for pname, p in method.named_parameters():  # w1 = w0 - lr * g(w0 + v): v is gone
        grad = torch.zeros_like(p) if p.grad is None else p.grad  # LAS-AT's strategy network
        torch.testing.assert_close(p.detach(), w0[pname] - 0.05 * grad, atol=1e-6, rtol=0)
    plain = _method(name).train()
    torch.manual_seed(1)
    _sgd_step(plain, x, y, lr=0.05)
    assert not torch.allclose(plain.target.head[0].weight.grad, method.target.head[0].weight.grad)


@pytest.mark.parametrize("name", METHODS.names())
def test_awp_leaves_no_residue_at_zero_learning_rate(name):
    method = _method(name, awp_gamma=GAMMA).train()
    w0 = _params(method)
    _sgd_step(method, *_batch(), lr=0.0)
    for pname, p in method.named_parameters():
        torch.testing.assert_close(p.detach(), w0[pname], atol=1e-6, rtol=0)


def test_awp_raises_the_loss_and_is_off_in_eval_mode():
    method = _method("trades", awp_gamma=1e-2).train()
    x, y = _batch()
    torch.manual_seed(1)
    perturbed = method(x, y)["loss"].item()
    method.after_step()  # restore without a step
    torch.manual_seed(1)
    unperturbed = method.loss(x, y, method.generate(x, y))["loss"].item()
    assert perturbed > unperturbed  # an ascent direction for the method's own loss
    w0 = _params(method)
    method.eval()(x, y)
    assert not _moved(method, w0)  # no perturbation outside training


# ---- the same loop for every method -----------------------------------------------------------


@pytest.mark.parametrize("name", METHODS.names())
def test_cli_trains_every_method_with_one_key(name, tmp_path, capsys):
    from d2r.cli import main

    overrides = [f"method.name={name}", "train.epochs=1", "data.train_subset=64", "eval.subset=32"]
    argv = ["train", "-q", "--out", str(tmp_path / name)]
    assert main(argv + [arg for o in overrides for arg in ("--set", o)]) == 0
    assert capsys.readouterr().out == f"run directory: {tmp_path / name}\n"  # -q: that alone
    assert 0 <= read_metrics(tmp_path / name, "epoch")[0]["robust_acc"] <= 1
