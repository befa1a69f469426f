"""The soundness test every bound must pass — run it on a model with a custom layer handler.

``check_soundness(model, domain, x)`` draws parameter vectors from the domain (half uniformly
inside, half at random vertices), evaluates the model at each with a plain forward pass in every
requested dtype, and counts the outputs that fall outside the certify-mode bounds of that dtype.
A sound engine has zero. It also checks that a zero-width domain around the model's own parameters
encloses the nominal forward pass. Use it when registering a handler
(``lid_engine.bounds.registry``)::

    report = le.testing.check_soundness(model, le.Box.around(model, 0.01), x, samples=10_000)
    assert report.violations == 0, report

With ``method="linear"`` and labels ``y`` it checks the linear margin bounds the same way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .bounds import bound_logits, bound_margins
from .domains import Box


@dataclass
class SoundnessReport:
    """What ``check_soundness`` found: per dtype, how many sampled outputs fell outside the bounds."""

    samples: int
    violations: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)
    worst_excess: float = 0.0  # the largest distance of an output outside its bounds
    nominal_enclosed: bool = True

    def __str__(self) -> str:
        return (f"{self.samples} parameter vectors per dtype: {self.violations} outputs outside the bounds "
                f"({', '.join(f'{k}: {v}' for k, v in self.by_dtype.items())}; worst excess {self.worst_excess:.3g}); "
                f"nominal forward enclosed by a zero-width domain: {self.nominal_enclosed}")


def check_soundness(model: nn.Module, domain: Box, x: Tensor, *, samples: int = 1000,
                    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64), seed: int = 0,
                    batch: int = 64, y: Tensor | None = None, method: str = "ibp") -> SoundnessReport:
    """Sample ``samples`` parameter vectors of ``domain`` (uniform and vertices, alternately) and
    count forward-pass outputs on ``x`` outside ``bound_logits(model, domain, x)`` in each dtype.

    ``method="linear"`` (with labels ``y``) checks the margin bounds instead: every sampled margin
    ``z_y − z_j`` must be at least ``bound_margins(model, domain, x, y, method="linear")``."""
    if method == "linear" and y is None:
        raise ValueError("check_soundness: method='linear' checks margins and needs the labels 'y'")
    report = SoundnessReport(samples)
    for dtype in dtypes:
        m = copy.deepcopy(model).to(dtype).eval()
        box = domain.to(dtype=dtype)
        xd = x.to(dtype) if x.is_floating_point() else x  # token ids stay integers for the forward pass
        if method == "linear":
            lo, hi = bound_margins(m, box, xd, y, method="linear", dtype=dtype), None
        else:
            lo, hi = bound_logits(m, box, xd, dtype=dtype)
        gen = torch.Generator().manual_seed(seed)
        bad = 0
        for start in range(0, samples, batch):
            draws = [box.vertex(gen) if (start + i) % 2 else box.sample(gen) for i in range(min(batch, samples - start))]
            with torch.no_grad():
                for params in draws:
                    out = functional_call(m, params, (xd,))
                    if hi is None:  # margins z_y − z_j against their lower bounds
                        out = out.gather(1, y[:, None]) - out
                        # +inf at j = y: no claim there; a NaN output escapes every finite bound
                        outside = ((out < lo) | out.isnan()) & (lo < torch.inf)
                        excess = (lo - out).nan_to_num(nan=torch.inf)
                    else:
                        outside = (out < lo) | (out > hi) | out.isnan()
                        excess = torch.maximum(lo - out, out - hi).nan_to_num(nan=torch.inf)
                    if bool(outside.any()):
                        bad += int(outside.sum())
                        report.worst_excess = max(report.worst_excess, float(excess[outside].max()))
        report.by_dtype[str(dtype).replace("torch.", "")] = bad
        report.violations += bad
        with torch.no_grad():
            nominal = m(xd)
        if hi is None:
            zlo = bound_margins(m, Box.point(m), xd, y, method="linear", dtype=dtype)
            margin = nominal.gather(1, y[:, None]) - nominal
            report.nominal_enclosed &= bool(((zlo <= margin) | (zlo == torch.inf)).all())
        else:
            zlo, zhi = bound_logits(m, Box.point(m), xd, dtype=dtype)
            report.nominal_enclosed &= bool(((zlo <= nominal) & (nominal <= zhi)).all())
    return report
