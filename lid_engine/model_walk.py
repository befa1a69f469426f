"""Execution-order walk over the layers of an ``nn.Sequential`` model.

The bound engine propagates intervals layer by layer, so it needs the layers in the order the
forward pass runs them, together with the prefix under which ``model.named_parameters()`` lists
their parameters. Only (nested) ``nn.Sequential`` containers have an order we can trust without
tracing, so anything else is a leaf that must be a supported layer.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .errors import UnsupportedLayerError


def iter_layers(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(path, module)`` for every leaf layer of a (nested) ``nn.Sequential``, in execution order.

    ``path`` is the dotted name used by ``named_parameters()`` (empty for a bare top-level leaf). A
    module that occurs several times is yielded at every occurrence (the forward pass runs it every
    time), each time with the path of its first occurrence, which is where ``named_parameters()``
    lists its parameters.
    """
    canonical = {id(p): n for n, p in model.named_parameters(prefix=prefix[:-1] if prefix else "")}
    # Walk (and check) the whole model before yielding: callers may replace parameters as they go.
    yield from list(_walk(model, prefix, {}, canonical))


def _walk(model: nn.Module, prefix: str, seen: dict[int, str], canonical: dict[int, str]) -> Iterator[tuple[str, nn.Module]]:
    where = prefix[:-1] or "<model>"
    if model._forward_hooks or model._forward_pre_hooks:
        raise UnsupportedLayerError(
            f"module '{where}' ({type(model).__name__}) has forward hooks, which may change what it computes "
            "(e.g. pruning or weight_norm); remove them before bounding the model"
        )
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward and "forward" not in vars(model):
        # _modules, not named_children(): named_children() skips a module that occurs twice, but the
        # forward pass runs it at every occurrence.
        for name, child in model._modules.items():
            if child is not None:
                yield from _walk(child, f"{prefix}{name}.", seen, canonical)
        return
    if len(list(model.children())) > 0:
        raise UnsupportedLayerError(
            f"module '{where}' ({type(model).__name__}) is a container with a custom forward(); "
            "lid_engine bounds models built from (nested) nn.Sequential containers, whose execution "
            "order is known without tracing"
        )
    path = seen.setdefault(id(model), prefix[:-1])
    for attr, p in model.named_parameters(recurse=False):
        if canonical.get(id(p)) != param_name(path, attr):
            raise UnsupportedLayerError(
                f"layer '{where}' ({type(model).__name__}): parameter '{attr}' is the same tensor as "
                f"'{canonical.get(id(p))}' of another layer (tied weights); lid_engine bounds each layer's "
                "parameters under their own name, so tied parameters are not supported"
            )
    yield path, model


def is_chain(model: nn.Module, leaf_types: tuple[type, ...]) -> bool:
    """Whether ``model`` is a (nested) plain ``nn.Sequential`` whose leaves all have a type in
    ``leaf_types`` (or is such a leaf itself): then its execution order is its module order."""
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward and "forward" not in vars(model):
        return all(is_chain(c, leaf_types) for c in model._modules.values() if c is not None)
    return type(model) in leaf_types and not any(True for _ in model.children())


def param_name(path: str, attr: str) -> str:
    """Name of parameter ``attr`` of the layer at ``path`` as ``named_parameters()`` spells it."""
    return f"{path}.{attr}" if path else attr
