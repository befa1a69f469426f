"""PGD with zonotope LIDs oriented by the lookahead buffer (ours; Domain-IL).

Why: in Domain-IL every task shares one 2-way head, and the move that serves task 1 and task 2
together is a diagonal one. A box that contains it contains corners that fail task 1
(cl_notes.md), so the box LIDs leave task 2 near chance. Here:

* after task 1, the head is trained on task 1's search data and the lookahead buffer (the next
  task's training data, METHOD.md §3.2), and the task-1 LID is the segment from the model to that
  head (``le.Zonotope.segment``; everything else fixed). It is certified on task 1's held-out
  examples with the linear bound, which is exact along a segment of the last layer;
* every later LID is the longest sub-segment around the current model on which task k's search
  data stays at τ_k + margin (the margins are linear along the segment, so each example is right
  on an interval of it): nested by construction, certified on task k's held-out examples;
* every later task trains inside the current segment by Adam on the segment's coefficient
  (``le.CoefficientOptimizer``: the chain rule gives its gradient, it is clamped to the range).
  Projected Adam (each parameter step projected back) crawled along the segment and stopped
  short of the task's optimum on 3 of 10 seeds.

The domain has one direction, chosen with task 2 in view: tasks 3–5 can move only along it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import lid_engine as le

from .lid_method import LidPGD
from .protocol import Task
from .training import accuracy, train_task

SUBSEGMENT_GRID = 50  # candidate ends on each side of the current model, per later LID


def last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model if isinstance(m, nn.Linear)][-1]


def head_names(model: nn.Module) -> dict[str, str]:
    """The last Linear layer's parameter names in ``model.named_parameters()`` (weight, bias)."""
    head = last_linear(model)
    return {n: f for n, p in model.named_parameters() for f, q in head.named_parameters() if p is q}


def train_head(model: nn.Module, x: Tensor, y: Tensor, recipe, *, seed: int) -> nn.Module:
    """A copy of ``model`` whose last Linear layer alone is trained on ``(x, y)`` with ``recipe``."""
    out = copy.deepcopy(model)
    train_task(out, x, y, recipe, seed=seed, optimizer=torch.optim.Adam(last_linear(out).parameters(), lr=recipe.lr))
    return out


def right_intervals(model: nn.Module, z: le.Zonotope, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per example, the coefficient interval ``[a, b]`` of the one-generator segment ``z`` on which
    it is classified right (empty: a > b). Exact when only the last layer moves: every margin is
    then linear in the coefficient, so it is known from its values at the two ends."""
    lo, hi = float(z.coeff_lower[0]), float(z.coeff_upper[0])
    ends = []
    for e in (lo, hi):
        m = copy.deepcopy(model)
        le.load_parameters_(m, z.point(torch.tensor([e], dtype=torch.float64)))
        with torch.no_grad():
            out = m.double()(x.double())
        ends.append(out.gather(1, y[:, None]) - out)  # (N, C) margins, 0 at the label
    a = torch.full((len(x),), lo, dtype=torch.float64)
    b = torch.full((len(x),), hi, dtype=torch.float64)
    m0, m1 = ends
    others = torch.ones_like(m0, dtype=torch.bool).scatter(1, y[:, None], False)
    slope = (m1 - m0) / (hi - lo) if hi > lo else torch.zeros_like(m0)
    for j in range(m0.shape[1]):  # m(ε) = m0 + (ε − lo)·slope > 0
        sel = others[:, j]
        s, base = slope[:, j], m0[:, j]
        root = lo - base / torch.where(s == 0, torch.ones_like(s), s)
        a = torch.where(sel & (s > 0), torch.maximum(a, root), a)
        b = torch.where(sel & (s < 0), torch.minimum(b, root), b)
        dead = sel & (s == 0) & (base <= 0)
        a, b = torch.where(dead, torch.full_like(a, hi + 1), a), torch.where(dead, torch.full_like(b, lo - 1), b)
    return a, b


def longest_subsegment(a: Tensor, b: Tensor, at: float, lo: float, hi: float, target: float) -> tuple[float, float]:
    """The longest ``[l, u]`` ⊆ ``[lo, hi]`` holding ``at`` on which a ``target`` fraction of the
    examples stays right (``[a_i, b_i] ⊇ [l, u]``), over a grid of candidate ends."""
    ls = torch.linspace(lo, at, SUBSEGMENT_GRID + 1, dtype=torch.float64)
    us = torch.linspace(at, hi, SUBSEGMENT_GRID + 1, dtype=torch.float64)
    ls[-1], us[0] = at, at
    right = ((a[None, None, :] <= ls[:, None, None]) & (b[None, None, :] >= us[None, :, None])).double().mean(2)
    length = (us[None, :] - ls[:, None]).masked_fill(right < target, -1.0)
    i, j = divmod(int(length.argmax()), len(us))
    if float(length[i, j]) < 0:
        return at, at
    return float(ls[i]), float(us[j])


class SegmentLidPGD(LidPGD):
    """PGD with zonotope LIDs oriented by the lookahead buffer (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.seq.scenario != "domain":
            raise ValueError("the segment LID is for Domain-IL, where every task shares the head it moves")
        self.zonotope: le.Zonotope | None = None
        self.records: dict[str, tuple[le.Zonotope, le.Certificate, float, tuple[Tensor, Tensor]]] = {}

    def optimizer(self, model: nn.Module, task: Task):
        """Task 1: plain Adam. Later tasks: Adam on the segment's coefficient (``le.CoefficientOptimizer``),
        with the recipe's learning rate; projected Adam stopped short of the task's optimum along
        the segment (cl_notes.md)."""
        if self.zonotope is None:
            return torch.optim.Adam(model.parameters(), lr=self.s.recipe.lr)
        return le.CoefficientOptimizer(model, self.zonotope, lr=self.s.recipe.lr)

    def after_task(self, model: nn.Module, task: Task, last: bool) -> None:
        if last:
            return
        acc = accuracy(model, *task.train, task=task.index)
        tau = le.tau_from_accuracy(acc, self.s.delta)
        if self.zonotope is None:
            upcoming = self.seq.tasks[task.index + 1]  # the lookahead buffer
            x = torch.cat([task.train[0], upcoming.train[0]])
            y = torch.cat([task.train[1], upcoming.train[1]])
            joint = train_head(model, x, y, self.s.recipe, seed=self.task_seed(task) + 500)
            joint_params = dict(joint.named_parameters())
            domain = le.Zonotope.segment(model, {n: joint_params[n].detach() for n in head_names(model)})
            kind = "segment"
        else:  # the longest sub-segment around the model: nested in the current one by construction
            z = self.zonotope
            at = float(z.nearest_coefficients(model)[0])
            lo, hi = float(z.coeff_lower[0]), float(z.coeff_upper[0])
            margin = min(self.s.tau_margin, max(acc - tau, 0.0) / 2)  # as the box search aims above τ
            a, b = right_intervals(model, z, *task.train)
            l, u = longest_subsegment(a, b, at, lo, hi, tau + margin)
            domain = le.Zonotope(z.centre, z.generators, torch.tensor([l], dtype=torch.float64),
                                 torch.tensor([u], dtype=torch.float64), z.residual)
            kind = "subsegment"
        cert = le.certify_box(model, domain, *task.cert, le.Spec("accuracy", tau), task=task.name, method="linear")
        self.zonotope = domain
        self.records[task.name] = (domain, cert, tau, task.cert)
        self.log.append({"task": task.name, "kind": kind, "tau": tau, "range": [float(domain.coeff_lower[0]),
                         float(domain.coeff_upper[0])], "length": segment_length(domain),
                         "certified": cert.certified_accuracy})

    def certificates(self, model: nn.Module) -> dict[str, dict]:
        """Per task, the certificate of its segment, which must hold the final model."""
        out = {}
        for name, (domain, cert, tau, data) in self.records.items():
            if not domain.contains(model):
                out[name] = None  # a protocol bug: the runner reports it as a failure
                continue
            out[name] = {"certified": cert.certified_accuracy, "lower_bound": cert.lower_bound, "n": cert.n,
                         "n_domains": cert.n_domains, "tau": tau, "width_sum": segment_length(domain),
                         "meets_tau": cert.certified_accuracy >= tau, "data": data}
        return out


def segment_length(z: le.Zonotope) -> float:
    """L1 length of a one-generator zonotope's segment: Σ|g|·(hi − lo)."""
    span = float(z.coeff_upper[0] - z.coeff_lower[0])
    return span * float(sum(g.abs().sum() for g in z.generators.values()))
