"""A model's computation as a graph of operations, traced with ``torch.fx``.

The bound engine follows the model's own computation. For a (nested) ``nn.Sequential`` the order is
known without tracing (``model_walk.py``); anything else — residual additions, concatenation,
branches, a custom ``forward``, functional calls such as ``F.relu`` or ``x.view(...)`` — is traced
symbolically into a list of :class:`Op` in execution order. Each op names what it runs (a module
path, a function, a tensor method or a parameter), its arguments (earlier ops or constants) and,
where the tracer recorded one, the line of the user's source that created it, so an unsupported
op can be reported where the user wrote it.

Modules whose types the bound engine handles are kept whole (``leaf_types``); any other module is
traced through. Untraceable models (data-dependent Python control flow, for example) raise
:class:`UnsupportedLayerError` naming the model and the traced line.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from .errors import UnsupportedLayerError
from .model_walk import param_name


@dataclass(frozen=True)
class Ref:
    """An argument that is the value of an earlier op (by its position in :attr:`ModelGraph.ops`)."""

    index: int


@dataclass
class Op:
    """One operation of the traced forward pass.

    ``kind`` is ``"input"`` (the model's input), ``"module"`` (``target`` is the module's path as
    ``named_modules()`` spells it), ``"function"`` (``target`` is the callable, e.g. ``torch.add``),
    ``"method"`` (``target`` is a tensor method name, e.g. ``"view"``), ``"attribute"`` (``target``
    is a parameter or buffer name) or ``"output"``. ``args``/``kwargs`` hold :class:`Ref` for values
    of earlier ops and plain Python values otherwise.
    """

    name: str
    kind: str
    target: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    source: str = ""  # "file:line: code" of the user's line that created it, when recorded
    module_type: str = ""  # for kind "module": the module's class name

    def describe(self) -> str:
        """How error messages name the op: its node name, what it runs and where it comes from."""
        what = {"module": f"module '{self.target}' ({self.module_type})", "method": f"tensor method '.{self.target}()'",
                "attribute": f"attribute '{self.target}'", "input": "input", "output": "output"}.get(self.kind)
        if what is None:
            what = f"function '{target_name(self.target)}'"
        return f"node '{self.name}' ({what})" + (f" at {self.source}" if self.source else "")


@dataclass
class ModelGraph:
    """The traced forward pass of ``model``: ops in execution order, one input, one output."""

    ops: list[Op]
    modules: dict[str, nn.Module]  # path -> module, for the ops of kind "module"
    fx_graph: fx.Graph | None = field(default=None, repr=False)  # the traced graph, node i = ops[i]

    @property
    def output(self) -> Op:
        return self.ops[-1]


def target_name(target: Any) -> str:
    """A readable dotted name for a traced callable (``torch.nn.functional.relu``, ``operator.add``)."""
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    if module == "builtins":
        return name
    if module.startswith("torch._C") or module == "torch._tensor" or not module:
        return f"torch.{name}"
    return f"{module}.{name}"


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_types
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
            return False
        return type(m) in self.leaf_types or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, leaf_types: Iterable[type] = ()) -> ModelGraph:
    """Trace ``model``'s forward pass into a :class:`ModelGraph`.

    ``leaf_types``: module types kept whole (the ones the bound engine handles); modules of other
    types that ``torch.fx`` would keep whole (``torch.nn`` layers) are kept too and reported as
    unsupported by the caller. Raises :class:`UnsupportedLayerError` when tracing fails (naming the
    model and, where the error points into user code, the line) or when the model has one input
    other than a single tensor.
    """
    tracer = _Tracer(tuple(leaf_types))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # noqa: BLE001 — fx raises many kinds; each becomes one clear error
        raise UnsupportedLayerError(
            f"model {type(model).__name__} cannot be traced with torch.fx{_user_frame(exc)}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. lid_engine bounds models whose forward "
            "pass is a fixed graph of tensor operations (no Python control flow on tensor values, one tensor "
            "input); rewrite that part of forward() or wrap the model"
        ) from None
    modules = dict(model.named_modules())
    ops: list[Op] = []
    index: dict[fx.Node, int] = {}
    for node in graph.nodes:
        source = _source(node)
        if node.op == "placeholder":
            if any(o.kind == "input" for o in ops):
                raise UnsupportedLayerError(
                    f"model {type(model).__name__}: forward() takes several inputs ('{ops[0].name}', '{node.name}'); "
                    "lid_engine bounds models of one input tensor (the parameters vary, the input is fixed)")
            op = Op(node.name, "input", node.target, source=source)
        elif node.op == "output":
            op = Op(node.name, "output", None, (_refs(node.args[0], index),), source=source)
        else:
            kind = {"call_module": "module", "call_function": "function", "call_method": "method",
                    "get_attr": "attribute"}[node.op]
            op = Op(node.name, kind, node.target, tuple(_refs(a, index) for a in node.args),
                    {k: _refs(v, index) for k, v in node.kwargs.items()}, source,
                    type(modules[node.target]).__name__ if kind == "module" else "")
        index[node] = len(ops)
        ops.append(op)
    if not any(o.kind == "input" for o in ops):
        raise UnsupportedLayerError(f"model {type(model).__name__}: forward() takes no input")
    used = {p: modules[p] for p in {o.target for o in ops if o.kind == "module"}}
    _check_modules(model, used, ops)
    return ModelGraph(ops, used, graph)


def _refs(value: Any, index: dict[fx.Node, int]) -> Any:
    """``value`` with every fx node replaced by a :class:`Ref` to its op."""
    return _map(value, fx.Node, lambda node: Ref(index[node]))


def _check_modules(model: nn.Module, used: dict[str, nn.Module], ops: list[Op]) -> None:
    """Hooks and tied weights: what the chain walk refuses, refused here too, naming the op."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    first = {o.target: o for o in reversed(ops) if o.kind == "module"}
    for path, m in used.items():
        where = first[path].describe()
        if m._forward_hooks or m._forward_pre_hooks:
            raise UnsupportedLayerError(
                f"{where} ({type(m).__name__}) has forward hooks, which may change what it computes "
                "(e.g. pruning or weight_norm); remove them before bounding the model")
        for attr, p in m.named_parameters():
            if canonical.get(id(p)) != param_name(path, attr):
                raise UnsupportedLayerError(
                    f"{where} ({type(m).__name__}): parameter '{attr}' is the same tensor as "
                    f"'{canonical.get(id(p))}' (tied weights); lid_engine bounds each parameter under one name, "
                    "so a module that holds another's parameters is not supported")


def _source(node: fx.Node) -> str:
    """``file:line: code`` of the innermost frame outside torch that created ``node`` (empty if unknown)."""
    lines = [ln.strip() for ln in (getattr(node, "stack_trace", None) or "").strip().splitlines()]
    found = ""
    for i, ln in enumerate(lines):
        if not ln.startswith('File "'):
            continue
        parts = ln.split('"')
        file = parts[1] if len(parts) > 1 else "?"
        if "/torch/" in file or file.endswith("model_graph.py"):
            continue
        line = ln.split("line ")[-1].split(",")[0]
        code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith('File "') else ""
        found = f"{file}:{line}" + (f": {code}" if code else "")
    return found


def _user_frame(exc: BaseException) -> str:
    """`` (at file:line: code)`` for the innermost frame of ``exc`` outside torch, if any."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename
              and not f.filename.endswith("model_graph.py")]
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno}: {(f.line or '').strip()})"


def map_refs(value: Any, fn: Callable[[Ref], Any]) -> Any:
    """``value`` with every :class:`Ref` replaced by ``fn(ref)`` (nested tuples, lists, dicts, slices)."""
    return _map(value, Ref, fn)


def _map(value: Any, leaf: type, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, leaf):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map(v, leaf, fn) for v in value)
    if isinstance(value, list):
        return [_map(v, leaf, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map(v, leaf, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_map(value.start, leaf, fn), _map(value.stop, leaf, fn), _map(value.step, leaf, fn))
    return value
