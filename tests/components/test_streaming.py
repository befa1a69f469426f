"""components.streaming: a Parquet certification file read a bounded chunk at a time.

* More rows than the configured memory budget holds are certified through the stream, with the
  counts, the data fingerprint and the provenance record of the file loaded whole.
* No chunk holds more rows than the budget allows; a row group far larger than it is refused.
* Bad files and bad rows are named (file, rows, column), as when a file is loaded whole.
"""

from __future__ import annotations

import json
import os
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
    with pytest.raises(DataError, match=r"cert\.parquet, rows 600\.\.699: feature column 'p7' holds NaN .* at row 613 "):
        fingerprint_stream(stream)

    df = frame(900, 5)
    df.loc[402, "digit"] = -1
    write(df, tmp_path / "cert.parquet", row_group_size=100)
    with pytest.raises(DataError, match=r"rows 400\.\.499: label column 'digit' holds -1 at row 402;"):
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


# ------------------------------------------------------------------ the configuration streams the split
def test_memory_mb_streams_the_configured_parquet_file_as_it_loads_whole(big):
    tmp, cfg = big
    streamed_cfg = config(tmp, **{}).model_copy(
        update={"certification": cfg.certification.model_copy(update={"memory_mb": MEMORY_MB})})
    whole, streamed = load_splits(cfg), load_splits(streamed_cfg)
    assert not whole.streamed and streamed.streamed
    assert streamed.certification.chunk_rows * FEATURES * 8 * 3 <= MEMORY_MB * 2**20 < ROWS * FEATURES * 4
    # one digest, provenance and class set whichever way the split is read: the certificate cannot tell
    assert streamed.fingerprint() == whole.fingerprint()
    assert streamed.provenance == whole.provenance and streamed.classes == whole.classes
    assert torch.equal(streamed.labels("certification"), whole.certification[1])
    assert all(torch.equal(a, b) for a, b in zip(streamed.head("certification", 5), (t[:5] for t in whole.certification)))
    wide = streamed.to_dtype(torch.float64)
    assert wide.certification.dtype == torch.float64
    assert wide.fingerprint() == whole.to_dtype(torch.float64).fingerprint()


@pytest.mark.parametrize("doc, message", [
    ({"data": {"source": "all.parquet", "label": "digit"}}, "the source form splits one file in memory"),
    ({"data": {"certification": "cert.csv"}}, "cert.csv is not a Parquet file"),
    ({"data": {"group": "site"}}, "data.group selects rows of the certification set in memory"),
    ({"spec": {"tau": 0.5, "recall": [{"class": 1, "tau": 0.5}]}}, "spec.recall selects rows"),
])
def test_memory_mb_refuses_what_cannot_be_streamed(tmp_path, doc, message):
    from components.config import ConfigError

    write(frame(50, 1), tmp_path / "train.parquet")
    base = {"version": 1, "name": "m", "model": {"factory": "team_models:make"}, "spec": {"tau": 0.5},
            "certification": {"memory_mb": 4},
            "data": {"train": "train.parquet", "search": "search.parquet", "certification": "cert.parquet",
                     "label": "digit"}}
    if "source" in doc.get("data", {}):
        base["data"] = doc["data"]
    else:
        base["data"].update(doc.get("data", {}))
    base["spec"] = doc.get("spec", base["spec"])
    with pytest.raises(ConfigError, match="certification.memory_mb") as err:
        parse_config(base, base_dir=tmp_path, file=tmp_path / "lidgate.yaml")
    assert message in str(err.value)


# ------------------------------------------------------------------ a team's DataLoader
class Noisy(torch.utils.data.Dataset):
    """Item i computed when read (seeded by i): a set that need not be held anywhere."""

    def __init__(self, n: int, features: int = FEATURES, bad_at: int | None = None, label_at: int | None = None):
        self.n, self.features, self.bad_at, self.label_at = n, features, bad_at, label_at

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        x = torch.from_numpy(np.random.default_rng([7, i]).normal(size=self.features).astype(np.float32))
        if i == self.bad_at:
            x[3] = float("nan")
        return x, (9 if i == self.label_at else i % 3)


def materialised(ds) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def test_a_dataloader_is_read_once_in_batches_and_hashes_as_its_tensors(big):
    from components.streaming import loader_stream

    _, cfg = big
    ds = Noisy(ROWS)
    loader = torch.utils.data.DataLoader(ds, batch_size=500)
    stream = loader_stream(loader, cfg.data, "team loader", memory_mb=MEMORY_MB)
    assert ROWS * FEATURES * 4 > MEMORY_MB * 2**20  # more rows than the budget holds
    x, y = materialised(ds)
    assert (stream.n, stream.dtype, stream.feature_shape, stream.portable) == (ROWS, torch.float32, (FEATURES,), True)
    assert stream.chunk_rows * FEATURES * 4 <= MEMORY_MB * 2**20 and max(len(c) for c, _ in stream.chunks()) < ROWS
    assert fingerprint_stream(stream) == fingerprint_data(x, y)
    net, box = model(), le.Box.around(model(), 0.002)
    assert count_certified(net, box, stream, batch_size=1024) == count_certified(net, box, (x, y), batch_size=1024)
    # a Dataset is batched by lidgate; the temporary file goes with the stream, and names its owner
    folder = __import__("pathlib").Path(stream.path).parent
    assert json.loads((folder / "owner.json").read_text())["pid"] == os.getpid()
    again = loader_stream(ds, cfg.data, "team dataset")
    assert fingerprint_stream(again) == fingerprint_data(x, y)
    del stream
    import gc

    gc.collect()
    assert not folder.exists()


@pytest.mark.parametrize("make, message", [
    (lambda: torch.utils.data.DataLoader(Noisy(100), batch_size=10, shuffle=True),
     "reads through a RandomSampler; a certification set must come in the same order"),
    (lambda: torch.utils.data.DataLoader(Noisy(5000), batch_size=5000),
     r"team loader, batch 0 \(rows from 0 on\): the batch's features take 1.2 MiB, more than certification.memory_mb = 1"),
    (lambda: torch.utils.data.DataLoader(Noisy(100, bad_at=57), batch_size=25),
     r"team loader, batch 2 \(rows from 50 on\): x of the batch holds NaN .* at row 57"),
    (lambda: torch.utils.data.DataLoader(Noisy(100, label_at=31), batch_size=25),
     r"team loader, batch 1 \(rows from 25 on\): label 9 at row 31 is not one of data.classes"),
    (lambda: torch.utils.data.DataLoader(Noisy(100, features=5), batch_size=25), r"feature|shape"),
    (lambda: [1, 2, 3], "is list; expected a torch.utils.data.DataLoader or Dataset"),
    (lambda: torch.utils.data.DataLoader(Noisy(6), batch_sampler=[[0, 1], [2, 3], [4, 5]]),
     "reads through a batch_sampler of type list; a certification set must come in the same order"),
])
def test_a_bad_dataloader_is_refused_by_name(big, tmp_path, make, message):
    from components.streaming import loader_stream

    _, cfg = big
    data = cfg.data.model_copy(update={"classes": [0, 1, 2], "shape": [FEATURES]})
    with pytest.raises(DataError, match=message):
        loader_stream(make(), data, "team loader", memory_mb=1, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written is left behind


# ------------------------------------------------------------------ GX checks a stream a block at a time
@pytest.mark.parametrize("case", ["good", "labels", "range", "few"])
def test_a_streamed_set_gets_the_verdicts_of_the_set_in_memory(case):
    from components.validation import validate_all

    x, y = materialised(Noisy(3000))
    if case == "labels":
        y[[1234, 2999]] = 7
    if case == "range":
        x[2100, 5] = 9.5
    kwargs = {"role": "certification", "n_features": FEATURES, "classes": [0, 1, 2], "value_range": (-6.0, 6.0),
              "confidence": 0.95, "target_lower_bound": 0.9999 if case == "few" else 0.85}
    stream = le.TensorStream(x, y, chunk_rows=256, name="cert.parquet")
    from components import validation

    old = validation.STREAM_BLOCK_ROWS
    try:
        validation.STREAM_BLOCK_ROWS = 1000  # three GX blocks
        reports = validate_all({"whole": (x, y, kwargs), "streamed": (stream, None, kwargs)})
    finally:
        validation.STREAM_BLOCK_ROWS = old
    whole, streamed = reports["whole"], reports["streamed"]
    assert [(c.name, c.success) for c in streamed.checks] == [(c.name, c.success) for c in whole.checks]
    assert streamed.success == whole.success == (case == "good") and streamed.n_rows == 3000
    details = {c.name: c.detail for c in streamed.checks}
    if case == "labels":
        assert details["labels"] == "label column: 2 rows outside task classes [0, 1, 2] (first at row 1234: value 7)"
    if case == "range":
        assert details["range"].startswith("features: values outside [-6, 6]: above 6 in 1 row (first at row 2100: "
                                           "column f5 = 9.5")
    if case == "few":
        assert "too small for the stated confidence" in details["confidence_rows"]
    assert {c.name: c.expectation for c in streamed.checks}["rows"] == \
        "ExpectColumnSumToBeBetween (rows of 3 streamed block(s))"


def test_a_recall_constraint_on_a_streamed_set_is_refused_by_name(big):
    """The configuration refuses the pair; a team's flow that builds one in Python is refused too."""
    from components.config import SpecSection
    from components.constraints import ConstraintError, spec_constraints

    tmp, cfg = big
    streamed = load_splits(cfg.model_copy(update={"certification": cfg.certification.model_copy(
        update={"memory_mb": MEMORY_MB})}))
    spec = SpecSection.model_validate({"tau": 0.5, "recall": [{"class": 1, "tau": 0.5}]})
    with pytest.raises(ConstraintError, match=r"task 'task': spec.recall and spec.worst_group .* streamed"):
        spec_constraints(spec, streamed)
    assert len(spec_constraints(SpecSection.model_validate({"tau": 0.5}), streamed)[0]) == 1
