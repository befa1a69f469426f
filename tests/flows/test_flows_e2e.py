"""End-to-end pipeline tests: real Prefect (test harness server), real MLflow (SQLite), real GX, real ONNX.

The flows take a configuration file, as a team's would: the digits example (8×8 digits, an MLP
64-32-10) with a short search, so the module runs in a few minutes; `make demo` runs the same flows
on MNIST, and tests/flows/test_pipeline_cli.py drives them through the CLI with code written in tmp.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers.paths import REPO
from tests.helpers.pipeline import new_scans, registry_of, write_config

pytestmark = pytest.mark.slow


@pytest.fixture()
def config(tmp_path, harness, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return write_config(tmp_path)


def _statuses(registry) -> dict[str, str]:
    return {str(v.version): v.tags.get("lid.status") for v in registry.history()}


def test_promotion_path_registers_certifies_promotes_and_exports(config, tmp_path):
    import onnxruntime as ort

    from components.export import read_onnx_metadata
    from flows.retrain import bootstrap_flow, retrain_flow

    r1 = bootstrap_flow(config=str(config))
    assert r1["promoted"] and r1["version"] == "1" and r1["champion_after"] == "1", r1["reasons"]
    assert r1["certification"]["lid"] and r1["certification"]["certified"]["digits"] >= r1["certification"]["tau"]

    r2 = retrain_flow(config=str(config), data=[str(new_scans(tmp_path))])
    assert r2["promoted"], r2["reasons"]
    assert r2["task"] == "scanner2" and r2["candidate"]["projection"] is True
    assert r2["certification"]["lineage"] == [{"version": "1", "ok": True, "failures": []}]
    registry = registry_of(config)
    assert registry.champion() == "2" and _statuses(registry) == {"1": "promoted", "2": "promoted"}
    v2 = registry.load(version="2")
    assert v2.lineage == ["1"] and set(v2.cert_data) == {"scanner2"}
    assert v2.tags["pipeline.task"] == "scanner2" and v2.tags["pipeline.source"] == "trained"
    from flows.tasks import load_configuration

    assert v2.tags["pipeline.config_sha256"] == load_configuration(config).sha256()
    pipeline = v2.lid.search_config["pipeline"]
    assert pipeline["data"]["split"]["seed"] == 0 and pipeline["data"]["files"][0]["path"].endswith("scanner2.npz")

    onnx = r2["onnx"]
    meta = read_onnx_metadata(onnx["path"])
    assert meta["lidgate.certificate_sha256"] == v2.tags["lid.certificate_sha256"]
    session = ort.InferenceSession(onnx["path"], providers=["CPUExecutionProvider"])
    x = v2.cert_data["scanner2"][0][:5].numpy()
    assert np.allclose(session.run(None, {session.get_inputs()[0].name: x})[0], v2.model(v2.cert_data["scanner2"][0][:5])
                       .detach().numpy(), atol=1e-4)
    registry.release(v2)


def test_rogue_update_is_blocked_and_champion_stays(config, tmp_path):
    from flows.retrain import bootstrap_flow, retrain_flow

    bootstrap_flow(config=str(config))
    r = retrain_flow(config=str(config), data=[str(new_scans(tmp_path))], projection=False)
    assert not r["promoted"] and r["champion_after"] == "1"
    codes = {x["code"] for x in r["reasons"]}
    assert {"outside_champion_lid", "earlier_certificate_failed", "no_certificate"} <= codes

    # the alias moved by hand to the blocked version: nothing is built on it
    from flows.tasks import ChampionError

    registry = registry_of(config)
    registry.client.set_registered_model_alias(registry.model_name, "champion", r["version"])
    with pytest.raises(ChampionError, match=f"v{r['version']} .* status is 'blocked'"):
        retrain_flow(config=str(config), data=[str(new_scans(tmp_path))])
    assert len(registry.history()) == 2, "nothing was trained or registered"
    assert _statuses(registry_of(config)) == {"1": "promoted", "2": "blocked"}
    # the audit moves it back to the last promoted version and records the incident
    from flows.audit import audit_flow

    audit = audit_flow(config=str(config))
    assert registry.champion() == "1" and audit["ok"]
    assert [(r["kind"], r["version"]) for r in audit["recovered"]] == [("alias_incident", "2")]
    summary = json.loads(Path(audit["summary"]).read_text())
    v2 = next(v for v in summary["versions"] if v["version"] == "2")
    assert any(r["code"] == "alias_incident" for r in v2["block_reasons"])


def test_a_candidate_trained_elsewhere_is_certified_against_the_champion(config, tmp_path):
    """submit: weights from another training run are certified against the champion's LID; a model
    trained from scratch lies outside it and is blocked, the champion's own weights pass."""
    import torch
    from safetensors.torch import save_file

    from flows.retrain import bootstrap_flow, submit_flow

    bootstrap_flow(config=str(config))
    registry = registry_of(config)
    champion = registry.load(version="1")
    same = tmp_path / "same.safetensors"
    save_file({k: v.contiguous() for k, v in champion.model.state_dict().items()}, str(same))
    torch.manual_seed(123)
    other = champion.spec.build()
    rogue = tmp_path / "rogue.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(rogue))
    registry.release(champion)

    r = submit_flow(config=str(config), weights=str(rogue))
    assert not r["promoted"] and r["candidate"]["source"] == "submitted"
    assert "outside_champion_lid" in {x["code"] for x in r["reasons"]}
    r = submit_flow(config=str(config), weights=str(same))
    assert r["promoted"], r["reasons"]
    assert _statuses(registry) == {"1": "promoted", "2": "blocked", "3": "promoted"}


def test_bad_data_is_rejected_before_training_and_recorded(config, tmp_path):
    """New data outside the configured value range fails the Great Expectations suite: no version is
    registered, the champion stays and the reason is kept in the lidgate-rejections experiment."""
    import mlflow

    from flows.retrain import bootstrap_flow, retrain_flow

    bootstrap_flow(config=str(config))
    r = retrain_flow(config=str(config), data=[str(new_scans(tmp_path, "bright", scale=3.0, offset=0.0))])
    assert r["version"] is None and not r["promoted"] and r["reasons"][0]["code"] == "validation_failed"
    assert "range" in r["reasons"][0]["detail"]
    registry = registry_of(config)
    assert registry.champion() == "1" and len(registry.history()) == 1
    mlflow.set_tracking_uri(registry.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["lidgate-rejections"])
    assert len(runs) == 1 and runs.iloc[0]["tags.lid.status"] == "rejected"


def test_a_vacuous_specification_is_refused(config, tmp_path):
    """A first version that guesses (constant outputs: ~10% on ten digits) gets τ = accuracy − 0.10, at
    or below chance level; a certificate at it would promise nothing, so it is blocked and says why."""
    import torch
    from safetensors.torch import save_file

    from components.factory import ModelSpec
    from flows.retrain import bootstrap_flow
    from flows.tasks import load_configuration

    cfg = load_configuration(config)
    model = ModelSpec(cfg.model.factory, dict(cfg.model.kwargs)).build(cfg.code)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
    weights = tmp_path / "guessing.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))

    r = bootstrap_flow(config=str(config), weights=str(weights))
    assert not r["promoted"] and r["champion_after"] is None
    assert "at or below chance level" in r["certification"]["error"]
    assert any("chance level" in x["detail"] for x in r["reasons"] if x["code"] == "no_certificate")
    assert _statuses(registry_of(config)) == {"1": "blocked"}


def test_certificates_are_signed_by_the_certify_worker_and_checked_by_the_gate(config, tmp_path):
    """signing.private_key: the certify step signs each certificate; signing.public_keys: the gate
    promotes only certificates signed by a trusted key over the version's own artifacts."""
    from components.gate import SIGNATURE_RECORD
    from components.signing import generate_keys, subject_digests
    from flows.retrain import bootstrap_flow, retrain_flow

    generate_keys(tmp_path / "keys" / "worker.key", tmp_path / "keys" / "worker.pub")
    generate_keys(tmp_path / "keys" / "other.key", tmp_path / "keys" / "other.pub")
    settings = yaml.safe_load(config.read_text())
    settings["signing"] = {"private_key": "keys/worker.key", "public_keys": ["keys/worker.pub"]}
    config.write_text(yaml.safe_dump(settings))

    r1 = bootstrap_flow(config=str(config))
    assert r1["promoted"], r1["reasons"]
    registry = registry_of(config)
    envelope = registry.read_record("1", SIGNATURE_RECORD)
    import base64

    signed = subject_digests(json.loads(base64.b64decode(envelope["payload"])))
    tags = registry.client.get_model_version("e2e", "1").tags
    assert signed["model"] == tags["lid.model_sha256"] and signed["lid/lid.json"] == tags["lid.certificate_sha256"]

    settings["signing"] = {"private_key": "keys/other.key", "public_keys": ["keys/worker.pub"]}  # a stolen-key swap
    config.write_text(yaml.safe_dump(settings))
    r2 = retrain_flow(config=str(config), data=[str(new_scans(tmp_path))])
    assert not r2["promoted"] and [x["code"] for x in r2["reasons"]] == ["signature_invalid"]
    assert "unknown key" in r2["reasons"][0]["detail"] and registry.champion() == "1"

    # the audit checks every signature against the configured keys: v1's holds
    from flows.audit import audit_flow

    audit = audit_flow(config=str(config))
    assert audit["ok"], audit
    from typer.testing import CliRunner

    from flows.cli import app

    fetched = CliRunner().invoke(app, ["fetch", "models:/e2e@champion", "--config", str(config), "--out",
                                       str(tmp_path / "v1"), "--json"])
    assert fetched.exit_code == 0 and json.loads(fetched.stdout)["signature"] == "verified", fetched.output
    settings["signing"] = {"public_keys": ["keys/other.pub"]}  # v1 was not signed by this key
    config.write_text(yaml.safe_dump(settings))
    audit = audit_flow(config=str(config))
    v1 = next(v for v in json.loads(Path(audit["summary"]).read_text())["versions"] if v["version"] == "1")
    assert not audit["ok"] and any(r["code"] == "signature_invalid" for r in v1["block_reasons"])
    fetched = CliRunner().invoke(app, ["fetch", "models:/e2e@champion", "--config", str(config), "--out",
                                       str(tmp_path / "v1-other-key")])
    assert fetched.exit_code == 3 and "unknown key" in fetched.output, fetched.output


def test_crash_between_registration_and_alias_move_leaves_champion(config, tmp_path, monkeypatch):
    from components.registry import Registry
    from flows.retrain import bootstrap_flow, retrain_flow

    bootstrap_flow(config=str(config))

    def crash(self, version):
        raise RuntimeError("injected crash before the alias move")

    with monkeypatch.context() as patch:
        patch.setattr(Registry, "move_champion", crash)
        r = retrain_flow(config=str(config), data=[str(new_scans(tmp_path))])
    assert not r["promoted"] and r["reasons"][-1]["code"] == "gate_error"
    registry = registry_of(config)
    assert registry.champion() == "1" and _statuses(registry) == {"1": "promoted", "2": "blocked"}


def test_the_certify_flow_refuses_another_configuration_or_other_data(config, tmp_path, monkeypatch):
    """The gpu worker certifies exactly what was trained: a candidate folder whose configuration or data
    hash differently where it is certified is refused. (The pipeline removes its candidate folder once
    the gate has decided: a copy is kept here.)"""
    import shutil

    from flows import retrain
    from flows.certify import CANDIDATE_FILE, CandidateError, certify_flow

    real = retrain.run_certification

    def keep_a_copy(candidate_dir):
        shutil.copytree(candidate_dir, tmp_path / "staged")
        return real(candidate_dir)

    monkeypatch.setattr(retrain, "run_certification", keep_a_copy)
    retrain.bootstrap_flow(config=str(config))
    assert list((tmp_path / "home" / "staging").iterdir()) == []  # nothing left behind
    staged = tmp_path / "staged"
    record = json.loads((staged / CANDIDATE_FILE).read_text())
    changed = json.loads(json.dumps(record))
    changed["config_sha256"] = "0" * 64
    (staged / CANDIDATE_FILE).write_text(json.dumps(changed))
    with pytest.raises(CandidateError, match="hashes to"):
        certify_flow(candidate_dir=str(staged))
    changed = dict(record, data_sha256="0" * 64)
    (staged / CANDIDATE_FILE).write_text(json.dumps(changed))
    with pytest.raises(CandidateError, match="data of task"):
        certify_flow(candidate_dir=str(staged))


def test_audit_lists_every_version_with_its_status_and_accuracy(config, tmp_path):
    from flows.audit import audit_flow
    from flows.retrain import bootstrap_flow, retrain_flow

    scans = str(new_scans(tmp_path))
    bootstrap_flow(config=str(config))
    retrain_flow(config=str(config), data=[scans])
    retrain_flow(config=str(config), data=[scans], task="scanner2-rogue", projection=False)
    result = audit_flow(config=str(config))
    summary = json.loads(Path(result["summary"]).read_text())
    assert summary["ok"] is True
    by_version = {v["version"]: v for v in summary["versions"]}
    assert {k: v["status"] for k, v in by_version.items()} == {"1": "promoted", "2": "promoted", "3": "blocked"}
    assert by_version["2"]["verified"] and by_version["1"]["verified"]
    # what each version gets right on every task's held-out data: the projected update keeps the digits
    acc = {k: v["accuracy"] for k, v in by_version.items()}
    assert set(acc["1"]) == {"digits", "scanner2", "scanner2-rogue"}
    assert acc["2"]["digits"] >= acc["1"]["digits"] - 0.1
    html = Path(result["report"]).read_text()
    assert html.count("<img") >= 4 and "blocked" in html and "held-out data" in html

    # the champion's ONNX export swapped on disk: the audit fails and says where
    onnx = Path(registry_of(config).client.get_model_version("e2e", "2").tags["pipeline.onnx_path"])
    onnx.write_bytes(onnx.read_bytes()[:-8] + b"\0" * 8)
    result = audit_flow(config=str(config))
    summary = json.loads(Path(result["summary"]).read_text())
    v2 = next(v for v in summary["versions"] if v["version"] == "2")
    assert summary["ok"] is False and not v2["verified"]
    assert [r["code"] for r in v2["block_reasons"]] == ["onnx_tampered"] and "(disk)" in v2["block_reasons"][0]["detail"]

    # `lidgate fetch` hands out the champion with its checked files, refuses a blocked version (exit 1)
    # and a champion whose ONNX export in its MLflow run was swapped (exit 3), writing nothing
    from typer.testing import CliRunner

    from flows.cli import app

    def fetch(ref: str, out: Path):
        return CliRunner().invoke(app, ["fetch", ref, "--config", str(config), "--out", str(out), "--json"])

    got = fetch("models:/e2e@champion", tmp_path / "fetched")
    assert got.exit_code == 0, got.output
    record = json.loads(got.stdout)
    fetched = tmp_path / "fetched"
    assert record["version"] == "2" and {c["version"] for c in record["certificates_checked"]} == {"1", "2"}
    from lid_engine.files import file_sha256

    assert file_sha256(fetched / "model.onnx") == record["onnx_sha256"]
    assert (fetched / "lid" / "lid.json").is_file() and (fetched / "weights.safetensors").is_file()
    blocked = fetch("models:/e2e/3", tmp_path / "blocked")
    assert blocked.exit_code == 1 and "lid.status 'blocked'" in blocked.output and not (tmp_path / "blocked").exists()
    run_id = registry_of(config).client.get_model_version("e2e", "2").run_id
    logged = next((tmp_path / "home").rglob(f"{run_id}/artifacts/onnx/*.onnx"))
    logged.write_bytes(logged.read_bytes()[:-8] + b"\0" * 8)
    swapped = fetch("models:/e2e@champion", tmp_path / "swapped")
    assert swapped.exit_code == 3 and "onnx" in swapped.output and not (tmp_path / "swapped").exists(), swapped.output


def test_deployments_take_the_configuration_and_have_pools_and_cron_schedules(config, harness):
    from prefect.client.orchestration import get_client

    from flows.deployments import apply_deployments

    ids = apply_deployments(str(config), retrain_cron="15 3 * * *")
    assert len(ids) == 3
    with get_client(sync_client=True) as client:
        pools = {p.name for p in client.read_work_pools()}
        assert {"cpu", "gpu"} <= pools
        retrain = client.read_deployment_by_name("retrain/retrain-nightly")
        certify = client.read_deployment_by_name("certify/certify-gpu")
        audit = client.read_deployment_by_name("audit/audit-daily")
        assert retrain.work_pool_name == "cpu" and certify.work_pool_name == "gpu"
        assert [s.schedule.cron for s in retrain.schedules] == ["15 3 * * *"]
        assert retrain.parameters == {"config": str(config.resolve())} == audit.parameters


def test_prefect_yaml_declares_the_same_deployments():
    spec = yaml.safe_load((REPO / "deployment" / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["certify-gpu"]["work_pool"]["name"] == "gpu"
    assert by_name["retrain-nightly"]["schedules"][0]["cron"]
    assert (REPO / by_name["retrain-nightly"]["parameters"]["config"]).is_file()
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        assert (REPO / path).is_file() and f"def {func}(" in (REPO / path).read_text()


@pytest.mark.timeout(900)
def test_retrain_calls_certify_through_the_gpu_pool_deployment(config, tmp_path, harness, monkeypatch):
    """With a server configured, certification runs as a deployment picked up by a `gpu` worker."""
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import apply_deployments
    from flows.retrain import bootstrap_flow, retrain_flow

    bootstrap_flow(config=str(config))
    apply_deployments(str(config))
    api = PREFECT_API_URL.value()
    env = {**os.environ, "PREFECT_API_URL": api}
    monkeypatch.setenv("LIDGATE_CERTIFY_TIMEOUT", "420")  # fail, don't hang, if the worker never picks it up
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        monkeypatch.setenv("PREFECT_API_URL", api)
        start = time.time()
        r = retrain_flow(config=str(config), data=[str(new_scans(tmp_path))])
        assert r["promoted"], r["reasons"]
        assert r["certification"]["lineage"][0]["ok"]
        assert time.time() - start < 600
    finally:
        worker.kill()
        out = worker.communicate(timeout=30)[0]
        print(out[-4000:])  # shown by pytest when the test fails
    assert "[lidgate] member 1/" in out  # the certificates were computed in the gpu worker's flow run


def test_the_first_version_can_come_from_a_model_already_in_mlflow(config, tmp_path):
    """model.mlflow: a second registered model starts from a version of the first (its spec and weights)."""
    from flows.retrain import bootstrap_flow
    from lid_engine import fingerprint_model

    assert bootstrap_flow(config=str(config))["promoted"]
    other = yaml.safe_load(config.read_text())
    other.update(name="e2e-copy", model={"mlflow": {"name": "e2e", "version": "1"}})
    copy_path = tmp_path / "copy.yaml"
    copy_path.write_text(yaml.safe_dump(other))
    r = bootstrap_flow(config=str(copy_path))
    assert r["promoted"] and r["candidate"]["source"] == "given", r["reasons"]
    source, copy = registry_of(config).load(version="1"), registry_of(copy_path).load(version="1")
    assert fingerprint_model(source.model) == fingerprint_model(copy.model)
    assert copy.spec.to_dict() == source.spec.to_dict()


def test_a_champion_without_a_certificate_is_not_built_on(config, tmp_path):
    """An alias moved by hand to a version registered without a LID: a retrain refuses to start (it could
    not project onto anything) instead of training without projection."""
    from flows.retrain import bootstrap_flow, retrain_flow
    from flows.tasks import ChampionError

    bootstrap_flow(config=str(config))
    registry = registry_of(config)
    v1 = registry.load(version="1")
    bare = registry.register(v1.model, v1.spec, lid=None, cert_data=v1.cert_data)
    registry.client.set_registered_model_alias(registry.model_name, "champion", bare)  # by hand, not the gate
    registry.release(v1)
    with pytest.raises(ChampionError, match="status is 'pending'"):
        retrain_flow(config=str(config), data=[str(new_scans(tmp_path))])
    registry.client.set_model_version_tag(registry.model_name, bare, "lid.status", "promoted")  # a forged status
    with pytest.raises(ChampionError, match="has no LID certificate"):
        retrain_flow(config=str(config), data=[str(new_scans(tmp_path))])
    assert len(registry.history()) == 2, "nothing was trained or registered"
    from flows.audit import audit_flow  # the audit sees a promoted status without a gate decision

    audit = audit_flow(config=str(config))
    v2 = next(v for v in json.loads(Path(audit["summary"]).read_text())["versions"] if v["version"] == bare)
    assert not audit["ok"] and any(r["code"] == "decision_missing" for r in v2["block_reasons"])
