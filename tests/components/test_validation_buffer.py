"""Tests for components.validation (Great Expectations suites) and components.buffer (lookahead buffer)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from components import validation as val
from components.buffer import BufferCorruptError, BufferRejectedError, LookaheadBuffer
from components.validation import ValidationReport, min_rows_for_confidence, validate_all, validate_dataset
from examples.digits.data import load_digits_8x8
from examples.mnist.data import load_mnist

MNIST_SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_mnist("test")
    return x[:2000].copy(), y[:2000].copy()


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return load_digits_8x8()


@pytest.fixture(scope="module")
def digits01(digits) -> tuple[np.ndarray, np.ndarray]:
    """The 0/1 task of the 8x8 digits (360 rows)."""
    x, y = digits
    keep = np.isin(y, [0, 1])
    return x[keep].copy(), y[keep].copy()


def _mnist_kwargs(**over):
    kw = dict(role="training", name="mnist", n_features=MNIST_SHAPE, classes=range(10), value_range=(0.0, 1.0))
    kw.update(over)
    return kw


def _failed(report: ValidationReport) -> dict[str, str]:
    return {c.name: c.detail for c in report.failures()}


# ============================================================================== validation: good data
def test_good_mnist_batch_passes(mnist) -> None:
    x, y = mnist
    r = validate_dataset(x, y, **_mnist_kwargs())
    assert r.success, r.summary()
    assert r.n_rows == 2000 and r.role == "training" and r.dataset == "mnist"
    assert [c.name for c in r.checks] == ["shape", "dtype", "rows", "finite", "labels", "range"]
    # the data checks really are GX expectations
    kinds = {c.name: c.expectation for c in r.checks}
    assert kinds["labels"] == "ExpectColumnValuesToBeInSet"
    assert kinds["rows"] == "ExpectTableRowCountToBeBetween"
    assert kinds["finite"].startswith("ExpectColumnValuesToBeBetween")
    assert kinds["shape"] == kinds["dtype"] == "python pre-check"
    # torch tensors are accepted as well
    r2 = validate_dataset(torch.from_numpy(x), torch.from_numpy(y), **_mnist_kwargs(role="lookahead"))
    assert r2.success, r2.summary()


def test_good_digits_batch_passes_including_certification(digits) -> None:
    x, y = digits
    r = validate_dataset(
        x, y, role="certification", name="digits", n_features=64, classes=range(10), value_range=(0, 1),
        confidence=0.95, target_lower_bound=0.9, min_rows=100,
    )
    assert r.success, r.summary()
    conf = next(c for c in r.checks if c.name == "confidence_rows")
    assert "1797 rows ≥ 29" in conf.detail
    json.dumps(r.to_dict())  # serialisable for audit reports
    assert r.summary().startswith("PASS")


# ============================================================================== validation: bad data
def test_int_features_rejected(digits) -> None:
    x, y = digits
    r = validate_dataset((x * 16).astype(np.int64), y, role="training", name="d", n_features=64, classes=range(10))
    assert not r.success
    assert _failed(r) == {"dtype": "features: dtype int64 is not floating point (expected float16/32/64)"}


def test_float_labels_rejected(digits) -> None:
    x, y = digits
    r = validate_dataset(x, y.astype(np.float32), role="training", name="d", n_features=64, classes=range(10))
    assert "labels: dtype float32 is not an integer type" in _failed(r)["dtype"]
    r = validate_dataset(torch.from_numpy(x), torch.from_numpy(y).bool(), role="training", name="d", n_features=64, classes=[0, 1])
    assert "labels: dtype bool is not an integer type" in _failed(r)["dtype"]


def test_wrong_shape_rejected(mnist) -> None:
    x, y = mnist
    r = validate_dataset(x.reshape(len(x), -1), y, **_mnist_kwargs())
    assert _failed(r) == {"shape": "x: per-example shape (784,) but the task expects (1, 28, 28)"}
    # not a table at all: 1-D x, labels that do not line up
    r = validate_dataset(x[:, 0, 0, 0], y, **_mnist_kwargs())
    bad = _failed(r)
    assert "x must be at least 2-D (examples × features), got shape (2000,)" in bad["shape"]
    assert "not checked" in bad["labels"]
    r = validate_dataset(x, y[:-1], **_mnist_kwargs())
    assert "x has 2000 examples but y has 1999 labels" in _failed(r)["shape"]
    r = validate_dataset(x, y[:, None], **_mnist_kwargs())
    assert "y must be 1-D (one label per example), got shape (2000, 1)" in _failed(r)["shape"]


def test_nan_rejected_with_location(mnist) -> None:
    x, y = mnist
    x = x.copy()
    x[4, 0, 0, 3] = np.nan
    x[10, 0, 5, 5] = np.nan
    r = validate_dataset(x, y, **_mnist_kwargs())
    assert _failed(r) == {"finite": "features: NaN/inf in 2 rows (first at row 4: column f3 = nan)"}


def test_inf_rejected_with_location(digits) -> None:
    x, y = digits
    x = x.copy()
    x[7, 9] = -np.inf
    r = validate_dataset(x, y, role="training", name="d", n_features=64, classes=range(10), value_range=(0, 1))
    # the range check looks at finite values only, so the inf is reported once, by 'finite'
    assert _failed(r) == {"finite": "features: NaN/inf in 1 row (first at row 7: column f9 = -inf)"}


def test_labels_outside_task_classes_rejected(digits01) -> None:
    x, y = digits01
    y = y.copy()
    y[[17, 40, 41]] = 5
    r = validate_dataset(x, y, role="training", name="task0", n_features=64, classes=[0, 1])
    assert _failed(r) == {"labels": "label column: 3 rows outside task classes [0, 1] (first at row 17: value 5)"}


def test_empty_rejected_without_gx_crash(mnist) -> None:
    x, y = mnist
    r = validate_dataset(x[:0], y[:0], **_mnist_kwargs(role="certification", confidence=0.95, target_lower_bound=0.9))
    assert not r.success and r.n_rows == 0
    bad = _failed(r)
    assert bad["rows"] == "empty data set: 0 rows (need ≥ 1)"
    assert bad["confidence_rows"].startswith("too small for the stated confidence: need ≥ 29 rows")
    assert bad["finite"] == "not checked: the data set is empty"


def test_too_small_for_confidence_rejected(digits01) -> None:
    x, y = digits01
    kw = dict(role="certification", name="cert", n_features=64, classes=[0, 1], confidence=0.95, target_lower_bound=0.9)
    r = validate_dataset(x[:28], y[:28], **kw)
    assert _failed(r) == {
        "confidence_rows": "too small for the stated confidence: need ≥ 29 rows to certify ≥ 0.9 at confidence 0.95 (have 28)"
    }
    assert validate_dataset(x[:29], y[:29], **kw).success  # exactly the boundary


def test_value_out_of_range_rejected(mnist) -> None:
    x, y = mnist
    x = x.copy()
    x[17, 0, 2, 2] = 1.5
    x[30, 0, 0, 1] = -0.25
    x[31, 0, 0, 1] = -0.25
    r = validate_dataset(x, y, **_mnist_kwargs())
    assert _failed(r) == {
        "range": "features: values outside [0, 1]: below 0 in 2 rows, above 1 in 1 row (first at row 17: column f58 = 1.5)"
    }


def test_min_rows_rejected(digits01) -> None:
    x, y = digits01
    r = validate_dataset(x[:10], y[:10], role="training", name="t", n_features=64, classes=[0, 1], min_rows=50)
    assert _failed(r) == {"rows": "row count 10 < required 50"}


def test_several_problems_all_reported(digits01) -> None:
    x, y = digits01
    x, y = x.copy(), y.copy()
    x[3, 0] = np.nan
    x[5, 1] = 2.0
    y[8] = 9
    r = validate_dataset(x, y, role="lookahead", name="t", n_features=64, classes=[0, 1], value_range=(0, 1))
    assert set(_failed(r)) == {"finite", "labels", "range"}
    text = r.summary()
    assert text.startswith("FAIL: lookahead data 't' (360 rows): 3 of 6 checks failed")
    assert "first at row 3" in text and "first at row 8: value 9" in text and "first at row 5: column f1 = 2" in text


def test_gx_errors_fail_closed(monkeypatch, digits01) -> None:
    x, y = digits01

    def boom(self, *a, **k):
        raise RuntimeError("simulated GX failure")

    monkeypatch.setattr(val._GXSession, "run", boom)
    r = validate_dataset(x, y, role="training", name="t", n_features=64, classes=[0, 1])
    assert not r.success
    assert "Great Expectations run failed: RuntimeError: simulated GX failure" in _failed(r)["labels"]


def test_bad_arguments_raise(digits01) -> None:
    x, y = digits01
    base = dict(name="t", n_features=64, classes=[0, 1])
    with pytest.raises(ValueError, match="role must be one of"):
        validate_dataset(x, y, role="test", **base)
    with pytest.raises(ValueError, match="only apply to role='certification'"):
        validate_dataset(x, y, role="training", confidence=0.95, target_lower_bound=0.9, **base)
    with pytest.raises(ValueError, match="given together"):
        validate_dataset(x, y, role="certification", confidence=0.95, **base)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        validate_dataset(x, y, role="certification", confidence=1.0, target_lower_bound=0.9, **base)
    with pytest.raises(ValueError, match="low ≤ high"):
        validate_dataset(x, y, role="training", value_range=(1, 0), **base)
    with pytest.raises(ValueError, match="classes must not be empty"):
        validate_dataset(x, y, role="training", name="t", n_features=64, classes=[])


# ============================================================================== Clopper–Pearson sizing
def test_min_rows_for_confidence_math() -> None:
    from scipy.stats import beta

    assert min_rows_for_confidence(0.95, 0.9) == 29
    assert min_rows_for_confidence(0.99, 0.99) == 459  # ln(0.01)/ln(0.99) = 458.2
    assert min_rows_for_confidence(0.95, 0.5) == 5  # ln(0.05)/ln(0.5) = 4.32
    for c, t in [(0.95, 0.9), (0.9, 0.8), (0.99, 0.95), (0.999, 0.999), (0.6, 0.3)]:
        n = min_rows_for_confidence(c, t)
        assert n == max(1, math.ceil(math.log(1 - c) / math.log(t)))
        # a perfect score on n rows reaches the target; on n − 1 rows it cannot
        assert beta.ppf(1 - c, n, 1) >= t
        assert n == 1 or beta.ppf(1 - c, n - 1, 1) < t
    # agrees with the routine that writes certificates (which rounds down by a relative 1e-12)
    import lid_engine as le

    n = min_rows_for_confidence(0.95, 0.9)
    assert le.clopper_pearson_lower(n, n, 0.05) >= 0.9 > le.clopper_pearson_lower(n - 1, n - 1, 0.05)
    for bad in [(0.0, 0.9), (0.95, 1.0), (0.95, 0.0), (True, 0.5)]:
        with pytest.raises(ValueError):
            min_rows_for_confidence(*bad)


# ============================================================================== validate_all / timing
def test_validate_all_builds_one_context(monkeypatch, mnist, digits01) -> None:
    made = []
    real = val._GXSession

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            made.append(1)
            super().__init__()

    monkeypatch.setattr(val, "_GXSession", Counting)
    (xm, ym), (xd, yd) = mnist, digits01
    yd_bad = yd.copy()
    yd_bad[0] = 7
    reports = validate_all(
        {
            "train": (xm, ym, {k: v for k, v in _mnist_kwargs().items() if k != "name"}),
            "lookahead": (xd, yd, dict(role="lookahead", n_features=64, classes=[0, 1])),
            "cert": (xd, yd_bad, dict(role="certification", n_features=64, classes=[0, 1], confidence=0.95, target_lower_bound=0.9)),
        }
    )
    assert len(made) == 1
    assert list(reports) == ["train", "lookahead", "cert"]
    assert reports["train"].success and reports["lookahead"].success
    assert reports["cert"].dataset == "cert"
    assert _failed(reports["cert"]) == {"labels": "label column: 1 row outside task classes [0, 1] (first at row 0: value 7)"}
    with pytest.raises(ValueError, match="role must be one of"):  # arguments are checked up front
        validate_all({"a": (xd, yd, dict(role="nope", n_features=64, classes=[0, 1]))})


def test_validation_of_10k_mnist_is_fast() -> None:
    import great_expectations  # noqa: F401  (exclude the one-off import from the timing)

    x, y = load_mnist("test", copy=False)
    t0 = time.perf_counter()
    r = validate_dataset(x, y, **_mnist_kwargs(role="certification", confidence=0.95, target_lower_bound=0.9))
    elapsed = time.perf_counter() - t0
    assert r.success, r.summary()
    assert r.n_rows == 10_000
    assert elapsed < 5.0, f"validating 10k MNIST rows took {elapsed:.2f} s"


# ============================================================================== buffer
def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _buf(tmp_path: Path, **kw) -> LookaheadBuffer:
    kw.setdefault("feature_shape", (64,))
    kw.setdefault("classes", [0, 1])
    return LookaheadBuffer(tmp_path / "buf", **kw)


def test_buffer_round_trip(tmp_path, digits01) -> None:
    x, y = digits01
    buf = _buf(tmp_path, value_range=(0, 1))
    assert len(buf) == 0
    empty_sha = buf.sha256()
    rep = buf.add(x[:100], y[:100], source="stream A, day 1")
    assert rep.success and rep.role == "lookahead"
    buf.add(torch.from_numpy(x[100:150]).double(), torch.from_numpy(y[100:150]), source="stream B")
    assert len(buf) == 150 and buf.sha256() != empty_sha
    bx, by = buf.data()
    assert bx.dtype == torch.float32 and by.dtype == torch.int64 and bx.shape == (150, 64)
    assert torch.equal(bx, torch.from_numpy(x[:150])) and torch.equal(by, torch.from_numpy(y[:150]))

    d = tmp_path / "buf"
    names = sorted(p.name for p in d.iterdir())
    assert len(names) == 2 and "manifest.json" in names  # one data file + manifest, no temp files
    data_file = next(n for n in names if n.endswith(".safetensors"))
    from safetensors.numpy import load_file

    raw = load_file(str(d / data_file))  # plain safetensors, readable without lidgate
    assert np.array_equal(raw["x"], x[:150]) and np.array_equal(raw["y"], y[:150])

    m = json.loads((d / "manifest.json").read_text())
    assert m["n"] == 150 and m["shapes"] == {"x": [150, 64], "y": [150]}
    assert m["dtypes"] == {"x": "float32", "y": "int64"} and m["classes"] == [0, 1]
    assert m["sha256"] == buf.sha256() and m["data_file"] == data_file
    assert m["created"] <= m["updated"]
    assert [(s["source"], s["n_rows"], s["n_kept"]) for s in m["sources"]] == [("stream A, day 1", 100, 100), ("stream B", 50, 50)]

    again = LookaheadBuffer.open(d)
    assert len(again) == 150 and again.sha256() == buf.sha256()
    ax, ay = again.data()
    assert torch.equal(ax, bx) and torch.equal(ay, by)
    assert again.feature_shape == (64,) and again.classes == [0, 1] and again.value_range == (0.0, 1.0)
    # the constructor attaches to an existing buffer with the same configuration …
    attached = LookaheadBuffer(d, feature_shape=(64,), classes=[0, 1], value_range=(0, 1))
    assert len(attached) == 150
    # … and refuses a different one
    with pytest.raises(ValueError, match="already holds a lookahead buffer"):
        LookaheadBuffer(d, feature_shape=(64,), classes=[0, 1, 2])
    # data() hands out copies
    bx[0, 0] = 99.0
    assert buf.data()[0][0, 0] != 99.0
    buf.clear()
    assert len(buf) == 0 and len(LookaheadBuffer.open(d)) == 0 and buf.sha256() == empty_sha


def test_buffer_mnist_shapes(tmp_path, mnist) -> None:
    x, y = mnist
    buf = LookaheadBuffer(tmp_path / "m", feature_shape=MNIST_SHAPE, classes=range(10), value_range=(0, 1))
    buf.add(x, y, source="mnist test[:2000]")
    bx, _ = LookaheadBuffer.open(tmp_path / "m").data()
    assert bx.shape == (2000, *MNIST_SHAPE)
    with pytest.raises(BufferRejectedError, match=r"per-example shape \(784,\) but the task expects \(1, 28, 28\)"):
        buf.add(x.reshape(2000, -1), y)


@pytest.mark.parametrize(
    "corrupt, check, message",
    [
        ("int", "dtype", "features: dtype int64 is not floating point"),
        ("nan", "finite", "features: NaN/inf in 1 row (first at row 3: column f5 = nan)"),
        ("label", "labels", "label column: 1 row outside task classes [0, 1] (first at row 2: value 7)"),
        ("range", "range", "above 1 in 1 row"),
        ("empty", "rows", "empty data set: 0 rows"),
        ("overflow", "float32", "features: 1 row overflow float32 storage (first at row 4)"),
    ],
)
def test_buffer_rejects_bad_batch_and_stays_unchanged(tmp_path, digits01, corrupt, check, message) -> None:
    x, y = digits01
    buf = _buf(tmp_path, value_range=(0, 1))
    buf.add(x[:40], y[:40], source="good")
    before_files, before_sha = _files(tmp_path / "buf"), buf.sha256()
    bx, by = x[40:60].copy(), y[40:60].copy()
    if corrupt == "int":
        bx = (bx * 16).astype(np.int64)
    elif corrupt == "nan":
        bx[3, 5] = np.nan
    elif corrupt == "label":
        by[2] = 7
    elif corrupt == "range":
        bx[6, 0] = 3.0
    elif corrupt == "empty":
        bx, by = bx[:0], by[:0]
    elif corrupt == "overflow":
        bx = bx.astype(np.float64)
        bx[4, 1] = 1e300
    with pytest.raises(BufferRejectedError) as info:
        buf.add(bx, by, source="bad")
    report = info.value.report
    assert not report.success
    assert message in {c.name: c.detail for c in report.failures()}[check]
    assert message in str(info.value)
    assert len(buf) == 40 and buf.sha256() == before_sha
    assert _files(tmp_path / "buf") == before_files
    assert len(LookaheadBuffer.open(tmp_path / "buf")) == 40


def test_buffer_capacity_keeps_newest(tmp_path, digits01) -> None:
    x, y = digits01
    buf = _buf(tmp_path, capacity=50)
    buf.add(x[:30], y[:30], source="a")
    buf.add(x[30:60], y[30:60], source="b")
    assert len(buf) == 50
    bx, by = buf.data()
    assert torch.equal(bx, torch.from_numpy(x[10:60])) and torch.equal(by, torch.from_numpy(y[10:60]))
    m = buf.manifest
    assert [(s["source"], s["n_kept"]) for s in m["sources"]] == [("a", 20), ("b", 30)]
    assert m["n_added_total"] == 60 and m["n_evicted_total"] == 10
    buf.add(x[100:180], y[100:180], source="big")  # one batch above capacity: its newest 50 rows
    bx, _ = LookaheadBuffer.open(tmp_path / "buf").data()
    assert torch.equal(bx, torch.from_numpy(x[130:180]))
    assert [(s["source"], s["n_rows"], s["n_kept"]) for s in buf.manifest["sources"]] == [("big", 80, 50)]


def test_buffer_tamper_detected_on_open(tmp_path, digits01) -> None:
    x, y = digits01
    buf = _buf(tmp_path)
    buf.add(x[:40], y[:40])
    d = tmp_path / "buf"
    data_file = d / buf.manifest["data_file"]
    original = data_file.read_bytes()

    # flip one byte of the feature data (the file stays valid safetensors)
    b = bytearray(original)
    b[-5] ^= 0x01
    data_file.write_bytes(bytes(b))
    with pytest.raises(BufferCorruptError, match="sha256 .* but the manifest records"):
        LookaheadBuffer.open(d)

    # a different, well-formed data file swapped in
    from safetensors.numpy import save

    data_file.write_bytes(save({"x": x[:40], "y": np.zeros(40, dtype=np.int64)}))
    with pytest.raises(BufferCorruptError, match="tampered"):
        LookaheadBuffer.open(d)

    data_file.write_bytes(original)
    assert len(LookaheadBuffer.open(d)) == 40

    # a manifest that lies about its data (labels edited, sha recomputed by the tamperer, shapes kept)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "classes": [0]}))
    with pytest.raises(BufferCorruptError, match="labels outside"):
        LookaheadBuffer.open(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(BufferCorruptError, match="not readable JSON"):
        LookaheadBuffer.open(d)
    (d / "manifest.json").write_text(json.dumps({**m, "data_file": "../../etc/passwd"}))
    with pytest.raises(BufferCorruptError, match="invalid data file"):
        LookaheadBuffer.open(d)
    (d / "manifest.json").write_text(json.dumps(m))
    data_file.unlink()
    with pytest.raises(BufferCorruptError, match="missing or unreadable"):
        LookaheadBuffer.open(d)
    with pytest.raises(FileNotFoundError):
        LookaheadBuffer.open(tmp_path / "nowhere")


def test_buffer_add_is_atomic_when_replace_fails(tmp_path, monkeypatch, digits01) -> None:
    x, y = digits01
    buf = _buf(tmp_path)
    buf.add(x[:40], y[:40], source="old")
    d = tmp_path / "buf"
    before_files, before_sha = _files(d), buf.sha256()

    def crash(*a, **k):
        raise OSError("simulated crash in os.replace")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        buf.add(x[40:80], y[40:80], source="new")
    monkeypatch.undo()
    assert _files(d) == before_files  # nothing new on disk, no temp files left
    assert len(buf) == 40 and buf.sha256() == before_sha  # in-memory state untouched too
    reopened = LookaheadBuffer.open(d)
    assert len(reopened) == 40 and reopened.sha256() == before_sha


def test_buffer_crash_before_manifest_commit_leaves_old_buffer(tmp_path, monkeypatch, digits01) -> None:
    """A crash after the new data file is in place but before the manifest rename (no cleanup runs)."""
    x, y = digits01
    buf = _buf(tmp_path)
    buf.add(x[:40], y[:40], source="old")
    d = tmp_path / "buf"
    before_sha = buf.sha256()
    real_replace = os.replace
    calls = []

    def replace_then_crash(src, dst, *a, **k):
        calls.append(Path(dst).name)
        if Path(dst).name == "manifest.json":
            raise OSError("simulated power loss before the manifest rename")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace_then_crash)
    monkeypatch.setattr(os, "unlink", lambda *a, **k: None)  # a real crash cleans nothing up
    with pytest.raises(OSError, match="power loss"):
        buf.add(x[40:80], y[40:80], source="new")
    monkeypatch.undo()
    assert calls[0].startswith("data-") and calls[-1] == "manifest.json"
    assert len(list(d.glob("data-*.safetensors"))) == 2  # the orphaned new data file is there …
    reopened = LookaheadBuffer.open(d)  # … but the manifest still names the old, intact one
    assert len(reopened) == 40 and reopened.sha256() == before_sha
    # the next successful write removes the leftovers
    reopened.add(x[40:80], y[40:80], source="retry")
    names = sorted(p.name for p in d.iterdir())
    assert len(names) == 2 and len(LookaheadBuffer.open(d)) == 80
