"""Certification sharded on Dask through Prefect's Dask task runner (``certification.shards``): the
pipeline's certify step gives the LID it gives in one process — the same files, byte for byte, apart
from their creation times — on a local cluster or on a scheduler named in the configuration, and says
where its shard task runs went."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.paths import REPO
from tests.helpers.pipeline import assert_same_lid, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory, harness):
    """A trained digits model, its data, and the LID the certify step gives it in one process."""
    from prefect import flow

    from components.config import CertificationSection
    from components.factory import ModelSpec
    from components.training import run_training
    from flows import tasks

    tmp = tmp_path_factory.mktemp("shards")
    config = tasks.load_configuration(write_config(tmp))
    # bound passes of 64 rows: the 449 held-out digits make 8 units, so 3 shards get 3, 3 and 2
    config = config.model_copy(update={"certification": CertificationSection(batch_size=64)})
    data = tasks.load_data.fn(config)
    torch.manual_seed(0)
    model = ModelSpec(config.model.factory, dict(config.model.kwargs)).build([REPO])
    run_training(config, model, torch.optim.Adam(model.parameters(), 3e-3), data)

    @flow(name="team-certify")
    def certify(cfg):
        return tasks.certify_candidate(cfg, model, data, None)

    one = certify(config)
    assert one.lid is not None and one.shards is None, one.error
    return config, certify, one.lid.save(tmp / "one")


def test_sharded_certification_saves_the_unsharded_lid(unsharded, tmp_path):
    from components.config import CertificationSection

    config, certify, one = unsharded
    sharded = config.model_copy(update={"certification": CertificationSection(shards=3, workers=2, batch_size=64)})
    assert sharded.sha256() == config.sha256()  # where the counts run is not what produced the version
    three = certify(sharded)
    assert three.lid is not None, three.error
    assert three.shards == {"shards": 3, "tasks": 3 * len(three.lid), "cluster": "local cluster of 2 thread worker(s)"}
    assert_same_lid(one, three.lid.save(tmp_path / "three"))


def test_shards_go_to_the_scheduler_the_configuration_names(unsharded, tmp_path):
    from distributed import LocalCluster

    from components.config import CertificationSection

    config, certify, one = unsharded
    with LocalCluster(n_workers=2, processes=False, protocol="tcp", dashboard_address=None) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://")
        external = config.model_copy(update={"certification": CertificationSection(shards=2, scheduler=address,
                                                                                   batch_size=64)})
        result = certify(external)
        assert result.lid is not None, result.error
        assert result.shards == {"shards": 2, "tasks": 2 * len(result.lid), "cluster": f"scheduler {address}"}
        assert len(cluster.scheduler.task_prefixes) > 0  # the scheduler really ran them
    assert_same_lid(one, result.lid.save(tmp_path / "external"))
