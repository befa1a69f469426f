"""The pipeline with a streamed certification set (``certification.memory_mb``), driven by a
configuration file as a team's would be: the digits example whose loader returns its certification
split as a ``torch.utils.data.DataLoader`` of 5,400 noisy held-out digits (1.4 MB), streamed under a
1 MiB budget (``examples/digits/lidgate-streamed.yaml``).

* The first version is validated (GX, a block at a time), certified, registered, promoted and
  exported; the registry stores the set as one file and hands it back as a stream, on which the
  retrain re-checks the first certificate and the audit re-verifies both.
* The certify step gives the LID it gives with the set in memory (byte for byte apart from creation
  times), for the DataLoader and for a Parquet file read by row groups.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tests.helpers.paths import REPO
from tests.helpers.pipeline import assert_same_lid, new_scans, registry_of, write_config

pytestmark = pytest.mark.slow

MEMORY_MB = 1


@pytest.fixture()
def config(tmp_path, harness, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return write_config(tmp_path, "lidgate-streamed.yaml")


def in_memory() -> tuple[torch.Tensor, torch.Tensor]:
    """The example's certification split, read whole from its DataLoader."""
    from examples.digits.stream import load_streamed

    xs, ys = zip(*load_streamed(copies=12)["certification"])
    return torch.cat(xs), torch.cat(ys)


def test_a_streamed_certification_set_runs_the_pipeline_end_to_end(config, tmp_path):
    from flows.audit import audit_flow
    from flows.retrain import bootstrap_flow, retrain_flow
    from flows.tasks import load_configuration
    from lid_engine import SafetensorsStream, fingerprint_data, fingerprint_stream

    assert load_configuration(config).certification.memory_mb == MEMORY_MB
    x, y = in_memory()
    assert x.numel() * x.element_size() > MEMORY_MB * 2**20, "the set must be larger than the memory budget"

    r1 = bootstrap_flow(config=str(config))
    assert r1["promoted"], r1

    registry = registry_of(config)
    v1 = registry.load(version="1")
    stored = v1.cert_data["digits"]
    try:
        # GX checked the streamed set a block at a time (the report registered with the version)
        report = json.loads((v1.directory / "validation.json").read_text())["reports"]["certification"]
        checks = {c["name"]: c for c in report["checks"]}
        assert report["success"] and checks["rows"]["detail"] == f"row count {len(y)} ≥ 1"
        assert checks["rows"]["expectation"].startswith("ExpectColumnSumToBeBetween")
        assert checks["labels"]["success"] and checks["range"]["success"]
        # stored as one file larger than the budget, read back as a stream: the data that were certified
        assert isinstance(stored, SafetensorsStream) and stored.n == len(y)
        assert max(len(xb) for xb, _ in stored.chunks()) * 64 * 4 <= MEMORY_MB * 2**20
        assert fingerprint_stream(stored) == fingerprint_data(x, y) == v1.lid.certificates[0]["digits"].data_sha256
    finally:
        registry.release(v1)

    r2 = retrain_flow(config=str(config), data=[str(new_scans(tmp_path))])
    assert r2["promoted"], r2
    assert r2["certification"]["lineage"] == [{"version": "1", "ok": True, "failures": []}]

    audit = audit_flow(config=str(config))
    summary = json.loads(open(audit["summary"]).read())
    assert audit["ok"] and [(v["version"], v["verified"]) for v in summary["versions"]] == [("1", True), ("2", True)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, harness):
    """A digits model trained on the streamed example's training split, and a team flow around the
    certify step."""
    from prefect import flow

    from components.factory import ModelSpec
    from components.training import run_training
    from flows import tasks

    tmp = tmp_path_factory.mktemp("streamed")
    config = tasks.load_configuration(write_config(tmp, "lidgate-streamed.yaml"))
    data = tasks.load_data.fn(config)
    assert data.streamed
    torch.manual_seed(0)
    model = ModelSpec(config.model.factory, dict(config.model.kwargs)).build([REPO])
    run_training(config, model, torch.optim.Adam(model.parameters(), 3e-3), data)

    @flow(name="team-certify")
    def certify(cfg, splits):
        return tasks.certify_candidate(cfg, model, splits, None)

    return tmp, config, certify


def whole(config):
    """The configuration without ``memory_mb``: the certification split read into memory."""
    return config.model_copy(update={"certification": config.certification.model_copy(update={"memory_mb": None})})


def test_the_dataloader_stream_gives_the_lid_of_the_set_in_memory(trained):
    from flows import tasks

    tmp, config, certify = trained
    streamed, loaded = tasks.load_data.fn(config), tasks.load_data.fn(whole(config))
    assert streamed.streamed and not loaded.streamed
    assert streamed.fingerprint() == loaded.fingerprint()
    a, b = certify(config, streamed), certify(whole(config), loaded)
    assert a.lid is not None and b.lid is not None, (a.error, b.error)
    assert_same_lid(a.lid.save(tmp / "streamed"), b.lid.save(tmp / "whole"))


def test_a_parquet_file_read_by_row_groups_gives_the_lid_of_the_file_in_memory(trained):
    from components.config import load_config
    from examples.digits.stream import load_streamed
    from flows import tasks

    tmp, config, certify = trained
    parts = load_streamed(copies=12)
    frames = {}
    for name in ("train", "search"):
        x, y = parts[name]
        frames[name] = (np.asarray(x), np.asarray(y))
    frames["certification"] = tuple(t.numpy() for t in in_memory())
    for name, (x, y) in frames.items():
        df = pd.DataFrame(x, columns=[f"px{i}" for i in range(x.shape[1])]).assign(digit=y)
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp / f"{name}.parquet", row_group_size=400)
    doc = yaml.safe_load((tmp / "lidgate.yaml").read_text())
    doc["data"] = {"task": "digits", "train": "train.parquet", "search": "search.parquet",
                   "certification": "certification.parquet", "label": "digit", "classes": list(range(10)),
                   "value_range": [0.0, 1.0]}
    (tmp / "files.yaml").write_text(yaml.safe_dump(doc))
    files = load_config(tmp / "files.yaml")
    assert files.certification.memory_mb == MEMORY_MB
    streamed, loaded = tasks.load_data.fn(files), tasks.load_data.fn(whole(files))
    assert streamed.streamed and streamed.fingerprint() == loaded.fingerprint()
    a, b = certify(files, streamed), certify(whole(files), loaded)
    assert a.lid is not None and b.lid is not None, (a.error, b.error)
    assert_same_lid(a.lid.save(tmp / "parquet-streamed"), b.lid.save(tmp / "parquet-whole"))


def test_a_loader_that_gives_other_rows_when_read_again_registers_nothing(config, tmp_path):
    """The certify flow reads the data again and must find the fingerprint the trainer recorded: a loader
    whose rows change from call to call is refused by name, and nothing is registered."""
    from flows.certify import CandidateError
    from flows.retrain import bootstrap_flow

    (tmp_path / "drifting.py").write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "from examples.digits.stream import load_streamed\n"
        "CALLS = [0]\n"
        "def load():\n"
        "    CALLS[0] += 1\n"
        "    out = load_streamed(copies=12)\n"
        "    x, y = (torch.cat(t) for t in zip(*out['certification']))\n"
        "    x[0, 0] = CALLS[0] / 10  # another value on every call\n"
        "    out['certification'] = DataLoader(TensorDataset(x, y), batch_size=256)\n"
        "    return out\n")
    doc = yaml.safe_load(config.read_text())
    doc["code"] = [str(REPO), str(tmp_path)]
    doc["data"]["loader"] = {"function": "drifting:load"}
    config.write_text(yaml.safe_dump(doc))
    with pytest.raises(CandidateError, match="data.loader.function drifting:load must return the same rows on every "
                                             "call"):
        bootstrap_flow(config=str(config))
    registry = registry_of(config)
    assert registry.history() == [] and registry.champion() is None


def test_a_streamed_set_that_fails_its_checks_is_rejected_with_the_row(config):
    """GX checks the streamed set a block at a time; a value outside data.value_range is refused before
    training, naming the first row and column, and nothing is registered."""
    from flows.retrain import bootstrap_flow

    doc = yaml.safe_load(config.read_text())
    doc["data"]["value_range"] = [0.0, 0.95]  # the noisy copies reach 1.0
    config.write_text(yaml.safe_dump(doc))
    r = bootstrap_flow(config=str(config))
    assert r["version"] is None and not r["promoted"] and r["reasons"][0]["code"] == "validation_failed"
    detail = r["reasons"][0]["detail"]
    assert "certification: range: features: values outside [0, 0.95]: above 0.95 in" in detail
    assert "(first at row " in detail and ": column f" in detail
    assert registry_of(config).history() == []
