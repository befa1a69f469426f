"""Partial domains and low-rank adapters.

A LID need not give every parameter width. ``width_mask(model, only=[...])`` builds the ``mask`` of
``compute_lid`` that keeps every parameter outside the named modules/parameters at zero width (the
last block and the head of a large network, say), so the certificate covers "these parameters may
move within the domain, everything else is fixed".

Low-rank adapters (LoRA, Hu et al. 2021) fine-tune ``W₀ + s·B·A`` instead of ``W``. ``add_lora``
replaces chosen ``nn.Linear`` layers by :class:`LoRALinear` (``W₀`` and its bias kept, ``A`` small
random, ``B`` zero, so the model is unchanged); ``lora_mask`` keeps everything but the factors at
zero width. The bound engine traces ``LoRALinear.forward`` — ``x·W₀ᵀ + b + s·(x·Aᵀ)·Bᵀ`` — and bounds
the product of the two varying factors soundly (``bounds.ops.matmul_bounds``: the product of two
interval matrices), so a LID over the adapters certifies every ``W₀ + s·B·A`` with ``A`` and ``B`` in
their boxes. The factors are ordinary parameters: ``ProjectedOptimizer`` keeps them in the LID, and
the certificate's model fingerprint covers them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .errors import InvalidInputError


class LoRALinear(nn.Module):
    """``base(x) + scale·(x·Aᵀ)·Bᵀ`` with ``A`` (rank × in) and ``B`` (out × rank)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise InvalidInputError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(base.in_features, base.out_features):
            raise InvalidInputError(f"LoRALinear: 'rank' must be an int in 1..{min(base.in_features, base.out_features)}, "
                                    f"got {rank!r}")
        self.base = base
        self.rank = rank
        self.scale = float(alpha if alpha is not None else rank) / rank
        w = base.weight
        a = torch.randn(rank, base.in_features, generator=generator, dtype=w.dtype) / math.sqrt(base.in_features)
        self.lora_A = nn.Parameter(a.to(w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_A.transpose(0, 1)) @ self.lora_B.transpose(0, 1) * self.scale

    def merged_weight(self) -> Tensor:
        """``W₀ + scale·B·A`` (for export or inspection)."""
        return self.base.weight + self.scale * self.lora_B @ self.lora_A

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def add_lora(model: nn.Module, targets: Iterable[str], rank: int = 4, alpha: float | None = None,
             seed: int = 0) -> nn.Module:
    """Replace each ``nn.Linear`` named in ``targets`` (``named_modules()`` paths) by a
    :class:`LoRALinear` around it, in place; returns ``model``. The outputs are unchanged (B = 0)."""
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    targets = list(targets)
    if not targets:
        raise InvalidInputError("add_lora: 'targets' names no layer")
    for path in targets:
        layer = modules.get(path)
        if not isinstance(layer, nn.Linear):
            linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
            raise InvalidInputError(f"add_lora: '{path}' is {'not a module' if layer is None else type(layer).__name__}; "
                                    f"expected one of the model's nn.Linear layers: {linears}")
        parent_path, _, attr = path.rpartition(".")
        parent = modules[parent_path] if parent_path else model
        setattr(parent, attr, LoRALinear(layer, rank, alpha, gen))
    return model


def width_mask(model: nn.Module, only: Iterable[str]) -> dict[str, Tensor]:
    """``compute_lid``'s ``mask`` giving width only to parameters named in ``only`` or lying under a
    module path in it (``"blocks.1"`` covers ``"blocks.1.conv1.weight"``); True = kept at zero width."""
    only = list(only)
    names = [n for n, _ in model.named_parameters()]
    covered = {n for n in names for o in only if n == o or n.startswith(o + ".")}
    unknown = [o for o in only if not any(n == o or n.startswith(o + ".") for n in names)]
    if unknown:
        raise InvalidInputError(f"width_mask: {unknown} name no parameter or module with parameters of the model")
    return {n: torch.full_like(p, n not in covered, dtype=torch.bool) for n, p in model.named_parameters()}


def lora_mask(model: nn.Module) -> dict[str, Tensor]:
    """``compute_lid``'s ``mask`` giving width to the LoRA factors only."""
    names = [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B")]
    if not names:
        raise InvalidInputError("lora_mask: the model has no LoRA factors; call add_lora first")
    return width_mask(model, names)
