"""Certification in pieces, and certificates checked on another machine.

* Shards at ``shard_ranges`` and streams re-cut by ``rebatch`` give exactly the one-pass counts, for
  IBP and the linear bound, in any number of shards or chunk sizes; the streamed fingerprint is the
  in-memory one; a certificate or a LID certified from a stream or through a sharding counter is the
  in-memory one field for field (only its creation time differs).
* A stream or a counter that delivers the wrong rows is refused by name.
* ``verify`` on other kernels: a recomputed count at least the stored one confirms the claim; a lower
  one fails with both numbers named.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lid_engine as le
from lid_engine import Box, Spec
from lid_engine import numerics
from lid_engine.certificate import (
    Counts,
    certify_box,
    count_certified,
    fingerprint_data,
    fingerprint_stream,
    hard_metric,
    population_lower_bound,
)
from lid_engine.errors import InvalidInputError
from lid_engine.lid import LID, manifest_digest
from lid_engine.stream import CertificationStream, TensorStream, batch_unit, rebatch, shard_ranges
from lid_engine.verify import verify


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 4)).eval()


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def labelled(model: nn.Module, shape: tuple[int, ...], n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.rand(n, generator=g) < 0.15  # some wrong labels: not everything certifies
    y[flip] = (y[flip] + 1) % model(x[:1]).shape[1]
    return x, y


MODEL = mlp()
X, Y = labelled(MODEL, (6,), 700)
BOX = Box.around(MODEL, 0.02)


def cert_fields(c) -> dict:
    d = c.to_dict()
    d.pop("created_at")  # the one timing field
    return d


# ------------------------------------------------------------------------ planning the pieces
@given(n=st.integers(1, 5000), shards=st.integers(1, 40), unit=st.integers(1, 600))
def test_shard_ranges_cover_every_row_once_from_unit_multiples(n, shards, unit):
    ranges = shard_ranges(n, shards, unit)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a < b for a, b in ranges) and all(b == a2 for (_, b), (a2, _) in zip(ranges, ranges[1:]))
    assert all(a % unit == 0 for a, _ in ranges)
    assert len(ranges) == min(shards, -(-n // unit))
    sizes = [-(-(b - a) // unit) for a, b in ranges]  # whole units per shard: as even as possible
    assert max(sizes) - min(sizes) <= 1


@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=20), rows=st.integers(1, 64))
def test_rebatch_cuts_whole_batches_in_order(sizes, rows):
    x = torch.arange(sum(sizes), dtype=torch.float64)[:, None]
    chunks, s = [], 0
    for k in sizes:
        chunks.append((x[s:s + k], x[s:s + k, 0].long()))
        s += k
    out = list(rebatch(chunks, rows))
    assert all(len(b) == rows for b, _ in out[:-1]) and all(0 < len(b) <= rows for b, _ in out)
    if out:
        assert torch.equal(torch.cat([b for b, _ in out]), x) and torch.equal(torch.cat([c for _, c in out]), x[:, 0].long())
    else:
        assert len(x) == 0


def test_batch_unit_follows_the_bound():
    assert batch_unit("ibp", 300) == 300
    assert batch_unit("linear", 2048) == le.bounds.LINEAR_CHUNK and batch_unit("linear", 100) == 100
    with pytest.raises(InvalidInputError, match="batch_size"):
        batch_unit("ibp", None)


# ------------------------------------------------------------------------ exact combination
@settings(max_examples=12, deadline=None)
@given(shards=st.integers(1, 9), batch=st.sampled_from([64, 100, 700]), method=st.sampled_from(["ibp", "linear"]))
def test_shards_add_up_to_one_pass(shards, batch, method):
    one = count_certified(MODEL, BOX, (X, Y), batch_size=batch, method=method)
    parts = [count_certified(MODEL, BOX, (X, Y), batch_size=batch, method=method, rows=r)
             for r in shard_ranges(len(X), shards, batch_unit(method, batch))]
    assert Counts.total(parts) == one
    assert 0 < one.certified < one.n  # a non-trivial count


@settings(max_examples=12, deadline=None)
@given(chunk=st.integers(1, 800), batch=st.sampled_from([64, 100, 2048]), method=st.sampled_from(["ibp", "linear"]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_a_stream_counts_and_hashes_as_tensors_in_memory(chunk, batch, method, dtype):
    x = X.to(dtype)
    stream = TensorStream(x, Y, chunk_rows=chunk)
    assert count_certified(MODEL, BOX, stream, batch_size=batch, method=method) == \
        count_certified(MODEL, BOX, (x, Y), batch_size=batch, method=method)
    assert fingerprint_stream(stream) == fingerprint_data(x, Y)


def test_stream_fingerprint_of_images():
    model = cnn()
    x, y = labelled(model, (1, 8, 8), 50)
    assert fingerprint_stream(TensorStream(x, y, chunk_rows=7)) == fingerprint_data(x, y)
    assert fingerprint_stream(TensorStream(x, y, chunk_rows=7)) != fingerprint_data(x[:-1], y[:-1])


def test_counts_add_class_by_class():
    a = Counts(3, 1, {"0": {"n": 2, "certified": 1}, "2": {"n": 1, "certified": 0}}, ("float64",))
    b = Counts(2, 2, {"1": {"n": 1, "certified": 1}, "10": {"n": 1, "certified": 1}}, ("float64",))
    s = a + b
    assert (s.n, s.certified) == (5, 3) and list(s.per_class) == ["0", "1", "2", "10"]
    with pytest.raises(InvalidInputError, match="evaluated in"):
        a + Counts(1, 1, {"0": {"n": 1, "certified": 1}}, ("float64", "float32"))
    with pytest.raises(InvalidInputError, match="no counts"):
        Counts.total([])


def sharding_counter(shards: int):
    """What lidgate's flows do on Dask, in one process: count each shard, add the parts."""
    calls = []

    def counter(model, box, data, *, dtype, batch_size, method, where):
        ranges = shard_ranges(len(data) if not isinstance(data, tuple) else len(data[0]), shards,
                              batch_unit(method, batch_size))
        calls.append(ranges)
        return Counts.total(count_certified(model, box, data, dtype=dtype, batch_size=batch_size, method=method,
                                            rows=r, where=where) for r in ranges)

    counter.calls = calls
    return counter


@pytest.mark.parametrize("method", ["ibp", "linear"])
def test_certificate_from_a_stream_or_shards_is_the_in_memory_one(method):
    spec = Spec("balanced_accuracy", 0.5)
    ref = certify_box(MODEL, BOX, X, Y, spec, method=method, batch_size=128)
    streamed = certify_box(MODEL, BOX, TensorStream(X, Y, chunk_rows=45), None, spec, method=method, batch_size=128)
    counter = sharding_counter(4)
    sharded = certify_box(MODEL, BOX, X, Y, spec, method=method, batch_size=128, counter=counter)
    assert cert_fields(streamed) == cert_fields(ref) == cert_fields(sharded)
    assert len(counter.calls[0]) == 4


def test_lid_certified_in_shards_saves_the_same_files(tmp_path):
    members = [Box.around(MODEL, r) for r in (0.005, 0.02)]
    data, specs = {"task": (X, Y)}, {"task": Spec("accuracy", 0.6)}
    one = LID.certify(MODEL, members, data, specs, batch_size=128)
    sharded = LID.certify(MODEL, members, {"task": TensorStream(X, Y, chunk_rows=99)}, specs, batch_size=128,
                          counter=sharding_counter(3))
    for lid in (one, sharded):
        for certs in lid.certificates:
            certs["task"] = type(certs["task"])(**{**certs["task"].to_dict(), "created_at": "2026-01-01T00:00:00+00:00"})
    a, b = one.save(tmp_path / "one"), sharded.save(tmp_path / "sharded")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    manifest = [json.loads((d / "lid.json").read_text()) for d in (a, b)]
    for m in manifest:
        m.pop("created_at", None), m.pop("digest", None)
    assert manifest[0] == manifest[1]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files if f.name != "lid.json")


def test_compute_lid_certifies_a_stream():
    lid = le.compute_lid(MODEL, X[:400], Y[:400], tau=0.5, cert={"task": TensorStream(X[400:], Y[400:], chunk_rows=37)},
                         iterations=15, progress=False, keep="all")
    ref = LID.certify(MODEL, lid.members, {"task": (X[400:], Y[400:])}, lid.tasks)
    assert [cert_fields(c["task"]) for c in lid.certificates] == [cert_fields(c["task"]) for c in ref.certificates]


# ------------------------------------------------------------------------ refusing bad pieces
class Broken(CertificationStream):
    def __init__(self, fault: str):
        self.n, self.feature_shape, self.dtype, self.name, self.fault = len(X), (6,), torch.float32, "broken.parquet", fault

    def _read(self, start, stop):
        for s in range(start, stop, 100):
            x, y = X[s:min(s + 100, stop)], Y[s:min(s + 100, stop)]
            if self.fault == "dtype" and s >= 200:
                x = x.double()
            if self.fault == "short" and s >= 600:
                return
            yield x, y


@pytest.mark.parametrize("fault, message", [("dtype", r"broken.parquet, chunk at row 200: x is torch.float64"),
                                            ("short", r"broken.parquet: the source ended at row 600, expected rows 0..700")])
def test_a_stream_that_breaks_its_header_is_refused_by_name(fault, message):
    with pytest.raises(InvalidInputError, match=message):
        count_certified(MODEL, BOX, Broken(fault), batch_size=128)
    with pytest.raises(InvalidInputError, match=message):
        fingerprint_stream(Broken(fault))


def test_a_counter_that_loses_rows_is_refused():
    def lossy(model, box, data, **kw):
        return count_certified(model, box, data, rows=(0, 600), **kw)

    with pytest.raises(InvalidInputError, match="must cover every row exactly once"):
        certify_box(MODEL, BOX, X, Y, Spec("accuracy", 0.5), counter=lossy)


# ------------------------------------------------------------------------ verify on other kernels
@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory):
    model = cnn()
    x, y = labelled(model, (1, 8, 8), 300)
    lid = LID.certify(model, [Box.around(model, 0.001)], {"task": (x, y)}, {"task": Spec("accuracy", 0.3)})
    return model, x, y, lid.save(tmp_path_factory.mktemp("cnn") / "lid")


def reseal(src, dst, delta: int):
    """The stored count moved by ``delta`` in one class, every derived number made consistent again."""
    d = shutil.copytree(src, dst)
    manifest = json.loads((d / "lid.json").read_text())
    c = manifest["members"][0]["certificates"]["task"]
    cls = next(k for k, v in c["per_class"].items() if 0 < v["certified"] < v["n"])
    c["per_class"][cls]["certified"] += delta
    c["certified"] += delta
    c["certified_accuracy"] = hard_metric(c["kind"], c["certified"], c["n"], c["per_class"])
    c["lower_bound"] = population_lower_bound(c["kind"], c["certified"], c["n"], c["per_class"], c["confidence"],
                                              c["n_domains"])
    manifest["digest"] = manifest_digest(manifest)
    (d / "lid.json").write_text(json.dumps(manifest))
    return d, cls, c


def test_verify_with_other_kernels_confirms_the_claim(saved_cnn, monkeypatch):
    model, x, y, d = saved_cnn  # certified with oneDNN's direct convolution (where available)
    monkeypatch.setattr(numerics, "direct_conv_available", lambda x: False)  # the auditor's: im2col + GEMM
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = verify(d, model, x, y, batch_size=77)  # other batches too
    finally:
        torch.set_num_threads(threads)
    assert report.ok, report.summary()


def test_verify_accepts_a_recount_at_least_the_stored_one(saved_cnn, tmp_path):
    model, x, y, d = saved_cnn
    lower, _, c = reseal(d, tmp_path / "lower", -1)  # another machine's sound count, one borderline example fewer
    report = verify(lower, model, x, y)
    assert report.ok, report.summary()
    detail = next(ch.detail for ch in report.checks if ch.name.endswith("recomputed"))
    assert f"≥ {c['certified']} stored" in detail


def test_verify_fails_a_recount_below_the_stored_one_naming_both(saved_cnn, tmp_path):
    model, x, y, d = saved_cnn
    higher, cls, c = reseal(d, tmp_path / "higher", +1)
    report = verify(higher, model, x, y)
    assert not report.ok
    (fail,) = report.failures
    assert fail.name == "member 0 / 'task' recomputed"
    k = c["certified"] - 1
    assert f"recomputed {k}/{c['n']} certified, stored {c['certified']}/{c['n']}" in fail.detail
    assert f"class {cls} ({c['per_class'][cls]['certified'] - 1} < {c['per_class'][cls]['certified']})" in fail.detail


def test_verify_reads_a_stream(saved_cnn):
    model, x, y, d = saved_cnn
    assert verify(d, model, TensorStream(x, y, chunk_rows=41)).ok
    other = TensorStream(x[:-1], y[:-1], chunk_rows=41)
    report = verify(d, model, other)
    assert not report.ok and "data 'task' fingerprint" in [c.name for c in report.failures]


# ------------------------------------------------------------------------ shards in threads of one process
def test_kernel_switches_are_held_by_one_thread_at_a_time():
    """The switches certification sets are process-wide: while one thread bounds, no other thread may
    set or restore them (Dask thread workers run shards in one process)."""
    import threading

    inside, release = threading.Event(), threading.Event()

    def certify_block():
        with numerics.certification_backend():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=certify_block)
    t.start()
    assert inside.wait(10)
    try:
        assert not torch._C._get_nnpack_enabled() and not torch._C._get_mkldnn_enabled()
        assert not numerics.SWITCHES.acquire(blocking=False)  # a search or another shard waits its turn
    finally:
        release.set()
        t.join(10)
    assert numerics.SWITCHES.acquire(blocking=False)
    numerics.SWITCHES.release()


def test_shards_counted_in_threads_equal_one_pass():
    from concurrent.futures import ThreadPoolExecutor

    model = cnn()
    x, y = labelled(model, (1, 8, 8), 400)
    box = Box.around(model, 0.001)
    before = (torch._C._get_mkldnn_enabled(), torch._C._get_nnpack_enabled())
    ranges = shard_ranges(len(x), 4, batch_unit("ibp", 64))
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda r: count_certified(model, box, (x, y), batch_size=64, rows=r), ranges))
    assert Counts.total(parts) == count_certified(model, box, (x, y), batch_size=64)
    assert (torch._C._get_mkldnn_enabled(), torch._C._get_nnpack_enabled()) == before


def test_a_stream_whose_label_reading_disagrees_is_refused():
    class Relabelled(TensorStream):
        def labels(self, start=0, stop=None):
            for y in super().labels(start, stop):
                yield (y + 1) % 4  # not the labels its chunks certify

    with pytest.raises(InvalidInputError, match=r"labels\(\) differ from the labels of its chunks\(\)"):
        fingerprint_stream(Relabelled(X, Y, chunk_rows=50))


@pytest.mark.parametrize("method", ["ibp", "linear"])
def test_a_batch_is_bounded_alike_alone_or_with_the_rest(method):
    """The first affine layer's product form follows the input's sign, decided per batch: a batch that
    is all ≥ 0 inside mixed-sign data gets the bounds it gets alone (in a shard or a stream chunk)."""
    from lid_engine.bounds import margin_bounds

    x = X.clone()
    x[128:256] = x[128:256].abs()  # one non-negative batch of 128 among mixed-sign ones
    whole = margin_bounds(MODEL, BOX, x, Y, method, mode="certify", dtype=torch.float64, batch_size=128)
    alone = margin_bounds(MODEL, BOX, x[128:256], Y[128:256], method, mode="certify", dtype=torch.float64,
                          batch_size=128)
    for w, a in zip(whole, alone):
        assert w is None and a is None or torch.equal(w[128:256], a)
    lo, hi = le.bound_logits(MODEL, BOX, x, mode="certify", dtype=torch.float64, batch_size=128)
    lo1, hi1 = le.bound_logits(MODEL, BOX, x[128:256], mode="certify", dtype=torch.float64, batch_size=128)
    assert torch.equal(lo[128:256], lo1) and torch.equal(hi[128:256], hi1)


def test_tensor_stream_refuses_labels_it_would_have_to_round():
    with pytest.raises(InvalidInputError, match="non-integer labels"):
        TensorStream(X, Y.double() + 0.5)
    with pytest.raises(InvalidInputError, match="integer class indices"):
        TensorStream(X, Y > 0)


def test_a_counter_that_counts_some_rows_twice_is_refused():
    def overlapping(model, box, data, **kw):  # 500 rows, but rows 0..199 twice and 300..499 never
        return Counts.total(count_certified(model, box, data, rows=r, **kw) for r in [(0, 300), (0, 200)])

    x, y = X[:500], Y[:500]
    with pytest.raises(InvalidInputError, match="must cover every row exactly once"):
        certify_box(MODEL, BOX, x, y, Spec("accuracy", 0.5), counter=overlapping)
    with pytest.raises(InvalidInputError, match="'rows' must be"):
        count_certified(MODEL, BOX, (x, y), rows=(-5, 10))


def test_tensors_staged_in_a_safetensors_file_count_and_hash_as_in_memory(tmp_path):
    import pickle

    from lid_engine.stream import SafetensorsStream

    stream = SafetensorsStream.write(X, Y, tmp_path / "cert.safetensors", chunk_rows=97)
    assert (stream.n, stream.dtype, stream.feature_shape) == (len(X), X.dtype, tuple(X.shape[1:]))
    assert fingerprint_stream(stream) == fingerprint_data(X, Y)
    shipped = pickle.loads(pickle.dumps(stream))  # what a process worker receives: the path
    assert count_certified(MODEL, BOX, shipped, batch_size=128, rows=(256, 700)) == \
        count_certified(MODEL, BOX, (X, Y), batch_size=128, rows=(256, 700))


def test_a_recount_that_raises_is_reported_as_not_recomputed(saved_cnn):
    model, x, y, d = saved_cnn

    def broken(*args, **kwargs):
        raise OSError("disk read error at row 128")

    report = verify(d, model, x, y, counter=broken)
    (fail,) = report.failures
    assert fail.name == "member 0 / 'task' recomputed"
    assert fail.detail == "could not be recomputed: OSError: disk read error at row 128"


# ------------------------------------------------------------------ a stream written to one file, or cast
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 700), shape=st.sampled_from([(3,), (2, 5), (1, 4, 4)]), chunk=st.integers(1, 300),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       meta=st.sampled_from([None, {}, {"task": "digits"}, {"task": "t-1.b"}, {"task": "naïve\u2028é"}]))
def test_a_stream_written_chunk_by_chunk_is_the_file_save_file_writes(tmp_path_factory, n, shape, chunk, dtype, meta):
    from safetensors.torch import save_file

    from lid_engine.stream import SafetensorsStream

    tmp = tmp_path_factory.mktemp("write")
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, 9, (n,), generator=g)
    save_file({"x": x, "y": y}, str(tmp / "whole.safetensors"), metadata=meta)
    stream = SafetensorsStream.write_chunks(TensorStream(x, y, chunk_rows=chunk).chunks(), tmp / "chunks.safetensors",
                                            metadata=meta, chunk_rows=chunk)
    # the registry pins a file's sha256: a version written from a stream must be the version written whole
    assert (tmp / "chunks.safetensors").read_bytes() == (tmp / "whole.safetensors").read_bytes()
    assert sorted(p.name for p in tmp.iterdir()) == ["chunks.safetensors", "whole.safetensors"]  # no parts left
    assert fingerprint_stream(stream) == fingerprint_data(x, y)
    assert torch.equal(torch.cat(list(stream.labels())), y)


@pytest.mark.parametrize("chunks, message", [
    ([], "no rows to write"),
    ([(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)), (torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64))],
     r"chunk at row 2 has x torch.float32 of shape \(2, 4\)"),
    ([(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)), (torch.zeros(2, 3).double(), torch.zeros(2, dtype=torch.int64))],
     r"chunk at row 2 has x torch.float64"),
    ([(torch.zeros(2, 3), torch.zeros(3, dtype=torch.int64))], r"y torch.int64 \(3,\), expected int64 of shape \(2,\)"),
    ([(torch.zeros(2, 3, dtype=torch.int32), torch.zeros(2, dtype=torch.int64))], "must be float32 or float64"),
])
def test_writing_bad_chunks_is_refused_and_leaves_no_file(tmp_path, chunks, message):
    from lid_engine.stream import SafetensorsStream

    with pytest.raises(InvalidInputError, match=message):
        SafetensorsStream.write_chunks(iter(chunks), tmp_path / "out.safetensors", name="team data")
    assert list(tmp_path.iterdir()) == []


def test_a_cast_stream_counts_and_hashes_as_the_cast_tensors():
    model = mlp()
    x, y = labelled(model, (6,), 300)
    wide = TensorStream(x.double(), y, chunk_rows=77, name="wide")
    cast = wide.astype(torch.float32)
    assert wide.astype(torch.float64) is wide and cast.dtype == torch.float32 and cast.name == "wide"
    assert fingerprint_stream(cast) == fingerprint_data(x.double().float(), y)
    box = Box.around(model, 1e-3)
    assert count_certified(model, box, cast, dtype=torch.float32, batch_size=64, method="ibp") == \
        count_certified(model, box, (x.double().float(), y), dtype=torch.float32, batch_size=64, method="ibp")


def test_accuracy_of_a_stream_is_the_accuracy_of_its_tensors():
    model = mlp()
    x, y = labelled(model, (6,), 500)
    y = y.clone()
    y[::7] = (y[::7] + 1) % 4
    stream = TensorStream(x, y, chunk_rows=33)
    for balanced in (False, True):
        assert le.accuracy(model, stream, batch_size=64, balanced=balanced) == pytest.approx(
            le.accuracy(model, x, y, batch_size=64, balanced=balanced), abs=1e-12)


def test_a_safetensors_stream_refuses_a_file_changed_under_it(tmp_path):
    import os
    import pickle

    from lid_engine.stream import SafetensorsStream

    x, y = labelled(MODEL, (6,), 300)
    stream = SafetensorsStream.write(x, y, tmp_path / "cert.safetensors", chunk_rows=64)
    copy = pickle.loads(pickle.dumps(stream))  # a worker's copy: checks the bytes before its first read
    assert fingerprint_stream(copy) == fingerprint_data(x, y)
    SafetensorsStream.write(x, (y + 1) % 4, tmp_path / "other.safetensors")
    os.replace(tmp_path / "other.safetensors", tmp_path / "cert.safetensors")
    with pytest.raises(InvalidInputError, match="changed while it was being certified"):
        fingerprint_stream(stream)
    with pytest.raises(InvalidInputError, match="not the one being certified"):
        list(pickle.loads(pickle.dumps(copy)).chunks())
    # rewritten in place at the same size with its modification time put back: the change time differs
    fresh = SafetensorsStream(tmp_path / "cert.safetensors")
    st = os.stat(tmp_path / "cert.safetensors")
    raw = bytearray((tmp_path / "cert.safetensors").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "cert.safetensors").write_bytes(bytes(raw))
    os.utime(tmp_path / "cert.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(InvalidInputError, match="changed while it was being certified"):
        fresh.head(1)
    # a stream pinned to a registered sha256 reads only a file with those bytes
    pinned = SafetensorsStream(tmp_path / "cert.safetensors").pin("0" * 64)
    with pytest.raises(InvalidInputError, match="not the one being certified"):
        pinned.head(1)


class Drifting(CertificationStream):
    """Gives other rows from its ``change_after``-th whole reading on: a source changed mid-certification."""

    def __init__(self, x, y, change_after: int):
        self.x, self.y, self.change_after, self.readings = x, y, change_after, 0
        self.n, self.feature_shape, self.dtype, self.name = len(x), tuple(x.shape[1:]), x.dtype, "drifting.parquet"

    def _read(self, start, stop):
        if (start, stop) == (0, self.n):
            self.readings += 1
        x = self.x if self.readings < self.change_after else self.x.flip(0)
        for s in range(start, stop, 128):
            yield x[s:min(s + 128, stop)], self.y[s:min(s + 128, stop)]


@pytest.mark.parametrize("change_after", [2, 3])
def test_a_source_that_changes_between_readings_certifies_nothing(change_after):
    """The fingerprint and the counts of a certificate are separate readings (and each LID member is
    counted again): a source whose rows change between them is refused, so no certificate can name
    rows other than those it counted."""
    stream = Drifting(X, Y, change_after)
    with pytest.raises(InvalidInputError, match="drifting.parquet: two readings of all the rows gave different rows"):
        LID.certify(MODEL, [BOX, Box.around(MODEL, 0.01)], {"t": stream}, {"t": Spec("accuracy", 0.1)})
    steady = Drifting(X, Y, change_after=10**9)
    lid = LID.certify(MODEL, [BOX], {"t": steady}, {"t": Spec("accuracy", 0.1)})
    assert lid.certificates[0]["t"].data_sha256 == fingerprint_data(X, Y) and steady.readings >= 2


def test_verify_fails_closed_on_a_source_that_changes_between_readings(tmp_path):
    lid = LID.certify(MODEL, [BOX], {"t": TensorStream(X, Y)}, {"t": Spec("accuracy", 0.1)})
    directory = lid.save(tmp_path / "lid")
    assert verify(directory, MODEL, Drifting(X, Y, change_after=10**9)).ok
    report = verify(directory, MODEL, Drifting(X, Y, change_after=2))
    assert not report.ok
    assert "two readings of all the rows gave different rows" in str(report)


@settings(max_examples=20, deadline=None)
@given(shards=st.integers(1, 7), unit=st.sampled_from([1, 50, 128]), chunk=st.integers(1, 300))
def test_a_shard_that_reads_its_range_reports_that_range_s_digest(shards, unit, chunk):
    """Shards read row ranges through a TappedStream; each digest equals the digest of that range in one
    whole reading (range_digests), whatever the chunking, and differs when the rows differ."""
    from lid_engine.stream import TappedStream, range_digests

    stream = TensorStream(X, Y, chunk_rows=chunk)
    ranges = shard_ranges(len(X), shards, unit)
    whole = range_digests(TensorStream(X, Y, chunk_rows=97), ranges)
    for (a, b), want in zip(ranges, whole):
        tapped = TappedStream(stream)
        assert sum(len(x) for x, _ in tapped.chunks(a, b)) == b - a and tapped.digest() == want
    other = Y.clone()
    other[ranges[-1][0]] = (other[ranges[-1][0]] + 1) % 4
    assert range_digests(TensorStream(X, other), ranges)[-1] != whole[-1]
    assert range_digests(TensorStream(X, other), ranges)[:-1] == whole[:-1]
