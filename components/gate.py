"""The promotion gate: the ONLY code path that moves the ``champion`` alias.

``promote(registry, version, validation_passed=...)`` promotes a registered version only if

1. the data validation passed (``validation_failed``);
2. the version's artifacts are intact: weights, spec, ``lid.json``, certification data and the
   rebuilt model match the fingerprints recorded at registration (``artifact_tampered``);
3. with a champion: the candidate's parameters lie inside the champion's LID (``outside_champion_lid``),
   and the candidate was certified against that champion: the last version of its lineage is the
   current champion (``stale_champion``: another version was promoted while it trained; promotion
   is a compare-and-set on the champion it was built on);
4. every earlier certificate still holds for this exact model: for the champion, every version of
   the champion's lineage and of the candidate's (every former champion stays in the chain),
   ``verify(<its LID>, candidate, data=<its cert data>, allow_update=True)``
   passes and the member containing the model certifies τ (``earlier_certificate_failed``; the
   check is ``components.lineage.verify_lineage``, shared with the certification flow and the audit);
5. the candidate's own certificate verifies (``new_certificate_failed``) and meets τ on every task
   (``below_tau``); a candidate registered without a LID is blocked (``no_certificate``).

Every check runs and every failure is collected. Writes happen in the order decide → intent tag →
commit (the status tags, ``promoted`` last) → compare-and-set move of the alias → intent cleared, so
the alias never points at a version whose promotion is not recorded. Fail closed: any exception
(``gate_error``) blocks and the alias stays where it was; a champion that changed meanwhile blocks
(``stale_champion``); a commit that cannot be moved is overwritten as blocked. A crash between
two writes is settled by ``recover`` (the next run, the watch or the audit).

Versions are read with ``Registry.inspect`` (every integrity problem listed, none raised) and the
alias is moved with ``Registry.move_champion``, which nothing else may call. Tag names and status
values: ``components.tags``.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lid_engine import verify
from lid_engine.files import utc_now

from . import tags as tg
from .constraints import constraint_records, describe
from .failpoints import failpoint
from .lineage import LineageCheck, verify_lineage
from .owner import owner_alive
from .registry import RUN_OWNER_TAG, LoadedVersion, Registry, RegistryError

__all__ = ["CODES", "SIGNATURE_RECORD", "GateDecision", "Reason", "promote", "recover", "signature_problem"]

CODES = (
    "validation_failed",
    "artifact_tampered",
    "outside_champion_lid",
    "earlier_certificate_failed",
    "stale_champion",
    "new_certificate_failed",
    "below_tau",
    "no_certificate",
    "signature_invalid",
    "gate_error",
)

#: where a version's signed certificate (a DSSE envelope, ``components.signing``) is kept in its run
SIGNATURE_RECORD = "signature/certificate.dsse.json"

DETAIL_LIMIT = 600       # characters per reason detail in the tag
TAG_VALUE_LIMIT = 5000   # MLflow caps model-version tag values (5000 on older stores; 100k on 3.x SQL)


@dataclass
class Reason:
    code: str     # machine-readable, one of CODES
    detail: str   # for humans

    def to_dict(self) -> dict:
        return {"code": self.code, "detail": self.detail}


@dataclass
class GateDecision:
    version: str
    promoted: bool
    reasons: list[Reason]
    champion_before: str | None
    champion_after: str | None
    checks: list[dict] = field(default_factory=list)
    decided_at: str = ""

    @property
    def codes(self) -> list[str]:
        return [r.code for r in self.reasons]

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "promoted": self.promoted,
            "reasons": [r.to_dict() for r in self.reasons],
            "champion_before": self.champion_before,
            "champion_after": self.champion_after,
            "checks": list(self.checks),
            "decided_at": self.decided_at,
        }


def _v(version: str | None) -> str:
    return f"version {version}" if version else "no champion"


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 15] + "… [truncated]"


def reasons_tag(reasons: list[Reason], limit: int = TAG_VALUE_LIMIT) -> str:
    """JSON list of {code, detail} that fits MLflow's tag value limit (details truncated, then dropped)."""
    for per_detail in (DETAIL_LIMIT, 200, 60, 0):
        items = [{"code": r.code, "detail": _clip(r.detail, per_detail) if per_detail else ""} for r in reasons]
        text = json.dumps(items, ensure_ascii=False)
        if len(text) <= limit:
            return text
    # still too long: keep the distinct codes only
    items = [{"code": c, "detail": ""} for c in dict.fromkeys(r.code for r in reasons)]
    return json.dumps(items)[:limit]


class _Evaluation:
    """Collects checks and reasons; every step is isolated so one failure never hides another."""

    def __init__(self, decision: GateDecision):
        self.decision = decision
        self._loaded: dict[str, LoadedVersion | None] = {}

    def check(self, name: str, ok: bool, detail: str = "", **extra) -> bool:
        self.decision.checks.append({"check": name, "ok": bool(ok), "detail": detail, **extra})
        return bool(ok)

    def fail(self, code: str, detail: str) -> None:
        self.decision.reasons.append(Reason(code, detail))

    def error(self, step: str, exc: BaseException) -> None:
        self.check(step, False, _err(exc))
        self.fail("gate_error", f"{step}: {_err(exc)}")

    def load(self, registry: Registry, version: str, role: str) -> LoadedVersion | None:
        """Lenient load (every integrity problem reported as ``artifact_tampered``), cached per version."""
        if version in self._loaded:
            return self._loaded[version]
        lv = None
        try:
            lv = registry.inspect(version=version)
        except Exception as exc:  # noqa: BLE001 — missing version, store unreachable, ...
            self.error(f"load version {version} ({role})", exc)
        if lv is not None:
            ok = not lv.problems
            detail = "artifacts match their registered fingerprints" if ok else \
                "; ".join(f"{a}: {d}" for a, d in lv.problems)
            self.check(f"artifacts of version {version} ({role})", ok, detail, version=version)
            if not ok:
                self.fail("artifact_tampered", f"version {version} ({role}): {detail}")
        self._loaded[version] = lv
        return lv


    def release(self, registry: Registry) -> None:
        for lv in self._loaded.values():
            if lv is not None:
                try:
                    registry.release(lv)
                except Exception:  # noqa: BLE001 — disk clean-up never changes a decision
                    pass


def _failing(report) -> list:
    return [c for c in report.checks if not c.ok]


def _evaluate(ev: _Evaluation, registry: Registry, version: str, validation_passed, validation_summary,
              trusted_keys: Sequence | None = None) -> None:
    d = ev.decision

    # (1) validation ------------------------------------------------------------------------------
    ok = validation_passed is True or (type(validation_passed).__name__ == "bool_" and bool(validation_passed))
    summary = "" if validation_summary is None else _clip(json.dumps(validation_summary, default=str), 1000)
    ev.check("validation", ok, summary or ("passed" if ok else f"validation_passed={validation_passed!r}"))
    if not ok:
        ev.fail("validation_failed", "data validation did not pass" + (f": {summary}" if summary else ""))

    # champion ------------------------------------------------------------------------------------
    champion = None
    try:
        champion = d.champion_before = registry.champion()
        ev.check("champion", True, f"current champion: {champion}" if champion else "no champion yet")
    except Exception as exc:  # noqa: BLE001
        ev.error("read champion", exc)
        champion_known = False
    else:
        champion_known = True

    # (2) candidate artifacts ---------------------------------------------------------------------
    cand = ev.load(registry, version, "candidate")
    model = None if cand is None else cand.model
    if cand is not None and model is None:
        ev.check("candidate model", False, "the model could not be rebuilt; model checks skipped")

    # (5) the candidate's own certificate ---------------------------------------------------------
    if cand is not None:
        try:
            _check_new_certificate(ev, cand)
        except Exception as exc:  # noqa: BLE001
            ev.error("new certificate", exc)

    # (5b) the certificate's signature -------------------------------------------------------------
    if trusted_keys is not None and cand is not None and cand.lid is not None:
        try:
            _check_signature(ev, registry, cand, trusted_keys)
        except Exception as exc:  # noqa: BLE001
            ev.error("signature", exc)

    # (3) inside the champion's LID ---------------------------------------------------------------
    champ = None
    if champion_known and champion is not None:
        champ = ev.load(registry, champion, "champion")
        try:
            if champ is None:
                pass  # gate_error recorded by load
            elif champ.lid is None:
                ev.check("inside champion LID", False, f"champion {champion} has no usable LID")
                ev.fail("earlier_certificate_failed", f"version {champion} (champion): its LID did not load")
            elif model is None:
                ev.check("inside champion LID", False, "not checked: the candidate model did not load")
            else:
                idx = champ.lid.member_index(model)
                ev.check("inside champion LID", idx is not None,
                         f"inside member {idx} of version {champion}'s LID" if idx is not None else
                         f"the parameters lie in none of the {len(champ.lid)} members of version {champion}'s LID",
                         version=champion)
                if idx is None:
                    ev.fail("outside_champion_lid",
                            f"the candidate's parameters lie outside every member of champion {champion}'s LID")
        except Exception as exc:  # noqa: BLE001
            ev.error("inside champion LID", exc)

    # (3b) certified against the champion it would replace ---------------------------------------
    if champion_known and cand is not None:
        built_on = cand.lineage[-1] if cand.lineage else None
        ev.check("built on the current champion", built_on == champion,
                 f"built on {_v(built_on)}; the champion is {_v(champion)}")
        if built_on != champion:
            ev.fail("stale_champion", f"the candidate was trained and certified against {_v(built_on)}, but the "
                                      f"champion is now {_v(champion)}; retrain or re-certify it against the champion")

    # (4) every earlier certificate on this exact model -------------------------------------------
    earlier: list[str] = []
    chain = (champ.lineage if champ is not None else []) + (cand.lineage if cand is not None else [])
    for v in chain + ([champion] if champion else []):
        if v not in earlier and v != version:
            earlier.append(v)
    roles = {v: "champion" if v == champion else "lineage" for v in earlier}
    try:
        results = verify_lineage(registry, model, earlier, load=lambda v: ev.load(registry, v, roles[v]))
    except Exception as exc:  # noqa: BLE001
        ev.error("earlier certificates", exc)
    else:
        for result in results:
            _record_earlier(ev, result, roles[result.version])


def _check_new_certificate(ev: _Evaluation, cand: LoadedVersion) -> None:
    v = cand.version
    if not cand.has_lid:
        why = cand.tags.get(tg.TAG_CERTIFICATION_ERROR)  # what the certification step said, if it said anything
        ev.check("new certificate", False, "registered without a LID")
        ev.fail("no_certificate", f"version {v} was registered without a LID certificate"
                + (f" (certification: {why})" if why else ""))
        return
    if cand.lid is None or cand.lid_dir is None:
        ev.check("new certificate", False, "the LID did not load")
        ev.fail("new_certificate_failed", f"version {v}: its LID did not load")
        return
    if cand.model is None:
        ev.check("new certificate", False, "not verified: the candidate model did not load")
        ev.fail("new_certificate_failed", f"version {v}: not verified, the model did not load")
    else:
        report = verify(cand.lid_dir, cand.model, data=cand.cert_data, allow_update=False)
        bad = _failing(report)
        ev.check("new certificate", report.ok, "verified" if report.ok else
                 "; ".join(f"{c.name}: {c.detail}" for c in bad), version=v)
        if not report.ok:
            ev.fail("new_certificate_failed",
                    f"version {v}: " + "; ".join(f"{c.name}: {c.detail}" for c in bad))
    lid = cand.lid
    records = constraint_records(lid.search_config)
    for t, spec in lid.tasks.items():
        acc, lb = lid.certified_accuracy(t), lid.lower_bound(t)
        ok = acc >= spec.tau and lid.meets_spec(t)
        what = f" ({describe(records[t])})" if t in records else ""
        ev.check(f"tau '{t}'", ok, f"certified {spec.kind} {acc:.4f} vs τ = {spec.tau:g} (lower bound {lb:.4f}){what}",
                 version=v, task=t)
        if not ok:
            ev.fail("below_tau", f"version {v}, task '{t}'{what}: certified {spec.kind} {acc:.4f} < τ = {spec.tau:g}")
        # the tags shown to people must say what the certificate says
        for tag, value in ((tg.TAG_CERT_ACC + t, acc), (tg.TAG_LOWER_BOUND + t, lb), (tg.TAG_TAU + t, spec.tau)):
            recorded = cand.tags.get(tag)
            try:
                same = recorded is not None and float(recorded) == float(value)
            except ValueError:
                same = False
            if not same:
                ev.check(f"tag {tag}", False, f"tag says {recorded!r}, the certificate {value!r}", version=v)
                ev.fail("artifact_tampered", f"version {v}: tag '{tag}' = {recorded!r} but the certificate says {value!r}")


def signature_problem(registry: Registry, version: LoadedVersion, trusted_keys: Sequence) -> str | None:
    """Why the version's certificate signature cannot be trusted, or None: the DSSE envelope in its
    run must verify with one of ``trusted_keys`` and its statement must name exactly this version's
    model, certificate and certification data. Shared by the gate and the audit."""
    from lid_engine import data_fingerprint

    from .signing import SignatureError, signed_mismatch, subject_digests, verify_envelope

    try:
        envelope = registry.read_record(version.version, SIGNATURE_RECORD)
        if envelope is None:
            raise SignatureError("the certificate is not signed (no signature in the version's run)")
        signed = subject_digests(verify_envelope(envelope, trusted_keys))
    except (SignatureError, RegistryError) as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 — anything unexpected is a failed check, never a pass
        return f"the signature could not be checked: {type(exc).__name__}: {exc}"
    expected = {"model": version.tags.get(tg.TAG_MODEL_SHA), "lid/lid.json": version.tags.get(tg.TAG_CERT_SHA),
                **{f"cert_data/{t}": data_fingerprint(data) for t, data in (version.cert_data or {}).items()}}
    return signed_mismatch(signed, expected)


def _check_signature(ev: _Evaluation, registry: Registry, cand: LoadedVersion, trusted_keys: Sequence) -> None:
    problem = signature_problem(registry, cand, trusted_keys)
    ev.check("signature", problem is None, problem or "signed by a trusted key over this version's artifacts")
    if problem is not None:
        ev.fail("signature_invalid", problem)


def _record_earlier(ev: _Evaluation, r: LineageCheck, role: str) -> None:
    """Turn one lineage result into checks and ``earlier_certificate_failed`` / ``gate_error`` reasons."""
    v = r.version
    if r.error is not None:
        ev.check(f"earlier certificate of version {v}", False, r.error)
        ev.fail("gate_error", f"earlier certificate of version {v}: {r.error}")
        return
    if r.problems:
        ev.check(f"earlier certificate of version {v}", False, "; ".join(r.problems), version=v)
        ev.fail("earlier_certificate_failed", f"version {v} ({role}): " + "; ".join(r.problems))
        return
    for t in r.tasks:
        ev.check(f"earlier certificate v{v} '{t.task}'", t.ok,
                 f"holds (model inside member {t.member})" if t.ok else "; ".join(t.problems), version=v, task=t.task)
        if not t.ok:
            ev.fail("earlier_certificate_failed", f"version {v} ({role}), task '{t.task}': " + "; ".join(t.problems))


def _record(registry: Registry, decision: GateDecision, tags: Mapping[str, str]) -> bool:
    """Write the decision's tags, the status last (it is the commit: a crash before it leaves the
    version pending, which ``recover`` rolls back)."""
    try:
        registry.set_tags(decision.version, _status_last(tags))
        return True
    except Exception as exc:  # noqa: BLE001
        decision.checks.append({"check": "record status", "ok": False, "detail": _err(exc)})
        return False


class _ChampionChanged(RuntimeError):
    """The champion is no longer the one the candidate was checked against."""


def _cas(registry: Registry, expected: str | None) -> None:
    now = registry.champion()
    if now != expected:
        raise _ChampionChanged(f"the champion changed from {expected} to {now} while the gate ran")


def _best_effort(step) -> None:
    try:
        step()
    except Exception:  # noqa: BLE001 — the status tag is the record; this only tidies
        pass


def promote(
    registry: Registry,
    version: str,
    *,
    validation_passed: bool,
    validation_summary: Mapping | None = None,
    trusted_keys: Sequence | None = None,
) -> GateDecision:
    """Run every check; move ``champion`` to ``version`` only if all pass. Never raises on a check
    failure or a registry error: the decision says what happened (fail closed).

    ``trusted_keys``: Ed25519 public keys (``components.signing``); when given, the candidate's
    certificate must be signed by one of them over exactly its registered artifacts
    (``signature_invalid`` otherwise)."""
    version = str(version)
    decision = GateDecision(version=version, promoted=False, reasons=[], champion_before=None,
                            champion_after=None, checks=[], decided_at=utc_now())
    ev = _Evaluation(decision)
    try:
        _evaluate(ev, registry, version, validation_passed, validation_summary, trusted_keys)
    except Exception as exc:  # noqa: BLE001 — fail closed
        decision.reasons.append(Reason("gate_error", f"unexpected error: {_err(exc)}"))
        decision.checks.append({"check": "gate", "ok": False, "detail": traceback.format_exc(limit=5)})
        if decision.champion_before is None:
            try:
                decision.champion_before = registry.champion()
            except Exception:  # noqa: BLE001 — unknown; the alias is not touched anyway
                pass
    decision.champion_after = decision.champion_before

    passed = not decision.reasons and bool(decision.checks) and all(c["ok"] for c in decision.checks)
    if not passed and not decision.reasons:  # a failed check without a reason must still block
        decision.reasons.append(Reason("gate_error", "a check failed without a reason"))

    # commit, then move the alias -------------------------------------------------------------------
    # intent → commit (status promoted, written last) → compare-and-set move → intent cleared: the alias
    # only ever points at a version whose promotion is recorded; a crash in between leaves a committed
    # version with its intent, which ``recover`` rolls back (alias not moved) or completes (moved).
    decision.decided_at = utc_now()
    if passed:
        try:
            _cas(registry, decision.champion_before)
            registry.set_tags(version, {tg.TAG_GATE_INTENT: json.dumps(
                {"previous_champion": decision.champion_before, "at": decision.decided_at})})
            failpoint("gate_intent")
            if _record(registry, decision, {
                tg.TAG_STATUS: tg.STATUS_PROMOTED, tg.TAG_PROMOTED_AT: decision.decided_at, tg.TAG_BLOCK_REASONS: "[]",
                tg.TAG_PREVIOUS_CHAMPION: decision.champion_before or "", tg.TAG_VALIDATION: "passed",
            }):
                failpoint("committed")
                _cas(registry, decision.champion_before)
                registry.move_champion(version)
                decision.promoted, decision.champion_after = True, version
                failpoint("alias_moved")
                registry.delete_tags(version, [tg.TAG_GATE_INTENT])
            else:
                decision.reasons.append(Reason("gate_error", "recording the promotion failed; the alias was not moved"))
        except Exception as exc:  # noqa: BLE001
            code = "stale_champion" if isinstance(exc, _ChampionChanged) else "gate_error"
            decision.checks.append({"check": "move alias", "ok": False, "detail": _err(exc)})
            try:
                decision.champion_after = registry.champion()
            except Exception:  # noqa: BLE001
                decision.champion_after = decision.champion_before
            decision.promoted = decision.champion_after == version  # the move happened after all
            if decision.promoted:
                _best_effort(lambda: registry.delete_tags(version, [tg.TAG_GATE_INTENT]))
            elif code == "stale_champion":
                decision.reasons.append(Reason(code, f"{exc}; not promoted (retrain on the new champion)"))
            else:
                decision.reasons.append(Reason(code, f"moving the alias failed: {_err(exc)}"))

    # record a block --------------------------------------------------------------------------------
    if not decision.promoted:
        _best_effort(lambda: registry.delete_tags(version, [tg.TAG_PROMOTED_AT, tg.TAG_PREVIOUS_CHAMPION]))
        _record(registry, decision, {
            tg.TAG_STATUS: tg.STATUS_BLOCKED, tg.TAG_BLOCKED_AT: decision.decided_at,
            tg.TAG_BLOCK_REASONS: reasons_tag(decision.reasons),
            tg.TAG_VALIDATION: "passed" if not any(r.code == "validation_failed" for r in decision.reasons) else "failed",
        })
        _best_effort(lambda: registry.delete_tags(version, [tg.TAG_GATE_INTENT]))
    try:  # the full decision next to the version's artifacts, for audits (best effort)
        registry.log_record(version, f"gate/decision-{decision.decided_at.replace(':', '')}.json", decision.to_dict())
    except Exception:  # noqa: BLE001
        pass
    ev.release(registry)
    return decision


# ------------------------------------------------------------------------------------ recovery
def _status_last(tags: Mapping[str, str]) -> dict[str, str]:
    return {**{k: v for k, v in tags.items() if k != tg.TAG_STATUS},
            **({tg.TAG_STATUS: tags[tg.TAG_STATUS]} if tg.TAG_STATUS in tags else {})}


def _json_tag(tags: Mapping[str, str], name: str) -> dict | None:
    try:
        value = json.loads(tags.get(name) or "null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


#: a half-done promotion whose process cannot be seen (another host) is left alone this long
GRACE_S = 600.0


def _age_s(at: object) -> float | None:
    """Seconds since an ISO timestamp (negative: in the future), or None when unreadable."""
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(str(at))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - when).total_seconds()


def recover(registry: Registry, *, move_alias: bool = True) -> list[dict]:
    """Settle what a crash, or a hand on the alias, left half-done. Returns one record per action
    (``{"kind", "version", "detail"}``); each is also written on the version (tags, and a JSON record
    next to its artifacts) before the alias moves. Safe to run at any time, by the next run, the
    watch or the audit. Nothing is ever promoted here: the alias only goes back to the latest
    version the gate promoted (by version number), or is removed.

    A promotion is intent → commit (``promoted``) → alias move → intent cleared, so a gate process
    that ended (on this host; on another, an intent older than ``GRACE_S``) leaves:

    * a ``promoted`` version with its intent that is the champion: moved, not tidied; the intent is
      cleared (``promotion_completed``);
    * a ``promoted`` version with its intent that is not the champion: committed, never moved; the
      promotion is rolled back and the version marked ``incomplete`` (``promotion_rolled_back``);
    * a ``pending`` version with the intent: ``incomplete`` (``promotion_interrupted``); without it,
      whose registering process (on this host) ended: ``incomplete`` (``run_died``). Versions whose
      process still runs, or registered from another host, stay pending;
    * with ``move_alias``: a champion that is not the latest promoted version (any other status, or
      an older promoted version), or no champion while promoted versions exist: the alias was moved
      outside the gate; it is put back on the latest promoted version (``alias_incident``, tagged on
      the version it was found on). A promotion in flight (promoted, intent present) never counts;
    * a registration run left RUNNING by a process that ended is marked FAILED (``run_abandoned``).

    ``move_alias=False`` (a retrain's start) leaves a hand-moved alias where it is: the retrain then
    refuses to build on it, and the watch or the audit moves it back.
    """
    done: list[dict] = []
    champion = registry.champion()  # before the history: a gate moving the alias meanwhile shows as in flight
    history = registry.history()

    def act(kind: str, version: str, detail: str, tags: Mapping[str, str], drop: Sequence[str] = ()) -> None:
        at = utc_now()
        record = {"kind": kind, "version": version, "detail": detail, "at": at}
        registry.set_tags(version, _status_last({**tags, tg.TAG_RECOVERED: at}))
        registry.delete_tags(version, drop)
        _best_effort(lambda: registry.log_record(version, f"gate/recovery-{at.replace(':', '')}.json", record))
        done.append(record)

    def in_flight(h) -> bool:
        return _json_tag(h.tags, tg.TAG_GATE_INTENT) is not None

    def ended(h) -> bool:
        """The process behind ``h``'s intent or registration has ended (or, unseen, the intent is stale)."""
        alive = owner_alive(_json_tag(h.tags, tg.TAG_OWNER))
        if alive is not None:
            return not alive
        age = _age_s((_json_tag(h.tags, tg.TAG_GATE_INTENT) or {}).get("at"))
        return in_flight(h) and (age is None or age < 0 or age > GRACE_S)

    # half-done promotions and dead pending versions -----------------------------------------------
    for h in history:
        if h.status == tg.STATUS_PROMOTED and in_flight(h) and ended(h):
            if h.version == champion:
                act("promotion_completed", h.version, "the gate moved the alias and stopped before tidying up; "
                    "its recorded decision stands", {}, drop=[tg.TAG_GATE_INTENT])
            else:
                act("promotion_rolled_back", h.version,
                    "the gate recorded the promotion and stopped before moving the alias; the alias stays on "
                    f"{'version ' + champion if champion else 'no champion'} and the version is not promoted "
                    "(run it again)",
                    {tg.TAG_BLOCK_REASONS: json.dumps([{"code": "gate_error", "detail": "promotion interrupted "
                                                                                        "before the alias move"}]),
                     tg.TAG_STATUS: tg.STATUS_INCOMPLETE},
                    drop=[tg.TAG_GATE_INTENT, tg.TAG_PROMOTED_AT, tg.TAG_PREVIOUS_CHAMPION])
        elif h.status == tg.STATUS_PENDING and h.version != champion and ended(h):
            if in_flight(h):
                kind, short = "promotion_interrupted", "promotion interrupted"
                detail = "the gate passed every check but its process ended before recording the promotion"
            else:
                kind, short = "run_died", "the run died before the gate"
                detail = "the run that registered it ended before the gate decided"
            act(kind, h.version, detail + "; not promoted (run it again)",
                {tg.TAG_BLOCK_REASONS: json.dumps([{"code": "gate_error", "detail": short}]),
                 tg.TAG_STATUS: tg.STATUS_INCOMPLETE}, drop=[tg.TAG_GATE_INTENT])

    # a champion the gate did not put there ----------------------------------------------------------
    if move_alias:
        history = registry.history()
        gated = [int(h.version) for h in history if h.status == tg.STATUS_PROMOTED and h.tags.get(tg.TAG_PROMOTED_AT)
                 and (not in_flight(h) or h.version == champion)]  # a decision recorded, not in flight elsewhere
        info = next((h for h in history if h.version == champion), None) if champion is not None else None
        state = info.status if info is not None else None
        back = str(max(gated)) if gated else None
        if champion != back and registry.champion() == champion:  # unchanged meanwhile (else: the next look)
            what = f"on version {champion} (status {state!r})" if champion is not None else "removed"
            if champion is not None and info is not None:
                act("alias_incident", champion,
                    f"the champion alias was {what}, which the gate did not decide; it was moved back to "
                    f"{'version ' + back if back else 'no champion'}",
                    {tg.TAG_INCIDENT: json.dumps({"found_on": champion, "status": state, "moved_back_to": back})})
            else:
                done.append({"kind": "alias_incident", "version": back, "at": utc_now(),
                             "detail": f"the champion alias was {what} outside the gate; it was put back on "
                                       f"version {back}"})
            if registry.champion() == champion:
                registry.move_champion(back)
    done += _abandoned_runs(registry)
    return done


def _abandoned_runs(registry: Registry) -> list[dict]:
    """Registration runs their process left RUNNING (killed before a version existed): ended as
    FAILED, with a record."""
    done = []
    runs = registry.client.search_runs(
        [registry.experiment_id], filter_string="tags.`lidgate.kind` = 'registration' and attributes.status = 'RUNNING'",
        max_results=1000)
    for run in runs:
        tags = run.data.tags or {}
        if tags.get("lidgate.model_name") != registry.model_name:
            continue
        if owner_alive(_json_tag(tags, RUN_OWNER_TAG)) is not False:
            continue
        at = utc_now()
        registry.client.set_tag(run.info.run_id, "lidgate.recovered", at)
        registry.client.set_terminated(run.info.run_id, "FAILED")
        done.append({"kind": "run_abandoned", "version": None, "run_id": run.info.run_id, "at": at,
                     "detail": f"registration run {run.info.run_id} was left RUNNING by a process that ended before "
                               "a version was created; marked FAILED"})
    return done
