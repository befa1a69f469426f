"""The frozen prefix of a partial domain: evaluated once, not on every pass of the search.

When a domain gives width only to the last part of a network (the last encoder block and the head,
say), every parameter vector in it computes the same activations up to the first layer that has
width. The LID search bounds the model hundreds of times on the same examples, so pushing those
examples through the fixed prefix again on every pass is wasted work: :func:`split_frozen` cuts the
model into a ``prefix`` (input → the cut activation, all of its parameters fixed) and a ``suffix``
(the cut activation → output, holding every parameter with width), and the search runs on the
suffix over the prefix's outputs, computed once per example.

**Where the cut goes.** For an ``nn.Sequential`` chain: after the longest run of leading layers
whose parameters all have zero width. For a traced graph: at the latest op that (1) depends on the
input only through ops whose parameters all have zero width and (2) lies on every path from the
input to the ops that do not (it *dominates* them), so the suffix needs that one value and no
other activation — a residual branch that skips over a layer with width keeps the cut before the
branch point. The suffix holds the model's own parameter objects; :attr:`FrozenPrefix.names` maps
its parameter names to the model's.

**What it is used for.** The search and the finalisation scale (search-mode bounds, which certify
nothing). Certificates are always computed on the whole model over the whole domain in certify
mode, prefix included, so the cache never enters a certified number.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from .model_graph import ModelGraph


@dataclass
class FrozenPrefix:
    """A model cut into a fixed ``prefix`` and a ``suffix`` that holds every parameter with width."""

    prefix: nn.Module
    suffix: nn.Module
    names: dict[str, str]  # suffix parameter name -> the model's name for the same tensor
    cut: str  # where the model was cut, for the record (layer path or graph node)
    prefix_parameters: int  # parameters inside the prefix (all at zero width)

    @torch.no_grad()
    def features(self, x: Tensor, chunk: int = 1024) -> Tensor:
        """The prefix's output for every row of ``x`` (evaluated on the prefix's device and dtype,
        returned on ``x``'s device)."""
        param = next(iter(self.prefix.parameters()), None)
        dev = param.device if param is not None else x.device
        dtype = param.dtype if param is not None else x.dtype
        outs = [self.prefix(x[i:i + chunk].to(dev, dtype)).to(x.device) for i in range(0, len(x), chunk)]
        return torch.cat(outs) if outs else x.new_zeros((0,))

    def record(self) -> dict:
        """JSON-able description for a LID's search configuration."""
        return {"cut": self.cut, "prefix_parameters": self.prefix_parameters,
                "suffix_parameters": sum(p.numel() for p in self.suffix.parameters())}


def split_frozen(model: nn.Module, layers: list[tuple[str, nn.Module]] | ModelGraph,
                 frozen: Mapping[str, Tensor]) -> FrozenPrefix | None:
    """Cut ``model`` after its frozen prefix, or None when nothing before the first parameter with
    width is worth caching. ``layers``: what ``bounds.ibp.check_supported(model)`` returned;
    ``frozen``: parameter name → bool tensor, True where the coordinate keeps zero width."""
    fixed = {n for n, m in frozen.items() if bool(m.all())}
    names = {id(p): n for n, p in model.named_parameters()}
    if isinstance(layers, ModelGraph):
        return _split_graph(model, layers, fixed, names)
    return _split_chain(layers, fixed, names)


def _fixed_module(m: nn.Module, fixed: set[str], names: dict[int, str]) -> bool:
    return all(names[id(p)] in fixed for p in m.parameters())


def _rename(suffix: nn.Module, names: dict[int, str]) -> dict[str, str]:
    return {n: names[id(p)] for n, p in suffix.named_parameters()}


def _count(params: list[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def _split_chain(layers, fixed: set[str], names: dict[int, str]) -> FrozenPrefix | None:
    k = 0
    while k < len(layers) and _fixed_module(layers[k][1], fixed, names):
        k += 1
    if k == 0 or k == len(layers) or not any(any(True for _ in m.parameters()) for _, m in layers[:k]):
        return None  # nothing fixed up front, everything fixed, or only parameter-free layers to skip
    prefix = nn.Sequential(*[m for _, m in layers[:k]])
    suffix = nn.Sequential(*[m for _, m in layers[k:]])
    cut = f"after layer '{layers[k - 1][0]}' ({type(layers[k - 1][1]).__name__})"
    return FrozenPrefix(prefix.eval(), suffix.eval(), _rename(suffix, names), cut,
                        _count(list(prefix.parameters())))


def _split_graph(model: nn.Module, graph: ModelGraph, fixed: set[str], names: dict[int, str]) -> FrozenPrefix | None:
    ops = graph.ops
    if graph.fx_graph is None:
        return None
    deps = [op.refs() for op in ops]
    users: list[list[int]] = [[] for _ in ops]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    params = set(names.values())
    on_input, wide = graph.depends_on_input(), [False] * len(ops)
    for i, op in enumerate(ops):
        own = (op.kind == "module" and not _fixed_module(graph.modules[op.target], fixed, names)) or (
            op.kind == "attribute" and op.target in params and op.target not in fixed)
        wide[i] = own or any(wide[d] for d in deps[i])
    start = next(i for i, op in enumerate(ops) if op.kind == "input")
    targets = {i for i in range(len(ops)) if wide[i] and on_input[i]}
    if not targets:
        return None
    for d in range(len(ops) - 1, start, -1):
        if wide[d] or not on_input[d] or ops[d].kind == "output" or not _dominates(d, start, users, targets):
            continue
        return _build(model, graph, d, names)
    return None


def _dominates(d: int, start: int, users: list[list[int]], targets: set[int]) -> bool:
    """Whether every path from the input to an op in ``targets`` passes through op ``d``."""
    seen, todo = {start}, [start]
    while todo:
        i = todo.pop()
        for u in users[i]:
            if u == d or u in seen:
                continue
            if u in targets:
                return False
            seen.add(u)
            todo.append(u)
    return True


def _build(model: nn.Module, graph: ModelGraph, d: int, names: dict[int, str]) -> FrozenPrefix | None:
    nodes = list(graph.fx_graph.nodes)
    cut_node = nodes[d]

    def copy_into(g: fx.Graph, roots: list[fx.Node], memo: dict) -> None:
        """Copy ``roots`` and every node they need (not already in ``memo``) into ``g``, in graph order."""
        needed, todo = set(), [r for r in roots if r not in memo]
        while todo:
            n = todo.pop()
            if n not in needed:
                needed.add(n)
                todo.extend(a for a in n.all_input_nodes if a not in memo)
        for n in nodes:
            if n in needed:
                memo[n] = g.node_copy(n, lambda a: memo[a])

    prefix_graph, prefix_memo = fx.Graph(), {}
    copy_into(prefix_graph, [cut_node], prefix_memo)
    prefix_graph.output(prefix_memo[cut_node])

    suffix_graph = fx.Graph()
    memo = {cut_node: suffix_graph.placeholder("features")}
    out_node = nodes[-1]
    copy_into(suffix_graph, out_node.all_input_nodes, memo)
    suffix_graph.output(fx.map_arg(out_node.args[0], lambda n: memo[n]))
    if any(n.op == "placeholder" and n.name != "features" for n in suffix_graph.nodes):
        return None  # the suffix would need the raw input too: no single cut
    prefix, suffix = fx.GraphModule(model, prefix_graph), fx.GraphModule(model, suffix_graph)
    op = graph.ops[d]
    return FrozenPrefix(prefix.eval(), suffix.eval(), _rename(suffix, names), f"at {op.describe(source=False)}",
                        _count(list(prefix.parameters())))
