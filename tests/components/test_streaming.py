"""components.streaming: a Parquet certification file read a bounded chunk at a time.

* More rows than the configured memory budget holds are certified through the stream, with the
  counts, the data fingerprint and the provenance record of the file loaded whole.
* No chunk holds more rows than the budget allows; a row group far larger than it is refused.
* Bad files and bad rows are named (file, rows, column), as when a file is loaded whole.
"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

import lid_engine as le
from components.config import parse_config
from components.data import DataError, load_file, load_splits
from components.streaming import ParquetStream, certification_stream
from lid_engine.certificate import count_certified, fingerprint_data, fingerprint_stream

FEATURES = 64
ROWS = 12000


def frame(n: int, seed: int, dtype=np.float32) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    cols = {f"p{i}": rng.normal(size=n).astype(dtype) for i in range(FEATURES)}
    return pd.DataFrame({**cols, "digit": rng.integers(0, 3, n)})


def write(df: pd.DataFrame, path, row_group_size: int = 500):
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), path, row_group_size=row_group_size)
    return path


MEMORY_MB = 1  # the budget every stream here reads under


def config(tmp_path, **data):
    write(frame(50, 1), tmp_path / "train.parquet")
    write(frame(50, 2), tmp_path / "search.parquet")
    doc = {"version": 1, "name": "m", "model": {"factory": "team_models:make"}, "spec": {"tau": 0.5},
           "data": {"train": "train.parquet", "search": "search.parquet", "certification": "cert.parquet",
                    "label": "digit", **data},
           }
    return parse_config(doc, base_dir=tmp_path, file=tmp_path / "lidgate.yaml")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    write(frame(ROWS, 3), tmp / "cert.parquet")
    return tmp, config(tmp)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def test_more_rows_than_the_budget_certify_as_the_file_loaded_whole(big):
    tmp, cfg = big
    stream = certification_stream(cfg, MEMORY_MB)
    budget = MEMORY_MB * 2**20
    assert ROWS * FEATURES * 4 > budget, "the test must certify more rows than the memory budget holds"
    assert stream.chunk_rows * FEATURES * 8 * 3 <= budget  # staged as float64 in three copies at most
    assert max(len(x) for x, _ in stream.chunks()) <= stream.chunk_rows < ROWS

    x, y = load_file(tmp / "cert.parquet", cfg.data)
    assert (stream.n, stream.dtype, stream.feature_shape) == (ROWS, x.dtype, tuple(x.shape[1:]))
    assert fingerprint_stream(stream) == fingerprint_data(x, y)
    assert stream.provenance() == load_splits(cfg).provenance["files"]["certification"]

    net = model()
    box = le.Box.around(net, 0.002)
    counts = count_certified(net, box, stream, batch_size=1024)
    assert counts == count_certified(net, box, (x, y), batch_size=1024)
    assert 0 < counts.certified < counts.n
    lid = le.LID.certify(net, [box], {"t": stream}, {"t": le.Spec("accuracy", 0.1)})
    assert lid.certificates[0]["t"].data_sha256 == fingerprint_data(x, y)
    assert le.verify(lid.save(tmp / "lid"), net, stream).ok


def test_a_stream_travels_to_another_process_as_its_path(big):
    _, cfg = big
    stream = certification_stream(cfg, MEMORY_MB)
    copy = pickle.loads(pickle.dumps(stream))
    rows = (1000, 2345)
    a = [torch.cat(t) for t in zip(*stream.chunks(*rows))]
    b = [torch.cat(t) for t in zip(*copy.chunks(*rows))]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a[0]) == 1345


def test_float64_columns_and_a_shape_read_as_a_whole_file_does(tmp_path):
    cfg = config(tmp_path, shape=[4, 16])
    write(frame(700, 4, np.float64), tmp_path / "cert.parquet", row_group_size=64)
    stream = certification_stream(cfg, MEMORY_MB)
    x, y = load_file(tmp_path / "cert.parquet", cfg.data)
    assert stream.dtype == x.dtype == torch.float64 and stream.feature_shape == (4, 16)
    assert fingerprint_stream(stream) == fingerprint_data(x, y)


def test_bad_files_and_rows_are_named(tmp_path):
    cfg = config(tmp_path)
    df = frame(900, 5)
    df.loc[613, "p7"] = np.nan
    write(df, tmp_path / "cert.parquet", row_group_size=100)
    stream = certification_stream(cfg, MEMORY_MB)  # the header is fine; the bad value is found when its chunk is read
    with pytest.raises(DataError, match=r"cert\.parquet, rows 600\.\.699 .*feature column 'p7' holds NaN .* at row 13"):
        fingerprint_stream(stream)

    df = frame(900, 5)
    df.loc[402, "digit"] = -1
    write(df, tmp_path / "cert.parquet", row_group_size=100)
    with pytest.raises(DataError, match=r"rows 400\.\.499 .*label column 'digit' holds -1 at row 2"):
        list(certification_stream(cfg, MEMORY_MB).labels())

    write(frame(900, 5).drop(columns=["digit"]), tmp_path / "cert.parquet")
    with pytest.raises(DataError, match=r"cert\.parquet: no label column 'digit'"):
        certification_stream(cfg, MEMORY_MB)

    write(frame(60000, 6), tmp_path / "cert.parquet", row_group_size=60000)
    with pytest.raises(DataError, match=r"row group 0 holds 60000 rows .* memory_mb = 1"):
        certification_stream(cfg, MEMORY_MB)

    (tmp_path / "cert.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"cert\.parquet: not a readable Parquet file"):
        certification_stream(cfg, MEMORY_MB)

    frame(10, 7).to_csv(tmp_path / "cert.csv", index=False)
    with pytest.raises(DataError, match=r"cert\.csv: a streamed certification set is read from Parquet files"):
        ParquetStream(tmp_path / "cert.csv", cfg.data, MEMORY_MB)


def test_a_file_rewritten_while_it_is_certified_is_refused(tmp_path):
    import os

    cfg = config(tmp_path)
    write(frame(900, 8), tmp_path / "cert.parquet", row_group_size=100)
    stream = certification_stream(cfg, MEMORY_MB)
    fingerprint_stream(stream)
    write(frame(900, 9), tmp_path / "cert.parquet", row_group_size=100)  # same size, other values
    os.utime(tmp_path / "cert.parquet", ns=(1, 1))
    with pytest.raises(DataError, match="the file changed while it was being certified"):
        list(stream.chunks())


def test_a_worker_reading_another_file_at_the_path_is_refused(tmp_path):
    """A stream travels to a Dask process worker as its path and the sha256 it was opened on: a file with
    other bytes there (even with the time it had) is refused before a row is counted."""
    import os

    cfg = config(tmp_path)
    path = write(frame(900, 8), tmp_path / "cert.parquet", row_group_size=100)
    stream = certification_stream(cfg, MEMORY_MB)
    shipped = pickle.dumps(stream)
    st = os.stat(path)
    write(frame(900, 9), path, row_group_size=100)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DataError, match="the file here is not the one being certified"):
        list(pickle.loads(shipped).chunks(0, 100))


def test_pandas_indexes_and_nullable_floats_read_as_a_whole_file_does(tmp_path):
    cfg = config(tmp_path)
    df = frame(300, 10)
    df["p0"] = df["p0"].astype("Float64")  # a pandas nullable float column
    df.index = pd.Index([f"r{i}" for i in range(300)], name="rowid")  # stored as a column, not a feature
    df.to_parquet(tmp_path / "cert.parquet", row_group_size=64)
    stream = certification_stream(cfg, MEMORY_MB)
    x, y = load_file(tmp_path / "cert.parquet", cfg.data)
    assert stream.features == [f"p{i}" for i in range(FEATURES)] and stream.dtype == x.dtype
    assert fingerprint_stream(stream) == fingerprint_data(x, y)
