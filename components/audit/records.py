"""Audit records: what the auditor found for each registered version, and the summary built from them.

``VersionAudit`` / ``TaskAudit`` are plain data — whoever walks the registry (``flows.audit``)
builds them; the plots and the page only read them. ``summary_dict`` is the content of
``summary.json``, with ``ok`` = every promoted version re-verified with no failing task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lid_engine import LID, __version__ as ENGINE_VERSION
from lid_engine.files import utc_now

__all__ = [
    "AUDIT_FORMAT", "PROMOTED_STATUSES", "TaskAudit", "VersionAudit", "audit_ok", "finite", "focus_record",
    "is_promoted", "json_safe", "largest_member", "member_positions", "problems", "summary_dict", "task_names",
]

AUDIT_FORMAT = "lidgate.audit/1"
#: statuses that count as "promoted" for the summary's ``ok`` flag (besides ``is_champion``)
PROMOTED_STATUSES = frozenset({"promoted", "champion"})


# ------------------------------------------------------------------------------ records
@dataclass
class TaskAudit:
    """One task's certificate of one version, as re-verified by the auditor."""

    task: str
    tau: float
    certified_accuracy: float
    lower_bound: float
    n: int
    verified: bool
    failures: list[str] = field(default_factory=list)
    #: what the task's constraint says in words ("recall of class 0 on 'golden'"), when it is one of a
    #: specification's constraints (``components.constraints``); empty otherwise
    constraint: str = ""

    @property
    def meets_tau(self) -> bool:
        return finite(self.certified_accuracy) and finite(self.tau) and self.certified_accuracy >= self.tau

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": str(self.task),
            "tau": _num(self.tau),
            "certified_accuracy": _num(self.certified_accuracy),
            "lower_bound": _num(self.lower_bound),
            "n": int(self.n),
            "verified": bool(self.verified),
            "meets_tau": self.meets_tau,
            "failures": [str(f) for f in self.failures],
            "constraint": str(self.constraint),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskAudit:
        nan = float("nan")
        return cls(
            task=d["task"], tau=_denum(d["tau"], nan), certified_accuracy=_denum(d["certified_accuracy"], nan),
            lower_bound=_denum(d["lower_bound"], nan), n=int(d["n"]), verified=bool(d["verified"]),
            failures=list(d.get("failures", [])), constraint=str(d.get("constraint", "")),
        )


@dataclass
class VersionAudit:
    """One registered model version: its status, whether its certificates re-verified, per-task numbers.

    ``status``: promoted | blocked | pending | champion | … (free text; shown as given).
    ``verified``: every certificate of this version re-verified. ``block_reasons``: ``[{code,
    detail}]``. ``lid``: the version's LID (for the width and checkpoint plots) or None. ``accuracy``:
    its plain (not certified) accuracy on each task's held-out data.
    """

    version: str
    status: str
    is_champion: bool
    created: str
    verified: bool
    tasks: list[TaskAudit] = field(default_factory=list)
    block_reasons: list[dict] = field(default_factory=list)
    lid: LID | None = None
    #: plain accuracy of this version's model on every task's held-out certification data in the
    #: registry (task → accuracy): how it does on what earlier and later versions were certified on
    accuracy: dict[str, float] = field(default_factory=dict)

    @property
    def promoted(self) -> bool:
        return is_promoted(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": str(self.version),
            "status": str(self.status),
            "is_champion": bool(self.is_champion),
            "promoted": self.promoted,
            "created": str(self.created),
            "verified": bool(self.verified),
            "tasks": [t.to_dict() for t in self.tasks],
            "block_reasons": [json_safe(dict(r)) for r in self.block_reasons],
            "lid": _lid_summary(self.lid) if self.lid is not None else None,
            "accuracy": {str(k): _num(v) for k, v in self.accuracy.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VersionAudit:
        """A record from ``summary.json`` (without the LID itself: ``lid`` is None)."""
        return cls(
            version=d["version"], status=d["status"], is_champion=bool(d["is_champion"]), created=d["created"],
            verified=bool(d["verified"]), tasks=[TaskAudit.from_dict(t) for t in d.get("tasks", [])],
            block_reasons=[dict(r) for r in d.get("block_reasons", [])], lid=None,
            accuracy={k: _denum(v, float("nan")) for k, v in d.get("accuracy", {}).items()},
        )


def is_promoted(record: VersionAudit) -> bool:
    """The champion, or a version whose status is one of ``PROMOTED_STATUSES``."""
    return bool(record.is_champion) or str(record.status).strip().lower() in PROMOTED_STATUSES


def problems(records: Sequence[VersionAudit]) -> list[str]:
    """One line per promoted version, or task of one, that did not re-verify, and for a champion the
    gate did not promote."""
    out = []
    for r in records:
        if r.is_champion and str(r.status) != "promoted":
            out.append(f"version {r.version} is the champion but the gate did not promote it (status {r.status!r})")
        if not is_promoted(r):
            continue
        if not r.verified:
            out.append(f"version {r.version} is {r.status} but its certificates did not re-verify")
        for t in r.tasks:
            if not t.verified:
                out.append(f"version {r.version} is {r.status} but task '{t.task}' did not re-verify")
    return out


def audit_ok(records: Sequence[VersionAudit]) -> bool:
    """Every promoted version re-verified, and none of its tasks failed (vacuously true without any)."""
    return not problems(records)


def summary_dict(records: Sequence[VersionAudit], *, model_name: str, generated_at: str | None = None) -> dict:
    """The content of ``summary.json``."""
    found = problems(records)
    return {
        "format": AUDIT_FORMAT,
        "model_name": str(model_name),
        "generated_at": generated_at or utc_now(),
        "engine_version": ENGINE_VERSION,
        "ok": not found,
        "problems": found,
        "n_versions": len(records),
        "champion": next((str(r.version) for r in records if r.is_champion), None),
        "versions": [r.to_dict() for r in records],
    }


def task_names(records: Sequence[VersionAudit]) -> list[str]:
    """Every task name in the records, in order of first appearance."""
    names: list[str] = []
    for r in records:
        for t in r.tasks:
            if str(t.task) not in names:
                names.append(str(t.task))
    return names


def focus_record(records: Sequence[VersionAudit]) -> tuple[VersionAudit | None, str]:
    """The record whose LID the width/checkpoint plots show: the champion's, else the newest with one."""
    for r in records:
        if r.is_champion and r.lid is not None:
            return r, "champion"
    for r in reversed(records):
        if r.lid is not None:
            return r, "no champion with an LID; showing the last version that has one"
    return None, ""


# ------------------------------------------------------------------------------ LID facts
def member_positions(lid: LID) -> tuple[list[float], str]:
    """x positions of the members on the checkpoint curve, and the axis label."""
    cfg = lid.search_config or {}
    its = cfg.get("checkpoint_iterations")
    idx = cfg.get("member_indices")
    m = len(lid.members)
    if isinstance(its, list) and all(finite(i) for i in its):
        if isinstance(idx, list) and len(idx) == m and all(isinstance(i, int) and 0 <= i < len(its) for i in idx):
            return [float(its[i]) for i in idx], "search iteration of the checkpoint"
        if len(its) == m:
            return [float(i) for i in its], "search iteration of the checkpoint"
    return [float(i) for i in range(m)], "LID member index"


def largest_member(lid: LID) -> int:
    """The member with the largest (finite) width sum."""
    sums = lid.width_sum()
    return int(max(range(len(sums)), key=lambda i: (sums[i] if finite(sums[i]) else -math.inf)))


def _lid_summary(lid: LID) -> dict[str, Any]:
    iters, xlabel = member_positions(lid)
    sums = lid.width_sum()
    members = []
    for i, certs in enumerate(lid.certificates):
        members.append({
            "index": i,
            "x": iters[i],
            "width_sum": _num(sums[i]),
            "certified_accuracy": {t: _num(c.certified_accuracy) for t, c in certs.items()},
            "lower_bound": {t: _num(c.lower_bound) for t, c in certs.items()},
        })
    return {
        "model_sha256": lid.model_sha256,
        "engine_version": lid.engine_version,
        "n_members": len(lid.members),
        "x_axis": xlabel,
        "largest_member": int(np.argmax(sums)) if sums else None,
        "tasks": {t: {"kind": s.kind, "tau": _num(s.tau)} for t, s in lid.tasks.items()},
        "members": members,
    }


# ------------------------------------------------------------------------------ numbers and JSON
def finite(v) -> bool:
    """A real, finite number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _num(v) -> float | None:
    """JSON has no NaN/inf: non-finite or missing numbers become null."""
    return float(v) if finite(v) else None


def _denum(v, default: float) -> float:
    return float(v) if v is not None else default


def json_safe(obj):
    """``obj`` with non-finite floats as None and anything unknown as its ``str``."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return str(obj)
