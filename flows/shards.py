"""Certification sharded on Dask through Prefect's Dask task runner (prefect-dask).

The certified count of a domain is a sum over examples, so ``certification.shards`` pieces of the
certification set are counted in parallel, each as a Prefect task run on a Dask worker, and added
exactly (``lid_engine.Counts``). Pieces start at the engine's batch boundaries
(``lid_engine.shard_ranges``), so every example is bounded in the batch one pass would use and the
certificate is the one-pass certificate, byte for byte.

Where the workers come from (``CertificationSection``):

* a local cluster started for the certification and stopped after it: ``workers`` workers, threads
  by default and processes when a Prefect server is configured (``processes`` overrides);
* an existing scheduler: ``scheduler: tcp://host:8786`` (``dask scheduler`` / ``dask worker`` on the
  machines, see deployment/README.md). Workers need lidgate, the team's model code and, for a
  streamed file, the file at the same path.

A shard gets the model, the domain and its rows: a stream travels as its source and a row range that
the shard reads itself; tensors held in memory are written once per certification set to a safetensors
file that local process workers read their rows from (``lid_engine.stream.SafetensorsStream``), and
travel as slices to thread workers or to an external scheduler's. It returns plain numbers (``Counts``,
and for a stream a digest of the rows it read, which must equal that range's digest in one whole reading
here: ``lid_engine.stream.range_digests``), never CUDA tensors, which Dask cannot move between
processes. The LID search itself stays where the certify flow runs (the ``gpu`` pool).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.settings import prefect_server_configured

if TYPE_CHECKING:
    from torch import nn

    from components.config import CertificationSection
    from lid_engine import Box, Counts
    from lid_engine.certificate import CertData

__all__ = ["ShardCounter", "certify_shard", "shard_counter"]


@task(name="certify-shard", cache_policy=NO_CACHE, persist_result=False)
def certify_shard(model: nn.Module, box: Box, data: CertData, rows: tuple[int, int] | None, *, dtype, batch_size: int,
                  method: str, threads: int | None = None) -> tuple[Counts, str | None]:
    """The certified counts of rows ``rows`` of ``data`` (all of it when None), on a Dask worker, and for a
    stream the digest of the rows it read (``lid_engine.stream.range_digests``)."""
    import torch

    from lid_engine import CertificationStream, count_certified
    from lid_engine.stream import TappedStream

    if threads is not None:
        torch.set_num_threads(threads)
    tapped = TappedStream(data) if isinstance(data, CertificationStream) else None
    counts = count_certified(model, box, tapped or data, dtype=dtype, batch_size=batch_size, method=method, rows=rows,
                             where="certify shard")
    return counts, tapped.digest() if tapped is not None else None


class ShardCounter:
    """A ``lid_engine`` counter (``certify_box(counter=...)``) that spreads the rows over a Dask cluster.

    Thread workers share this process's kernel switches, so their shards run one at a time
    (``lid_engine.numerics.SWITCHES``); do not call the counter from inside a certification block."""

    def __init__(self, runner, shards: int, threads: int | None, cluster: str, staging: Path | None = None) -> None:
        self.runner, self.shards, self.threads = runner, shards, threads
        self.cluster = cluster  # where the shards run, in words (the summary and the log say it)
        self.submitted = 0  # shard task runs so far (reported in the flow's log and summary)
        # local process workers: tensors are written once per certification set to a file here and read
        # back by each shard (instead of pickling every shard's rows for every member)
        self.staging = staging
        self._staged: dict[tuple[int, int], tuple[object, object]] = {}
        # per stream and shard ranges: the digests of the ranges' rows (the stream kept alive with them)
        self._digests: dict[tuple, tuple[object, list[str]]] = {}

    def _staged_stream(self, data):
        """``data`` (tensors, or a stream that would pickle as its rows) as a stream over a file in the
        staging folder, written on first use (a stream a chunk at a time)."""
        from lid_engine import CertificationStream
        from lid_engine.stream import SafetensorsStream

        key = (id(data),) if isinstance(data, CertificationStream) else (id(data[0]), id(data[1]))
        if key not in self._staged:  # the data are kept alive with their stream, so the id is not reused
            path = self.staging / f"certification-{len(self._staged)}.safetensors"
            staged = SafetensorsStream.write_chunks(data.chunks(), path, name=data.name) \
                if isinstance(data, CertificationStream) else SafetensorsStream.write(data[0], data[1], path)
            self._staged[key] = (data, staged)
        return self._staged[key][1]

    def __call__(self, model: nn.Module, box: Box, data: CertData, *, dtype, batch_size: int | None, method: str,
                 where: str) -> Counts:
        from lid_engine import Box, CertificationStream, Counts, InvalidInputError, shard_ranges
        from lid_engine.stream import batch_unit, range_digests

        if self.staging is not None and not (isinstance(data, CertificationStream) and data.portable):
            data = self._staged_stream(data)
        n = len(data) if isinstance(data, CertificationStream) else len(data[0])
        ranges = shard_ranges(n, self.shards, batch_unit(method, batch_size))
        # Dask cannot move CUDA tensors between processes: shards get CPU copies (the search may have run on CUDA)
        model, box = _cpu(model), box.to("cpu") if isinstance(box, Box) else box
        futures = []
        for a, b in ranges:
            # tensors travel as their slice only; a stream travels as its source and reads its own rows
            piece, rows = (data, (a, b)) if isinstance(data, CertificationStream) else \
                ((data[0][a:b].cpu(), data[1][a:b].cpu()), None)
            futures.append(self.runner.submit(certify_shard, parameters={
                "model": model, "box": box, "data": piece, "rows": rows, "dtype": dtype, "batch_size": batch_size,
                "method": method, "threads": self.threads}))
        self.submitted += len(futures)
        results = [f.result() for f in futures]
        if isinstance(data, CertificationStream):
            # the rows each shard counted must be the rows of one whole reading here, which the stream binds
            # to its fingerprint's (lid_engine.stream): a worker reading other rows certifies nothing
            key = (id(data), tuple(ranges))
            if key not in self._digests:
                self._digests[key] = (data, range_digests(data, ranges))
            for (a, b), (_, got), want in zip(ranges, results, self._digests[key][1]):
                if got != want:
                    raise InvalidInputError(f"{data.name}: the shard of rows {a}..{b} counted other rows than this "
                                            "process reads there (a different file on the worker, or a source that "
                                            "changed); nothing counted from it can be certified")
        return Counts.total(counts for counts, _ in results)


def _cpu(model: nn.Module) -> nn.Module:
    import copy

    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    return model if on_cpu else copy.deepcopy(model).to("cpu")


@contextmanager
def shard_counter(section: CertificationSection) -> Iterator[ShardCounter | None]:
    """A ``ShardCounter`` on the cluster ``section`` describes, for the duration of the block (None when
    ``shards`` is 1 and no scheduler is named: count in-process)."""
    if section.shards <= 1 and section.scheduler is None:
        yield None
        return
    from prefect_dask import DaskTaskRunner

    cpus = os.cpu_count() or 1
    if section.scheduler is not None:
        runner, threads, cluster = DaskTaskRunner(address=section.scheduler), None, f"scheduler {section.scheduler}"
        staging = False  # workers elsewhere: the rows travel with the shards
    else:
        workers = section.workers or max(1, min(section.shards, cpus))
        processes = section.processes if section.processes is not None else prefect_server_configured()
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "processes": processes, "threads_per_worker": 1,
                                                "dashboard_address": None})
        staging = processes  # local process workers read the rows from a file on this machine
        # torch threads per process worker, so the workers share the cores; thread workers share one pool
        threads = max(1, cpus // workers) if processes else None
        cluster = f"local cluster of {workers} {'process' if processes else 'thread'} worker(s)"
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # Dask logs every worker start and stop at INFO
    try:
        with runner, tempfile.TemporaryDirectory(prefix="lidgate-shards-") as tmp:
            yield ShardCounter(runner, section.shards, threads, cluster, Path(tmp) if staging else None)
    finally:
        quiet.setLevel(level)
