"""Audit: re-verify the certificate of every registered version and write an HTML report with plots.

For each version: its own LID is re-verified on its registered certification data against its own
weights (``allow_update=False``, every member recomputed), and each earlier LID in its lineage is
re-verified with the version's weights inside it (``allow_update=True``, recomputing the member that
contains them — the certificate that covers this version). Nothing is trusted from tags except the status.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger


def build_records(registry, trusted_keys=None) -> list:
    from components import tags
    from components.audit import TaskAudit, VersionAudit
    from components.constraints import constraint_records, describe
    from components.lineage import verify_lineage
    from lid_engine import verify

    champion = registry.champion()
    records = []
    cache: dict[str, object] = {}

    def load(version: str):
        if version not in cache:
            cache[version] = registry.load(version=version)
        return cache[version]

    for info in registry.history():
        version = str(info.version)
        status, reasons = tags.status(info.tags), tags.block_reasons(info.tags) + _incidents(info.tags)
        try:
            loaded = load(version)
        except Exception as exc:  # an unreadable or tampered version is reported, never skipped
            records.append(VersionAudit(version=version, status=status, is_champion=version == champion,
                                        created=str(info.created), verified=False, tasks=[],
                                        block_reasons=reasons + [{"code": "load_failed", "detail": str(exc)}],
                                        lid=None))
            continue
        tasks = []
        if loaded.lid is not None:
            report = verify(loaded.lid_dir, loaded.model, data=loaded.cert_data)
            failures = [f"{c.name}: {c.detail}" for c in report.failures]
            records_of = constraint_records(loaded.lid.search_config)
            for task_name, spec in loaded.lid.tasks.items():
                tasks.append(TaskAudit(task=task_name, tau=spec.tau, certified_accuracy=loaded.lid.certified_accuracy(task_name),
                                       lower_bound=loaded.lid.lower_bound(task_name),
                                       n=loaded.lid.certificates[0][task_name].n, verified=report.ok, failures=failures,
                                       constraint=describe(records_of[task_name]) if task_name in records_of else ""))
        for earlier in verify_lineage(registry, loaded.model, loaded.lineage, load=load):
            where = f"LID of v{earlier.version}"
            try:
                described = constraint_records(load(earlier.version).lid.search_config) if earlier.tasks else {}
            except Exception:  # noqa: BLE001 — the lineage check above already reports a version that does not load
                described = {}
            for t in earlier.tasks:
                tasks.append(TaskAudit(task=f"{t.task} ({where})", tau=t.tau, certified_accuracy=t.certified_accuracy,
                                       lower_bound=t.lower_bound, n=t.n, verified=t.ok, failures=list(t.problems),
                                       constraint=describe(described[t.task]) if t.task in described else ""))
            if not earlier.tasks:  # the earlier version could not be checked at all: fail closed, visibly
                tasks.append(TaskAudit(task=where, tau=float("nan"), certified_accuracy=float("nan"),
                                       lower_bound=float("nan"), n=0, verified=False, failures=earlier.failures))
        findings = _onnx_problems(registry, info, loaded.directory) + _decision_problems(info.tags)
        if trusted_keys is not None and loaded.lid is not None:
            from components.gate import signature_problem

            problem = signature_problem(registry, loaded, trusted_keys)
            if problem is not None:
                findings.append({"code": "signature_invalid", "detail": problem})
        verified = bool(tasks) and all(t.verified for t in tasks) and not findings
        records.append(VersionAudit(version=version, status=status, is_champion=version == champion,
                                    created=str(info.created), verified=verified, tasks=tasks,
                                    block_reasons=reasons + findings, lid=loaded.lid))
    _heldout_accuracy(records, cache)
    for loaded in cache.values():
        registry.release(loaded)
    return records


def _onnx_problems(registry, info, directory) -> list[dict]:
    """The version's ONNX export, in its MLflow run and on disk, against the sha256 recorded when it
    was exported (consumers deploy these bytes, so a swapped file fails the audit)."""
    from components import artifacts, tags
    from lid_engine.files import file_sha256

    expected = info.tags.get(tags.TAG_ONNX_SHA)
    if not expected:
        return []
    found = []
    copies = [("MLflow run", info.tags.get(tags.TAG_ONNX_ARTIFACT)), ("disk", info.tags.get(tags.TAG_ONNX_PATH))]
    for where, ref in copies:
        if not ref:
            continue
        try:
            path = (artifacts.download(registry.tracking_uri, info.run_id, ref, Path(directory) / "onnx-check")
                    if where == "MLflow run" else Path(ref))
            if where == "disk" and not path.exists():
                continue  # moved away after export: nothing on disk to vouch for
            actual = file_sha256(path)
        except Exception as exc:  # noqa: BLE001 — unreadable is a finding, not a crash
            found.append({"code": "onnx_unreadable", "detail": f"ONNX export ({where}) {ref}: {exc}"})
            continue
        if actual != expected:
            found.append({"code": "onnx_tampered", "detail": f"ONNX export ({where}) {ref} hashes to {actual[:16]}…, "
                                                             f"exported as {expected[:16]}…"})
    return found


def _decision_problems(version_tags: dict) -> list[dict]:
    """A ``promoted`` status without the gate's decision record next to it (``lid.promoted_at``, which
    the gate writes before the status): a status set by hand."""
    from components import tags

    if tags.status(version_tags) != tags.STATUS_PROMOTED or version_tags.get(tags.TAG_PROMOTED_AT):
        return []
    return [{"code": "decision_missing", "detail": "the version is tagged promoted but carries no gate decision "
                                                   "(no lid.promoted_at): the status was set outside the gate"}]


def _incidents(version_tags: dict) -> list[dict]:
    """What ``components.gate.recover`` found on a version, as reasons the report shows."""
    from components import tags

    incident = version_tags.get(tags.TAG_INCIDENT)
    if not incident:
        return []
    try:
        found = json.loads(incident)
        moved = found.get("moved_back_to")
        detail = (f"the champion alias was found here (status {found.get('status')!r}) without a gate decision; "
                  f"moved back to {'v' + str(moved) if moved else 'no champion'} at {version_tags.get(tags.TAG_RECOVERED)}")
    except (ValueError, AttributeError):
        detail = f"unreadable incident record: {incident[:200]!r}"
    return [{"code": "alias_incident", "detail": detail}]


def _heldout_accuracy(records: list, cache: dict) -> None:
    """Fill each record's ``accuracy``: its model on every task's held-out data in the registry."""
    from lid_engine import accuracy

    data: dict[str, tuple] = {}
    for loaded in cache.values():
        for task, xy in loaded.cert_data.items():
            data.setdefault(task, xy)
    for record in records:
        loaded = cache.get(record.version)
        if loaded is None or loaded.model is None:
            continue
        for task, xy in data.items():
            try:  # (x, y), or a stream of stored data larger than the registry's stream_mb
                record.accuracy[task] = accuracy(loaded.model, *(xy if isinstance(xy, tuple) else (xy,)))
            except Exception:  # noqa: BLE001 — data of another shape (a different model family): not comparable
                continue


def write_audit(settings, out_dir: str | Path | None = None, trusted_keys=None) -> dict:
    """Re-verify every registered version of ``settings.model_name`` and write the HTML report and JSON summary.

    ``trusted_keys``: Ed25519 public keys; when given, every certificate's signature is checked too.

    Returns:
        ``{"report", "summary", "ok", "versions", "recovered", "records"}`` (``ok``: every promoted
        version verified; ``recovered``: what ``components.gate.recover`` finished or undid first:
        half-done promotions, runs that died, a champion alias moved outside the gate).
    """
    from components.audit import render_audit_report
    from flows.settings import open_registry

    from components.gate import recover

    registry = open_registry(settings)
    try:
        recovered = recover(registry, move_alias=True)
    except Exception as exc:  # noqa: BLE001 — the audit still runs and says what could not be settled
        recovered = [{"kind": "recover_failed", "version": None, "run_id": "-", "at": "",
                      "detail": f"{type(exc).__name__}: {exc}"}]
    records = build_records(registry, trusted_keys)
    out = Path(out_dir) if out_dir else settings.audit_dir
    html, summary_path = render_audit_report(records, out, model_name=settings.model_name)
    summary = json.loads(Path(summary_path).read_text())
    return {"report": str(html), "summary": str(summary_path), "ok": summary.get("ok"), "versions": len(records),
            "recovered": recovered, "records": records}


@flow(name="audit")
def audit_flow(config: str | None = None, model_name: str | None = None, out_dir: str | None = None) -> dict:
    """Re-verify every registered version of the configuration's model (or ``model_name``); returns the
    summary and the report paths."""
    from flows.settings import settings_for

    if config is not None:
        from flows.tasks import load_configuration

        loaded = load_configuration(config)
        settings = settings_for(loaded)
        keys = configured_keys(loaded)
    else:
        settings, keys = settings_for(model_name=model_name), None
    result = write_audit(settings, out_dir, keys)
    get_run_logger().info("audit of %d versions written to %s", result["versions"], result["report"])
    return {k: v for k, v in result.items() if k != "records"}


def configured_keys(config) -> list | None:
    """The configuration's ``signing.public_keys``, loaded (None when it lists none)."""
    from components.signing import load_public_keys

    return load_public_keys(config.signing.public_keys) or None
