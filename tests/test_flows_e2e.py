"""End-to-end pipeline tests: real Prefect (test harness server), real MLflow (SQLite), real GX, real ONNX.

Small on purpose (8×8 digits, an MLP 64-32-10, short searches) so the whole module runs in a few
minutes; `make demo` runs the same flows on MNIST.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

FACTORY = {"factory": "lid_engine.models:mlp", "factory_kwargs": {"sizes": [64, 32, 10]}}
FAST = {"iterations": 30, "checkpoints": 3, "epochs": 20, "lr": 3e-3}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture()
def home(tmp_path, monkeypatch, harness):
    monkeypatch.setenv("LIDGATE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LIDGATE_MODEL_NAME", "e2e")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def _registry():
    from flows.settings import get_settings, open_registry

    s = get_settings()
    return open_registry(s)


def _bootstrap():
    from flows.retrain import bootstrap_flow

    return bootstrap_flow(task_ref="digits:0,1", **FACTORY, **FAST)


def test_promotion_path_registers_certifies_promotes_and_exports(home):
    import onnxruntime as ort

    from components.export import read_onnx_metadata
    from flows.retrain import retrain_flow

    r1 = _bootstrap()
    assert r1["promoted"] and r1["champion_after"] == r1["version"] == "1"
    # the update is certified with the linear bound; v1's IBP certificate is re-checked with IBP
    r2 = retrain_flow(task_ref="digits:2,3", projection=True, biasing="fisher", frozen_fraction=0.5, bound="linear",
                      **FAST)
    assert r2["promoted"], r2["reasons"]
    assert r2["certification"]["bound"] == "linear"
    assert r2["certification"]["reverify"] == [{"version": "1", "ok": True, "failures": []}]
    registry = _registry()
    assert registry.champion() == "2"
    statuses = {str(v.version): v.tags.get("lid.status") for v in registry.history()}
    assert statuses == {"1": "promoted", "2": "promoted"}
    v2 = registry.load(version="2")
    assert v2.lineage == ["1"] and v2.lid is not None
    assert v2.lid.certificate(0).bound_method == "linear"
    assert registry.load(version="1").lid.certificate(0).bound_method == "ibp"
    # the promoted version's ONNX export carries its certificate digest and matches torch
    onnx_path = Path(r2["onnx"]["path"])
    assert read_onnx_metadata(onnx_path)["lidgate.certificate_sha256"] == v2.tags["lid.certificate_sha256"]
    x = v2.cert_data["t23"][0][:9]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), v2.model(x).detach(), atol=1e-5, rtol=1e-5)


def test_rogue_update_is_blocked_and_champion_stays(home):
    from flows.retrain import retrain_flow

    _bootstrap()
    r = retrain_flow(task_ref="digits:4,5", projection=False, biasing="none", **FAST)
    codes = {x["code"] for x in r["reasons"]}
    assert not r["promoted"] and "outside_champion_lid" in codes and "earlier_certificate_failed" in codes
    registry = _registry()
    assert registry.champion() == "1"
    tags = registry.load(version=r["version"]).tags
    assert tags["lid.status"] == "blocked"
    assert "outside_champion_lid" in {x["code"] for x in json.loads(tags["lid.block_reasons"])}


def test_bad_data_is_rejected_before_training_and_recorded(home, monkeypatch):
    import mlflow

    import flows.retrain as retrain
    from flows.data import load_task

    _bootstrap()

    def poisoned(ref, **kw):
        data = load_task(ref, **kw)
        x, y = data.train
        x = x.clone()
        x[3, 5] = float("nan")
        data.train = (x, y)
        return data

    monkeypatch.setattr("flows.data.load_task", poisoned)
    r = retrain.retrain_flow(task_ref="digits:2,3", **FAST)
    assert r["version"] is None and not r["promoted"] and r["reasons"][0]["code"] == "validation_failed"
    assert "NaN" in r["reasons"][0]["detail"] or "nan" in r["reasons"][0]["detail"]
    registry = _registry()
    assert registry.champion() == "1" and len(registry.history()) == 1
    mlflow.set_tracking_uri(registry.tracking_uri)
    runs = mlflow.search_runs(experiment_names=["lidgate-rejections"])
    assert len(runs) == 1 and runs.iloc[0]["tags.lid.status"] == "rejected"


def test_crash_between_registration_and_alias_move_leaves_champion(home, monkeypatch):
    from components.registry import Registry
    from flows.retrain import retrain_flow

    _bootstrap()

    def crash(self, version):
        raise RuntimeError("injected crash before the alias move")

    with monkeypatch.context() as patch:  # scoped: the fixture's LIDGATE_HOME must stay set
        patch.setattr(Registry, "move_champion", crash)
        r = retrain_flow(task_ref="digits:2,3", projection=True, biasing="none", **FAST)
    assert not r["promoted"] and r["reasons"][-1]["code"] == "gate_error"
    registry = _registry()
    assert registry.champion() == "1"
    assert {str(v.version): v.tags.get("lid.status") for v in registry.history()} == {"1": "promoted", "2": "blocked"}


def test_audit_lists_every_version_with_its_status(home):
    from flows.audit import audit_flow
    from flows.retrain import retrain_flow

    _bootstrap()
    retrain_flow(task_ref="digits:2,3", projection=True, biasing="none", **FAST)
    retrain_flow(task_ref="digits:4,5", projection=False, biasing="none", **FAST)
    result = audit_flow()
    summary = json.loads(Path(result["summary"]).read_text())
    assert summary["ok"] is True
    by_version = {v["version"]: v for v in summary["versions"]}
    assert {k: v["status"] for k, v in by_version.items()} == {"1": "promoted", "2": "promoted", "3": "blocked"}
    assert by_version["2"]["verified"] and by_version["1"]["verified"]
    html = Path(result["report"]).read_text()
    assert html.count("<img") >= 3 and "blocked" in html


def test_deployments_have_pools_and_cron_schedules(harness):
    from prefect.client.orchestration import get_client

    from flows.deployments import apply_deployments

    ids = apply_deployments(retrain_cron="15 3 * * *")
    assert len(ids) == 3
    with get_client(sync_client=True) as client:
        pools = {p.name for p in client.read_work_pools()}
        assert {"cpu", "gpu"} <= pools
        retrain = client.read_deployment_by_name("retrain/retrain-nightly")
        certify = client.read_deployment_by_name("certify/certify-gpu")
        assert retrain.work_pool_name == "cpu" and certify.work_pool_name == "gpu"
        assert [s.schedule.cron for s in retrain.schedules] == ["15 3 * * *"]


def test_prefect_yaml_declares_the_same_deployments():
    import yaml

    spec = yaml.safe_load(Path("deployment/prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["certify-gpu"]["work_pool"]["name"] == "gpu"
    assert by_name["retrain-nightly"]["schedules"][0]["cron"]
    for d in spec["deployments"]:
        path, func = d["entrypoint"].split(":")
        assert Path(path).is_file() and f"def {func}(" in Path(path).read_text()


@pytest.mark.timeout(900)
def test_retrain_calls_certify_through_the_gpu_pool_deployment(home, harness, monkeypatch):
    """With a server configured, certification runs as a deployment picked up by a `gpu` worker."""
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import apply_deployments
    from flows.retrain import retrain_flow

    _bootstrap()
    apply_deployments()
    api = PREFECT_API_URL.value()
    env = {**os.environ, "PREFECT_API_URL": api, "LIDGATE_HOME": str(home), "LIDGATE_MODEL_NAME": "e2e"}
    monkeypatch.setenv("LIDGATE_CERTIFY_TIMEOUT", "420")  # fail, don't hang, if the worker never picks it up
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        monkeypatch.setenv("PREFECT_API_URL", api)
        start = time.time()
        r = retrain_flow(task_ref="digits:2,3", projection=True, biasing="none", **FAST)
        assert r["promoted"], r["reasons"]
        assert r["certification"]["reverify"][0]["ok"]
        assert time.time() - start < 600
    finally:
        worker.kill()
        out = worker.communicate(timeout=30)[0]
        print(out[-4000:])  # shown by pytest when the test fails
    assert "certify" in out.lower() or r["promoted"]
