"""A configuration's specification as the constraints of one LID.

``spec`` says what must hold for every model in the LID: the overall metric ≥ τ and, optionally,
the recall of chosen classes ≥ τ_k (``spec.recall``) and the worst group's accuracy ≥ τ_g
(``spec.worst_group``, over the groups of the data's group column). Each becomes one *task* of the
engine: its own constraint with its own multiplier in the search, its own certificate, its own
certification data, registry tags, gate check, ``verify`` line and audit row. A recall constraint is
the accuracy on the examples of its class; "worst group ≥ τ_g" is "every group ≥ τ_g", one task per
group. No engine code knows about recall or groups: these are accuracies on subsets, which the engine
already bounds soundly.

Task names: the data task (``golden``) for the metric, ``golden.recall.0`` and
``golden.group.<name>`` for the others. The LID records what each task means
(``search_config["pipeline"]["constraints"]``), so reports can say "recall of class 0" rather than a
task name.

Confidence: the population claims of the K constraints hold *together* with probability ≥
``spec.confidence`` when each is certified at ``1 − (1 − confidence) / K`` (a union bound); each
certificate records the confidence it was certified at.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from components.config import SpecSection
    from components.data import DataSplits

__all__ = ["Constraint", "ConstraintError", "constraint_cert_data", "constraint_records", "describe", "joint_statement",
           "joint_confidence", "spec_constraints", "thresholds"]

Pair = tuple[Tensor, Tensor]
KINDS = ("metric", "recall", "group")


class ConstraintError(ValueError):
    """A constraint of the specification cannot be certified on this data (the message says which and why)."""


@dataclass(frozen=True)
class Constraint:
    """One constraint of a specification, as one task of the LID.

    Attributes:
        task: the engine task name (certificate, registry tags, certification data file).
        kind: ``"metric"`` (the spec's metric on the whole task), ``"recall"`` or ``"group"``.
        base: the data task it belongs to.
        target: the class id (recall) or group name (group); None for the metric.
        metric: the engine's metric on the subset: the spec's metric, or ``"accuracy"``.
        search, certification: the rows of the task's search and certification splits it is about.
    """

    task: str
    kind: str
    base: str
    target: str | None
    metric: str
    search: Pair
    certification: Pair

    def describe(self) -> str:
        """What the constraint says, in words: "recall of class 0", "accuracy of group 'short'"."""
        return describe(self.record())

    def record(self, tau: float | None = None) -> dict[str, Any]:
        """JSON-able record (kept in the LID's search configuration)."""
        out: dict[str, Any] = {"task": self.task, "kind": self.kind, "base": self.base, "target": self.target,
                               "metric": self.metric}
        if tau is not None:
            out["tau"] = float(tau)
        return out


def spec_constraints(spec: SpecSection, data: DataSplits) -> tuple[list[Constraint], list[str]]:
    """The constraints ``spec`` puts on ``data``'s task, and notes on configured ones that do not apply.

    A recall constraint whose class has no example in the task's search or certification split, and a
    worst-group constraint on data without a group column, do not apply to that task: the note says so
    (the pipeline records it with the certification).

    Raises:
        ConstraintError: a group with fewer than ``spec.worst_group.min_examples`` search or
            certification examples (its certificate would say little), group names that collide, or a
            recall or group constraint on a streamed certification set.
    """
    task = data.task
    if data.streamed and (spec.recall or spec.worst_group is not None):
        raise ConstraintError(f"task '{task}': spec.recall and spec.worst_group select rows of the certification set "
                              "in memory, and this one is streamed (certification.memory_mb); remove one or the other")
    out = [Constraint(task, "metric", task, None, spec.metric, data.search, data.certification)]
    notes: list[str] = []
    for r in spec.recall:
        search, cert = _rows(data.search, data.search[1] == r.cls), _rows(data.certification,
                                                                           data.certification[1] == r.cls)
        if len(search[1]) == 0 or len(cert[1]) == 0:
            notes.append(f"spec.recall: class {r.cls} has no example in the "
                         f"{'search' if len(search[1]) == 0 else 'certification'} split of task '{task}'; its recall "
                         "constraint does not apply to this task")
            continue
        out.append(Constraint(f"{task}.recall.{r.cls}", "recall", task, str(r.cls), "accuracy", search, cert))
    if spec.worst_group is not None:
        if data.groups is None:
            notes.append(f"spec.worst_group: task '{task}' has no group column (data.group, or a loader's 'group'); "
                         "the worst-group constraint does not apply to this task")
        else:
            out += _group_constraints(task, data, spec.worst_group.min_examples)
    return out, notes


def _group_constraints(task: str, data: DataSplits, min_examples: int) -> list[Constraint]:
    assert data.groups is not None
    names = sorted(set(data.groups["search"].tolist()) | set(data.groups["certification"].tolist()))
    out, used = [], {}
    for g in names:
        safe = re.sub(r"[^A-Za-z0-9_-]", "-", g)[:60] or "-"
        if safe in used:
            raise ConstraintError(f"spec.worst_group: groups {used[safe]!r} and {g!r} of task '{task}' have the same "
                                  f"task name '{task}.group.{safe}'; expected group names that differ in letters, "
                                  "digits, '_' or '-'")
        used[safe] = g
        search = _rows(data.search, torch.from_numpy(data.groups["search"] == g))
        cert = _rows(data.certification, torch.from_numpy(data.groups["certification"] == g))
        for split, (_, y) in (("search", search), ("certification", cert)):
            if len(y) < min_examples:
                raise ConstraintError(
                    f"spec.worst_group: group {g!r} of task '{task}' has {len(y)} {split} example(s), fewer than "
                    f"spec.worst_group.min_examples = {min_examples}; merge small groups or lower min_examples")
        out.append(Constraint(f"{task}.group.{safe}", "group", task, g, "accuracy", search, cert))
    return out


def _rows(pair: Pair, keep: Tensor) -> Pair:
    x, y = pair
    return x[keep], y[keep]


def thresholds(spec: SpecSection, model: nn.Module, constraints: list[Constraint],
               search_metric: float | None) -> dict[str, float]:
    """τ of every constraint: fixed, or from the model's own metric on the constraint's search rows.

    Raises:
        ValueError: a relative threshold without the metric it is computed from.
    """
    import lid_engine as le

    out: dict[str, float] = {}
    by_class = {str(r.cls): r for r in spec.recall}
    for c in constraints:
        if c.kind == "metric":
            out[c.task] = spec.threshold(search_metric)
            continue
        own = le.accuracy(model, *c.search)
        if c.kind == "recall":
            out[c.task] = by_class[str(c.target)].threshold(own)
        else:
            assert spec.worst_group is not None
            out[c.task] = spec.worst_group.threshold(own)
    return out


def joint_confidence(confidence: float, n_constraints: int) -> float:
    """The confidence each of ``n_constraints`` certificates needs so that all hold together with
    probability ≥ ``confidence`` (union bound)."""
    return 1.0 - (1.0 - float(confidence)) / max(int(n_constraints), 1)


def constraint_records(search_config: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """task → record of what it means, from a LID's ``search_config`` (empty for LIDs without constraints)."""
    pipeline = (search_config or {}).get("pipeline") or {}
    records = pipeline.get("constraints") if isinstance(pipeline, Mapping) else None
    if not isinstance(records, list):
        return {}
    return {str(r["task"]): dict(r) for r in records if isinstance(r, Mapping) and "task" in r}


def describe(record: Mapping[str, Any] | None, task: str | None = None) -> str:
    """A constraint in words ("recall of class 0 on 'golden'"); the task name when there is no record."""
    if not record:
        return f"task '{task}'" if task else "task"
    base, kind, target = record.get("base"), record.get("kind"), record.get("target")
    metric = str(record.get("metric", "accuracy")).replace("_", " ")
    if kind == "recall":
        return f"recall of class {target} on '{base}'"
    if kind == "group":
        return f"accuracy of group '{target}' of '{base}'"
    return f"{metric} on '{base}'"


def joint_statement(lid: Any) -> str | None:
    """The specification's constraints in words and their joint confidence, for a LID made from a
    configuration with several constraints (None for a LID of one task or one made outside the pipeline)."""
    records = constraint_records(lid.search_config)
    if len(records) < 2:
        return None
    pipeline = lid.search_config.get("pipeline") or {}
    parts = [f"{describe(records[t])} ≥ {lid.tasks[t].tau:.4f} (task '{t}')" for t in lid.tasks if t in records]
    text = f"The specification has {len(parts)} constraints, each certified on its own rows: " + "; ".join(parts) + "."
    if isinstance(pipeline.get("confidence"), (int, float)):
        text += (f" Each population claim is made at confidence {lid.confidence:.6g}, so all {len(parts)} hold together "
                 f"with probability ≥ {pipeline['confidence']:g} (union bound).")
    return text


def constraint_cert_data(spec: SpecSection, data: DataSplits, tasks: Any = None) -> dict[str, Pair]:
    """task → certification data of every constraint (of those in ``tasks`` when given: a LID's tasks).

    Falls back to the task's own data alone when the constraints cannot be built (the certification
    then failed and no LID was issued, so nothing else is certified)."""
    try:
        cons, _ = spec_constraints(spec, data)
    except ConstraintError:
        return {data.task: data.certification}
    out = {c.task: c.certification for c in cons}
    if tasks is not None:
        out = {t: out[t] for t in tasks if t in out}
    return out
