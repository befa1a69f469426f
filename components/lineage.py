"""Lineage re-verification: does a model still satisfy the certificates of earlier versions?

A model update is safe only if every earlier champion's certificate still covers it: its
parameters lie in some member of that version's LID, that member's certificate re-verifies on the
version's registered certification data, and it certifies τ for every task. The certification
flow asks this before computing a new LID, the promotion gate before moving the alias, and the
audit for every registered version — all three through ``verify_lineage`` here, so they can never
disagree about what "still certified" means.

Each earlier version is checked with ``lid_engine.verify(<its LID>, model, data=<its cert data>,
allow_update=True, recompute="containing")``: every integrity and fingerprint check of the saved
LID, membership of the parameters, and a recomputation of the member that contains them.
Failures are attributed to the task they name; a failure that names no task (the model is outside
the LID, a file was modified) counts against every task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from lid_engine import verify

from .registry import LoadedVersion, Registry

__all__ = ["LineageCheck", "TaskCheck", "check_version", "verify_lineage"]

#: version-level problems (``LineageCheck.problems``); the gate quotes them in its reasons
NOT_LOADED = "could not be loaded"
NO_LID = "registered without a LID"
LID_UNREADABLE = "its LID did not load"
NO_MODEL = "not verified, the candidate model did not load"


@dataclass(frozen=True)
class TaskCheck:
    """One task of an earlier version's LID, checked against the model.

    ``certified_accuracy``/``lower_bound``: of the member that contains the model (the certificate
    that covers it); NaN when the model lies in no member. ``problems``: empty when it holds.
    """

    task: str
    tau: float
    certified_accuracy: float
    lower_bound: float
    n: int
    member: int | None
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class LineageCheck:
    """The result for one earlier version.

    ``problems``: why it could not be checked at all (not loaded, no LID, no model); ``error``:
    ``"Type: message"`` when the verification itself raised (the gate reports it as ``gate_error``).
    ``ok`` only when every task was checked and holds.
    """

    version: str
    tasks: list[TaskCheck] = field(default_factory=list)
    member: int | None = None
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems and bool(self.tasks) and all(t.ok for t in self.tasks)

    @property
    def failures(self) -> list[str]:
        """Every problem as one line each (version-level first, then per task)."""
        out = list(self.problems) + ([f"verification raised {self.error}"] if self.error else [])
        out += [f"task '{t.task}': {p}" for t in self.tasks for p in t.problems]
        return out

    def to_dict(self) -> dict:
        """``{"version", "ok", "failures"}`` (the certification flow's summary entry)."""
        return {"version": self.version, "ok": self.ok, "failures": self.failures}


def check_version(earlier: LoadedVersion | None, model: nn.Module | None, version: str, *,
                  counter: Callable | None = None, batch_size: int | None = 2048) -> LineageCheck:
    """Check ``model`` against the LID of one earlier version (already loaded; None: it could not be).

    ``counter``: how ``verify`` counts the certified examples (``lid_engine.certify_box``'s; e.g. shards
    on a cluster), in bound passes of ``batch_size`` rows. Never raises: an exception inside ``verify`` is returned in ``LineageCheck.error``.
    """
    result = LineageCheck(version=str(version))
    if earlier is None:
        result.problems.append(NOT_LOADED)
        return result
    lid = earlier.lid
    if lid is None or earlier.lid_dir is None:
        result.problems.append(LID_UNREADABLE if earlier.has_lid else NO_LID)
        return result
    if model is None:
        result.problems.append(NO_MODEL)
        return result
    try:
        report = verify(earlier.lid_dir, model, data=earlier.cert_data, allow_update=True, recompute="containing",
                        counter=counter, batch_size=batch_size)
        bad = [c for c in report.checks if not c.ok]
        result.member = report.member
        for t, spec in lid.tasks.items():
            mine = [c for c in bad if f"'{t}'" in c.name or not any(f"'{u}'" in c.name for u in lid.tasks)]
            problems = [f"{c.name}: {c.detail}" for c in mine]
            cert = lid.certificates[report.member][t] if report.member is not None else None
            if report.ok and cert is not None and cert.certified_accuracy < spec.tau:
                problems.append(f"member {report.member} containing the model certifies "
                                f"{cert.certified_accuracy:.4f} < τ = {spec.tau:g}")
            result.tasks.append(TaskCheck(
                task=t, tau=spec.tau, member=report.member, problems=tuple(problems),
                certified_accuracy=cert.certified_accuracy if cert is not None else math.nan,
                lower_bound=cert.lower_bound if cert is not None else math.nan,
                n=lid.certificates[0][t].n,
            ))
    except Exception as exc:  # noqa: BLE001 — reported, never raised: every caller must fail closed
        result.tasks.clear()
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def verify_lineage(
    registry: Registry,
    model: nn.Module | None,
    versions: Sequence[str],
    *,
    load: Callable[[str], LoadedVersion | None] | None = None,
    counter: Callable | None = None,
    batch_size: int | None = 2048,
) -> list[LineageCheck]:
    """Check ``model`` against the LID of every version in ``versions``, in order.

    Args:
        registry: where the versions are registered.
        model: the model to check (None: reported as unverifiable for every version).
        versions: earlier versions, e.g. a candidate's lineage plus the champion.
        load: how to read a version; returns it, or None (or raises) when it cannot be read.
            Default: ``registry.load`` (strict: a modified artifact makes the version unloadable),
            released again after its check. A caller's loader keeps ownership of what it loads.
        counter, batch_size: how the certified examples are counted (see ``check_version``).

    Returns:
        One ``LineageCheck`` per version; ``all(r.ok for r in results)`` means every earlier
        certificate still holds for ``model``.
    """
    results = []
    for version in versions:
        version = str(version)
        loaded, why = None, None
        try:
            loaded = load(version) if load is not None else registry.load(version=version)
        except Exception as exc:  # noqa: BLE001 — an unreadable version fails its check, it is not skipped
            why = f"{NOT_LOADED}: {type(exc).__name__}: {exc}"
        try:
            result = check_version(loaded, model, version, counter=counter, batch_size=batch_size)
        finally:
            if load is None and loaded is not None:
                registry.release(loaded)
        if why is not None:
            result.problems = [why]
        results.append(result)
    return results
