"""The audit report: registered model versions and their certificates as one HTML page + JSON.

Pure rendering — records in, files out. Whoever walks the MLflow registry (and re-verifies each
version's certificates; ``flows.audit``) builds one ``VersionAudit`` per version;
``render_audit_report`` writes

``report.html``
    self-contained (no external CSS/JS; plots are base64 PNGs): header with model name, date and
    engine version; a table of every version (status, champion, re-verified ✓/✗, per task the
    certified accuracy against τ, the Clopper–Pearson lower bound and n, block reasons and
    verification failures); three plots — certified accuracy and lower bound per version for
    every task with τ; the width histograms per parameter tensor of the champion's largest LID
    member (tensors without any width listed in one line); the champion LID's checkpoint curve.
``summary.json``
    the same version list, machine-readable, with ``ok`` = every promoted version (status
    ``promoted``/``champion`` or the champion alias) was re-verified with no failing task.

Modules: ``records`` (the data and the summary), ``plots`` (matplotlib, PNG bytes), ``page``
(HTML and the files).
"""

from __future__ import annotations

from .page import render_audit_report
from .records import AUDIT_FORMAT, PROMOTED_STATUSES, TaskAudit, VersionAudit, audit_ok, is_promoted, summary_dict

__all__ = [
    "AUDIT_FORMAT",
    "PROMOTED_STATUSES",
    "TaskAudit",
    "VersionAudit",
    "audit_ok",
    "is_promoted",
    "render_audit_report",
    "summary_dict",
]
