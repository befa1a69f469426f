"""The registry schema: every MLflow tag, alias and status value lidgate writes or reads.

A registered model version carries ``lid.*`` tags. The registry writes the registration tags
(what the certificate says, the sha256 that pins every artifact, the lineage); only the promotion
gate writes the decision tags (status, reasons, timestamps). Readers (the gate, the audit, the
flows) use these names and the small parsers below instead of spelling tag strings themselves.

Per-task tags are a prefix plus the task name: ``lid.tau.<task>`` is ``TAG_TAU + task``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = [
    "CHAMPION_ALIAS", "STATUSES", "STATUS_BLOCKED", "STATUS_INCOMPLETE", "STATUS_PENDING", "STATUS_PROMOTED",
    "STATUS_UNKNOWN", "TAG_GATE_INTENT", "TAG_INCIDENT", "TAG_ONNX_ARTIFACT", "TAG_ONNX_PATH", "TAG_ONNX_SHA",
    "TAG_OWNER", "TAG_RECOVERED",
    "TAG_BLOCKED_AT", "TAG_BLOCK_REASONS", "TAG_CANDIDATE_SOURCE", "TAG_CERT_ACC", "TAG_CERTIFICATION_ERROR",
    "TAG_CONFIG_SHA",
    "TAG_DATA_SHA256", "TAG_PROJECTION", "TAG_TASK", "TAG_CERT_SHA", "TAG_DATA_SHA", "TAG_FACTORY",
    "TAG_HAS_LID", "TAG_LINEAGE", "TAG_LOWER_BOUND", "TAG_MLFLOW_MODEL", "TAG_MLFLOW_MODEL_SHA", "TAG_MODEL_SHA", "TAG_PARENT",
    "TAG_PREVIOUS_CHAMPION", "TAG_PROMOTED_AT", "TAG_REGISTERED_AT", "TAG_SPEC_SHA", "TAG_STATUS", "TAG_TASKS",
    "TAG_TAU", "TAG_VALIDATION", "TAG_VALIDATION_SHA", "TAG_WEIGHTS_SHA",
    "block_reasons", "lineage", "status", "tasks",
]

#: the alias that marks the promoted model; only ``components.gate`` moves it
CHAMPION_ALIAS = "champion"

# ------------------------------------------------------------------ status values (TAG_STATUS)
STATUS_PENDING = "pending"      # registered, the gate has not decided yet
STATUS_PROMOTED = "promoted"    # the gate promoted it (it is, or was, the champion)
STATUS_BLOCKED = "blocked"      # the gate refused it; TAG_BLOCK_REASONS says why
STATUS_INCOMPLETE = "incomplete"  # the run that registered it, or the gate's promotion, died half-way
STATUS_UNKNOWN = "unknown"      # reading a version without a status tag (not a lidgate registration)
STATUSES = (STATUS_PENDING, STATUS_PROMOTED, STATUS_BLOCKED, STATUS_INCOMPLETE)

# ------------------------------------------------------------------ written at registration
TAG_STATUS = "lid.status"
TAG_TASKS = "lid.tasks"                          # comma-separated task names
TAG_HAS_LID = "lid.has_lid"                      # "true" | "false"
TAG_CERT_ACC = "lid.certified_accuracy."         # + task
TAG_LOWER_BOUND = "lid.lower_bound."             # + task
TAG_TAU = "lid.tau."                             # + task
TAG_CERT_SHA = "lid.certificate_sha256"          # sha256 of lid/lid.json
TAG_WEIGHTS_SHA = "lid.weights_sha256"
TAG_SPEC_SHA = "lid.spec_sha256"
TAG_VALIDATION_SHA = "lid.validation_sha256"
TAG_MODEL_SHA = "lid.model_sha256"               # lid_engine.fingerprint_model of the rebuilt model
TAG_DATA_SHA = "lid.cert_data_sha256."           # + task
TAG_LINEAGE = "lid.lineage"                      # comma-separated earlier champion versions, oldest first
TAG_PARENT = "lid.parent"                        # the last version of the lineage ("" without one)
TAG_FACTORY = "lid.factory"
TAG_MLFLOW_MODEL = "lid.mlflow_model"            # "pt2" | "none"
TAG_MLFLOW_MODEL_SHA = "lid.mlflow_model_sha256"  # artifacts.directory_digest of the version's source (pt2)
TAG_REGISTERED_AT = "lid.registered_at"

# ------------------------------------------------------------------ written by the pipeline (flows.tasks)
# Not lid.* tags: the registry reserves those for what it pins and the gate for what it decides.
TAG_CONFIG_SHA = "pipeline.config_sha256"        # sha256 of the configuration that produced the version
TAG_TASK = "pipeline.task"                       # the task its own LID certifies
TAG_DATA_SHA256 = "pipeline.data_sha256"         # fingerprint of the train/search/certification splits
TAG_CANDIDATE_SOURCE = "pipeline.source"         # "trained" | "submitted" | "given"
TAG_PROJECTION = "pipeline.projection"           # "true" | "false": trained with projection onto the LID
TAG_CERTIFICATION_ERROR = "pipeline.certification_error"  # why no LID was certified (registered without one)
TAG_ONNX_SHA = "pipeline.onnx_sha256"           # sha256 of the ONNX export of a promoted version
TAG_ONNX_ARTIFACT = "pipeline.onnx_artifact"     # its path in the version's MLflow run
TAG_ONNX_PATH = "pipeline.onnx_path"             # the exported file on disk (what a deployment picks up)
TAG_OWNER = "pipeline.owner"                     # JSON {"host", "pid", "started"}: the process that registered it

# ------------------------------------------------------------------ written by the gate
TAG_BLOCK_REASONS = "lid.block_reasons"          # JSON list of {"code", "detail"}
TAG_PROMOTED_AT = "lid.promoted_at"
TAG_BLOCKED_AT = "lid.blocked_at"
TAG_PREVIOUS_CHAMPION = "lid.previous_champion"
TAG_VALIDATION = "lid.validation"                # "passed" | "failed"
# A promotion is intent → alias move → commit. The status tag is written last: it is the commit.
TAG_GATE_INTENT = "lid.gate_intent"              # JSON {"previous_champion", "at"}: every check passed
TAG_RECOVERED = "lid.recovered"                  # when gate.recover finished or ended a half-done decision
TAG_INCIDENT = "lid.incident"                    # JSON: the alias found on this version outside the gate


def _items(text: str | None) -> list[str]:
    return [x for x in (text or "").split(",") if x]


def status(tags: Mapping[str, str]) -> str:
    """The version's ``lid.status``, or ``"unknown"``."""
    return tags.get(TAG_STATUS) or STATUS_UNKNOWN


def tasks(tags: Mapping[str, str]) -> list[str]:
    """The task names the version was registered with (``lid.tasks``)."""
    return _items(tags.get(TAG_TASKS))


def lineage(tags: Mapping[str, str]) -> list[str]:
    """The earlier champion versions the version must still satisfy, oldest first (``lid.lineage``)."""
    return _items(tags.get(TAG_LINEAGE))


def block_reasons(tags: Mapping[str, str]) -> list[dict]:
    """The gate's ``[{code, detail}]`` for a blocked version (``[]`` when none are recorded).

    An unreadable tag is itself reported as a reason rather than hidden.
    """
    text = tags.get(TAG_BLOCK_REASONS) or "[]"
    try:
        value = json.loads(text)
    except ValueError:
        return [{"code": "unreadable_tag", "detail": f"'{TAG_BLOCK_REASONS}' is not JSON: {text[:200]!r}"}]
    if not isinstance(value, list):
        return [{"code": "unreadable_tag", "detail": f"'{TAG_BLOCK_REASONS}' is not a JSON list"}]
    return [dict(r) if isinstance(r, Mapping) else {"code": "", "detail": str(r)} for r in value]
