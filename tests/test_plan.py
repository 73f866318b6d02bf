"""`d2r plan`: the FLOP counter against hand-computed FLOPs, the step's count against its
attack's steps, a study's total against its cells, an op without a formula named (the rest
counted), and bad input as one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from d2r import cli, plan
from d2r.config import resolve
from d2r.flops import count
from d2r.methods import METHODS
from d2r.models import MODELS


def _conv_linear() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))


def test_counter_gives_two_flops_per_multiply_accumulate():
    model, x = _conv_linear(), torch.rand(2, 3, 8, 8)
    conv = 2 * 4 * 8 * 8 * (3 * 3 * 3)  # (B, out, H, W) outputs x (in x 3 x 3) MACs each
    linear = 2 * 256 * 10
    assert count(lambda: model(x)).flops == 2 * (conv + linear)
    # backward: the conv's weight gradient (x needs none), the linear's input and weight ones
    loss = lambda: model(x).sum().backward()  # noqa: E731
    assert count(loss).flops == 2 * (2 * conv + 3 * linear)
    assert count(loss).uncounted == {}  # relu, sum, views: no model FLOPs, nothing to name


def test_counter_runs_on_meta_tensors_and_through_autograd_grad():
    with torch.device("meta"):
        model, x = _conv_linear(), torch.rand(2, 3, 8, 8, requires_grad=True)

    def grad() -> None:
        torch.autograd.grad(model(x).sum(), x)

    conv, linear = 2 * 4 * 8 * 8 * 27, 2 * 256 * 10
    assert count(grad).flops == 2 * (2 * conv + 2 * linear)  # forward, input gradients only


def _config(tmp_path, sets: dict, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(sets, sort_keys=False))
    return path


def test_one_more_cag_step_costs_one_forward_and_input_gradient_of_the_target():
    """The embedded D2R-CAG (small_cnn target, tiny_cnn guide on digits) at K and K + 1."""
    k = [plan.step_count(resolve(None, [f"method.steps={s}"])) for s in (3, 4)]
    cfg = resolve(None)
    method, info = plan.count._meta_method(cfg)
    x, y = plan.count._batch(info)
    method.target.eval()  # CAG attacks with both models in eval mode
    one_step = plan.gradient_count(method.target, x, y)
    assert one_step.flops > 0 and k[1].flops - k[0].flops == one_step.flops


def test_step_count_is_linear_in_the_counted_batch(monkeypatch):
    cfg = resolve(None)
    at_two = plan.step_count(cfg).flops
    monkeypatch.setattr(plan.count, "COUNT_BATCH", 4)
    assert plan.step_count(cfg).flops == at_two


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_step_is_counted(name):
    """The count runs every method's step on the meta device (no values: a method that reads
    one, e.g. to sample its attack, must not, or `d2r plan` fails on its configs)."""
    assert plan.step_count(resolve(overrides=[f"method.name={name}"])).flops > 0


def test_las_at_is_counted_at_its_largest_candidate_steps():
    """A per-sample budget on meta tensors runs its bound: an upper bound of the attack."""
    few = plan.step_count(
        resolve(overrides=["method.name=las_at", "method.attack_iters_types=[3]"])
    )
    many = plan.step_count(
        resolve(overrides=["method.name=las_at", "method.attack_iters_types=[3,9]"])
    )
    assert many.flops > few.flops


def test_config_plan_fields_and_the_limit(tmp_path):
    path = _config(tmp_path, {"train": {"epochs": 3}, "data": {"batch_size": 100}})
    result = plan.plan(path, "a100")
    # digits: 1,497 training images less the 300 held out (data.val_size's default)
    assert result["train_images"] == 1197 and result["steps_per_epoch"] == 12
    per_epoch = result["train_flops_per_image_step"] * 1197
    assert result["train_flops_per_epoch"] == per_epoch
    assert result["train_flops_total"] == 3 * per_epoch
    assert result["peak_flops"] == 312e12
    assert result["limit_seconds_per_epoch"] == pytest.approx(per_epoch / 312e12)
    total = 3 * per_epoch + result["check_flops_total"]
    assert result["flops_total"] == total and result["check_flops_total"] > 0
    assert result["limit_hours_total"] == pytest.approx(total / 312e12 / 3600)
    assert result["expected_hours_total"] is None and "no GPU figure" in result["mfu_missing"]
    assert "expected h" in plan.text(result) and "no measured MFU for a100" in plan.text(result)


def _study(tmp_path):
    spec = {
        "set": {"train.epochs": 2, "data.train_subset": 200},
        "grid": {"seed": [0, 1], "method.steps": [1, 2]},
        "eval": {"attacks": ["pgd3", "cw3"], "n": 20},
    }
    return _config(tmp_path, spec, "study.yaml")


def test_study_total_is_the_sum_of_its_cells(tmp_path):
    result = plan.plan(_study(tmp_path), "h200")
    cells, total = result["cells"], result["total"]
    assert len(cells) == total["runs"] == 4
    for key in ("train_flops_total", "check_flops_total", "flops_total"):
        assert total[key] == sum(c[key] for c in cells)
    assert total["eval_flops_total"] == sum(c["eval"]["flops_total"] for c in cells)
    assert total["limit_hours_total"] == pytest.approx(sum(c["limit_hours_total"] for c in cells))
    one, two = (c for c in cells if c["name"].startswith("seed-0"))
    assert two["train_flops_per_image_step"] > one["train_flops_per_image_step"]
    assert one["eval"]["images"] == 20 and not one["eval"]["attacks"]["pgd3"]["upper_bound"]
    assert "| total | 4 |" in plan.text(result)  # seeds of one cost on one row each: 2 rows + total


def test_expected_hours_from_a_gpu_check(tmp_path):
    results = {
        "machine": {"gpu": "NVIDIA H100 80GB HBM3"},
        "started": "2026-12-01",
        "parts": [{"name": "epoch", "status": "ok", "figures": {"mfu": 0.25}}],
    }
    check = _config(tmp_path, results, "results.json")
    check.write_text(json.dumps(results))
    result = plan.plan(_study(tmp_path), "h100", gpu_check=check)
    for cell in result["cells"]:
        assert cell["expected_hours_total"] == pytest.approx(cell["limit_hours_total"] / 0.25)
    assert result["total"]["expected_hours_total"] == pytest.approx(
        result["total"]["limit_hours_total"] / 0.25
    )
    with pytest.raises(ValueError, match="not a a100"):
        plan.plan(_study(tmp_path), "a100", gpu_check=check)


class FFTNet(nn.Module):
    """A conv and a linear layer around a 2-D FFT, an op with no FLOP formula."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, fft: bool = True):
        super().__init__()
        self.fft = fft
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x):
        h = self.conv(x)
        if self.fft:
            h = torch.fft.irfft2(torch.fft.rfft2(h), s=h.shape[-2:])
        return self.fc(h.flatten(1))


def test_an_op_without_a_formula_is_named_and_the_rest_counted(tmp_path, monkeypatch):
    monkeypatch.setitem(MODELS._entries, "fft_net", FFTNet)
    sets = {"train": {"epochs": 1}, "method": {"name": "pgd_at", "steps": 2}}
    with_fft = plan.plan(_config(tmp_path, {**sets, "target": {"name": "fft_net"}}), "h100")
    plain = {**sets, "target": {"name": "fft_net", "fft": False}}
    without = plan.plan(_config(tmp_path, plain, "plain.yaml"), "h100")
    assert "aten._fft_r2c" in with_fft["uncounted_ops"] and without["uncounted_ops"] == {}
    assert with_fft["train_flops_per_image_step"] == without["train_flops_per_image_step"] > 0
    assert "not counted (no FLOP formula)" in plan.text(with_fft)
    assert "aten._fft_r2c" in plan.text(with_fft)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "v100"], "--device 'v100': choose one of h100"),
        (["--set", "train.epochs=zero"], "train.epochs"),
        (["--gpu-check", "missing.json"], "--gpu-check 'missing.json' not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert cli.main(["plan", "configs/cifar10/d2r_cag.yaml", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("d2r: error:") and message in err and err.count("\n") == 1


def test_missing_config_and_json_format(tmp_path, capsys):
    assert cli.main(["plan", str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    path = _config(tmp_path, {"train": {"epochs": 1}})
    assert cli.main(["plan", str(path), "--format", "json", "--device", "rtx4090"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["peak_flops"] == 165e12 and result["train_flops_per_epoch"] > 0
