"""The scaling benchmark (benchmarks/scale.py) in its smallest mode: every cell runs in its own process, the
results and plots are written, and the sharded counts equal the unsharded ones — so the benchmark cannot rot.
No timing is asserted (the machine is shared)."""

from __future__ import annotations

import json

import pytest
import torch

import lid_engine as le
from benchmarks import scale
from lid_engine import count_certified, shard_ranges


def test_the_synthetic_stream_gives_the_same_rows_to_every_reader():
    stream = scale.SyntheticStream(3 * scale.BLOCK + 100)
    x, y = stream.head(stream.n)
    for a, b in ((0, 5), (scale.BLOCK - 3, scale.BLOCK + 7), (stream.n - 1, stream.n)):
        got = torch.cat([c[0] for c in stream.chunks(a, b)])
        assert torch.equal(got, x[a:b])
    assert y.dtype == torch.int64 and len(y) == len(x) == stream.n


def test_shards_of_the_stream_add_up_to_one_pass():
    model = scale.mlp(8)
    box = le.Box.around(model, radius=scale.RADIUS)
    stream = scale.SyntheticStream(5000)
    whole = count_certified(model, box, stream, batch_size=512)
    parts = [count_certified(model, box, stream, batch_size=512, rows=r) for r in shard_ranges(stream.n, 3, 512)]
    assert le.Counts.total(parts) == whole and whole.certified > 0


def test_the_pipeline_rows_are_the_same_read_as_a_block_or_one_by_one():
    import numpy as np

    idx = np.arange(scale.PIPE_POOL - 5, scale.PIPE_POOL + 5)
    x, y = scale.pipeline_rows(idx)
    ds = scale.PipelineRows(scale.PIPE_POOL + 5)
    for k, i in enumerate(idx):
        xi, yi = ds[int(i)]
        assert np.array_equal(xi.numpy(), x[k]) and yi == y[k]
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1 and set(y) <= set(range(10))


def test_a_part_measured_again_replaces_only_its_own_cells():
    old = {"quick": True, "machine": {"m": 0}, "wall_s": 1.0, "sizes": {},
           "cells": [{"kind": "count", "rows": 8, "torch_threads": 2, "omp": "default", "counts": {}},
                     {"kind": "count", "rows": 8, "torch_threads": 1, "data": "tensors", "counts": {"old": 1}},
                     {"kind": "search", "hidden": 1}]}
    new = {"quick": True, "sizes": {}, "runs": [{"parts": ["compare"], "machine": {"m": 1}, "wall_s": 2.0}],
           "cells": [{"kind": "count", "rows": 8, "torch_threads": 1, "data": "tensors", "counts": {}}]}
    doc = scale.merge(old, new)
    assert [scale.part_of(c) for c in doc["cells"]] == ["compare", "search"]
    assert [c["run"] for c in doc["cells"]] == [1, 0] and doc["cells"][0]["counts"] == {}
    assert [r["machine"] for r in doc["runs"]] == [{"m": 0}, {"m": 1}]


@pytest.mark.slow
def test_quick_benchmark_writes_its_results_and_sharded_counts_equal_unsharded(tmp_path):
    assert scale.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "scale.json").read_text())
    counts = [c for c in doc["cells"] if c["kind"] in ("count", "sharded")]
    assert {(c["kind"], c.get("mode"), c.get("workers")) for c in counts} == {
        ("count", None, None), ("sharded", "threads", 1), ("sharded", "threads", 2),
        ("sharded", "processes", 1), ("sharded", "processes", 2)}
    assert all(c["counts"] == counts[0]["counts"] for c in counts) and doc["equal_counts"] == {"4096": True}
    assert all(c["shards"] == c["workers"] for c in counts if c["kind"] == "sharded")
    assert all(c["peak_mib"] > 0 for c in doc["cells"])
    pipeline = [c for c in doc["cells"] if c["kind"] == "pipeline"]
    assert {(c["source"], c["memory_mb"]) for c in pipeline} == {
        ("parquet", scale.PIPE_MEMORY_MB), ("parquet", None), ("loader", scale.PIPE_MEMORY_MB), ("loader", None)}
    assert all(c["streamed"] == bool(c["memory_mb"]) and c["validation_passed"] for c in pipeline)
    assert doc["pipeline_equal"] == {"3000": True}
    assert {c["kind"] for c in doc["cells"]} >= {"probe", "search"}
    md = (tmp_path / "scale.md").read_text()
    assert "| 4,096 | processes | 2 | 2 |" in md and "CUDA: not measured" in md and "model W=16" in md
    assert "## 3. The pipeline with a streamed certification set" in md and "| DataLoader | 3,000 | streamed | 64 |" in md
    assert (tmp_path / "scale_rows.png").stat().st_size > 0 and (tmp_path / "scale_params.png").stat().st_size > 0
