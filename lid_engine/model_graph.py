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

import operator
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
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

    def refs(self) -> list[int]:
        """The positions of the earlier ops whose values this op reads (in argument order)."""
        found: list[int] = []
        _map((self.args, self.kwargs), Ref, lambda r: found.append(r.index))
        return found

    def describe(self, source: bool = True) -> str:
        """How error messages name the op: its node name, what it runs and (``source``) where it comes from."""
        what = {"module": f"module '{self.target}' ({self.module_type})", "method": f"tensor method '.{self.target}()'",
                "attribute": f"attribute '{self.target}'", "input": "input", "output": "output"}.get(self.kind)
        if what is None:
            what = f"function '{target_name(self.target)}'"
        return f"node '{self.name}' ({what})" + (f" at {self.source}" if self.source and source else "")


@dataclass
class ModelGraph:
    """The traced forward pass of ``model``: ops in execution order, one input, one output."""

    ops: list[Op]
    modules: dict[str, nn.Module]  # path -> module, for the ops of kind "module"
    fx_graph: fx.Graph | None = field(default=None, repr=False)  # the traced graph, node i = ops[i]
    faithful: bool = field(default=False, repr=False)  # checked against forward() (check_faithful)

    @property
    def output(self) -> Op:
        return self.ops[-1]

    def depends_on_input(self) -> list[bool]:
        """Per op, whether its value depends on the model's input (parameters, buffers and constants do not)."""
        flags: list[bool] = []
        for op in self.ops:
            flags.append(op.kind == "input" or any(flags[i] for i in op.refs()))
        return flags


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
    _check_in_place(ops, used)
    return ModelGraph(ops, used, graph)


def check_faithful(model: nn.Module, graph: ModelGraph, x: torch.Tensor, rows: int = 2) -> None:
    """Check once that the traced graph computes what ``model.forward`` computes, on the first ``rows`` of
    ``x``. The tracer records ``h += 1`` as ``h = h + 1``; when another name still refers to the old ``h``,
    eager PyTorch changes both and the graph does not — no trace-time check can see that."""
    if graph.faithful or graph.fx_graph is None:
        return
    param = next(model.parameters(), None)
    xs = x[:rows].detach()
    if param is not None and xs.is_floating_point():
        xs = xs.to(param.device, param.dtype)
    if xs.is_floating_point() and bool((xs == xs.round()).all()) and any(
            isinstance(m, nn.Embedding) for m in graph.modules.values()):
        xs = xs.long()  # token ids: the bound engine carries them as floats, the model takes integers
    try:
        with torch.no_grad():
            traced = fx.GraphModule(model, graph.fx_graph)(xs)
            eager = model(xs)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return  # the bound engine's own pass names what is wrong with this input
    if not isinstance(eager, torch.Tensor) or not isinstance(traced, torch.Tensor):
        return  # the output check of the bound engine names this case
    same = eager.shape == traced.shape and bool(torch.equal(eager, traced) or torch.allclose(
        eager, traced, rtol=1e-5, atol=1e-6 * float(eager.abs().max().clamp(min=1.0))))
    if not same:
        gap = float((eager - traced).abs().max()) if eager.shape == traced.shape else float("nan")
        raise UnsupportedLayerError(
            f"model {type(model).__name__}: the traced graph computes other outputs than forward() on the first "
            f"examples (largest difference {gap:.3g}). forward() probably updates a tensor in place that another "
            "name still refers to (h += ... after r = h, or an in-place op on a view); write the update out of "
            "place (h = h + ...)")
    graph.faithful = True


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor}
# ops whose result may share storage with their input: mutating it in place changes the input too
_ALIASING_METHODS = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute", "t",
                     "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "narrow", "select", "unfold",
                     "split", "chunk", "unbind", "as_strided", "detach", "movedim", "swapaxes", "to", "type_as",
                     "float", "double"}
_ALIASING_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout)


def _in_place(op: Op, used: dict[str, nn.Module]) -> bool:
    if op.kind == "module":
        return bool(getattr(used[op.target], "inplace", False))
    if op.kind == "method":
        return isinstance(op.target, str) and op.target.endswith("_") and not op.target.startswith("_")
    if op.kind == "function":
        name = getattr(op.target, "__name__", "")
        return (op.target in _IN_PLACE_OPERATORS or bool(op.kwargs.get("inplace", False))
                or (name.endswith("_") and not name.startswith("_")))
    return False


def _aliases(op: Op, used: dict[str, nn.Module]) -> bool:
    """Whether ``op``'s value may share storage with another value of the graph (or be the model's input, a
    parameter or a buffer)."""
    if op.kind in ("input", "attribute"):
        return True
    if op.kind == "module":
        return isinstance(used[op.target], _ALIASING_MODULES)
    if op.kind == "method":
        return op.target in _ALIASING_METHODS
    if op.kind == "function":
        return op.target in (operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute,
                             torch.squeeze, torch.unsqueeze, torch.narrow, torch.split, torch.chunk, torch.t,
                             torch.movedim, torch.swapaxes, torch.unbind, torch.detach)
    return False


def _check_in_place(ops: list[Op], used: dict[str, nn.Module]) -> None:
    """An in-place op (``nn.ReLU(inplace=True)``, ``F.relu(h, inplace=True)``, ``h += 1``, ``h.relu_()``) is
    bounded as the pure op it computes. That is right only when nothing else sees the tensor it overwrites:
    refuse it when its first argument has another use, or may share storage with another value."""
    users: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        for r in op.refs():
            users.setdefault(r, []).append(i)
    for i, op in enumerate(ops):
        if not _in_place(op, used) or not op.args or not isinstance(op.args[0], Ref):
            continue
        target = op.args[0].index
        others = [ops[u] for u in users.get(target, []) if u != i]
        if others or _aliases(ops[target], used):
            why = (f"{others[0].describe()} also uses the value it overwrites" if others else
                   f"the value it overwrites ({ops[target].describe()}) may share memory with another tensor")
            raise UnsupportedLayerError(
                f"{op.describe()} works in place, and {why}; lid_engine bounds each op as a pure function, which "
                "that in-place update is not. Write it out of place (h = F.relu(h), h = h + x, "
                "nn.ReLU(inplace=False))")


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
