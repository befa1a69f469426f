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


def test_a_shard_that_counts_other_rows_certifies_nothing(harness):
    """Each shard reports a digest of the rows it counted, which must equal that range's digest in one
    whole reading where the certificate is made: a worker that reads other rows (another file at the same
    path, say) is refused, so the certificate cannot name rows other than those counted."""
    import threading

    from prefect import flow
    from torch import nn

    import lid_engine as le
    from components.config import CertificationSection
    from flows.shards import shard_counter
    from lid_engine.stream import CertificationStream

    class TwoFaced(CertificationStream):
        """The rows it was made with in the thread that made it, other rows in any other thread."""

        def __init__(self, x, y, lie: bool):
            self.x, self.y, self.lie, self.owner = x, y, lie, threading.get_ident()
            self.n, self.feature_shape, self.dtype, self.name = len(x), (x.shape[1],), x.dtype, "cert.parquet"

        def _read(self, start, stop):
            x = self.x.flip(0) if self.lie and threading.get_ident() != self.owner else self.x
            yield x[start:stop], self.y[start:stop]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(300, 5)
    with torch.no_grad():
        y = model(x).argmax(1)
    box, spec = le.Box.around(model, 1e-3), le.Spec("accuracy", 0.5)

    @flow(name="two-faced-shards")
    def run(lie: bool):
        with shard_counter(CertificationSection(shards=3, workers=2, batch_size=64)) as counter:
            return le.certify_box(model, box, TwoFaced(x, y, lie), None, spec, batch_size=64, counter=counter)

    assert run(False).certified == le.certify_box(model, box, x, y, spec, batch_size=64).certified
    with pytest.raises(Exception, match=r"cert.parquet: the shard of rows \d+..\d+ counted other rows than this "
                                        "process reads there"):
        run(True)
