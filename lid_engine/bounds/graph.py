"""Interval bounds over a traced model graph (``lid_engine.model_graph``), op by op.

The chain engine (``ibp.py``) handles ``nn.Sequential`` models with stacked intervals; every other
model is traced and each op is bounded by its handler from the registry (``registry.py``; the
built-in ones in ``ops.py``, the chain's layer handlers adapted in ``ibp.py``). Values flow as
:class:`~lid_engine.bounds.registry.Bounds`; the model's parameters are read from the domain, its
buffers and constants are exact.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ..domains import Box
from ..errors import UnsoundBoundError, UnsupportedLayerError
from ..model_graph import ModelGraph, Op, check_faithful, map_refs, target_name, trace
from .. import numerics as rounding
from . import ops  # noqa: F401 — registers the built-in op handlers
from .registry import FUNCTIONS, MODULES, BoundContext, Bounds, supported


def trace_supported(model: nn.Module) -> ModelGraph:
    """Trace ``model`` and check that the registry has a handler for every op; raises
    :class:`UnsupportedLayerError` naming the first op without one, its source line and what is
    supported."""
    graph = trace(model, leaf_types=tuple(MODULES))
    for op in graph.ops:
        if op.kind in ("input", "output", "attribute"):
            continue
        if _handler(graph, op) is None:
            raise UnsupportedLayerError(
                f"{op.describe()} is not supported by the bound engine. "
                f"Supported: {supported()}. A custom layer can be registered: lid_engine.bounds.registry"
            )
    return graph


def _handler(graph: ModelGraph, op: Op):
    if op.kind == "module":
        return MODULES.get(type(graph.modules[op.target]))
    return FUNCTIONS.get(op.target)  # functions by identity, tensor methods by name


def propagate_graph(model: nn.Module, graph: ModelGraph, box: Box, x: Tensor, *, certify: bool,
                    nonneg: bool | None = None, record: list | None = None) -> tuple[Tensor, Tensor]:
    """(lo, hi) of the model's output for every parameter vector in ``box``, the input ``x`` fixed.

    ``record``, if given, receives every op's value (``Bounds``, or a plain value for size arithmetic)
    in the order of ``graph.ops`` (the linear bound needs them)."""
    check_faithful(model, graph, x)
    ctx = BoundContext(box, certify, x.dtype, x.device)
    env: list = []
    flags, flagged = [], []
    for op in graph.ops:
        if op.kind == "input":
            value = Bounds.exact(x, nonneg=bool(x.min() >= 0) if nonneg is None else nonneg)
        elif op.kind == "attribute":
            value = _attribute(ctx, model, op)
        elif op.kind == "output":
            value = map_refs(op.args[0], lambda r: env[r.index])
        else:
            value = _run(ctx, graph, op, env)
        if certify and isinstance(value, Bounds) and not value.point and not _rearranges(graph, op):
            flags.append(_invalid(value))
            flagged.append(op)
        env.append(value)
    if flags:
        bad = torch.stack(flags).cpu()
        if bool(bad.any()):  # never repaired: name the first op where it happened
            raise UnsoundBoundError(f"{flagged[int(bad.nonzero()[0])].describe()}: bounds overflowed to inf/NaN or "
                                    "lower > upper")
    if record is not None:
        record.extend(env)
    out = env[-1]
    if not isinstance(out, Bounds):
        raise UnsupportedLayerError(
            f"model {type(model).__name__} returns {type(out).__name__}; lid_engine bounds models that return one "
            "tensor of logits")
    return out.lo, out.hi


def _run(ctx: BoundContext, graph: ModelGraph, op: Op, env: list):
    args = map_refs(op.args, lambda r: env[r.index])
    kwargs = map_refs(op.kwargs, lambda r: env[r.index])
    handler = _handler(graph, op)
    if op.kind != "module" and not _holds_bounds((args, kwargs)):  # arithmetic on sizes, e.g. x.shape[0] * 2
        return _plain(op, args, kwargs)
    try:
        if op.kind == "module":
            return handler(ctx, op.target, graph.modules[op.target], *args, **kwargs)
        return handler(ctx, *args, **kwargs)
    except UnsoundBoundError:
        raise
    except UnsupportedLayerError as exc:
        raise UnsupportedLayerError(f"{op.describe()}: {exc}") from None
    except (RuntimeError, IndexError, TypeError, ValueError) as exc:
        if "out of memory" in str(exc):
            raise
        shapes = [tuple(a.shape) for a in args if isinstance(a, Bounds)]
        raise UnsupportedLayerError(
            f"{op.describe()} cannot be bounded on inputs of shape {', '.join(map(str, shapes)) or '()'}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def _holds_bounds(value) -> bool:
    if isinstance(value, Bounds):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_bounds(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_bounds(v) for v in value.values())
    return False


def _plain(op: Op, args: tuple, kwargs: dict):
    """An op on plain Python values (sizes, shapes): no tensor involved, so evaluate it."""
    if isinstance(args[0] if args else None, Tensor):
        raise UnsupportedLayerError(f"{op.describe()}: unexpected tensor argument outside the bound engine")
    if op.kind == "method":
        return getattr(args[0], op.target)(*args[1:], **kwargs)
    return op.target(*args, **kwargs)


def _attribute(ctx: BoundContext, model: nn.Module, op: Op) -> Bounds:
    """A parameter (its bounds in the domain) or a buffer/constant tensor (exact)."""
    value = functools.reduce(getattr, op.target.split("."), model)
    if isinstance(value, nn.Parameter):
        names = {id(p): n for n, p in model.named_parameters()}
        lo, hi = ctx.parameter(names[id(value)])
        return Bounds(lo, hi)
    if isinstance(value, Tensor):
        t = value.detach().to(ctx.device, ctx.dtype if value.is_floating_point() else value.dtype)
        return Bounds.exact(t, nonneg=bool((t >= 0).all()))
    raise UnsupportedLayerError(f"{op.describe()} is a {type(value).__name__}, not a tensor")


def _rearranges(graph: ModelGraph, op: Op) -> bool:
    """Whether the op only moves elements of its checked input (a view, slice, transpose …): no new
    values to check for overflow."""
    return op.kind in ("function", "method") and getattr(_handler(graph, op), "rearranges", False)


def _invalid(b: Bounds) -> Tensor:
    return rounding.invalid_bounds(b.lo, b.hi)


__all__ = ["propagate_graph", "trace_supported", "target_name"]
