"""Certificates cover the model's own arithmetic, whatever dtype the inputs arrive in.

Each case is an example a bound in the wrong precision would certify although the model's plain
forward pass misclassifies it (found by an adversarial review): float64 inputs to a float32 model,
integers above 2**24, a float64 model certified in float32, and flush-to-zero left on while
certifying. Plus the named errors for models and inputs the bound cannot take.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lid_engine as le
from lid_engine import numerics as rounding
from lid_engine.certificate import certified_counts, certify_box
from lid_engine.errors import LidError


def _linear(weight, bias, dtype=torch.float32) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(len(weight[0]), len(weight))).to(dtype).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(weight, dtype=dtype))
        model[0].bias.copy_(torch.tensor(bias, dtype=dtype))
    return model


def _forward_predicts(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        return int(model(x.to(next(model.parameters()).dtype)).argmax())


@pytest.mark.parametrize("method", ["ibp", "linear"])
def test_float64_inputs_to_a_float32_model_are_certified_in_float32_too(method):
    model = _linear([[1.0, 0.0], [1.0, 1.0]], [0.0, 0.0])  # z0 = x0, z1 = x0 + x1
    x = torch.tensor([[1.0, 0.75 * 2.0**-24]], dtype=torch.float64)  # exact z1 > z0, but float32 rounds to a tie
    y = torch.tensor([1])
    box = le.Box.point(model)
    assert _forward_predicts(model, x) == 0
    assert le.certified_accuracy(model, box, x, y, method=method) == 0.0
    assert not bool(le.certified_examples(model, box, x, y, method=method).any())
    assert certified_counts(model, box, x, y, method=method)[:2] == (1, 0)


def test_integer_inputs_reach_float64_without_float32_rounding():
    model = _linear([[1.0], [0.0]], [-(2.0**24) - 0.5, 0.0], torch.float64)
    x, y = torch.tensor([[2**24 + 1]]), torch.tensor([1])  # 2**24 + 1 is no float32
    assert _forward_predicts(model, x) == 0
    cert = certify_box(model, le.Box.point(model), x, y, le.Spec("accuracy"))
    assert cert.certified == 0


def test_a_float64_model_certified_in_float32_is_checked_in_float64_too():
    model = _linear([[0.0], [1e30]], [1e-25, 0.0], torch.float64)
    x, y = torch.tensor([[1e-50]], dtype=torch.float64), torch.tensor([0])  # 1e-50 flushes to 0 in float32
    assert _forward_predicts(model, x) == 1
    cert = certify_box(model, le.Box.point(model), x, y, le.Spec("accuracy"), dtype=torch.float32)
    assert cert.evaluation_dtypes == ["float32", "float64"] and cert.certified == 0
    assert "float32 and float64" in cert.statement()


def test_flush_to_zero_is_off_while_certifying_and_restored_after():
    n = 1000
    model = _linear([[1e-154] * n, [0.0] * n], [0.0, 5e-306], torch.float64)  # products 1e-308 are subnormal
    x, y = torch.full((1, n), 1e-154, dtype=torch.float64), torch.tensor([1])
    assert _forward_predicts(model, x) == 0  # z0 = 1e-305 > z1 = 5e-306 with gradual underflow
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        assert rounding.flushes_denormals()
        assert certified_counts(model, le.Box.point(model), x, y)[:2] == (1, 0)
        assert rounding.flushes_denormals()  # the user's setting is back
    finally:
        torch.set_flush_denormal(False)
    assert not rounding.flushes_denormals()


@pytest.mark.parametrize("model,x,match", [
    (nn.Sequential(nn.Conv2d(1, 2, 5), nn.Flatten(), nn.Linear(2, 2)), torch.randn(2, 1, 3, 3),
     r"layer '0' \(Conv2d\) cannot take inputs of shape \(2, 1, 3, 3\)"),
    (nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(8), nn.Linear(8, 2)), torch.randn(2, 4),
     r"layer '1' \(BatchNorm1d\) cannot take inputs of shape \(2, 6\)"),
    (nn.Sequential(nn.Linear(4, 4), nn.MaxPool2d(2), nn.Linear(2, 2)), torch.randn(2, 4),
     r"layer '1' \(MaxPool2d\) cannot take inputs of shape \(2, 4\)"),
    (nn.Sequential(nn.Linear(4, 2)), torch.randn(2, 4, dtype=torch.complex64), r"'x' must be real"),
])
def test_shapes_a_layer_cannot_take_are_named_by_layer(model, x, match):
    model.eval()
    with pytest.raises(LidError, match=match):
        le.bound_logits(model, le.Box.around(model, 0.01), x)


def test_batchnorm_without_a_positive_variance_is_named():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, eps=0.0), nn.Linear(3, 2)).eval()
    model[1].running_var.zero_()
    with pytest.raises(LidError, match=r"layer '1' \(BatchNorm1d\): running_var \+ eps must be positive"):
        le.bound_logits(model, le.Box.around(model, 0.01), torch.randn(2, 4))
