"""The fast path (d2r.speed): flag resolution, and that each flag leaves the loss unchanged
(within bf16's precision for autocast). No test here measures time."""

import copy

import pytest
import torch

from d2r import data, speed
from d2r.config import resolve
from d2r.trainer import Trainer, build_method

SMALL = ["data.train_subset=128", "data.batch_size=32", "eval.subset=64", "train.epochs=1"]


def fast_path(**flags) -> speed.FastPath:
    options = {"amp": False, "channels_last": False, "compile": False, "optimizer_impl": "foreach"}
    return speed.FastPath("cpu", **{**options, **flags})


@pytest.fixture(scope="module")
def batch_and_method():
    cfg = resolve(None, [])
    torch.manual_seed(0)
    method = build_method(cfg, data.info("digits"))
    x, y = data.load("digits", "data", "train")
    return x[:64].float() / 255, y[:64], method


def losses(batch_and_method, fast: speed.FastPath, steps: int = 2) -> list[float]:
    """D2R-CAG losses of `steps` forwards of a copy of the method, same attack noise each."""
    x, y, method = batch_and_method
    method = copy.deepcopy(method)
    fast.prepare(method.models().values())
    method.train()
    out = []
    for _ in range(steps):
        torch.manual_seed(1)
        with fast.autocast():
            out.append(method(fast.batch(x), y)["loss"].item())
    return out


def test_auto_on_a_cpu_without_native_bf16_is_channels_last_only(monkeypatch):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: False)
    fast = speed.resolve(resolve(None, []).train, torch.device("cpu"))
    assert (fast.amp, fast.channels_last, fast.compile) == (False, True, False)
    fused = speed.fused_sgd_available("cpu")  # torch >= 2.4 has a CPU kernel
    assert fast.optimizer_options() == ({"fused": True} if fused else {"foreach": True})
    assert fast.skips_on_device == fused


def test_without_a_fused_sgd_auto_is_foreach_and_fused_is_refused(monkeypatch):
    monkeypatch.setattr(speed, "fused_sgd_available", lambda device_type="cuda": False)
    fast = speed.resolve(resolve(None, []).train, torch.device("cpu"))
    assert fast.optimizer_options() == {"foreach": True} and not fast.skips_on_device
    with pytest.raises(ValueError, match="no fused SGD for cpu; use foreach"):
        speed.resolve(resolve(None, ["train.optimizer_impl=fused"]).train, torch.device("cpu"))


@pytest.mark.skipif(not speed.fused_sgd_available("cpu"), reason="this torch has no CPU fused SGD")
def test_optimizer_impls_train_the_same_weights(tmp_path):
    """fused, foreach and for_loop SGD: one epoch of the Trainer ends with the same weights."""
    runs = {}
    for impl in ("fused", "foreach", "for_loop"):
        cfg = resolve(None, [*SMALL, f"train.optimizer_impl={impl}", "eval.attack=pgd2"])
        trainer = Trainer(cfg, tmp_path / impl, progress=False)
        trainer._train_epoch(0)
        runs[impl] = trainer.method.state_dict()
    for impl in ("foreach", "for_loop"):
        for k, v in runs["fused"].items():
            torch.testing.assert_close(runs[impl][k], v, rtol=1e-5, atol=1e-6)


def test_auto_turns_on_bf16_and_channels_last_on_a_native_bf16_cpu(monkeypatch):
    monkeypatch.setattr(speed, "cpu_has_native_bf16", lambda: True)
    fast = speed.resolve(resolve(None, []).train, torch.device("cpu"))
    assert (fast.amp, fast.channels_last, fast.compile) == (True, True, False)


def test_auto_turns_everything_on_for_cuda():
    fast = speed.resolve(resolve(None, []).train, torch.device("cuda"))
    assert (fast.amp, fast.channels_last, fast.compile) == (True, True, True)
    fused = speed.fused_sgd_available()
    assert fast.optimizer_options() == ({"fused": True} if fused else {"foreach": True})


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.amp=bf16", "train.channels_last=on", "train.compile=true"], (True, True, True)),
        (["train.amp=true", "train.channels_last=true", "train.compile=off"], (True, True, False)),
        (["train.amp=off", "train.channels_last=false", "train.compile=false"], (False,) * 3),
    ],
)
def test_flags_force_either_way(overrides, expected):
    fast = speed.resolve(resolve(None, overrides).train, torch.device("cuda"))
    assert (fast.amp, fast.channels_last, fast.compile) == expected


@pytest.mark.parametrize("bad", ["train.amp=fp16", "train.compile=maybe", "train.optimizer_impl=x"])
def test_bad_flag_values_fail_at_config_time(bad):
    with pytest.raises(ValueError, match=bad.split("=")[0]):
        resolve(None, [bad])


def test_channels_last_gives_the_same_loss(batch_and_method):
    reference = losses(batch_and_method, fast_path())
    assert losses(batch_and_method, fast_path(channels_last=True)) == pytest.approx(
        reference, rel=1e-5
    )


def test_bf16_autocast_gives_nearly_the_same_loss_with_fp32_logits(batch_and_method):
    # bf16 keeps 8 bits of mantissa, and a flipped gradient sign moves an attack pixel.
    reference = losses(batch_and_method, fast_path())
    assert losses(batch_and_method, fast_path(amp=True)) == pytest.approx(reference, rel=0.03)
    x, _, method = batch_and_method
    method = copy.deepcopy(method)
    fast_path(amp=True).prepare([method.target])
    with fast_path(amp=True).autocast():
        assert method.target(x).dtype == torch.float32  # the loss is computed in fp32


def test_trainer_uses_the_flags_and_keeps_evaluation_fp32(tmp_path):
    flags = ["train.amp=bf16", "train.channels_last=on", "train.optimizer_impl=for_loop"]
    trainer = Trainer(resolve(None, SMALL + flags), tmp_path / "run", progress=False)
    assert trainer.optimizer.defaults["foreach"] is False
    assert trainer.method.target.body[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    record = trainer.fit().final
    assert torch.isfinite(torch.tensor(record["loss"])) and 0 <= record["clean_acc"] <= 1
    assert not _cpu_autocast_on()  # autocast ended with the step


def _cpu_autocast_on() -> bool:
    try:  # takes the device type in torch 2.8.0, 2.11.0 and 2.14.1
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch 2.2.2: no argument, and a function of the CPU's own
        return torch.is_autocast_cpu_enabled()


def test_compiled_models_do_not_recompile_when_modes_switch(tmp_path, monkeypatch):
    """Each step runs both models in eval mode (attack) and train mode (loss): after the first
    epoch has compiled every (mode, grad) variant, a second epoch must compile nothing."""
    import torch._dynamo

    monkeypatch.setattr(speed, "COMPILE_OPTIONS", {"backend": "aot_eager"})
    torch._dynamo.reset()
    trainer = Trainer(resolve(None, [*SMALL, "train.compile=on"]), tmp_path / "run", progress=False)
    trainer._train_epoch(0)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    record = trainer._train_epoch(1)
    assert torch.isfinite(torch.tensor(record["loss"]))
    torch._dynamo.reset()


def test_sgd_starts_with_zero_momentum_buffers_in_the_parameters_layout():
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    impl = "fused" if speed.fused_sgd_available("cpu") else "foreach"
    optimizer = fast_path(optimizer_impl=impl).sgd(conv.parameters(), lr=0.1, momentum=0.9)
    buffer = optimizer.state[conv.weight]["momentum_buffer"]
    assert buffer.stride() == conv.weight.stride() and not buffer.any()
    plain = fast_path().sgd(conv.parameters(), lr=0.1, momentum=0)
    assert not plain.state
    with pytest.raises(ValueError, match="dampening"):
        fast_path().sgd(conv.parameters(), lr=0.1, momentum=0.9, dampening=0.1)
