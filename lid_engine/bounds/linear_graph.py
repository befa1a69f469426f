"""The backward linear bound (``linear.py``) over a traced graph, with IBP where no relaxation is known.

The chain version walks an ``nn.Sequential`` backwards from ``Λ = e_y − e_j``. Here the walk runs
over the ops of a :class:`~lid_engine.model_graph.ModelGraph` in reverse execution order; an op's
multiplier is the sum of what its consumers pass back to it (a residual addition passes its ``Λ``
to both summands). Every step is an inequality ``Λ·z ≥ Λ'·a + ρ`` that holds for *any* ``Λ``, so
rounding in the multipliers never matters; what each rule adds to the bound is evaluated with the
chain's rigorous accumulator (``linear._Sum``: float64 plus an a-priori bound on its own rounding).

Rules (:func:`rule`):

* **affine** — ``nn.Linear`` (inputs of any rank) and ``nn.Conv2d`` (groups = 1, symmetric zero
  padding) with their parameters in the domain: the chain's ``_affine`` (weight correlation, the
  second-order term, bias, and the float forward pass's deviation ``e``).
* **relu** — ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()``: CROWN's slopes (``linear._relu``).
* **move** — ops that only move elements (views, reshapes, flatten, permute/transpose, slicing,
  ``cat``, squeeze/unsqueeze, Identity, Dropout in eval mode): exact, so ``Λ'`` is the op's
  vector–Jacobian product (autograd's backward of the op itself).
* **sum** — ``+`` and ``−`` of two activations, average pooling (``nn.AvgPool2d``, ``F.avg_pool2d``)
  and means: linear, but a float forward pass rounds them, so the bound also subtracts
  ``|Λ|·(c·M + k·η)`` (``numerics.slack_coefficients`` over the terms each output sums, ``M`` the
  op applied to its inputs' magnitudes), as the chain does for an affine layer's ``e``.
* **interval** — every other op (LayerNorm, GELU, softmax, attention, BatchNorm, a custom handler …):
  the walk stops there and bounds ``Λ·z`` by ``z``'s IBP interval, ``Σ Λ⁺·lo − Λ⁻·hi`` — exact for
  the interval, so IBP takes over *per op*. A certificate computed with ``method="linear"`` records
  the ops the walk crossed this way (``Certificate.linear_fallbacks``); :func:`fallback_ops` lists the
  ones known without running it.

An operand that is not a per-example activation (a parameter or buffer used directly, a constant)
is bounded where it is used, by its own interval — exact for a box, since the op is linear in it.

**Rounding.** A relaxation step holds for whatever multiplier rounding produced. The steps that *compute*
a multiplier as a sum — pulling Λ back through a move, mean or pooling, summing it over broadcast
dimensions, adding the multipliers of a value's several consumers — are exact only in real arithmetic:
each charges γ·(the same sum of magnitudes)·max|a| to the accumulator, as the chain charges ν = W_mᵀΛ.
Zonotope domains use their bounding box here (sound; the chain keeps the generator terms).
"""

from __future__ import annotations

import contextlib
import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import numerics as rounding
from ..domains import Box
from ..model_graph import ModelGraph, Op, Ref, map_refs, target_name
from . import ibp, linear
from .graph import propagate_graph
from .registry import Bounds

_RELU_FUNCTIONS = (F.relu, torch.relu)
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)
_MOVE_FUNCTIONS = (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                   operator.getitem, torch.cat, torch.concat)
_MOVE_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze")
_ADD = (operator.add, torch.add, operator.iadd)
_SUB = (operator.sub, torch.sub, operator.isub)
_MEAN = (torch.mean, F.avg_pool2d)


def rule(graph: ModelGraph, op: Op) -> str:
    """How the backward walk crosses ``op``: "affine", "relu", "move", "sum" or "interval" (module docstring)."""
    if op.kind == "module":
        m = graph.modules[op.target]
        if type(m) is nn.Linear:  # exact types: a subclass (an adapter, say) computes something else
            return "affine"
        if type(m) is nn.Conv2d:
            try:
                linear.conv_padding(m)
            except Exception:  # noqa: BLE001 — uneven 'same' padding: no relaxation here
                return "interval"
            return "affine" if m.groups == 1 and m.padding_mode == "zeros" else "interval"
        if type(m) is nn.ReLU:
            return "relu"
        if type(m) in _MOVE_MODULES:
            return "move"
        if type(m) is nn.AvgPool2d:
            return "sum"
        return "interval"
    if op.kind == "function":
        if op.target in _RELU_FUNCTIONS:
            return "relu"
        if op.target in _MOVE_FUNCTIONS:
            return "move"
        if op.target in _ADD + _SUB:
            return "sum" if "alpha" not in op.kwargs else "interval"
        if op.target in _MEAN:
            return "sum"
        return "interval"
    if op.kind == "method":
        if op.target == "relu":
            return "relu"
        if op.target in _MOVE_METHODS:
            return "move"
        if op.target == "mean":
            return "sum"
        return "interval"
    return "interval"


def fallback_ops(graph: ModelGraph) -> list[str]:
    """The ops whose rule is "interval" (no relaxation here), in execution order: a module by its path
    and type (``blocks.0.bn1 (BatchNorm2d)``), a function or tensor method by node and callable
    (``mul (operator.mul)``). What a bound actually crossed with IBP also depends on shapes (a mean over
    the batch dimension, say): ``graph_linear_margins(..., fallbacks=[])`` records that."""
    return [describe(op) for op in graph.ops
            if op.kind in ("module", "function", "method") and rule(graph, op) == "interval"]


def describe(op: Op) -> str:
    if op.kind == "module":
        return f"{op.target} ({op.module_type})"
    return f"{op.name} ({'.' + op.target + '()' if op.kind == 'method' else target_name(op.target)})"


def margins(model: nn.Module, box: Box, x: Tensor, y: Tensor, *, certify: bool,
            layers: list[tuple[str, nn.Module]] | ModelGraph, competitors: int | None = None,
            zonotope=None) -> tuple[Tensor, Tensor, Tensor]:
    """The linear bound over what ``linear.walk`` chose: the chain walk (``linear.linear_margins``; a
    ``zonotope``'s generator terms minimised exactly) or the graph walk (its bounding ``box``)."""
    if isinstance(layers, ModelGraph):
        return graph_linear_margins(model, layers, box, x, y, certify=certify, competitors=competitors)
    return linear.linear_margins(model, box, x, y, certify=certify, layers=layers, competitors=competitors,
                                 zonotope=zonotope)


def graph_linear_margins(model: nn.Module, graph: ModelGraph, box: Box, x: Tensor, y: Tensor, *, certify: bool,
                         competitors: int | None = None, fallbacks: list[str] | None = None,
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """IBP's logit bounds ``(lo, hi)`` and the linear lower bounds on ``z_y − z_j`` (N, C; ``-inf`` at
    ``j = y`` and, in search mode with ``competitors=k``, beyond the ``k`` classes IBP finds most dangerous).

    ``fallbacks``, if given, receives the ops (``describe``) whose IBP interval the walk used, in
    execution order."""
    env: list = []
    lo, hi = propagate_graph(model, graph, box, x, certify=certify, record=env)
    out = lo.new_full(lo.shape, -math.inf)
    logits = graph.output.args[0]
    if lo is hi or not hasattr(logits, "index") or lo.shape[1] < 2:
        return lo, hi, out
    with torch.no_grad():  # the competitors: worst IBP margin first
        top = torch.finfo(lo.dtype).max
        rank = (lo.gather(1, y[:, None]) - hi).nan_to_num(nan=-math.inf).clamp(max=top)
        rank = rank.scatter(1, y[:, None], math.inf)
        k = lo.shape[1] - 1 if competitors is None else min(competitors, lo.shape[1] - 1)
        others = rank.argsort(dim=1)[:, :k]
    dtype = torch.float64 if certify else x.dtype
    with contextlib.nullcontext() if certify else rounding.onednn_kernels():
        walk = _Walk(model, graph, env, box, x, certify, dtype)
        value = walk.run(logits.index, y, others)
    if fallbacks is not None:
        fallbacks.extend(describe(graph.ops[i]) for i in sorted(walk.crossed))
    if certify:
        value = linear._narrow_down(value.nan_to_num(nan=-math.inf, posinf=-math.inf, neginf=-math.inf), out.dtype)
    return lo, hi, out.scatter(1, others, value)


class _Walk:
    """One backward pass: multipliers per op, the accumulated bound, and the per-op rules.

    Λ of an op has shape (N, J, *the op's shape without its first dimension), rows = examples. A rule
    passes Λ on to an argument only where the argument's first dimension is the same examples in the
    same order (checked per rule); any other argument is bounded by its interval where it is used."""

    def __init__(self, model, graph: ModelGraph, env: list, box: Box, x: Tensor, certify: bool, dtype: torch.dtype):
        self.model, self.graph, self.env, self.box = model, graph, env, box
        self.certify, self.dtype, self.eval_dtype = certify, dtype, x.dtype
        self.n = len(x)
        self.on_input = graph.depends_on_input()
        self.crossed: set[int] = set()  # ops whose interval ended the walk (not constants, inputs, parameters)

    def run(self, logits: int, y: Tensor, others: Tensor) -> Tensor:
        n_classes = self.env[logits].lo.shape[1]
        eye = torch.eye(n_classes, dtype=self.dtype, device=y.device)
        lam0 = eye[y][:, None, :] - eye[others]  # (N, J, C)
        self.acc = linear._Sum(tuple(others.shape), lam0, self.certify)
        self.lam: dict[int, Tensor] = {logits: lam0}
        for i in range(logits, -1, -1):
            lam = self.lam.pop(i, None)
            if lam is None:
                continue
            op, value = self.graph.ops[i], self.env[i]
            kind = "interval" if value.point or op.kind in ("input", "attribute") else rule(self.graph, op)
            if kind == "interval" or not getattr(self, "_" + kind)(i, op, lam):
                self._interval(lam, value)
                self._crossed(i)
        return self.acc.lower()

    # ------------------------------------------------------------------ helpers
    def _bounds(self, value: Bounds) -> tuple[Tensor, Tensor]:
        return value.lo.to(self.dtype), value.hi.to(self.dtype)

    def _activation(self, ref) -> bool:
        """Whether argument ``ref`` is an input-dependent interval with a first dimension of N (a rule
        still checks that this dimension lines up with its output's examples)."""
        if not hasattr(ref, "index"):
            return False
        value = self.env[ref.index]
        return (isinstance(value, Bounds) and self.on_input[ref.index] and not value.point
                and value.lo.dim() >= 2 and value.lo.shape[0] == self.n)

    def _crossed(self, i: int) -> None:
        """Record that the bound used op ``i``'s IBP interval (an input-dependent op, not a constant)."""
        value = self.env[i]
        if self.on_input[i] and not value.point and self.graph.ops[i].kind in ("module", "function", "method"):
            self.crossed.add(i)

    def _pass(self, ref, lam: Tensor) -> None:
        i = ref.index
        if i in self.lam:  # a value with several consumers: their multipliers add up (rounded: charged)
            self._charge(ref, self.lam[i].abs() + lam.abs(), 2)
            lam = self.lam[i] + lam
        self.lam[i] = lam

    def _charge(self, ref, lam_mag: Tensor, terms: int) -> None:
        """A multiplier for ``ref`` computed as a float sum of ``terms`` products whose magnitudes add up to
        ``lam_mag`` is off by at most γ·lam_mag per entry; its term Λ·a then by γ·lam_mag·|a|: charged through
        the accumulator's magnitude (as the chain walk charges ν = W_mᵀΛ)."""
        if not self.certify:
            return
        lo, hi = self._bounds(self.env[ref.index])
        amag = torch.maximum(lo.abs(), hi.abs())
        self.acc.add(torch.zeros_like(lam_mag), lam_mag * amag[:, None], terms)

    def _interval(self, lam: Tensor, value: Bounds) -> None:
        """``Λ·z ≥ Σ Λ⁺·lo − Λ⁻·hi`` over z's interval (broadcast to Λ's shape)."""
        lo, hi = self._bounds(value)
        shape = lam.shape[2:]
        lo, hi = _per_row(lo, self.n, shape), _per_row(hi, self.n, shape)
        term = torch.where(lam >= 0, lam * lo, lam * hi)
        mag = lam.abs() * torch.maximum(lo.abs(), hi.abs()) if self.certify else None
        self.acc.add(term, mag, 1)

    def _call(self, op: Op, tensors: dict[int, Tensor]):
        """Run ``op`` with the arguments in ``tensors`` (by op index) substituted and every other argument
        at its value (sizes, constants)."""
        def arg(r):
            if r.index in tensors:
                return tensors[r.index]
            v = self.env[r.index]
            return v.lo if isinstance(v, Bounds) else v
        args, kwargs = map_refs(op.args, arg), map_refs(op.kwargs, arg)
        if op.kind == "module":
            return self.graph.modules[op.target](*args, **kwargs)
        if op.kind == "method":
            return getattr(args[0], op.target)(*args[1:], **kwargs)
        return op.target(*args, **kwargs)

    def _tensor_refs(self, op: Op) -> list[Ref]:
        """The distinct arguments of ``op`` that hold intervals (not sizes or other plain values)."""
        return [Ref(i) for i in dict.fromkeys(op.refs()) if isinstance(self.env[i], Bounds)]

    def _rows_kept(self, op: Op, refs: list) -> bool:
        """Whether row r of ``op``'s output is computed from row r of each argument in ``refs`` only: run
        the op on arguments whose row r holds the value r everywhere and check the output."""
        rows = {}
        for r in refs:
            lo = self.env[r.index].lo
            rows[r.index] = torch.arange(self.n, dtype=self.dtype, device=lo.device).reshape(
                self.n, *[1] * (lo.dim() - 1)).expand(lo.shape)
        try:
            with torch.no_grad():
                out = self._call(op, rows)
        except Exception:  # noqa: BLE001 — an op that will not run on these values keeps its interval
            return False
        if not isinstance(out, Tensor) or out.dim() < 2 or out.shape[0] != self.n:
            return False
        expect = torch.arange(self.n, dtype=self.dtype, device=out.device).reshape(self.n, *[1] * (out.dim() - 1))
        return bool((out == expect).all())

    def _pullback(self, op: Op, lam: Tensor, refs: list) -> list[Tensor]:
        """Per argument in ``refs``, ``Λ`` pulled back through ``op`` (its vector–Jacobian product) for
        every competitor; differentiable in ``Λ`` (the search back-propagates through it). The ops with this
        rule (moves, means, pooling) have non-negative Jacobians, so pulling back |Λ| gives the magnitudes
        of the sums that formed each multiplier: their rounding is charged (certify mode)."""
        primals = [torch.zeros_like(self.env[r.index].lo, dtype=self.dtype).requires_grad_(True) for r in refs]
        cotangents = [lam, lam.abs()] if self.certify else [lam]
        with torch.enable_grad():
            out = self._call(op, {r.index: p for r, p in zip(refs, primals)})
            pulled = [[torch.autograd.grad(out, primals, c[:, j], retain_graph=True, create_graph=c.requires_grad,
                                           allow_unused=True) for j in range(c.shape[1])] for c in cotangents]
        stacked = [[torch.stack([torch.zeros_like(primals[k]) if g[k] is None else g[k] for g in per_j], dim=1)
                    for k in range(len(refs))] for per_j in pulled]
        if self.certify:  # every multiplier entry sums at most (output elements per example) terms, then a division
            terms = lam[0, 0].numel() + 1
            for r, mag in zip(refs, stacked[1]):
                self._charge(r, mag, terms)
        return stacked[0]

    # ------------------------------------------------------------------ rules (False: use the interval)
    def _affine(self, i: int, op: Op, lam: Tensor) -> bool:
        ref = op.args[0] if len(op.args) == 1 and not op.kwargs else None
        if not hasattr(ref, "index") or not isinstance(self.env[ref.index], Bounds):
            return False
        m, value = self.graph.modules[op.target], self.env[ref.index]
        if value.lo.dim() != (4 if isinstance(m, nn.Conv2d) else self.env[i].lo.dim()) or value.lo.dim() < 2:
            return False
        if value.point:
            state = ibp.Interval(value.lo.to(self.dtype), point=True, nonneg=value.nonneg)
        else:
            state = ibp.Interval(torch.cat(self._bounds(value), dim=1), nonneg=value.nonneg)
        nu = linear._affine(self.acc, op.target, m, lam, state, self.box, self.certify, self.dtype, self.eval_dtype)
        if nu is not None:  # rows line up: Linear acts on the last dimension, Conv2d on (C, H, W)
            if self._activation(ref):
                self._pass(ref, nu)
            else:
                self._interval(nu, value)
                self._crossed(ref.index)
        return True

    def _relu(self, i: int, op: Op, lam: Tensor) -> bool:
        refs = self._tensor_refs(op)
        if len(refs) != 1 or not self._activation(refs[0]) or self.env[refs[0].index].lo.shape != self.env[i].lo.shape:
            return False
        lo, hi = self._bounds(self.env[refs[0].index])
        self._pass(refs[0], linear._relu(self.acc, lam, lo, hi, self.certify))
        return True

    def _move(self, i: int, op: Op, lam: Tensor) -> bool:
        refs = self._tensor_refs(op)
        if not refs or not all(self._activation(r) for r in refs) or not self._rows_kept(op, refs):
            return False
        for r, lam_in in zip(refs, self._pullback(op, lam, refs)):
            self._pass(r, lam_in)
        return True

    def _sum(self, i: int, op: Op, lam: Tensor) -> bool:
        if op.kind == "function" and op.target in _ADD + _SUB:
            return self._add(i, op, lam)
        refs = self._tensor_refs(op)  # a mean or average pooling of one activation
        if len(refs) != 1 or not self._activation(refs[0]) or not self._rows_kept(op, refs):
            return False
        (r,) = refs
        (lam_in,) = self._pullback(op, lam, refs)
        if self.certify:
            lo, hi = self._bounds(self.env[r.index])
            with torch.no_grad():
                mag = self._call(op, {r.index: torch.maximum(lo.abs(), hi.abs())})
            m = self.graph.modules.get(op.target) if op.kind == "module" else None
            if isinstance(m, nn.AvgPool2d):  # every output averages at most one window
                k = m.kernel_size
                terms = k[0] * k[1] if isinstance(k, tuple) else k * k
            elif op.kind == "function" and op.target is F.avg_pool2d:  # window size unknown here: every input
                terms = lo[0].numel()
            else:  # a mean: the input elements per output element
                terms = max(1, lo[0].numel() // max(1, self.env[i].lo[0].numel()))
            self._rounding(lam, mag, terms)
        self._pass(r, lam_in)
        return True

    def _add(self, i: int, op: Op, lam: Tensor) -> bool:
        if len(op.args) != 2 or op.kwargs:
            return False
        out_dim = self.env[i].lo.dim()
        passes = [hasattr(a, "index") and self._activation(a) and self.env[a.index].lo.dim() == out_dim for a in op.args]
        if not any(passes):
            return False
        signs = (1.0, -1.0 if op.target in _SUB else 1.0)
        mags = []
        for sign, arg, passed in zip(signs, op.args, passes):
            if passed:  # same rank and N rows: row r of the sum is row r of this summand
                shape = self.env[arg.index].lo.shape
                summed = _sum_to(sign * lam, shape)
                if summed.numel() != lam.numel():  # broadcast: the multiplier is a float sum, charged
                    self._charge(arg, _sum_to(lam.abs(), shape), lam.numel() // summed.numel() + 1)
                self._pass(arg, summed)
                value = self.env[arg.index]
            elif hasattr(arg, "index"):  # a parameter, a constant, or an activation not row-aligned (a batch
                value = self.env[arg.index]  # statistic): bounded by its interval here
                self._interval(sign * lam, value)
                self._crossed(arg.index)
            else:  # a Python number
                value = Bounds.exact(torch.tensor(float(arg), dtype=self.dtype, device=lam.device))
                self._interval(sign * lam, value)
            lo, hi = self._bounds(value)
            mags.append(_per_row(torch.maximum(lo.abs(), hi.abs()), self.n, lam.shape[2:])[:, 0])
        if self.certify:
            self._rounding(lam, mags[0] + mags[1], 2)
        return True

    def _rounding(self, lam: Tensor, mag: Tensor, terms: int) -> None:
        """A float forward pass of a sum of ``terms`` values with magnitudes summing to ``mag`` (N, *out)
        deviates from the real sum by at most c·mag + k·η: subtract |Λ| times that."""
        c, k = rounding.slack_coefficients(terms + 1, self.eval_dtype)
        e = rounding.round_up(rounding.round_up(mag.to(self.dtype) * c) + k * rounding.eta(self.eval_dtype))
        err = lam.abs() * e[:, None]
        self.acc.add(-err, err, 2)


def _sum_to(lam: Tensor, shape: torch.Size) -> Tensor:
    """``Λ`` (N, J, *out) summed over the dimensions along which an operand of ``shape`` (N, …, same
    rank as the output) was broadcast."""
    dims = tuple(d + 1 for d in range(1, len(shape)) if shape[d] == 1 and lam.shape[d + 1] != 1)
    return lam.sum(dim=dims, keepdim=True) if dims else lam


def _per_row(t: Tensor, n: int, shape: torch.Size) -> Tensor:
    """``t`` — rows of N examples (or 1, broadcast) at the output's rank, or a tensor without a batch
    dimension broadcast into the output — as (N, 1, *shape)."""
    if t.dim() == len(shape) + 1:
        return t.expand(n, *shape)[:, None]
    return t.expand(shape)[None, None].expand(n, 1, *shape)
