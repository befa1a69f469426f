"""Tests for benchmarks.cl.data: the blobs toy, task splits (Split-MNIST) and hold-out splits."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.cl import data as ds

# --------------------------------------------------------------------------------------------------
# Blobs
# --------------------------------------------------------------------------------------------------


def test_blobs_shape_balance_geometry() -> None:
    x, y = ds.blobs(n=2000, n_classes=6, radius=10.0, std=1.5, seed=0)
    assert x.shape == (2000, 2) and x.dtype == np.float32
    assert y.shape == (2000,) and y.dtype == np.int64
    counts = np.bincount(y, minlength=6)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 2000
    for k in range(6):
        centre = x[y == k].mean(axis=0)
        expected = 10.0 * np.array([np.cos(2 * np.pi * k / 6), np.sin(2 * np.pi * k / 6)])
        assert np.linalg.norm(centre - expected) < 0.5
        assert 1.2 < float(x[y == k].std(axis=0).mean()) < 1.8
    assert len(np.unique(y[:30])) > 1  # rows are shuffled, not grouped by class


def test_blobs_reproducible() -> None:
    a, b = ds.blobs(seed=3), ds.blobs(seed=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], ds.blobs(seed=4)[0])


def test_blobs_uneven_n() -> None:
    _, y = ds.blobs(n=1003, n_classes=6)
    counts = np.bincount(y, minlength=6)
    assert counts.sum() == 1003 and counts.max() - counts.min() <= 1


# --------------------------------------------------------------------------------------------------
# Task splits
# --------------------------------------------------------------------------------------------------


def test_split_tasks_partitions() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=5000)
    tasks = ds.split_mnist_tasks()
    parts = ds.split_tasks(y, tasks)
    assert len(parts) == 5
    allidx = np.concatenate(parts)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)  # disjoint and covering
    for part, classes in zip(parts, tasks):
        assert part.dtype == np.int64
        assert set(np.unique(y[part]).tolist()) == set(classes)
        assert np.all(np.diff(part) > 0)
        # every example of these classes is in this part
        assert len(part) == int(np.isin(y, classes).sum())


def test_split_tasks_subset_of_classes() -> None:
    y = np.array([0, 1, 2, 3, 4, 5, 0, 1])
    parts = ds.split_tasks(y, [[0], [2, 5]])
    assert parts[0].tolist() == [0, 6]
    assert parts[1].tolist() == [2, 5]


def test_split_tasks_rejects_bad_specs() -> None:
    y = np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match="class 1"):
        ds.split_tasks(y, [(0, 1), (1, 2)])
    assert len(ds.split_tasks(y, [(0, 1), (1, 2)], allow_overlap=True)) == 2
    with pytest.raises(ValueError, match="no classes"):
        ds.split_tasks(y, [()])
    with pytest.raises(ValueError, match="selects no example"):
        ds.split_tasks(y, [(7, 8)])
    with pytest.raises(ValueError, match="1-D"):
        ds.split_tasks(y.reshape(2, 2), [(0,)])


def test_split_mnist_tasks_classic() -> None:
    assert ds.split_mnist_tasks() == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


@pytest.mark.parametrize("seed", range(20))
def test_split_mnist_tasks_seeded_even_odd(seed: int) -> None:
    tasks = ds.split_mnist_tasks(seed)
    assert len(tasks) == 5
    assert sorted(d for pair in tasks for d in pair) == list(range(10))
    for even, odd in tasks:
        assert isinstance(even, int) and isinstance(odd, int)
        assert even % 2 == 0 and odd % 2 == 1
    assert ds.split_mnist_tasks(seed) == tasks


def test_split_mnist_tasks_vary_with_seed() -> None:
    pairings = {tuple(sorted(ds.split_mnist_tasks(s))) for s in range(20)}
    orders = {tuple(ds.split_mnist_tasks(s)) for s in range(20)}
    assert len(pairings) > 10 and len(orders) > 10


# --------------------------------------------------------------------------------------------------
# Hold-out splits
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 100, 2000, 2001])
def test_holdout_split_disjoint_and_covering(n: int) -> None:
    parts = ds.holdout_split(n, [0.7, 0.15, 0.15], seed=1)
    assert len(parts) == 3
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n  # disjoint + covering
    if n:
        assert allidx.min() == 0 and allidx.max() == n - 1
    for part, f in zip(parts, [0.7, 0.15, 0.15]):
        assert part.dtype == np.int64
        assert abs(len(part) - f * n) < 1.0 + 1e-9


def test_holdout_split_partial_fractions_leave_rest_out() -> None:
    search, cert = ds.holdout_split(1000, [0.5, 0.2], seed=0)
    assert len(search) == 500 and len(cert) == 200
    assert len(np.intersect1d(search, cert)) == 0


def test_holdout_split_reproducible_and_random() -> None:
    a = ds.holdout_split(500, [0.5, 0.5], seed=2)
    b = ds.holdout_split(500, [0.5, 0.5], seed=2)
    c = ds.holdout_split(500, [0.5, 0.5], seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], np.arange(250))  # shuffled, not a prefix


def test_holdout_split_rejects_bad_fractions() -> None:
    with pytest.raises(ValueError, match="sum"):
        ds.holdout_split(10, [0.6, 0.6], seed=0)
    with pytest.raises(ValueError):
        ds.holdout_split(10, [-0.1, 0.5], seed=0)
    with pytest.raises(ValueError):
        ds.holdout_split(10, [], seed=0)
