"""components.registry + components.gate (+ components.lineage) against REAL MLflow (SQLite store in a temp dir, no mocks).

One SQLite database per module (creating its tables costs ~9 s); every test registers under its own
registered-model name, so aliases and versions never leak between tests.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.cl.data import blobs  # noqa: E402
from benchmarks.training import train_classifier  # noqa: E402
import components.gate as gate  # noqa: E402
import components.lineage as lineage  # noqa: E402
from components.factory import FactoryError, ModelSpec  # noqa: E402
from components.gate import promote  # noqa: E402
from components.owner import owner_tag  # noqa: E402
from components.registry import Registry, RegistryError, RegistryIntegrityError  # noqa: E402
from lid_engine import LID, Box, Spec, fingerprint_data, fingerprint_model, project_  # noqa: E402
from lid_engine.lid import manifest_digest  # noqa: E402
from tests.helpers.paths import REPO  # noqa: E402

SPEC = ModelSpec("tests.helpers.models:mlp", {"sizes": [2, 16, 4]})
TAU = 0.8


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mlflow")
    Registry(f"sqlite:///{d}/mlflow.db", artifact_location=d / "artifacts", cache_dir=d / "cache").experiment_id
    return d


@pytest.fixture
def registry(store, request) -> Registry:
    name = "m-" + re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:80]
    return Registry(f"sqlite:///{store}/mlflow.db", model_name=name,
                    artifact_location=store / "artifacts", cache_dir=store / "cache")


@pytest.fixture(scope="module")
def data():
    x, y = blobs(560, n_classes=4, seed=0)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    return {"train": (x[:400], y[:400]), "cert": {"t1": (x[400:], y[400:])}}


@pytest.fixture(scope="module")
def base_model(data):
    torch.manual_seed(0)
    model = SPEC.build()
    train_classifier(model, *data["train"], epochs=4, lr=1e-2)
    return model.eval()


def certify(model, data, radii=(1e-3, 1e-2), tau=TAU) -> LID:
    return LID.certify(model, [Box.around(model, r) for r in radii], data["cert"], {"t1": Spec("accuracy", tau)})


@pytest.fixture(scope="module")
def base_lid(base_model, data) -> LID:
    return certify(base_model, data)


def shifted(model, delta: float, into=None):
    """A copy with every parameter moved by ``delta`` (then projected into ``into`` if given)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(delta)
    if into is not None:
        project_(m, into)
    return m.eval()


@pytest.fixture
def champion(registry, base_model, base_lid, data) -> str:
    v = registry.register(base_model, SPEC, lid=base_lid, cert_data=data["cert"], validation={"ok": True})
    d = promote(registry, v, validation_passed=True)
    assert d.promoted, d.to_dict()
    return v


def good_candidate(registry, champion, base_lid, data, **kw) -> tuple[str, torch.nn.Module]:
    """A δ-safe update: perturbed, projected into the champion's LID, with its own valid LID."""
    m = shifted(registry.load(champion).model, 0.004, into=base_lid)
    v = registry.register(m, SPEC, lid=certify(m, data, radii=(1e-3,)), cert_data=data["cert"],
                          lineage=[champion], **kw)
    return v, m


def store_file(registry: Registry, version: str, relative: str) -> Path:
    run_id = registry.client.get_model_version(registry.model_name, version).run_id
    uri = registry.client.get_run(run_id).info.artifact_uri
    return Path(unquote(urlparse(uri).path)) / relative


def assert_blocked(registry: Registry, decision, version: str, code: str, champion: str | None) -> list[dict]:
    assert not decision.promoted
    assert code in decision.codes, decision.to_dict()
    assert decision.champion_before == champion and decision.champion_after == champion
    assert registry.champion() == champion
    tags = registry.client.get_model_version(registry.model_name, version).tags
    assert tags["lid.status"] == "blocked"
    reasons = json.loads(tags["lid.block_reasons"])
    assert code in [r["code"] for r in reasons]
    assert all(set(r) == {"code", "detail"} for r in reasons)
    assert_history_consistent(registry)
    return reasons


def assert_history_consistent(registry: Registry) -> None:
    hist = registry.history()
    champ = registry.champion()
    holders = [h.version for h in hist if "champion" in h.aliases]
    assert holders == ([champ] if champ else [])
    for h in hist:
        assert h.status in ("pending", "promoted", "blocked", "incomplete")
        if h.version == champ:
            assert h.status == "promoted"


# ------------------------------------------------------------------------------------------ registry
def test_register_load_roundtrip(registry, base_model, base_lid, data):
    import mlflow

    x_cert, y_cert = data["cert"]["t1"]
    uri_before, env_before = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    v = registry.register(base_model, SPEC, lid=base_lid, cert_data=data["cert"], validation={"rows": 160},
                          extra_tags={"owner": "tests"}, example_input=x_cert[:8])
    assert isinstance(v, str) and v == "1"
    # log_model needed the global tracking URI for a moment: it is restored
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == (uri_before, env_before)
    lv = registry.load(v)
    assert lv.version == v and lv.spec == SPEC and lv.problems == [] and lv.lineage == []
    with torch.no_grad():
        assert torch.equal(lv.model(x_cert), base_model(x_cert))
    assert fingerprint_model(lv.model) == fingerprint_model(base_model)
    assert lv.lid.manifest() == base_lid.manifest()
    assert torch.equal(lv.cert_data["t1"][0], x_cert) and torch.equal(lv.cert_data["t1"][1], y_cert)
    assert fingerprint_data(*lv.cert_data["t1"]) == fingerprint_data(x_cert, y_cert)
    t = lv.tags
    assert t["lid.status"] == "pending" and t["lid.tasks"] == "t1" and t["owner"] == "tests"
    assert float(t["lid.certified_accuracy.t1"]) == base_lid.certified_accuracy("t1")
    assert float(t["lid.lower_bound.t1"]) == base_lid.lower_bound("t1")
    assert float(t["lid.tau.t1"]) == TAU
    assert t["lid.model_sha256"] == base_lid.model_sha256
    for key in ("lid.certificate_sha256", "lid.weights_sha256", "lid.cert_data_sha256.t1", "lid.lineage", "lid.parent"):
        assert key in t
    assert t["lid.mlflow_model"] == "pt2"
    # the certificate, a single artifact, the alias-free listing
    cert = registry.certificate(v)
    assert cert["model_sha256"] == base_lid.model_sha256 and len(cert["members"]) == 2
    assert json.loads(registry.artifact_path(v, "validation.json").read_text()) == {"rows": 160}
    # the MLflow model (pt2) serves the same function
    import mlflow.pytorch

    served = mlflow.pytorch.load_model(registry.client.get_model_version(registry.model_name, v).source)
    with torch.no_grad():
        assert torch.allclose(served(x_cert), base_model(x_cert))

    v2 = registry.register(shifted(base_model, 1e-3), SPEC, lid=None, cert_data=data["cert"], lineage=[v])
    assert v2 == "2"
    lv2 = registry.load(v2)
    assert lv2.lid is None and lv2.lid_dir is None and lv2.lineage == ["1"] and lv2.tags["lid.parent"] == "1"
    assert lv2.tags["lid.mlflow_model"] == "none"
    hist = registry.history()
    assert [h.version for h in hist] == ["1", "2"] and [h.status for h in hist] == ["pending", "pending"]
    assert all(h.run_id and h.created for h in hist) and registry.champion() is None
    with pytest.raises(RegistryError, match="without a LID"):
        registry.certificate(v2)
    with pytest.raises(RegistryError):
        registry.load("99")
    with pytest.raises(RegistryError, match="alias"):
        registry.load(alias="champion")


def test_register_rejects_bad_input(registry, base_model, base_lid, data):
    with pytest.raises(RegistryError, match="does not rebuild"):
        registry.register(base_model, ModelSpec("tests.helpers.models:mlp", {"sizes": [2, 8, 4]}),
                          lid=base_lid, cert_data=data["cert"])
    with pytest.raises(RegistryError, match="tasks"):
        registry.register(base_model, SPEC, lid=base_lid, cert_data={"t2": data["cert"]["t1"]})
    with pytest.raises(RegistryError, match="lid"):
        registry.register(base_model, SPEC, lid=None, cert_data=data["cert"], extra_tags={"lid.status": "promoted"})
    with pytest.raises(RegistryError, match="no version"):
        registry.register(base_model, SPEC, lid=None, cert_data=data["cert"], lineage=["7"])
    with pytest.raises(RegistryError, match=r"task name 't1\\n'"):  # a trailing newline is not part of a name
        registry.register(base_model, SPEC, lid=None, cert_data={"t1\n": data["cert"]["t1"]})
    with pytest.raises(RegistryError, match=r"cert_data\['t1'\] must be a pair of tensors \(x, y\) or a "
                                            "lid_engine.CertificationStream"):
        registry.register(base_model, SPEC, lid=None, cert_data={"t1": [1, 2, 3]})
    with pytest.raises(FactoryError, match="ModelSpec.factory"):
        ModelSpec("os.system", {})  # not module:function
    assert registry.history() == []


def test_load_detects_tampered_artifacts(registry, base_model, base_lid, data):
    v = registry.register(base_model, SPEC, lid=base_lid, cert_data=data["cert"])
    path = store_file(registry, v, "cert_data/t1.safetensors")
    tensors = load_file(str(path))
    tensors["y"][0] = (tensors["y"][0] + 1) % 4  # relabel one certification example
    save_file(tensors, str(path))
    with pytest.raises(RegistryIntegrityError, match="cert_data/t1.safetensors"):
        registry.load(v)
    with pytest.raises(RegistryIntegrityError):
        registry.artifact_path(v, "cert_data/t1.safetensors")


# ------------------------------------------------------------------------------------------ gate: promotion
def test_first_version_then_projected_update_promoted(registry, base_model, base_lid, data):
    v1 = registry.register(base_model, SPEC, lid=base_lid, cert_data=data["cert"])
    d1 = promote(registry, v1, validation_passed=True, validation_summary={"suite": "ok"})
    assert d1.promoted and d1.reasons == [] and d1.champion_before is None and d1.champion_after == v1
    assert registry.champion() == v1
    assert registry.load(alias="champion").version == v1

    v2, m2 = good_candidate(registry, v1, base_lid, data)
    assert base_lid.member_index(m2) is not None
    d2 = promote(registry, v2, validation_passed=True)
    assert d2.promoted, d2.to_dict()
    assert (d2.champion_before, d2.champion_after) == (v1, v2) and registry.champion() == v2
    names = [c["check"] for c in d2.checks]
    assert "inside champion LID" in names and "new certificate" in names
    assert any(c["check"].startswith(f"earlier certificate v{v1}") and c["ok"] for c in d2.checks)
    tags = registry.client.get_model_version(registry.model_name, v2).tags
    assert tags["lid.status"] == "promoted" and tags["lid.promoted_at"] and tags["lid.previous_champion"] == v1
    assert json.dumps(d2.to_dict())  # JSON-able
    assert_history_consistent(registry)
    assert [h.status for h in registry.history()] == ["promoted", "promoted"]
    # the decision is kept next to the version's artifacts
    gate_dir = store_file(registry, v2, "gate")
    assert json.loads(next(gate_dir.glob("decision-*.json")).read_text())["promoted"] is True


# ------------------------------------------------------------------------------------------ gate: each block
def test_blocked_when_validation_failed(registry, champion, base_lid, data):
    v, _ = good_candidate(registry, champion, base_lid, data)
    d = promote(registry, v, validation_passed=False, validation_summary={"failed": ["x_range"]})
    assert_blocked(registry, d, v, "validation_failed", champion)
    assert d.codes == ["validation_failed"]  # nothing else was wrong with it


def test_blocked_when_outside_champion_lid(registry, champion, base_model, data):
    m = shifted(base_model, 0.05)  # no projection: outside the champion's LID
    v = registry.register(m, SPEC, lid=certify(m, data, radii=(1e-3,)), cert_data=data["cert"], lineage=[champion])
    d = promote(registry, v, validation_passed=True)
    assert_blocked(registry, d, v, "outside_champion_lid", champion)
    assert "new_certificate_failed" not in d.codes and "below_tau" not in d.codes


def test_blocked_when_earlier_certificate_fails(registry, base_model, data):
    # v1: LID = one box of radius 1e-2. v2: clamped onto v1's upper corner, LID of radius 1e-3 around it.
    lid1 = certify(base_model, data, radii=(1e-2,))
    v1 = registry.register(base_model, SPEC, lid=lid1, cert_data=data["cert"])
    assert promote(registry, v1, validation_passed=True).promoted
    m2 = shifted(base_model, 0.05, into=lid1)
    lid2 = certify(m2, data, radii=(1e-3,))
    v2 = registry.register(m2, SPEC, lid=lid2, cert_data=data["cert"], lineage=[v1])
    assert promote(registry, v2, validation_passed=True).promoted
    # v3 lies inside the champion's (v2's) LID but beyond v1's box: v1's certificate no longer covers it.
    m3 = shifted(m2, 0.05, into=lid2)
    assert lid2.member_index(m3) is not None and lid1.member_index(m3) is None
    v3 = registry.register(m3, SPEC, lid=certify(m3, data, radii=(1e-3,)), cert_data=data["cert"], lineage=[v1, v2])
    d = promote(registry, v3, validation_passed=True)
    reasons = assert_blocked(registry, d, v3, "earlier_certificate_failed", v2)
    assert set(d.codes) == {"earlier_certificate_failed"}
    detail = next(r["detail"] for r in reasons if r["code"] == "earlier_certificate_failed")
    assert f"version {v1}" in detail and "'t1'" in detail and "model inside LID" in detail


def test_a_swapped_mlflow_model_is_caught_by_load_and_the_gate(registry, champion, base_model, base_lid, data):
    """What consumers load (``mlflow.pytorch.load_model("models:/NAME/<v>")``, the version's source) is
    pinned at registration: editing it afterwards is an integrity failure like any pinned artifact."""
    m = shifted(base_model, 0.004, into=base_lid)
    v = registry.register(m, SPEC, lid=certify(m, data, radii=(1e-3,)), cert_data=data["cert"], lineage=[champion],
                          example_input=data["cert"]["t1"][0][:4])
    mv = registry.client.get_model_version(registry.model_name, v)
    assert len(mv.tags["lid.mlflow_model_sha256"]) == 64
    registry.release(registry.load(v))  # intact: loads
    local = Path(unquote(urlparse(mv.source).path))
    victim = next(p for p in sorted(local.rglob("*")) if p.is_file() and p.suffix == ".pt2")
    victim.write_bytes(victim.read_bytes() + b"\0")
    with pytest.raises(RegistryIntegrityError, match="mlflow model"):
        registry.load(v)
    d = promote(registry, v, validation_passed=True)
    assert_blocked(registry, d, v, "artifact_tampered", champion)


def test_a_candidate_built_on_a_former_champion_is_stale(registry, champion, base_lid, data):
    """Promotion is a compare-and-set on the champion a candidate was certified against: two retrains
    start from v1, the first is promoted, the second is blocked (it never saw v2)."""
    first, _ = good_candidate(registry, champion, base_lid, data)
    assert promote(registry, first, validation_passed=True).promoted
    second, _ = good_candidate(registry, champion, base_lid, data)
    d = promote(registry, second, validation_passed=True)
    reasons = assert_blocked(registry, d, second, "stale_champion", first)
    assert d.codes == ["stale_champion"]  # otherwise fine: inside v2's LID, every certificate holds
    assert f"against version {champion}" in reasons[0]["detail"] and f"now version {first}" in reasons[0]["detail"]


def test_every_former_champion_stays_in_the_chain(registry, champion, base_lid, data):
    """A candidate whose lineage names only the current champion is still checked against the
    champion's own lineage (v1 here), so no former champion's certificate drops out."""
    v2, m2 = good_candidate(registry, champion, base_lid, data)
    assert promote(registry, v2, validation_passed=True).promoted
    lid2 = certify(m2, data, radii=(1e-3,))
    v3 = registry.register(m2, SPEC, lid=lid2, cert_data=data["cert"], lineage=[v2])  # v1 left out
    d = promote(registry, v3, validation_passed=True)
    assert d.promoted, d.to_dict()
    checked = {c["check"] for c in d.checks}
    assert any(c.startswith(f"earlier certificate v{champion}") for c in checked), checked
    assert any(c.startswith(f"earlier certificate v{v2}") for c in checked), checked


def test_blocked_when_lid_json_tampered(registry, champion, base_lid, data):
    v, _ = good_candidate(registry, champion, base_lid, data)
    path = store_file(registry, v, "lid/lid.json")
    manifest = json.loads(path.read_text())
    manifest["tasks"]["t1"]["tau"] = 0.5  # claim a weaker spec ...
    for member in manifest["members"]:
        member["certificates"]["t1"]["tau"] = 0.5
    manifest["digest"] = manifest_digest(manifest)  # ... and re-seal the manifest like a careful forger
    path.write_text(json.dumps(manifest, indent=2))
    d = promote(registry, v, validation_passed=True)
    reasons = assert_blocked(registry, d, v, "artifact_tampered", champion)
    assert any("lid/lid.json" in r["detail"] for r in reasons)


def test_blocked_when_new_certificate_is_for_another_model(registry, champion, base_lid, data):
    m = shifted(registry.load(champion).model, 0.004, into=base_lid)
    # a valid LID, but around the champion's parameters, not this model's
    v = registry.register(m, SPEC, lid=base_lid, cert_data=data["cert"], lineage=[champion])
    d = promote(registry, v, validation_passed=True)
    reasons = assert_blocked(registry, d, v, "new_certificate_failed", champion)
    assert any("model fingerprint" in r["detail"] for r in reasons)


def test_blocked_when_below_tau(registry, champion, base_lid, data):
    m = shifted(registry.load(champion).model, 0.004, into=base_lid)
    weak = certify(m, data, radii=(2.0,), tau=0.5)  # a huge box: certified accuracy collapses
    assert weak.certified_accuracy("t1") < 0.5
    v = registry.register(m, SPEC, lid=weak, cert_data=data["cert"], lineage=[champion])
    d = promote(registry, v, validation_passed=True)
    assert_blocked(registry, d, v, "below_tau", champion)
    assert d.codes == ["below_tau"]


def test_blocked_without_certificate(registry, champion, base_lid, data):
    m = shifted(registry.load(champion).model, 0.004, into=base_lid)
    v = registry.register(m, SPEC, lid=None, cert_data=data["cert"], lineage=[champion])
    d = promote(registry, v, validation_passed=True)
    assert_blocked(registry, d, v, "no_certificate", champion)
    assert d.codes == ["no_certificate"]


def test_blocked_without_certificate_and_no_champion(registry, base_model, data):
    v = registry.register(base_model, SPEC, lid=None, cert_data=data["cert"])
    d = promote(registry, v, validation_passed=True)
    assert_blocked(registry, d, v, "no_certificate", None)


def test_blocked_when_weights_tampered(registry, champion, base_lid, data):
    v, _ = good_candidate(registry, champion, base_lid, data)
    path = store_file(registry, v, "model/weights.safetensors")
    state = load_file(str(path))
    state["0.weight"][0, 0] += 1e-3  # still a valid file, still inside the LIDs: only the bytes betray it
    save_file(state, str(path))
    d = promote(registry, v, validation_passed=True)
    reasons = assert_blocked(registry, d, v, "artifact_tampered", champion)
    assert any("model/weights.safetensors" in r["detail"] for r in reasons)


def test_collects_every_reason(registry, champion, base_model, data):
    m = shifted(base_model, 0.05)
    v = registry.register(m, SPEC, lid=certify(m, data, radii=(2.0,), tau=0.5), cert_data=data["cert"],
                          lineage=[champion])
    d = promote(registry, v, validation_passed=False)
    assert {"validation_failed", "outside_champion_lid", "earlier_certificate_failed", "below_tau"} <= set(d.codes)
    assert_blocked(registry, d, v, "below_tau", champion)


# ------------------------------------------------------------------------------------------ lineage: one implementation
def test_outside_an_earlier_lid_fails_in_gate_certify_flow_and_audit(registry, base_model, data, monkeypatch):
    """v3 lies inside the champion's (v2's) LID but outside v1's: the gate, the certification flow's
    re-verification and the audit all say so, all through components.lineage."""
    from flows.audit import build_records
    from flows.tasks import recheck_lineage

    lid1 = certify(base_model, data, radii=(1e-2,))
    v1 = registry.register(base_model, SPEC, lid=lid1, cert_data=data["cert"])
    assert promote(registry, v1, validation_passed=True).promoted
    m2 = shifted(base_model, 0.05, into=lid1)
    v2 = registry.register(m2, SPEC, lid=(lid2 := certify(m2, data, radii=(1e-3,))), cert_data=data["cert"],
                           lineage=[v1])
    assert promote(registry, v2, validation_passed=True).promoted
    m3 = shifted(m2, 0.05, into=lid2)
    assert lid2.member_index(m3) is not None and lid1.member_index(m3) is None
    v3 = registry.register(m3, SPEC, lid=certify(m3, data, radii=(1e-3,)), cert_data=data["cert"], lineage=[v1, v2])

    calls = []
    real = lineage.check_version
    monkeypatch.setattr(lineage, "check_version",
                        lambda earlier, model, version, **kw: calls.append(str(version)) or real(earlier, model, version, **kw))

    # the shared implementation
    results = lineage.verify_lineage(registry, m3, [v1, v2])
    assert [r.version for r in results] == [v1, v2] and [r.ok for r in results] == [False, True]
    assert results[0].member is None and results[1].member is not None
    assert [t.task for t in results[0].tasks] == ["t1"] and not results[0].tasks[0].ok
    assert any("model inside LID" in p for p in results[0].tasks[0].problems)
    assert calls == [v1, v2]

    # the gate
    calls.clear()
    d = promote(registry, v3, validation_passed=True)
    assert_blocked(registry, d, v3, "earlier_certificate_failed", v2)
    assert [r.detail.split(",")[0] for r in d.reasons] == [f"version {v1} (lineage)"]
    assert sorted(calls) == sorted([v1, v2])

    # the certification flow's re-check before it computes a new LID
    calls.clear()
    summary = recheck_lineage(registry, m3, [v1, v2])
    assert summary == [r.to_dict() for r in results]
    assert summary[0]["ok"] is False and summary[1] == {"version": v2, "ok": True, "failures": []}
    assert calls == [v1, v2]

    # the audit
    calls.clear()
    records = {r.version: r for r in build_records(registry)}
    tasks = {t.task: t for t in records[v3].tasks}
    assert not tasks[f"t1 (LID of v{v1})"].verified and tasks[f"t1 (LID of v{v2})"].verified
    assert any("model inside LID" in f for f in tasks[f"t1 (LID of v{v1})"].failures)
    assert not records[v3].verified and records[v2].verified and records[v1].verified
    assert sorted(calls) == sorted([v1, v1, v2])  # v2's lineage [v1], v3's lineage [v1, v2]


def test_unreadable_earlier_version_fails_closed_everywhere(registry, base_model, base_lid, data):
    """An earlier version whose artifacts were modified fails the lineage check (it is not skipped),
    and the audit reports it instead of crashing."""
    from flows.audit import build_records

    v1 = registry.register(base_model, SPEC, lid=base_lid, cert_data=data["cert"])
    assert promote(registry, v1, validation_passed=True).promoted
    v2, m2 = good_candidate(registry, v1, base_lid, data)
    path = store_file(registry, v1, "cert_data/t1.safetensors")
    tensors = load_file(str(path))
    tensors["y"][0] = (tensors["y"][0] + 1) % 4
    save_file(tensors, str(path))

    [r] = lineage.verify_lineage(registry, m2, [v1])
    assert not r.ok and r.problems[0].startswith("could not be loaded: RegistryIntegrityError")
    [r] = lineage.verify_lineage(registry, None, [v1], load=lambda v: None)
    assert not r.ok and r.problems == ["could not be loaded"]
    records = {r.version: r for r in build_records(registry)}
    assert not records[v1].verified and records[v1].block_reasons[-1]["code"] == "load_failed"
    [t] = records[v2].tasks[1:]
    assert t.task == f"LID of v{v1}" and not t.verified and "RegistryIntegrityError" in t.failures[0]
    d = promote(registry, v2, validation_passed=True)
    assert_blocked(registry, d, v2, "artifact_tampered", v1)


def test_only_components_lineage_rechecks_earlier_certificates():
    """No component and no pipeline flow calls verify(..., allow_update=True) outside components/lineage.py;
    the gate, the certification flow and the audit call verify_lineage. (The CLI's ``verify --allow-update``
    and the engine demo check a LID the user names, not a registry lineage.)"""
    paths = [p for p in (REPO / "components").rglob("*.py") if p.name != "lineage.py"]
    paths += [REPO / "flows" / name for name in ("certify.py", "audit.py", "retrain.py", "tasks.py")]
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                updates = [k for k in node.keywords if k.arg == "allow_update" and not (
                    isinstance(k.value, ast.Constant) and k.value.value is False)]
                assert not updates, f"{path.relative_to(REPO)}:{node.lineno} re-verifies an earlier LID itself"
    for rel in ("components/gate.py", "flows/tasks.py", "flows/audit.py"):
        assert "verify_lineage(" in (REPO / rel).read_text(encoding="utf-8"), rel


# ------------------------------------------------------------------------------------------ gate: fail closed
def test_crash_moving_the_alias(registry, champion, base_lid, data, monkeypatch):
    v, _ = good_candidate(registry, champion, base_lid, data)

    def boom(self, version):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(Registry, "move_champion", boom)
    d = promote(registry, v, validation_passed=True)
    assert_blocked(registry, d, v, "gate_error", champion)
    assert d.codes == ["gate_error"] and "registry went away" in d.reasons[0].detail


def test_unknown_version_is_blocked_not_raised(registry, champion):
    d = promote(registry, "42", validation_passed=True)
    assert not d.promoted and "gate_error" in d.codes and registry.champion() == champion


def test_crash_moving_the_alias_first_champion(registry, base_model, base_lid, data, monkeypatch):
    v = registry.register(base_model, SPEC, lid=base_lid, cert_data=data["cert"])
    monkeypatch.setattr(Registry, "move_champion", lambda self, version: 1 / 0)
    d = promote(registry, v, validation_passed=True)
    assert_blocked(registry, d, v, "gate_error", None)


def test_crash_inside_verify(registry, champion, base_lid, data, monkeypatch):
    v, _ = good_candidate(registry, champion, base_lid, data)

    def boom(*args, **kwargs):
        raise MemoryError("verify died")

    monkeypatch.setattr(gate, "verify", boom)  # the candidate's own certificate
    monkeypatch.setattr(lineage, "verify", boom)  # the earlier certificates
    d = promote(registry, v, validation_passed=True)
    reasons = assert_blocked(registry, d, v, "gate_error", champion)
    assert set(d.codes) == {"gate_error"} and any("verify died" in r["detail"] for r in reasons)
    assert any(r["detail"].startswith(f"earlier certificate of version {champion}: MemoryError") for r in reasons)


def test_crash_recording_promotion_moves_alias_back(registry, champion, base_lid, data, monkeypatch):
    v, _ = good_candidate(registry, champion, base_lid, data)
    real = Registry.set_tags

    def flaky(self, version, tags):
        if tags.get("lid.status") == "promoted":
            raise ConnectionError("tag write lost")
        return real(self, version, tags)

    monkeypatch.setattr(Registry, "set_tags", flaky)
    d = promote(registry, v, validation_passed=True)
    assert_blocked(registry, d, v, "gate_error", champion)


@pytest.mark.parametrize("seen", ["before the intent", "after the commit"])
def test_champion_moved_concurrently(registry, champion, base_lid, data, monkeypatch, seen):
    """Compare-and-set: a champion that changes while the gate runs, even after the promotion was
    recorded, blocks the candidate (stale_champion) and leaves no promotion tags behind."""
    v, _ = good_candidate(registry, champion, base_lid, data)
    answers = iter([champion, "999"] if seen == "before the intent" else [champion, champion, "999"])
    real = Registry.champion
    monkeypatch.setattr(Registry, "champion", lambda self: next(answers, None) or real(self))
    d = promote(registry, v, validation_passed=True)
    monkeypatch.undo()
    assert_blocked(registry, d, v, "stale_champion", champion)
    tags = registry.client.get_model_version(registry.model_name, v).tags
    assert not {"lid.gate_intent", "lid.promoted_at", "lid.previous_champion"} & set(tags)


def test_unexpected_crash_anywhere(registry, champion, base_lid, data, monkeypatch):
    v, _ = good_candidate(registry, champion, base_lid, data)
    monkeypatch.setattr(gate, "_evaluate", lambda *a, **k: 1 / 0)
    d = promote(registry, v, validation_passed=True)
    assert_blocked(registry, d, v, "gate_error", champion)


def test_block_reasons_tag_fits_mlflow_limit():
    reasons = [gate.Reason("earlier_certificate_failed", "x" * 10_000) for _ in range(40)]
    text = gate.reasons_tag(reasons)
    assert len(text) <= gate.TAG_VALUE_LIMIT
    assert {r["code"] for r in json.loads(text)} == {"earlier_certificate_failed"}


# ------------------------------------------------------------------------------------------ only the gate moves the alias
def _python_files():
    for top in ("lid_engine", "components", "flows", "deployment", "benchmarks"):
        base = REPO / top
        if base.is_dir():
            yield from (p for p in base.rglob("*.py") if ".venv" not in p.parts)


def test_only_the_gate_moves_the_alias():
    """Registry.move_champion is public (the gate must not reach into privates) but only the gate calls it,
    and the raw MLflow alias setters appear nowhere else."""
    movers = ("set_registered_model_alias", "delete_registered_model_alias", "move_champion", "_set_champion")
    offenders = []
    for path in _python_files():
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8")
        for name in movers:
            if name in text and rel not in ("components/registry.py", "components/gate.py"):
                offenders.append(f"{rel}: {name}")
        if rel == "components/gate.py":
            assert "set_registered_model_alias" not in text and "delete_registered_model_alias" not in text
            assert "registry._" not in text, "the gate calls a private registry method"
    assert offenders == []
    # inside registry.py the raw MLflow calls live only in move_champion, and nothing there calls it
    tree = ast.parse((REPO / "components/registry.py").read_text(encoding="utf-8"))
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            calls = {n.func.attr for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
            if fn.name != "move_champion":
                assert not calls & set(movers), f"registry.{fn.name} moves the alias"


# ------------------------------------------------------------------------------------------ recovery
class Killed(BaseException):
    """A SIGKILL at this point: nothing after it runs (no ``except Exception`` catches it)."""


def dead_owner() -> dict[str, str]:
    """``pipeline.owner`` of a process on this host that has ended."""
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return {"pipeline.owner": json.dumps({"host": socket.gethostname(), "pid": proc.pid, "started": 0.0})}


def _killed_in(registry, v, monkeypatch, where: str) -> None:
    """Run the gate on ``v`` and kill it at ``where``: 'move' (the promotion is recorded, the alias
    not moved) or 'tidy' (the alias moved, the intent not cleared)."""
    target = (Registry, "move_champion") if where == "move" else (Registry, "delete_tags")
    monkeypatch.setattr(*target, lambda *a, **k: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        promote(registry, v, validation_passed=True)
    monkeypatch.undo()


@pytest.mark.parametrize("owner", ["dead", "alive"])
def test_killed_before_alias_move_rolled_back(registry, champion, base_lid, data, monkeypatch, owner):
    """A gate killed between its commit and the alias move: the alias never pointed at the version;
    once the gate's process is gone, recover rolls the promotion back (it never promotes); while the
    process lives, nothing is touched, not even by the watch. (Short names: registered-model names are
    cut at 80 characters.)"""
    tags = dead_owner() if owner == "dead" else {"pipeline.owner": owner_tag()}
    v, _ = good_candidate(registry, champion, base_lid, data, extra_tags=tags)
    _killed_in(registry, v, monkeypatch, "move")
    version_tags = registry.client.get_model_version(registry.model_name, v).tags
    assert registry.champion() == champion and version_tags["lid.status"] == "promoted"
    assert "lid.gate_intent" in version_tags

    done = gate.recover(registry)
    if owner == "alive":
        assert done == [] and registry.champion() == champion
        return
    assert [r["kind"] for r in done] == ["promotion_rolled_back"]
    assert registry.champion() == champion
    version_tags = registry.client.get_model_version(registry.model_name, v).tags
    assert version_tags["lid.status"] == "incomplete"
    assert not {"lid.gate_intent", "lid.promoted_at"} & set(version_tags)
    assert_history_consistent(registry)
    assert gate.recover(registry) == []  # settled


@pytest.mark.parametrize("owner", ["dead", "alive"])
def test_killed_after_alias_move_completed(registry, champion, base_lid, data, monkeypatch, owner):
    """A gate killed after the alias move, before clearing its intent: the champion's promotion is
    recorded; recover only tidies (promotion_completed) once the process is gone."""
    tags = dead_owner() if owner == "dead" else {"pipeline.owner": owner_tag()}
    v, _ = good_candidate(registry, champion, base_lid, data, extra_tags=tags)
    _killed_in(registry, v, monkeypatch, "tidy")
    assert registry.champion() == v
    assert registry.client.get_model_version(registry.model_name, v).tags["lid.status"] == "promoted"
    done = gate.recover(registry)
    assert registry.champion() == v
    if owner == "alive":
        assert done == []
        return
    assert [r["kind"] for r in done] == ["promotion_completed"]
    assert "lid.gate_intent" not in registry.client.get_model_version(registry.model_name, v).tags
    assert_history_consistent(registry)


def test_a_forged_intent_promotes_nothing(registry, champion, base_model, base_lid, data):
    """Gate tags written by hand promote nothing: a 'promoted' version with an intent that the alias
    never reached is rolled back; a pending one the alias was moved to is an incident."""
    rogue = registry.register(shifted(base_model, 0.05), SPEC, lid=None, cert_data=data["cert"],
                              extra_tags=dead_owner())
    forged = {"lid.gate_intent": json.dumps({"previous_champion": champion, "at": "2999-01-01T00:00:00"}),
              "lid.status": "promoted"}
    registry.set_tags(rogue, forged)
    done = gate.recover(registry)
    assert [r["kind"] for r in done] == ["promotion_rolled_back"] and registry.champion() == champion
    assert registry.client.get_model_version(registry.model_name, rogue).tags["lid.status"] == "incomplete"

    rogue2 = registry.register(shifted(base_model, 0.05), SPEC, lid=None, cert_data=data["cert"],
                               extra_tags=dead_owner())
    registry.set_tags(rogue2, {"lid.gate_intent": forged["lid.gate_intent"]})
    registry.client.set_registered_model_alias(registry.model_name, "champion", rogue2)
    assert gate.recover(registry, move_alias=False) == []  # a retrain's recovery: it refuses to build on it
    done = gate.recover(registry)
    assert [r["kind"] for r in done] == ["alias_incident"] and registry.champion() == champion


def test_an_older_promoted_version_or_no_alias_is_an_incident(registry, champion, base_lid, data):
    v2, _ = good_candidate(registry, champion, base_lid, data)
    assert promote(registry, v2, validation_passed=True).promoted
    registry.client.set_registered_model_alias(registry.model_name, "champion", champion)  # back to v1 by hand
    done = gate.recover(registry)
    assert [(r["kind"], r["version"]) for r in done] == [("alias_incident", champion)] and registry.champion() == v2
    registry.client.delete_registered_model_alias(registry.model_name, "champion")
    done = gate.recover(registry)
    assert [(r["kind"], r["version"]) for r in done] == [("alias_incident", v2)] and registry.champion() == v2
    assert_history_consistent(registry)


def test_versions_whose_run_died_are_marked_incomplete_and_live_ones_left_pending(registry, champion, base_lid,
                                                                                   data, monkeypatch):
    died, _ = good_candidate(registry, champion, base_lid, data, extra_tags=dead_owner())
    running, _ = good_candidate(registry, champion, base_lid, data,
                                extra_tags={"pipeline.owner": owner_tag()})  # this process: alive
    interrupted, _ = good_candidate(registry, champion, base_lid, data, extra_tags=dead_owner())
    monkeypatch.setattr(gate, "_record", lambda *a, **k: (_ for _ in ()).throw(Killed()))  # intent, no commit
    with pytest.raises(Killed):
        promote(registry, interrupted, validation_passed=True)
    monkeypatch.undo()

    done = {r["version"]: r["kind"] for r in gate.recover(registry)}
    assert done == {died: "run_died", interrupted: "promotion_interrupted"}
    statuses = {h.version: h.status for h in registry.history()}
    assert statuses == {champion: "promoted", died: "incomplete", running: "pending", interrupted: "incomplete"}
    assert registry.champion() == champion
    assert_history_consistent(registry)


def test_an_alias_moved_by_hand_is_moved_back_and_recorded(registry, champion, base_model, base_lid, data):
    v2, _ = good_candidate(registry, champion, base_lid, data)
    assert promote(registry, v2, validation_passed=True).promoted
    rogue = registry.register(shifted(base_model, 0.05), SPEC, lid=None, cert_data=data["cert"])
    blocked = promote(registry, rogue, validation_passed=True)
    assert not blocked.promoted
    registry.client.set_registered_model_alias(registry.model_name, "champion", rogue)  # by hand

    assert gate.recover(registry, move_alias=False) == [] and registry.champion() == rogue  # a retrain's view
    done = gate.recover(registry)
    assert [r["kind"] for r in done] == ["alias_incident"] and registry.champion() == v2
    incident = json.loads(registry.client.get_model_version(registry.model_name, rogue).tags["lid.incident"])
    assert incident == {"found_on": rogue, "status": "blocked", "moved_back_to": v2}
    assert_history_consistent(registry)


# ------------------------------------------------------------------------------------------ signatures
@pytest.fixture(scope="module")
def signing_keys(tmp_path_factory):
    from components.signing import generate_keys, load_private_key, load_public_key

    d = tmp_path_factory.mktemp("signing")
    generate_keys(d / "worker.key", d / "worker.pub")
    generate_keys(d / "other.key", d / "other.pub")
    return {n: (load_private_key(d / f"{n}.key"), load_public_key(d / f"{n}.pub")) for n in ("worker", "other")}


def signed_candidate(registry, champion, base_lid, data, private_key) -> str:
    """A good candidate whose certificate the worker signed (as flows.certify does) and logged."""
    from lid_engine.files import file_sha256
    from components.signing import certificate_statement, sign

    v, m = good_candidate(registry, champion, base_lid, data)
    loaded = registry.load(v)
    try:
        statement = certificate_statement(m, loaded.lid, file_sha256(Path(loaded.lid_dir) / "lid.json"), data["cert"])
    finally:
        registry.release(loaded)
    registry.log_record(v, gate.SIGNATURE_RECORD, sign(statement, private_key))
    return v


def test_a_certificate_signed_by_a_trusted_key_passes(registry, champion, base_lid, data, signing_keys):
    v = signed_candidate(registry, champion, base_lid, data, signing_keys["worker"][0])
    d = promote(registry, v, validation_passed=True, trusted_keys=[signing_keys["worker"][1]])
    assert d.promoted, d.to_dict()
    assert any(c["check"] == "signature" and c["ok"] for c in d.checks)


@pytest.mark.parametrize("case", ["unsigned", "unknown key", "another version's signature"])
def test_unsigned_or_foreign_signatures_are_blocked(registry, champion, base_lid, data, signing_keys, case):
    trusted = [signing_keys["worker"][1]]
    if case == "unsigned":
        v, _ = good_candidate(registry, champion, base_lid, data)
        fragment = "not signed"
    elif case == "unknown key":
        v = signed_candidate(registry, champion, base_lid, data, signing_keys["other"][0])
        fragment = "unknown key"
    else:  # a genuine signature, copied from a version with another certificate
        donor = signed_candidate(registry, champion, base_lid, data, signing_keys["worker"][0])
        m = shifted(registry.load(champion).model, 0.002, into=base_lid)  # another model, another certificate
        v = registry.register(m, SPEC, lid=certify(m, data, radii=(1e-3,)), cert_data=data["cert"], lineage=[champion])
        registry.log_record(v, gate.SIGNATURE_RECORD, registry.read_record(donor, gate.SIGNATURE_RECORD))
        fragment = "does not match this certificate's lid/lid.json, model"
    d = promote(registry, v, validation_passed=True, trusted_keys=trusted)
    reasons = assert_blocked(registry, d, v, "signature_invalid", champion)
    assert d.codes == ["signature_invalid"] and fragment in reasons[0]["detail"], reasons


def test_a_registration_run_left_running_by_a_dead_process_is_marked_failed(registry, champion):
    owner = json.loads(dead_owner()["pipeline.owner"])
    run = registry.client.create_run(registry.experiment_id, tags={
        "lidgate.kind": "registration", "lidgate.model_name": registry.model_name, "lidgate.owner": json.dumps(owner)})
    alive = registry.client.create_run(registry.experiment_id, tags={
        "lidgate.kind": "registration", "lidgate.model_name": registry.model_name, "lidgate.owner": owner_tag()})
    done = gate.recover(registry)
    assert [(r["kind"], r["run_id"]) for r in done] == [("run_abandoned", run.info.run_id)]
    assert registry.client.get_run(run.info.run_id).info.status == "FAILED"
    assert registry.client.get_run(alive.info.run_id).info.status == "RUNNING"
    registry.client.set_terminated(alive.info.run_id)
