"""Certification sharded on Dask through Prefect's Dask task runner (``certification.shards``): the
pipeline's certify step gives the LID it gives in one process — the same files, byte for byte, apart
from their creation times — and says how many shard task runs counted it."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.paths import REPO
from tests.helpers.pipeline import write_config

pytestmark = pytest.mark.slow

TIMING = ("created_at",)


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING and k != "digest"}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def test_sharded_certification_saves_the_unsharded_lid(tmp_path, harness):
    from prefect import flow

    from components.config import CertificationSection
    from components.factory import ModelSpec
    from components.training import run_training
    from flows import tasks

    config = tasks.load_configuration(write_config(tmp_path))
    data = tasks.load_data.fn(config)
    torch.manual_seed(0)
    model = ModelSpec(config.model.factory, dict(config.model.kwargs)).build([REPO])
    run_training(config, model, torch.optim.Adam(model.parameters(), 3e-3), data)
    # bound passes of 64 rows: the 449 held-out digits make 8 units, 3 shards of 3, 3 and 2
    config = config.model_copy(update={"certification": CertificationSection(batch_size=64)})
    sharded = config.model_copy(update={"certification": CertificationSection(shards=3, workers=2, batch_size=64)})
    assert sharded.sha256() == config.sha256()  # where the counts run is not what produced the version

    @flow(name="team-certify")
    def certify(cfg):
        return tasks.certify_candidate(cfg, model, data, None)

    one, three = certify(config), certify(sharded)
    assert one.lid is not None and three.lid is not None, (one.error, three.error)
    assert one.shards is None and three.shards == {"shards": 3, "tasks": 3 * len(three.lid),
                                                 "cluster": "local cluster of 2 thread worker(s)"}
    a, b = one.lid.save(tmp_path / "one"), three.lid.save(tmp_path / "three")
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for f in files:
        if f == "lid.json":
            assert without_timing(json.loads((a / f).read_text())) == without_timing(json.loads((b / f).read_text()))
        else:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
