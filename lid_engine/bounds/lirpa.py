"""auto_LiRPA backend: IBP and CROWN bounds on the logits over a box of *parameters*.

The input ``x`` is fixed; every weight and bias ranges over its own interval ``[lower, upper]``
from the ``Box``. auto_LiRPA calls this "weight perturbation": each parameter becomes a
``BoundedParameter`` carrying an L∞ perturbation with per-element bounds ``x_L``/``x_U``.

Only (nested) ``nn.Sequential`` models of Linear, ReLU and Flatten are accepted: those are the layers
for which auto_LiRPA 0.3 implements weight perturbation (Conv and BatchNorm raise "not
implemented" inside it), and restricting to Sequential lets us name the offending module exactly.

The user's model is never touched: the bounds are computed on a deep copy.

The bounds are what auto_LiRPA computes in ordinary floating point (no outward rounding); a
certificate must add its a-priori rounding margin on top, as for every other bound method.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..domains import Box
from ..errors import InvalidInputError, UnsoundBoundError, UnsupportedLayerError
from ..model_walk import iter_layers, param_name
from ._lirpa_compat import import_auto_lirpa

METHODS = ("ibp", "crown")
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.ReLU, nn.Flatten)
_SUPPORTED_NAMES = "Linear, ReLU, Flatten"

# Intermediate CROWN bounds on only the unstable ReLU inputs ("sparse") pass a one-hot spec
# (OneHotC) backwards, which auto_LiRPA's weight-perturbed Linear cannot handle: keep them dense.
_BOUND_OPTS = {"sparse_intermediate_bounds": False}

_perturbation_cls: type | None = None


def bound_logits_lirpa(model: nn.Module, box: Box, x: Tensor, method: str = "crown") -> tuple[Tensor, Tensor]:
    """Sound ``(lo, hi)`` on ``model(x)`` for every parameter vector in ``box`` (x fixed).

    ``method`` is ``"ibp"`` (interval propagation) or ``"crown"`` (backward linear relaxation),
    both as implemented by auto_LiRPA. Returns detached tensors of shape ``(batch, n_outputs)`` in
    the dtype of ``x``.
    """
    if method not in METHODS:
        raise ValueError(f"bound_logits_lirpa: 'method' must be one of {METHODS}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"bound_logits_lirpa: 'model' must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise InvalidInputError("bound_logits_lirpa: 'x' must be a floating-point tensor")
    if x.dim() < 2 or x.shape[0] == 0:
        raise InvalidInputError(
            f"bound_logits_lirpa: 'x' must have a non-empty leading batch dimension, got shape {tuple(x.shape)}"
        )
    box.check_matches(model, "bound_logits_lirpa")
    check_supported(model)

    lirpa = import_auto_lirpa()
    x = x.detach()
    box = box.to(device=x.device, dtype=x.dtype)  # narrowing casts round outward (sound)

    net = _prepare_copy(model, box, x, lirpa)
    bounded = lirpa.BoundedModule(net, (torch.zeros_like(x[:1]),), bound_opts=_BOUND_OPTS, device=x.device)
    n_out = int(net(x[:1]).shape[1])
    # auto_LiRPA builds its default specification matrix C in float32; pass one in x's dtype.
    spec = torch.eye(n_out, dtype=x.dtype, device=x.device).expand(x.shape[0], n_out, n_out)
    with torch.no_grad():
        if method == "ibp":
            lo, hi = bounded.compute_bounds(x=(x,), method="IBP")
        else:
            lo, hi = bounded.compute_bounds(x=(x,), C=spec, method="CROWN")
    lo, hi = lo.detach().to(x.dtype), hi.detach().to(x.dtype)
    _check_ordered(lo, hi, method)
    return lo, hi


def check_supported(model: nn.Module) -> None:
    """Raise ``UnsupportedLayerError`` naming the first layer this backend cannot bound."""
    for path, module in iter_layers(model):
        if not isinstance(module, SUPPORTED_LAYERS):
            raise UnsupportedLayerError(
                f"layer '{path or '<model>'}' ({type(module).__name__}) is not supported by the "
                f"auto_LiRPA backend under parameter perturbation; supported layers: {_SUPPORTED_NAMES}"
            )


# --------------------------------------------------------------------------- internals
def _prepare_copy(model: nn.Module, box: Box, x: Tensor, lirpa) -> nn.Module:
    """Deep copy of ``model`` in x's dtype whose parameters are ``BoundedParameter``s over ``box``.

    Walks the layers once with ``x[:1]`` to reject shapes auto_LiRPA mishandles: a weight-perturbed
    Linear must see ``(batch, features)`` (with more axes IBP returns per-position bounds and CROWN
    fails), and the logits must come out as ``(batch, n_outputs)``.

    A bias-free Linear gets a zero, unperturbed bias: without one, torch traces it as
    ``Transpose`` + ``MatMul`` and auto_LiRPA's CROWN cannot propagate a perturbed weight through the
    transpose. Adding an exact zero changes no output.
    """
    ptb_cls = _box_perturbation_class(lirpa)
    net = copy.deepcopy(model).to(device=x.device, dtype=x.dtype).eval()
    h = x[:1]
    with torch.no_grad():
        for path, module in iter_layers(net):
            where = path or "<model>"
            if isinstance(module, nn.Linear):
                if h.dim() != 2:
                    raise InvalidInputError(
                        f"layer '{where}' (Linear) receives input of shape {tuple(h.shape)}; the auto_LiRPA "
                        "backend needs (batch, features) before every Linear: put an nn.Flatten() in front of it"
                    )
            for attr, p in list(module.named_parameters(recurse=False)):
                name = param_name(path, attr)
                ptb = ptb_cls(x_L=box.lower[name], x_U=box.upper[name])
                setattr(module, attr, lirpa.BoundedParameter(p.detach().clone(), ptb, requires_grad=False))
            if isinstance(module, nn.Linear) and module.bias is None:
                module.bias = nn.Parameter(h.new_zeros(module.out_features), requires_grad=False)
            h = module(h)
            if h.dim() < 1 or h.shape[0] != 1:
                raise InvalidInputError(f"layer '{where}' ({type(module).__name__}) does not keep the batch dimension")
    if h.dim() != 2:
        raise InvalidInputError(
            f"the model's output has shape {tuple(h.shape)} for one example; the auto_LiRPA backend needs "
            "logits of shape (batch, n_outputs)"
        )
    return net


def _box_perturbation_class(lirpa) -> type:
    """``PerturbationLpNorm`` whose CROWN concretisation sees the per-element box with a batch axis.

    IBP reads ``x_L``/``x_U`` directly (parameter-shaped). CROWN's concretisation instead reshapes
    them as ``(batch, -1, 1)`` to multiply with the bound matrices, so it needs a leading batch
    dimension; a size-1 axis broadcasts over every input of the batch.
    """
    global _perturbation_cls
    if _perturbation_cls is None:

        class _BoxPerturbation(lirpa.PerturbationLpNorm):
            def __init__(self, x_L: Tensor, x_U: Tensor):
                super().__init__(eps=0.0, norm=float("inf"), x_L=x_L, x_U=x_U)

            def get_input_bounds(self, x, A):
                return self.x_L.unsqueeze(0), self.x_U.unsqueeze(0)

        _perturbation_cls = _BoxPerturbation
    return _perturbation_cls


def _check_ordered(lo: Tensor, hi: Tensor, method: str) -> None:
    """Raise instead of returning a bound that is NaN or has lower > upper (never repair it)."""
    bad = ~(lo <= hi)  # also catches NaN
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise UnsoundBoundError(
            f"auto_LiRPA {method} returned an invalid bound on output {idx}: "
            f"lower={float(lo[idx]):.6g}, upper={float(hi[idx]):.6g}"
        )
