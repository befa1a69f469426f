"""The production shape on one machine: PostgreSQL → MLflow server, Prefect server, work pools.

Starts ``deployment/local_stack.sh`` on free loopback ports, registers and promotes a certified model
through the MLflow *server* (PostgreSQL backend), checks the Prefect deployments and pools, stops.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from tests.helpers.paths import REPO

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _workers() -> set[str]:
    out = subprocess.run(["pgrep", "-f", "prefect worker start --pool"], capture_output=True, text=True).stdout
    return set(out.split())


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if shutil.which("initdb") is None and not Path("/usr/lib/postgresql").exists():
        pytest.fail("PostgreSQL server binaries are missing: `apt-get install -y postgresql` (.ci/run does this)")
    # The postgres account must reach the cluster directory: pytest's own temp root is 0700.
    home = Path(tempfile.mkdtemp(prefix="lidgate-stack-"))
    os.chmod(home, 0o755)
    ports = {"PG_PORT": _free_port(), "MLFLOW_PORT": _free_port(), "PREFECT_PORT": _free_port()}
    env = {**os.environ, "LIDGATE_HOME": str(home), **{k: str(v) for k, v in ports.items()}}
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PREFECT_HOME"):
        env.pop(key, None)
    script = REPO / "deployment" / "local_stack.sh"
    workers_before = _workers()
    started = subprocess.run([str(script), "start"], env=env, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"home": home, "env": env, **ports}
    finally:
        subprocess.run([str(script), "stop"], env=env, capture_output=True, text=True, timeout=120)
        leftover = subprocess.run(["pgrep", "-f", f"{home}|--port {ports['PREFECT_PORT']}|--port {ports['MLFLOW_PORT']}"],
                                  capture_output=True, text=True).stdout.split()
        leftover += sorted(_workers() - workers_before)
        shutil.rmtree(home, ignore_errors=True)
        assert not leftover, f"local_stack.sh stop left processes behind: {leftover}"


def test_mlflow_server_on_postgres_registers_and_gates(stack, tmp_path):
    import lid_engine as le
    from benchmarks.cl.data import blobs
    from components.factory import ModelSpec
    from components.gate import promote
    from components.registry import Registry
    from tests.helpers.models import mlp
    from benchmarks.training import train_classifier

    x, y = (torch.from_numpy(a) for a in blobs(n=600, n_classes=4, seed=1))
    torch.manual_seed(0)
    spec = ModelSpec("tests.helpers.models:mlp", {"sizes": [2, 16, 4]})
    model = mlp([2, 16, 4])
    train_classifier(model, x[:300], y[:300], epochs=30, batch_size=32, lr=1e-2)
    lid = le.LID.certify(model, [le.Box.around(model, r) for r in (1e-3, 1e-2)], {"t": (x[300:], y[300:])},
                         {"t": le.Spec("accuracy", 0.5)})
    uri = f"http://127.0.0.1:{stack['MLFLOW_PORT']}"
    registry = Registry(uri, "stack-model", artifact_location=None, cache_dir=tmp_path / "cache")
    version = registry.register(model, spec, lid=lid, cert_data={"t": (x[300:], y[300:])})
    assert isinstance(version, str)
    decision = promote(registry, version, validation_passed=True)
    assert decision.promoted, decision.reasons
    assert registry.champion() == version
    loaded = registry.load(alias="champion")
    torch.testing.assert_close(loaded.model(x[:5]), model(x[:5]))
    # the backend really is PostgreSQL
    psql = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(stack["PG_PORT"]), "-U", "postgres", "-d", "mlflow",
                           "-tAc", "select count(*) from model_versions"], capture_output=True, text=True)
    assert psql.returncode == 0 and int(psql.stdout.strip()) == 1


def test_prefect_server_has_pools_and_scheduled_deployments(stack):
    env = {**stack["env"], "PREFECT_API_URL": f"http://127.0.0.1:{stack['PREFECT_PORT']}/api"}
    code = (
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        "    print(sorted(p.name for p in c.read_work_pools()))\n"
        "    d = c.read_deployment_by_name('retrain/retrain-nightly')\n"
        "    print(d.work_pool_name, [s.schedule.cron for s in d.schedules])\n"
        "    print(c.read_deployment_by_name('certify/certify-gpu').work_pool_name)\n"
    )
    out = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "'cpu'" in lines[0] and "'gpu'" in lines[0]
    assert lines[1] == "cpu ['0 2 * * *']"
    assert lines[2] == "gpu"


def test_the_watch_hears_mlflow_webhooks_and_puts_a_hand_moved_alias_back(stack, tmp_path):
    """`lidgate watch --listen`: the MLflow server (PostgreSQL backend) calls the watch's receiver with
    an HMAC-signed alias event; the watch puts the alias back at once (its poll is an hour away) and
    records the incident; an unsigned call is refused."""
    import json
    import time
    import urllib.error
    import urllib.request

    import yaml
    from mlflow import MlflowClient

    from components.factory import ModelSpec
    from components.gate import promote
    from components.registry import Registry
    from tests.helpers.models import mlp

    uri = f"http://127.0.0.1:{stack['MLFLOW_PORT']}"
    name = "watched-model"
    registry = Registry(uri, name, artifact_location=None, cache_dir=tmp_path / "cache")
    spec = ModelSpec("tests.helpers.models:mlp", {"sizes": [2, 4, 2]})
    cert = {"t": (torch.randn(8, 2), torch.randint(0, 2, (8,)))}
    first = registry.register(mlp([2, 4, 2]), spec, lid=None, cert_data=cert)
    registry.client.set_registered_model_alias(name, "champion", first)  # a first champion, set outside
    registry.set_tags(first, {"lid.promoted_at": "2026-01-01T00:00:00+00:00", "lid.status": "promoted"})  # by hand
    rogue = registry.register(mlp([2, 4, 2]), spec, lid=None, cert_data=cert)
    assert not promote(registry, rogue, validation_passed=True).promoted  # blocked: no certificate

    config = yaml.safe_load((REPO / "examples" / "digits" / "lidgate.yaml").read_text())
    config.update(name=name, code=[str(REPO)], registry={"home": str(tmp_path / "home"), "tracking_uri": uri})
    (tmp_path / "lidgate.yaml").write_text(yaml.safe_dump(config))
    port = _free_port()
    env = {**stack["env"], "LIDGATE_WEBHOOK_SECRET": "s3cret-for-the-stack-test"}
    watch = subprocess.Popen([str(REPO / ".venv" / "bin" / "lidgate"), "watch", str(tmp_path / "lidgate.yaml"),
                              "--interval", "3600", "--listen", f"127.0.0.1:{port}"], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not [w for w in MlflowClient(uri).list_webhooks()
                                               if w.name == f"lidgate-watch-{name}"]:
            time.sleep(0.5)
        time.sleep(7)  # the first look is done and the server's webhook cache (5 s in local_stack.sh) expired
        with pytest.raises(urllib.error.HTTPError) as refused:  # no signature: refused
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/", data=b"{}", method="POST"))
        assert refused.value.code == 401

        registry.client.set_registered_model_alias(name, "champion", rogue)  # by hand
        moved_back = None
        deadline = time.time() + 30
        while time.time() < deadline:
            if registry.champion() == first:
                moved_back = time.time()
                break
            time.sleep(0.5)
        assert moved_back is not None, "the watch did not put the alias back within 30 s"
        incident = json.loads(registry.client.get_model_version(name, rogue).tags["lid.incident"])
        assert incident["found_on"] == rogue and incident["moved_back_to"] == first
    finally:
        watch.terminate()
        output = watch.communicate(timeout=30)[0]
        print(output)  # shown by pytest when the test fails
    assert "webhook: the champion alias changed" in output, output


CERTIFY_THROUGH_THE_DEPLOYMENT = """
import json, sys
from pathlib import Path

import torch

from components.config import CertificationSection
from components.factory import ModelSpec
from components.training import run_training
from flows import tasks
from flows.certify import RESULT_FILE, run_certification, save_candidate

config_path, out = sys.argv[1], Path(sys.argv[2])
config = tasks.load_configuration(config_path)
data = tasks.load_data.fn(config)
torch.manual_seed(0)
spec = ModelSpec(config.model.factory, dict(config.model.kwargs))
model = spec.build([config.base_dir])
run_training(config, model, torch.optim.Adam(model.parameters(), 3e-3), data)
save_candidate(out / "candidate", model, spec, {
    "config": config_path, "config_sha256": config.sha256(), "data_paths": [], "task": data.task, "dtype": "float32",
    "data_sha256": data.fingerprint(), "champion": None, "lineage": [], "action": "bootstrap", "biasing": False})
sharded = run_certification(out / "candidate")  # PREFECT_API_URL is set: the certify-gpu deployment runs it
one = tasks.certify_candidate.fn(config.model_copy(update={"certification": CertificationSection(batch_size=64)}),
                                 model, data, None)
one.lid.save(out / "one")
print(json.dumps({"summary": json.loads((out / "candidate" / RESULT_FILE).read_text()), "ok": sharded.lid is not None}))
"""


def test_the_certify_deployment_fans_certification_out_to_dask_process_workers(stack, tmp_path):
    """The gpu worker runs the certify flow; with certification.shards its counts come from a local Dask
    cluster of process workers under the Prefect server, and the LID is the one counted in one process."""
    import json

    import yaml

    config = yaml.safe_load((REPO / "examples" / "digits" / "lidgate.yaml").read_text())
    config.update(name="sharded", code=[str(REPO)], registry={"home": str(tmp_path / "home")},
                  search={"iterations": 30, "checkpoints": 2},
                  certification={"shards": 2, "workers": 2, "processes": True, "batch_size": 64})
    (tmp_path / "lidgate.yaml").write_text(yaml.safe_dump(config))
    env = {**stack["env"], "PREFECT_API_URL": f"http://127.0.0.1:{stack['PREFECT_PORT']}/api",
           "LIDGATE_CERTIFY_TIMEOUT": "600"}
    out = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", CERTIFY_THROUGH_THE_DEPLOYMENT,
                          str(tmp_path / "lidgate.yaml"), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"], result
    shards = result["summary"]["shards"]
    assert shards["cluster"] == "local cluster of 2 process worker(s)" and shards["tasks"] == 2 * result["summary"]["members"]
    sharded, one = tmp_path / "candidate" / "lid", tmp_path / "one"
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.name != "lid.json")
    assert files and all((one / f).read_bytes() == (sharded / f).read_bytes() for f in files)
    certs = [[m["certificates"] for m in json.loads((d / "lid.json").read_text())["members"]] for d in (one, sharded)]
    for a, b in zip(*certs):
        for t in a:
            a[t].pop("created_at"), b[t].pop("created_at")
    assert certs[0] == certs[1]
