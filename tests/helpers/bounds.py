"""Shared helpers of the bound-soundness tests (IBP, linear bound, zonotope): boxes, inputs, the
linear-bound model zoo with its labels, and the sampled-enclosure assertions."""

from __future__ import annotations

import zlib

import torch
from torch import nn

import lid_engine as le

__all__ = [
    "LINEAR_ZOO", "assert_below", "assert_enclosed", "inputs", "labels", "linear_zoo", "make_box",
    "sampled_margins", "seeded_bn",
]


def seeded_bn(layer: nn.Module, seed: int) -> nn.Module:
    """A BatchNorm layer with seeded running statistics and affine parameters (not the identity)."""
    g = torch.Generator().manual_seed(seed)
    layer.running_mean.copy_(torch.randn(layer.num_features, generator=g) * 0.3)
    layer.running_var.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.num_features, generator=g))
        layer.bias.copy_(torch.randn(layer.num_features, generator=g) * 0.2)
    return layer


def make_box(model: nn.Module, kind: str, seed: int) -> le.Box:
    """A box around ``model``: ``absolute`` (±0.05), ``relative`` (±30%) or a seeded asymmetric one."""
    if kind == "absolute":
        return le.Box.around(model, 0.05)
    if kind == "relative":
        return le.Box.relative_around(model, 0.3)
    g = torch.Generator().manual_seed(seed)
    lower, upper = {}, {}
    for n, p in model.named_parameters():
        p = p.detach()
        lower[n] = p - 0.1 * torch.rand(p.shape, generator=g)
        upper[n] = p + 0.1 * torch.rand(p.shape, generator=g) * (torch.rand(p.shape, generator=g) < 0.7)
    return le.Box(lower, upper)


def inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int, n: int = 12) -> torch.Tensor:
    """``n`` seeded standard-normal inputs of ``shape`` in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g).to(dtype)


def assert_enclosed(outs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, tol: float = 0.0) -> None:
    """Every sampled output lies in [lo, hi], up to a relative ``tol``."""
    slack = tol * (1 + outs.abs())
    below = (outs < lo - slack).sum().item()
    above = (outs > hi + slack).sum().item()
    worst = max(float((lo - outs).max()), float((outs - hi).max()))
    assert below == 0 and above == 0, f"{below} outputs below lo, {above} above hi (worst excess {worst:.3g})"


def linear_zoo(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """Models built from the layers the linear bound supports, with their input shape."""
    torch.manual_seed(zlib.crc32(name.encode()) % 1000)  # str hash() differs per process
    if name == "linear":
        return nn.Sequential(nn.Linear(6, 4)), (6,)
    if name == "mlp":
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)), (6,)
    if name == "conv":  # the paper's CNN in miniature: two convolutions, stride, padding, no bias on one
        return nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2, bias=False), nn.ReLU(),
            nn.Flatten(), nn.Linear(18, 4),
        ), (1, 8, 8)
    if name == "conv_geometry":  # 'same' and 'valid' strings, dilation, stride, asymmetric integer padding
        return nn.Sequential(
            nn.Conv2d(1, 2, 3, padding="same", dilation=2), nn.ReLU(), nn.Conv2d(2, 2, 3, padding="valid"),
            nn.ReLU(), nn.Conv2d(2, 2, (3, 2), stride=2, padding=(1, 2)), nn.ReLU(), nn.Flatten(), nn.Linear(40, 3),
        ), (1, 9, 9)
    if name == "nested":  # pass-through layers, nesting, two affine layers in a row, a leading ReLU
        return nn.Sequential(
            nn.ReLU(), nn.Linear(5, 8), nn.Sequential(nn.Dropout(0.3), nn.Linear(8, 8), nn.Identity()),
            nn.ReLU(), nn.Sequential(nn.Linear(8, 4)),
        ).eval(), (5,)
    if name == "taskmask":
        return nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 6),
            le.TaskMask(6, [[0, 1], [2, 3, 4], [5]]).set_task(1),
        ), (1, 8, 8)
    raise KeyError(name)


LINEAR_ZOO = ["linear", "mlp", "conv", "conv_geometry", "nested", "taskmask"]


def labels(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mostly the model's own predictions (certifiable), every fourth one shifted."""
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % model(x[:1]).shape[1]
    if isinstance(model[-1], le.TaskMask):  # keep labels inside the active task, but one outside
        y[::4] = 2
        y[1] = 0
    return y


def sampled_margins(outs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(samples, N, C) margins z_y − z_j of stacked forward passes."""
    return outs.gather(2, y[None, :, None].expand(len(outs), -1, 1)) - outs


def assert_below(bound: torch.Tensor, margins: torch.Tensor) -> None:
    """Every finite margin bound lies at or below every sampled margin."""
    finite = torch.isfinite(bound)
    excess = (bound[None] - margins)[:, finite]
    assert int((excess > 0).sum()) == 0, f"bound above a sampled margin by up to {float(excess.max()):.3g}"
