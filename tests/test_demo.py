"""The demo's numbers never move silently: the first two epochs of `d2r train` (the embedded
default, in fp32) give the loss terms measured when the README's figures were taken. A change to
the method, the data, the models' init or the schedule moves the first epoch's terms far more
than their tolerance. The tolerances are what the summation order allows: fp32 kernels of two
CPUs (AVX2, AVX-512) and of one or two threads agree to 2e-4 over the first epoch; the second
epoch amplifies that to about 1%, and the symmetric term, |K1 - K2| of two nearly equal KLs,
moves by about 1% already in the first."""

import pytest

import d2r

# metrics.jsonl's epoch records of `d2r train --set train.amp=off` (two threads), 2026-12-04,
# 2-core Intel Xeon (AVX-512, AMX), torch 2.14.1 CPU; this test runs on one thread.
FIRST = {"loss": 2.6349478, "ce": 2.2889946, "mse": 0.1505651, "kl_adv": 0.0060798}
SECOND = {"loss": 2.7937436, "ce": 2.1083753, "mse": 0.3734446, "kl_adv": 0.0095931}
FIRST_SYM = 0.00064965


def test_the_demos_first_epochs_give_the_measured_loss_terms(tmp_path):
    # two epochs of the 15: the first epoch's warm-up and the second's lr are the same in both
    overrides = {"train.epochs": 2, "train.amp": "off"}
    run = d2r.train(out=tmp_path / "run", overrides=overrides, quiet=True)
    first, second = [r for r in run.history if r["kind"] == "epoch"]
    assert {k: first[k] for k in FIRST} == pytest.approx(FIRST, rel=1e-3)
    assert first["sym"] == pytest.approx(FIRST_SYM, rel=5e-2)
    assert {k: second[k] for k in SECOND} == pytest.approx(SECOND, rel=2e-2)
