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
    """Yield ``(path, module)`` for every leaf layer of a (nested) ``nn.Sequential``.

    ``path`` is the dotted name used by ``named_parameters()`` (empty for a bare top-level leaf).
    """
    if isinstance(model, nn.Sequential):
        for name, child in model.named_children():
            yield from iter_layers(child, f"{prefix}{name}.")
        return
    if len(list(model.children())) > 0:
        where = prefix[:-1] or "<model>"
        raise UnsupportedLayerError(
            f"module '{where}' ({type(model).__name__}) is a container with a custom forward(); "
            "lid_engine bounds models built from (nested) nn.Sequential containers, whose execution "
            "order is known. Rewrite it as nn.Sequential(...) of supported layers."
        )
    yield prefix[:-1], model


def param_name(path: str, attr: str) -> str:
    """Name of parameter ``attr`` of the layer at ``path`` as ``named_parameters()`` spells it."""
    return f"{path}.{attr}" if path else attr
