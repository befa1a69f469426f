"""components.data: data files and loader functions read into DataSplits."""

from __future__ import annotations

import hashlib
import os
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from components.config import parse_config
from components.data import DataError, DataSplits, file_provenance, load_file, load_splits, seeded_split, split_indices


def config(base: Path, data: dict, **extra):
    doc = {"version": 1, "name": "m", "model": {"factory": "team_models:make"}, "data": data, "spec": {"tau": 0.5},
           **extra}
    return parse_config(doc, base_dir=base, file=base / "lidgate.yaml")


def table(n: int = 40, seed: int = 0, *, classes: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"f1": rng.normal(size=n), "f2": rng.normal(size=n), "f3": rng.normal(size=n),
                         "f4": rng.normal(size=n), "target": rng.integers(0, classes, n)})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean(err: DataError) -> None:
    """No traceback from inside pandas/numpy chained to the error."""
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert "\n" not in str(err)


# ------------------------------------------------------------------------------ files form
def test_files_form_reads_parquet_csv_and_npz(tmp_path):
    table(30, 1).to_parquet(tmp_path / "train.parquet")
    table(20, 2).to_csv(tmp_path / "search.csv", index=False)
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "cert.npz", x=rng.normal(size=(10, 4)).astype(np.float32), y=rng.integers(0, 3, 10))
    cfg = config(tmp_path, {"task": "golden", "train": "train.parquet", "search": "search.csv",
                            "certification": "cert.npz", "label": "target"})
    with pytest.raises(DataError, match=r"cert\.npz: data\.label applies to tabular files"):
        load_splits(cfg)
    # an npz carries x and y itself, so the columns only fit the tabular files: use the default label name
    table(30, 1).rename(columns={"target": "label"}).to_parquet(tmp_path / "train.parquet")
    table(20, 2).rename(columns={"target": "label"}).to_csv(tmp_path / "search.csv", index=False)
    cfg = config(tmp_path, {"task": "golden", "train": "train.parquet", "search": "search.csv",
                            "certification": "cert.npz"})
    splits = load_splits(cfg)
    assert splits.task == "golden"
    assert [len(x) for _, (x, _) in splits.items()] == [30, 20, 10]
    # the parquet file holds float64 columns: kept wide, and the other splits follow
    assert all(x.dtype == torch.float64 and y.dtype == torch.int64 for _, (x, y) in splits.items())
    assert splits.feature_shape == (4,) and splits.classes == (0, 1, 2)
    files = splits.provenance["files"]
    assert splits.provenance["form"] == "files"
    for name, file in (("train", "train.parquet"), ("search", "search.csv"), ("certification", "cert.npz")):
        assert files[name]["path"] == str((tmp_path / file).resolve())
        assert files[name]["sha256"] == sha(tmp_path / file)
    assert splits.provenance["rows"] == {"train": 30, "search": 20, "certification": 10}
    assert files["train"]["columns"] == {"features": ["f1", "f2", "f3", "f4"], "label": "label"}
    assert "columns" not in files["certification"]
    expected = table(30, 1)[["f1", "f2", "f3", "f4"]].to_numpy().copy()
    torch.testing.assert_close(splits.train[0], torch.from_numpy(expected))


def test_dtypes_float32_unless_the_source_holds_float64(tmp_path):
    df = table(12)
    df.to_csv(tmp_path / "a.csv", index=False)
    df.astype({c: "float32" for c in ("f1", "f2", "f3", "f4")}).to_parquet(tmp_path / "a32.parquet")
    df.to_parquet(tmp_path / "a64.parquet")
    np.savez(tmp_path / "i.npz", x=np.arange(24).reshape(12, 2), y=np.arange(12) % 2)
    np.savez(tmp_path / "d.npz", x=np.zeros((12, 2)), y=np.arange(12) % 2)
    d = config(tmp_path, {"source": "a.csv", "label": "target"}).data
    assert load_file(tmp_path / "a.csv", d)[0].dtype == torch.float32  # CSV text: float32
    assert load_file(tmp_path / "a32.parquet", d)[0].dtype == torch.float32
    assert load_file(tmp_path / "a64.parquet", d)[0].dtype == torch.float64
    d = config(tmp_path, {"source": "i.npz"}).data
    assert load_file(tmp_path / "i.npz", d)[0].dtype == torch.float32  # integers: float32
    assert load_file(tmp_path / "d.npz", d)[0].dtype == torch.float64


def test_load_file_with_features_shape_and_classes(tmp_path):
    df = table(10)
    df.to_parquet(tmp_path / "new.parquet")
    d = config(tmp_path, {"source": "x.csv", "features": ["f4", "f1", "f2", "f3"], "label": "target",
                          "shape": [2, 2], "classes": [0, 1, 2]}).data
    x, y = load_file(tmp_path / "new.parquet", d)
    assert x.shape == (10, 2, 2) and y.tolist() == df["target"].tolist()
    torch.testing.assert_close(x[:, 0, 0], torch.from_numpy(df["f4"].to_numpy().copy()))  # features in the listed order
    assert file_provenance(tmp_path / "new.parquet")["sha256"] == sha(tmp_path / "new.parquet")


def test_float_labels_that_are_integers_are_accepted(tmp_path):
    df = table(10)
    df["target"] = df["target"].astype(float)
    df.to_csv(tmp_path / "a.csv", index=False)
    _, y = load_file(tmp_path / "a.csv", config(tmp_path, {"source": "a.csv", "label": "target"}).data)
    assert y.dtype == torch.int64 and y.tolist() == df["target"].astype(int).tolist()


def test_the_same_file_for_two_splits_is_refused(tmp_path):
    table().to_csv(tmp_path / "a.csv", index=False)
    (tmp_path / "b.csv").write_bytes((tmp_path / "a.csv").read_bytes())
    table(seed=5).to_csv(tmp_path / "c.csv", index=False)
    cfg = config(tmp_path, {"train": "c.csv", "search": "a.csv", "certification": "b.csv", "label": "target"})
    with pytest.raises(DataError, match=r"b\.csv: data\.certification has the same content as data\.search"):
        load_splits(cfg)


# ------------------------------------------------------------------------------ seeded split
def test_seeded_split_is_deterministic_disjoint_and_recorded(tmp_path):
    df = table(101)
    df.to_parquet(tmp_path / "all.parquet")
    split = {"train": 0.5, "search": 0.3, "certification": 0.2, "seed": 7}
    cfg = config(tmp_path, {"source": "all.parquet", "label": "target", "split": split})
    a, b = load_splits(cfg), load_splits(cfg)
    for name in ("train", "search", "certification"):
        assert torch.equal(getattr(a, name)[0], getattr(b, name)[0])
    assert a.fingerprint() == b.fingerprint()
    rows = {name: {tuple(r) for r in getattr(a, name)[0].tolist()} for name in ("train", "search", "certification")}
    assert sum(len(r) for r in rows.values()) == 101
    assert not (rows["train"] & rows["search"]) and not (rows["train"] & rows["certification"])
    assert not (rows["search"] & rows["certification"])
    assert {len(r) for r in rows.values()} == {50, 30, 21} or sorted(len(r) for r in rows.values()) == [20, 30, 51]
    prov = a.provenance
    assert prov["form"] == "source" and prov["source"]["sha256"] == sha(tmp_path / "all.parquet")
    assert {k: prov["split"][k] for k in ("train", "search", "certification", "seed")} == split
    assert len(prov["split"]["assignment_sha256"]) == 64
    other = load_splits(config(tmp_path, {"source": "all.parquet", "label": "target", "split": {**split, "seed": 8}}))
    assert other.provenance["split"]["assignment_sha256"] != prov["split"]["assignment_sha256"]
    assert other.fingerprint() != a.fingerprint()


def test_seeded_split_of_tensors_and_arrays_agree():
    x, y = np.arange(20).reshape(10, 2), np.arange(10)
    fractions = {"train": 0.6, "search": 0.2, "certification": 0.2}
    arrays = seeded_split(x, y, fractions, seed=1)
    tensors = seeded_split(torch.from_numpy(x), torch.from_numpy(y), fractions, seed=1)
    for name in fractions:
        assert arrays[name][1].tolist() == tensors[name][1].tolist()
    with pytest.raises(ValueError, match="sum to 1"):
        seeded_split(x, y, {"train": 0.6, "search": 0.2, "certification": 0.3}, seed=0)
    with pytest.raises(DataError, match="split 'certification' would receive 0 of 2 rows"):
        seeded_split(x[:2], y[:2], fractions, seed=0)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 400), weights=st.tuples(*[st.floats(0.01, 1.0)] * 3), seed=st.integers(0, 2**32 - 1))
def test_split_indices_partition_the_rows_exactly(n, weights, seed):
    total = sum(weights)
    fractions = {"train": weights[0] / total, "search": weights[1] / total}
    fractions["certification"] = 1.0 - fractions["train"] - fractions["search"]
    try:
        idx = split_indices(n, fractions, seed)
    except DataError as exc:  # only when some piece would be empty
        assert "would receive 0 of" in str(exc)
        assert any(f * n < 1 for f in fractions.values())
        return
    everything = np.concatenate(list(idx.values()))
    assert sorted(everything.tolist()) == list(range(n))  # disjoint and complete
    for name, f in fractions.items():
        assert abs(len(idx[name]) - f * n) < 1 + 1e-9 and len(idx[name]) >= 1
        assert np.all(np.diff(idx[name]) > 0)
    again = split_indices(n, fractions, seed)
    assert all(np.array_equal(idx[k], again[k]) for k in idx)


# ------------------------------------------------------------------------------ loader form
@pytest.fixture
def code_dir(tmp_path, monkeypatch):
    """A folder for a team's modules; sys.path and sys.modules are restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    folder = tmp_path / "code"
    folder.mkdir()
    yield folder
    for name in set(sys.modules) - before:
        del sys.modules[name]


def loader_module(folder: Path, body: str) -> str:
    name = f"team_data_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text("import numpy as np\nimport torch\n" + textwrap.dedent(body))
    return name


LOADERS = {
    "arrays": """
        def load(n=30):
            rng = np.random.default_rng(0)
            return rng.normal(size=(n, 3)), torch.from_numpy(rng.integers(0, 2, n))
    """,
    "splits": """
        def load(n=30):
            rng = np.random.default_rng(0)
            part = lambda m: (torch.randn(m, 3, generator=torch.Generator().manual_seed(m)), rng.integers(0, 2, m))
            return {"train": part(n), "search": part(5), "certification": part(7)}
    """,
    "dataset": """
        class Pairs(torch.utils.data.Dataset):
            def __init__(self, n):
                self.x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
            def __len__(self):
                return len(self.x)
            def __getitem__(self, i):
                return self.x[i], torch.tensor(i % 2)
        def load(n=30):
            return Pairs(n)
    """,
    "iterable": """
        class Stream(torch.utils.data.IterableDataset):
            def __init__(self, n):
                self.n = n
            def __iter__(self):
                for i in range(self.n):
                    yield np.full(3, i, dtype=np.float32), i % 2
        def load(n=30):
            return Stream(n)
    """,
}


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_loader_functions_of_every_result_kind(tmp_path, code_dir, kind):
    module = loader_module(code_dir, LOADERS[kind])
    cfg = config(tmp_path, {"task": "t", "loader": {"function": f"{module}:load", "kwargs": {"n": 40}}},
                 code=["code"])
    splits = load_splits(cfg)
    sizes = [len(y) for _, (_, y) in splits.items()]
    assert sizes == ([40, 5, 7] if kind == "splits" else [24, 8, 8])
    assert splits.feature_shape == (3,) and splits.classes == (0, 1)
    x = splits.train[0]
    assert x.dtype == (torch.float64 if kind == "arrays" else torch.float32)
    prov = splits.provenance
    assert prov["form"] == "loader"
    assert prov["loader"] == {"function": f"{module}:load", "kwargs": {"n": 40}}
    expected = {"arrays": "arrays", "splits": "splits", "dataset": "dataset", "iterable": "dataset"}[kind]
    assert prov["returned"] == expected
    assert ("split" in prov) == (kind != "splits")
    if kind != "splits":
        assert prov["split"]["seed"] == 0 and prov["split"]["train"] == 0.6


def test_loader_result_can_be_reshaped(tmp_path, code_dir):
    module = loader_module(code_dir, """
        def load():
            return np.zeros((20, 4), dtype=np.float32), np.arange(20) % 2
    """)
    splits = load_splits(config(tmp_path, {"loader": {"function": f"{module}:load"}, "shape": [1, 2, 2]},
                                code=["code"]))
    assert splits.feature_shape == (1, 2, 2) and splits.train[0].shape[1:] == (1, 2, 2)


@pytest.mark.parametrize("body,fragment", [
    ("def load():\n    raise RuntimeError('disk on fire')\n", "calling it raised RuntimeError: disk on fire"),
    ("def load():\n    return 'nope'\n", "returned str; expected (x, y), a dict"),
    ("def load():\n    return {'train': (np.zeros((3, 2)), np.zeros(3))}\n", "expected exactly 'train'"),
    ("def load():\n    return np.zeros((3, 2)), np.zeros(4)\n", "has 3 rows but y of the result has 4 labels"),
    ("def load():\n    return np.zeros((30, 2)), -np.ones(30)\n", "y of the result holds -1.0 at row 0"),
    ("def load():\n    return np.full((30, 2), np.nan), np.zeros(30)\n", "x of the result holds NaN"),
    ("def load():\n    return np.array([['a', 'b']] * 30), np.zeros(30)\n", "x of the result has dtype <U1"),
    ("def load():\n    return np.zeros(30), np.zeros(30)\n", "x of the result has shape (30,)"),
    ("class D(torch.utils.data.Dataset):\n    def __len__(self):\n        return 3\n"
     "    def __getitem__(self, i):\n        return {'x': i}\ndef load():\n    return D()\n",
     "Dataset item 0 is dict; expected an (x, y) pair"),
    ("class D(torch.utils.data.Dataset):\n    def __len__(self):\n        return 3\n"
     "    def __getitem__(self, i):\n        raise KeyError(i)\ndef load():\n    return D()\n",
     "reading Dataset item 0 raised KeyError"),
    ("def load():\n    return {'train': (np.zeros((3, 2)), np.zeros(3)), 'search': (np.zeros((3, 2)), np.zeros(3)),\n"
     "            'certification': (np.zeros((0, 2)), np.zeros(0))}\n", "split 'certification' has 0 rows"),
])
def test_loader_errors_name_the_function(tmp_path, code_dir, body, fragment):
    module = loader_module(code_dir, body)
    with pytest.raises(DataError) as info:
        load_splits(config(tmp_path, {"loader": {"function": f"{module}:load"}}, code=["code"]))
    assert f"data.loader.function {module}:load" in str(info.value)
    assert fragment in str(info.value)


def test_loader_that_cannot_be_imported_is_a_factory_error(tmp_path, code_dir):
    from components.factory import FactoryError

    with pytest.raises(FactoryError, match=r"data\.loader\.function"):
        load_splits(config(tmp_path, {"loader": {"function": "no_such_team_module:load"}}, code=["code"]))


# ------------------------------------------------------------------------------ bad files
def _write_bad(tmp_path: Path, case: str) -> tuple[str, dict]:
    """Write the file for one bad-data case; return its name and the data section to use."""
    df = table(12)
    target = {"label": "target"}
    if case == "missing file":
        return "absent.csv", target
    if case == "unknown format":
        (tmp_path / "data.txt").write_text("1,2\n")
        return "data.txt", target
    if case == "missing label":
        df.to_parquet(tmp_path / "a.parquet")
        return "a.parquet", {"label": "y"}
    if case == "missing feature":
        df.to_csv(tmp_path / "a.csv", index=False)
        return "a.csv", {**target, "features": ["f1", "f9"]}
    if case == "text feature":
        df["f2"] = df["f2"].astype(str)
        df.loc[3, "f2"] = "abc"
        df.to_csv(tmp_path / "a.csv", index=False)
        return "a.csv", target
    if case == "date feature":
        df["f3"] = pd.Timestamp("2024-01-01")
        df.to_parquet(tmp_path / "a.parquet")
        return "a.parquet", target
    if case == "nan feature":
        df.loc[5, "f3"] = np.nan
        df.to_parquet(tmp_path / "a.parquet")
        return "a.parquet", target
    if case == "inf feature":
        df.loc[2, "f4"] = np.inf
        df.to_csv(tmp_path / "a.csv", index=False)
        return "a.csv", target
    if case == "huge feature":
        df.loc[4, "f1"] = 1e300
        df.to_csv(tmp_path / "a.csv", index=False)
        return "a.csv", target
    if case == "fractional label":
        df["target"] = df["target"] + 0.5
        df.to_parquet(tmp_path / "a.parquet")
        return "a.parquet", target
    if case == "negative label":
        df.loc[6, "target"] = -2
        df.to_csv(tmp_path / "a.csv", index=False)
        return "a.csv", target
    if case == "text label":
        df["target"] = df["target"].astype(str)
        df.loc[1, "target"] = "cat"
        df.to_csv(tmp_path / "a.csv", index=False)
        return "a.csv", target
    if case == "missing label value":
        df["target"] = df["target"].astype("Int64")
        df.loc[8, "target"] = pd.NA
        df.to_parquet(tmp_path / "a.parquet")
        return "a.parquet", target
    if case == "bool label":
        df["target"] = df["target"] > 0
        df.to_parquet(tmp_path / "a.parquet")
        return "a.parquet", target
    if case == "label outside classes":
        df.loc[0, "target"] = 7
        df.to_csv(tmp_path / "a.csv", index=False)
        return "a.csv", {**target, "classes": [0, 1, 2]}
    if case == "shape does not divide":
        df.to_csv(tmp_path / "a.csv", index=False)
        return "a.csv", {**target, "shape": [3]}
    if case == "no rows":
        df.iloc[:0].to_csv(tmp_path / "a.csv", index=False)
        return "a.csv", target
    if case == "empty csv":
        (tmp_path / "a.csv").write_bytes(b"")
        return "a.csv", target
    if case == "random csv":
        (tmp_path / "a.csv").write_bytes(os.urandom(2000))
        return "a.csv", target
    if case == "random parquet":
        (tmp_path / "a.parquet").write_bytes(os.urandom(2000))
        return "a.parquet", target
    if case == "random npz":
        (tmp_path / "a.npz").write_bytes(os.urandom(2000))
        return "a.npz", {}
    if case == "npy saved as npz":
        np.save(tmp_path / "a.npy", np.zeros(3))
        (tmp_path / "a.npy").rename(tmp_path / "a.npz")
        return "a.npz", {}
    if case == "object npz":
        np.savez(tmp_path / "a.npz", x=np.array([[{"a": 1}]] * 12, dtype=object), y=np.zeros(12, dtype=int))
        return "a.npz", {}
    if case == "npz without y":
        np.savez(tmp_path / "a.npz", x=np.zeros((12, 2)), labels=np.zeros(12))
        return "a.npz", {}
    if case == "npz nan":
        x = np.zeros((12, 2, 3))
        x[4, 1, 2] = np.nan
        np.savez(tmp_path / "a.npz", x=x, y=np.zeros(12, dtype=int))
        return "a.npz", {}
    if case == "npz 2-d labels":
        np.savez(tmp_path / "a.npz", x=np.zeros((12, 2)), y=np.zeros((12, 1), dtype=int))
        return "a.npz", {}
    raise AssertionError(case)


# (case, what the message must name besides the file, a fragment of what was expected)
BAD_FILES = [
    ("missing file", "", "no such file"),
    ("unknown format", "", "unknown data format '.txt'"),
    ("missing label", "'y'", "available columns: 'f1', 'f2', 'f3', 'f4', 'target'"),
    ("missing feature", "'f9'", "available columns: 'f1'"),
    ("text feature", "feature column 'f2'", "row 3 holds 'abc'; expected numbers"),
    ("date feature", "feature column 'f3'", "is not numeric"),
    ("nan feature", "feature column 'f3'", "NaN (a missing value) at row 5"),
    ("inf feature", "feature column 'f4'", "inf at row 2"),
    ("huge feature", "feature column 'f1'", "too large for float32 at row 4"),
    ("fractional label", "label column 'target'", "at row 0; expected integer class ids ≥ 0"),
    ("negative label", "label column 'target'", "-2 at row 6"),
    ("text label", "label column 'target'", "row 1 holds 'cat'"),
    ("missing label value", "label column 'target'", "NaN (a missing value) at row 8"),
    ("bool label", "label column 'target'", "true/false"),
    ("label outside classes", "label 7 at row 0", "data.classes [0, 1, 2]"),
    ("shape does not divide", "data.shape [3]", "each row has 4"),
    ("no rows", "the file has 0 rows", "at least one example"),
    ("empty csv", "empty CSV file", "header row"),
    ("random csv", "not a CSV file", "UTF-8"),
    ("random parquet", "not a readable Parquet file", ""),
    ("random npz", "not an .npz archive", "arrays 'x' and 'y'"),
    ("npy saved as npz", "single .npy array", "arrays 'x' and 'y'"),
    ("object npz", "array 'x'", "object arrays are not allowed"),
    ("npz without y", "no array 'y'", "found 'x', 'labels'"),
    ("npz nan", "array 'x'", "NaN (a missing value) at row 4 (position [1, 2] within the row)"),
    ("npz 2-d labels", "array 'y'", "expected one label per row"),
]


@pytest.mark.parametrize("case,names,expected", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_get_a_clear_data_error(tmp_path, case, names, expected):
    name, data = _write_bad(tmp_path, case)
    configurable = Path(name).suffix != ".txt"  # the configuration itself refuses an unknown suffix
    cfg = config(tmp_path, {"source": name if configurable else "other.csv", **data})
    with pytest.raises(DataError) as info:  # the single-file reader (lidgate retrain --data)
        load_file(tmp_path / name, cfg.data)
    message = str(info.value)
    assert str(tmp_path / name) in message
    assert names in message and expected in message
    assert_clean(info.value)
    if configurable:
        with pytest.raises(DataError) as again:  # the configured source says the same
            load_splits(cfg)
        assert str(again.value) == message


# ------------------------------------------------------------------------------ DataSplits
def _splits(x_train: torch.Tensor) -> DataSplits:
    y = torch.zeros(len(x_train), dtype=torch.int64)
    pair = (torch.zeros(2, 2), torch.zeros(2, dtype=torch.int64))
    return DataSplits("t", (x_train, y), pair, pair, {}, (2,), (0,))


def test_fingerprints_cover_the_tensors():
    from lid_engine import fingerprint_data

    a = _splits(torch.ones(3, 2))
    assert a.fingerprint() == _splits(torch.ones(3, 2)).fingerprint()
    assert a.fingerprint() != _splits(torch.ones(3, 2).double()).fingerprint()
    b = _splits(torch.ones(3, 2))
    b.train[0][0, 0] = 2.0
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprints()["certification"] == fingerprint_data(*a.certification)


def test_datasplits_checks_its_parts():
    with pytest.raises(DataError, match="split 'train' has examples of shape"):
        _splits(torch.ones(3, 5))
    with pytest.raises(DataError, match="split 'train' must hold n ≥ 1 rows"):
        _splits(torch.ones(0, 2))


# ------------------------------------------------------------------------------ groups and feature records
def test_group_columns_from_csv_npz_and_loaders(tmp_path, code_dir):
    """A group column (data.group) is read beside the features, never as one, split with the same rows,
    and fingerprinted; a loader returns it as 'group' together with a 'features' record."""
    df = table(60)
    df["region"] = np.where(np.arange(60) % 3 == 0, "north", "south")
    df.to_csv(tmp_path / "d.csv", index=False)
    cfg = config(tmp_path, {"task": "t", "source": "d.csv", "label": "target", "group": "region"})
    data = load_splits(cfg)
    assert data.feature_shape == (4,)  # the group column is not a feature
    assert data.provenance["source"]["group"] == "region"
    for name, (x, _) in data.items():
        rows = np.round(x[:, 0].numpy().astype(np.float64), 5)
        full = np.round(df["f1"].to_numpy(), 5)
        expected = [df["region"][int(np.flatnonzero(np.isclose(full, r, atol=1e-5))[0])] for r in rows]
        assert data.groups[name].tolist() == expected
    regrouped = load_splits(cfg)
    regrouped.groups["certification"] = regrouped.groups["certification"][::-1].copy()
    assert regrouped.fingerprint() != data.fingerprint()  # the groups are part of what was certified

    np.savez(tmp_path / "g.npz", x=np.zeros((30, 2), np.float32), y=np.arange(30) % 2, site=np.arange(30) % 3)
    npz = load_splits(config(tmp_path, {"task": "t", "source": "g.npz", "group": "site"}))
    assert sorted(set(npz.groups["train"].tolist())) == ["0", "1", "2"]
    plain = load_splits(config(tmp_path, {"task": "t", "source": "g.npz"}))
    assert plain.groups is None

    module = loader_module(code_dir, """
        def load(n=30):
            rng = np.random.default_rng(0)
            return {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": np.arange(n) % 2,
                    "group": np.array(["a", "b"] * (n // 2)), "features": {"encoder": "e", "encoder_sha256": "ab"}}
    """)
    cfg = config(tmp_path, {"task": "t", "loader": {"function": f"{module}:load"}}, code=["code"])
    got = load_splits(cfg)
    assert got.provenance["features"] == {"encoder": "e", "encoder_sha256": "ab"}
    assert set(got.groups["search"].tolist()) <= {"a", "b"}
    module2 = loader_module(code_dir, """
        def load(n=30):
            rng = np.random.default_rng(0)
            return {"x": rng.normal(size=(n, 3)).astype(np.float32), "y": np.arange(n) % 2,
                    "group": np.array(["a", "b"] * (n // 2)), "features": {"encoder": "e", "encoder_sha256": "cd"}}
    """)
    other = load_splits(config(tmp_path, {"task": "t", "loader": {"function": f"{module2}:load"}}, code=["code"]))
    assert other.fingerprints() == got.fingerprints()  # the same numbers…
    assert other.fingerprint() != got.fingerprint()  # …but another encoder: another data fingerprint


def test_bad_groups_and_feature_records_are_named(tmp_path, code_dir):
    np.savez(tmp_path / "a.npz", x=np.zeros((30, 2), np.float32), y=np.arange(30) % 2, site=np.zeros((30, 2)))
    with pytest.raises(DataError, match=r"array 'site' \(data.group\) has shape \[30, 2\]; expected one group per row"):
        load_splits(config(tmp_path, {"task": "t", "source": "a.npz", "group": "site"}))
    np.savez(tmp_path / "b.npz", x=np.zeros((30, 2), np.float32), y=np.arange(30) % 2, features=np.array("{not json"))
    with pytest.raises(DataError, match=r"b.npz: array 'features' is not JSON"):
        load_splits(config(tmp_path, {"task": "t", "source": "b.npz"}))
    module = loader_module(code_dir, """
        def load():
            return {"x": np.zeros((10, 2), np.float32), "y": np.arange(10) % 2, "group": ["a"] * 9}
    """)
    with pytest.raises(DataError, match=r"'group' of the result has 9 rows, 'y' 10"):
        load_splits(config(tmp_path, {"task": "t", "loader": {"function": f"{module}:load"}}, code=["code"]))
    module = loader_module(code_dir, """
        def load():
            return {"x": np.zeros((10, 2), np.float32), "y": np.arange(10) % 2, "weights": 1}
    """)
    with pytest.raises(DataError, match=r"unknown keys 'weights'"):
        load_splits(config(tmp_path, {"task": "t", "loader": {"function": f"{module}:load"}}, code=["code"]))
    with pytest.raises(ValueError, match=r"data.group: applies to data files"):
        config(tmp_path, {"task": "t", "loader": {"function": "m:f"}, "group": "g"})


def test_the_configured_data_must_hold_its_group_column(tmp_path):
    """A typo in data.group is named with the file's columns (not mistaken for a feature, not ignored);
    new data may lack the column (its task then gets no group constraint)."""
    df = table(40)
    df["region"] = ["north", "south"] * 20
    df.to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DataError, match=r"d.csv: no column 'regoin' \(data.group\).*'region'"):
        load_splits(config(tmp_path, {"task": "t", "source": "d.csv", "label": "target", "group": "regoin"}))
    np.savez(tmp_path / "g.npz", x=np.zeros((30, 2), np.float32), y=np.arange(30) % 2)
    with pytest.raises(DataError, match=r"g.npz: no array 'site' \(data.group\); .*'x', 'y'"):
        load_splits(config(tmp_path, {"task": "t", "source": "g.npz", "group": "site"}))
    from components.data import load_update

    cfg = config(tmp_path, {"task": "t", "source": "d.csv", "label": "target", "group": "region"})
    df.drop(columns=["region"]).to_csv(tmp_path / "new.csv", index=False)
    assert load_update(cfg, [tmp_path / "new.csv"]).groups is None
