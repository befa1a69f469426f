"""Sampling oracle for soundness tests: plain forward passes at parameter vectors in a box."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from lid_engine import Box


def sample_parameters(box: Box, n: int, seed: int, vertex_fraction: float = 0.5) -> dict[str, Tensor]:
    """``n`` stacked parameter vectors: a ``vertex_fraction`` of random vertices, the rest uniform."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    n_vert = int(n * vertex_fraction)
    for name in box.names:
        lo, hi = box.lower[name].detach().cpu(), box.upper[name].detach().cpu()
        shape = (n, *lo.shape)
        u = torch.rand(shape, generator=g, dtype=lo.dtype)
        u[:n_vert] = (u[:n_vert] < 0.5).to(lo.dtype)
        p = lo + (hi - lo) * u
        p[:n_vert] = torch.where(u[:n_vert] > 0.5, hi.expand(n_vert, *lo.shape), lo.expand(n_vert, *lo.shape))
        out[name] = torch.minimum(torch.maximum(p, lo), hi)
    return out


def sampled_outputs(model: nn.Module, params: dict[str, Tensor], x: Tensor, chunk: int = 500) -> Tensor:
    """Forward pass of ``model`` at every stacked parameter vector: shape (n_params, batch, outputs)."""
    buffers = dict(model.named_buffers())

    def one(p: dict[str, Tensor]) -> Tensor:
        return functional_call(model, (p, buffers), (x,))

    n = len(next(iter(params.values())))
    outs = []
    with torch.no_grad():
        for s in range(0, n, chunk):
            outs.append(vmap(one)({k: v[s : s + chunk] for k, v in params.items()}))
    return torch.cat(outs)
