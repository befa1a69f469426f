"""Certification data in pieces: streamed from storage, or split into shards counted in parallel.

A certified count is a sum over examples, so a certification set can be counted piece by piece and
the pieces added exactly (``certificate.Counts``). Two things make the pieces give the *same*
certificate, byte for byte, as one pass over tensors held in memory:

* **Batches.** The bound pass of one pass runs over batches of ``batch_unit(method, batch_size)``
  rows counted from row 0. Shards start at multiples of that unit (``shard_ranges``) and a stream is
  re-cut into whole units (``rebatch``), so every example is bounded in exactly the batch it would be
  bounded in by one pass, with the same kernels.
* **Fingerprint.** ``certificate.fingerprint_stream`` feeds sha256 the same bytes as
  ``fingerprint_data`` on the concatenated tensors, one piece at a time.

``CertificationStream`` is the protocol a source implements (rows ``[start, stop)`` of ``(x, y)`` in
order, in chunks of its choosing); ``TensorStream`` serves tensors held in memory. lidgate's
components add a Parquet source read by row groups. Nothing here imports beyond torch.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from .errors import InvalidInputError

__all__ = ["CastStream", "CertificationStream", "GuardedFile", "SafetensorsStream", "TappedStream", "TensorStream", "batch_unit",
           "range_digests", "rebatch", "shard_ranges"]

FLOAT_DTYPES = (torch.float32, torch.float64)


class CertificationStream(ABC):
    """Certification data read in order, a chunk at a time, so it never has to fit in memory.

    Subclasses set ``n`` (rows), ``feature_shape`` (one example's shape), ``dtype`` (of ``x``) and
    ``name`` (what errors call the source: a file path, say), and implement ``_read``. A stream must
    be re-readable: counting, fingerprinting and shards each read it again from where they need.
    """

    n: int
    feature_shape: tuple[int, ...]
    dtype: torch.dtype
    name: str
    #: True when the stream pickles as a reference to storage another process can read (a file path), so
    #: process workers read their own rows; False when pickling would copy the data (or cannot work)
    portable: bool = False

    @abstractmethod
    def _read(self, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Chunks ``(x, y)`` covering rows ``[start, stop)`` in order (any chunk sizes)."""

    def labels(self, start: int = 0, stop: int | None = None) -> Iterator[Tensor]:
        """The labels of rows ``[start, stop)`` in chunks; override when a source can read them alone."""
        for _, y in self.chunks(start, stop):
            yield y

    def __len__(self) -> int:
        return self.n

    def chunks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Checked chunks ``(x, y)`` of rows ``[start, stop)``: ``x`` of ``dtype`` and ``(k, *feature_shape)``,
        ``y`` int64 of shape ``(k,)``, exactly ``stop − start`` rows in all.

        Every reading of all the rows is hashed as it goes, and must give the rows the first one gave
        (``InvalidInputError`` otherwise, when the reading ends): a certificate's fingerprint and its
        counts are separate readings, so they are bound to the same bytes by construction, whatever
        happens to the source in between."""
        start, stop = self._range(start, stop)
        full = start == 0 and stop == self.n
        hx, hy = hashlib.sha256(), hashlib.sha256()
        row = start
        for x, y in self._read(start, stop):
            self._check_chunk(x, y, row)
            row += len(x)
            if row > stop:
                raise InvalidInputError(f"{self.name}: the source returned rows past row {stop} (asked for {start}..{stop})")
            if full:
                _hash_rows(hx, hy, x, y)
            yield x, y
        if row != stop:
            raise InvalidInputError(f"{self.name}: the source ended at row {row}, expected rows {start}..{stop} "
                                    f"({self.n} rows in all)")
        if full:
            self._same_rows(hx.digest() + hy.digest())

    def _same_rows(self, digest: bytes) -> None:
        """Record the first whole reading's digest; refuse a later one that differs."""
        first = self.__dict__.setdefault("_rows_digest", digest)
        if first != digest:
            raise InvalidInputError(f"{self.name}: two readings of all the rows gave different rows (the source "
                                    "changed while it was being certified, or does not give the same rows every "
                                    "time); nothing read from it can be certified")

    def head(self, k: int) -> tuple[Tensor, Tensor]:
        """The first ``k`` rows (fewer when the stream is shorter) as tensors."""
        xs, ys = [], []
        for x, y in self.chunks(0, min(k, self.n)):
            xs.append(x), ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def astype(self, dtype: torch.dtype) -> CertificationStream:
        """The same rows with ``x`` cast to ``dtype`` (a model's floating dtype); ``self`` when it already is."""
        return self if dtype == self.dtype else CastStream(self, dtype)

    def _range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n if stop is None else stop
        if not (0 <= start <= stop <= self.n):
            raise InvalidInputError(f"{self.name}: rows {start}..{stop} lie outside 0..{self.n}")
        return start, stop

    def _check_chunk(self, x, y, row: int) -> None:
        where = f"{self.name}, chunk at row {row}"
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise InvalidInputError(f"{where}: a chunk must be a pair of tensors (x, y), got "
                                    f"({type(x).__name__}, {type(y).__name__})")
        if x.dtype != self.dtype or tuple(x.shape[1:]) != tuple(self.feature_shape):
            raise InvalidInputError(f"{where}: x is {x.dtype} of shape {tuple(x.shape)}, expected {self.dtype} of "
                                    f"shape (k, {', '.join(map(str, self.feature_shape))})")
        if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
            raise InvalidInputError(f"{where}: y must be int64 of shape ({len(x)},), got {y.dtype} {tuple(y.shape)}")

    def _check_header(self) -> None:
        """For subclasses' ``__init__``: the declared size, shape and dtype are usable."""
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise InvalidInputError(f"{self.name}: a certification stream needs n ≥ 1 rows, got {self.n!r}")
        if self.dtype not in FLOAT_DTYPES:
            raise InvalidInputError(f"{self.name}: features must be float32 or float64, got {self.dtype}")
        if not all(isinstance(s, int) and s >= 1 for s in self.feature_shape):
            raise InvalidInputError(f"{self.name}: feature_shape must be positive integers, got {self.feature_shape}")


class TensorStream(CertificationStream):
    """Tensors held in memory, served ``chunk_rows`` rows at a time (the reference stream in tests)."""

    def __init__(self, x: Tensor, y: Tensor, chunk_rows: int = 4096, name: str = "tensors") -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.dim() < 1 or len(x) != len(y):
            raise InvalidInputError("TensorStream: 'x' and 'y' must be tensors with the same number of rows")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise InvalidInputError(f"TensorStream: 'chunk_rows' must be a positive integer, got {chunk_rows!r}")
        from .certificate import canonical_labels  # (certificate imports this module)

        self.x, self.y = x, canonical_labels(y, f"TensorStream '{name}'")  # refused, never rounded
        self.n, self.feature_shape, self.dtype, self.name = len(x), tuple(x.shape[1:]), x.dtype, name
        self.chunk_rows = chunk_rows
        self._check_header()

    def _read(self, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        for s in range(start, stop, self.chunk_rows):
            e = min(s + self.chunk_rows, stop)
            yield self.x[s:e], self.y[s:e]


class CastStream(CertificationStream):
    """Another stream's rows with ``x`` cast to ``dtype`` chunk by chunk (``CertificationStream.astype``)."""

    def __init__(self, base: CertificationStream, dtype: torch.dtype) -> None:
        if not isinstance(base, CertificationStream):
            raise InvalidInputError(f"CastStream: expected a CertificationStream, got {type(base).__name__}")
        self.base, self.dtype = base, dtype
        self.n, self.feature_shape, self.name, self.portable = base.n, base.feature_shape, base.name, base.portable
        self._check_header()

    def _read(self, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.base.chunks(start, stop):
            yield x.to(self.dtype), y

    def labels(self, start: int = 0, stop: int | None = None) -> Iterator[Tensor]:
        return self.base.labels(start, stop)


class TappedStream(CertificationStream):
    """Another stream's rows, hashed as they are read: ``digest()`` is ``range_digests``' digest of the rows
    read so far (one contiguous range), so a shard can say which rows it counted."""

    def __init__(self, base: CertificationStream) -> None:
        self.base, self.n, self.feature_shape, self.dtype, self.name = base, base.n, base.feature_shape, base.dtype, base.name
        self._hx, self._hy = hashlib.sha256(), hashlib.sha256()

    def _read(self, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in self.base.chunks(start, stop):
            _hash_rows(self._hx, self._hy, x, y)
            yield x, y

    def digest(self) -> str:
        return (self._hx.digest() + self._hy.digest()).hex()


def range_digests(stream: CertificationStream, ranges: list[tuple[int, int]]) -> list[str]:
    """A digest of the rows of each contiguous range ``[a, b)`` (in order, covering ``0..n``), from one whole
    reading of ``stream`` — which the stream binds to its other whole readings (``chunks``). A shard that
    counted rows ``[a, b)`` through a ``TappedStream`` must report the same digest."""
    if not ranges or ranges[0][0] != 0 or ranges[-1][1] != stream.n or \
            any(b != c for (_, b), (c, _) in zip(ranges, ranges[1:])):
        raise InvalidInputError(f"range_digests: {ranges} are not contiguous ranges covering 0..{stream.n}")
    out: list[str] = []
    hx, hy = hashlib.sha256(), hashlib.sha256()
    row, k = 0, 0
    for x, y in stream.chunks():
        while len(x):
            take = min(ranges[k][1] - row, len(x))
            _hash_rows(hx, hy, x[:take], y[:take])
            x, y, row = x[take:], y[take:], row + take
            if row == ranges[k][1]:
                out.append((hx.digest() + hy.digest()).hex())
                hx, hy, k = hashlib.sha256(), hashlib.sha256(), k + 1
    return out


def _hash_rows(hx, hy, x: Tensor, y: Tensor) -> None:
    hx.update(x.detach().cpu().contiguous().numpy())
    hy.update(y.detach().cpu().contiguous().numpy())


class GuardedFile:
    """For a stream over one file that must not change under it (``SafetensorsStream``; lidgate's
    components' ``ParquetStream``): every reading calls ``_check_file``, which refuses a file whose size,
    modification or change time or inode differ from when it was opened (a file replaced by another, or
    rewritten in place with its modification time put back: the change time cannot be set), and a copy
    unpickled in another process (a Dask worker) first checks the file's bytes against ``sha256`` —
    taken when the stream is opened or first pickled, or given by ``pin`` — and then keeps that file's
    identity. ``_file_error`` is the exception raised."""

    path: Path | str
    name: str
    sha256: str | None
    _file_error: type[Exception] = InvalidInputError

    def _guard(self, sha256: str | None = None) -> None:
        """For ``__init__``: this process has the file open as it is now."""
        self.sha256, self._stat, self._verified = sha256, self._identity(), True

    def _identity(self) -> tuple[int, ...]:
        import os

        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise self._file_error(f"{self.name}: cannot be read ({exc.strerror or exc})") from None
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev

    def _file_sha256(self) -> str:
        from .files import file_sha256

        try:
            return file_sha256(self.path)
        except OSError as exc:
            raise self._file_error(f"{self.name}: cannot be read ({exc.strerror or exc})") from None

    def _check_file(self) -> None:
        """The file at the path is the one the stream was opened on (see the class docstring)."""
        if not self._verified:
            digest = self._file_sha256()
            if digest != self.sha256:
                raise self._file_error(f"{self.name}: the file here is not the one being certified (sha256 "
                                       f"{digest[:12]}…, expected {str(self.sha256)[:12]}…); give every worker the "
                                       "same file")
            self._stat, self._verified = self._identity(), True
        if self._identity() != self._stat:
            raise self._file_error(f"{self.name}: the file changed while it was being certified (its size, "
                                   "modification or change time or inode differ from when it was opened); certify "
                                   "a file nothing writes to")

    def pin(self, sha256: str):
        """Check the file's bytes against ``sha256`` (a registered fingerprint) before the first read: what
        is read is then what was pinned, even if the file changed after it was checked elsewhere."""
        self.sha256, self._verified = sha256, False
        return self

    def __getstate__(self) -> dict:
        """Another process checks the file's sha256 before its first read (taken now if not yet known)."""
        if self.sha256 is None:
            self._check_file()
            self.sha256 = self._file_sha256()
        return {**self.__dict__, "_verified": False}


class SafetensorsStream(GuardedFile, CertificationStream):
    """``(x, y)`` written once to a safetensors file and read back a slice at a time (no pickles): how
    tensors held in memory reach other processes (Dask process workers) without being copied to every
    shard — the stream pickles as its path.

    Every reading must see the file the stream was opened on (``GuardedFile``).

    The header is checked by the safetensors library; the rows are then read a chunk at a time with plain
    positioned reads (not a memory map, whose pages would stay resident for a whole reading), so a reading
    holds about one chunk of the file."""

    portable = True

    def __init__(self, path, chunk_rows: int = 4096) -> None:
        from safetensors import safe_open

        self.path, self.name, self.chunk_rows = str(path), str(path), chunk_rows
        self._guard()  # (the sha256 is taken when first pickled: what a reader elsewhere must find)
        with safe_open(self.path, "pt") as f:
            if set(f.keys()) != {"x", "y"}:
                raise InvalidInputError(f"{self.name}: expected tensors 'x' and 'y', found {sorted(f.keys())}")
            x, y = f.get_slice("x"), f.get_slice("y")
            shape, self.dtype = tuple(x.get_shape()), getattr(torch, _SAFETENSORS_DTYPES.get(x.get_dtype(), "uint8"))
            if tuple(y.get_shape()) != shape[:1] or y.get_dtype() != "I64":
                raise InvalidInputError(f"{self.name}: 'y' must be int64 of shape ({shape[0]},)")
        self.n, self.feature_shape = shape[0], shape[1:]
        self._check_header()
        self._offsets = _data_offsets(self.path)  # where the bytes of 'x' and of 'y' start in the file

    @classmethod
    def write(cls, x: Tensor, y: Tensor, path, chunk_rows: int = 4096) -> SafetensorsStream:
        """Write ``(x, y)`` (labels as int64) to ``path`` and open it."""
        from safetensors.torch import save_file

        from .certificate import canonical_labels  # (certificate imports this module)

        save_file({"x": x.detach().cpu().contiguous(), "y": canonical_labels(y, str(path)).contiguous()}, str(path))
        return cls(path, chunk_rows)

    @classmethod
    def write_chunks(cls, chunks: Iterable[tuple[Tensor, Tensor]], path, *, metadata: dict[str, str] | None = None,
                     chunk_rows: int = 4096, name: str = "certification data") -> SafetensorsStream:
        """Write ``(x, y)`` chunks (a stream's ``chunks()``, say) to one safetensors file at ``path`` without
        holding more than one chunk, and open it; the file has the bytes ``save_file({"x": X, "y": Y},
        metadata=metadata)`` writes for the concatenated ``X`` and ``Y`` when ``metadata`` has at most one
        key (save_file orders several keys differently from one process to the next).

        ``x`` is float32 or float64 with one shape and dtype in every chunk, ``y`` int64 with one label per
        row (checked; ``name`` says whose chunks in the errors). ``x`` and ``y`` go to sibling files first
        (the header needs the row count), which are joined and removed; ``path`` appears complete or not
        at all."""
        import json
        import os
        import shutil

        path = str(path)
        parts = {k: f"{path}.{k}.partial" for k in ("x", "y", "all")}
        n, first = 0, None
        try:
            with open(parts["x"], "wb") as fx, open(parts["y"], "wb") as fy:
                for x, y in chunks:
                    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                        raise InvalidInputError(f"{name}: chunks must be pairs of tensors (x, y), got "
                                                f"({type(x).__name__}, {type(y).__name__}) at row {n}")
                    if first is None:
                        first = (x.dtype, tuple(x.shape[1:]))
                        if x.dtype not in FLOAT_DTYPES or x.dim() < 2:
                            raise InvalidInputError(f"{name}: x must be float32 or float64 of shape (rows, features…), "
                                                    f"got {x.dtype} of shape {tuple(x.shape)}")
                    if (x.dtype, tuple(x.shape[1:])) != first:
                        raise InvalidInputError(f"{name}: the chunk at row {n} has x {x.dtype} of shape {tuple(x.shape)}, "
                                                f"the first chunk {first[0]} of shape (k, {', '.join(map(str, first[1]))}); "
                                                "expected one dtype and example shape")
                    if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                        raise InvalidInputError(f"{name}: the chunk at row {n} has y {y.dtype} {tuple(y.shape)}, expected "
                                                f"int64 of shape ({len(x)},)")
                    fx.write(_le_bytes(x))
                    fy.write(_le_bytes(y))
                    n += len(x)
            if first is None or n == 0:
                raise InvalidInputError(f"{name}: no rows to write; expected at least one")
            dtype, shape = first
            x_bytes = os.path.getsize(parts["x"])
            header: dict = {} if metadata is None else {"__metadata__": {k: metadata[k] for k in sorted(metadata)}}
            # save_file's layout: tensors sorted by dtype (int64 before float64 and float32), then name
            header["y"] = {"dtype": "I64", "shape": [n], "data_offsets": [0, 8 * n]}
            header["x"] = {"dtype": _SAFETENSORS_CODES[dtype], "shape": [n, *shape],
                           "data_offsets": [8 * n, 8 * n + x_bytes]}
            text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            text += b" " * (-len(text) % 8)
            with open(parts["all"], "wb") as out:
                out.write(len(text).to_bytes(8, "little"))
                out.write(text)
                for k in ("y", "x"):
                    with open(parts[k], "rb") as f:
                        shutil.copyfileobj(f, out, 2**22)
            os.replace(parts["all"], path)
        finally:
            for p in parts.values():
                if os.path.exists(p):
                    os.remove(p)
        return cls(path, chunk_rows)

    def _rows(self, f, name: str, dtype: torch.dtype, shape: tuple[int, ...], s: int, e: int) -> Tensor:
        """Rows ``[s, e)`` of tensor ``name`` read from the open file ``f``."""
        row = math.prod(shape) * dtype.itemsize
        out = torch.empty((e - s, *shape), dtype=dtype)
        view = memoryview(out.numpy()).cast("B")
        f.seek(self._offsets[name] + s * row)
        if f.readinto(view) != len(view):
            raise InvalidInputError(f"{self.name}: the file ended inside rows {s}..{e} of '{name}'")
        if not _LITTLE_ENDIAN:  # safetensors stores little-endian values
            out.numpy().byteswap(inplace=True)
        return out

    def _read(self, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        self._check_file()
        with open(self.path, "rb", buffering=0) as f:
            for s in range(start, stop, self.chunk_rows):
                e = min(s + self.chunk_rows, stop)
                yield (self._rows(f, "x", self.dtype, tuple(self.feature_shape), s, e),
                       self._rows(f, "y", torch.int64, (), s, e))
        self._check_file()

    def labels(self, start: int = 0, stop: int | None = None) -> Iterator[Tensor]:
        start, stop = self._range(start, stop)
        self._check_file()
        with open(self.path, "rb", buffering=0) as f:
            for s in range(start, stop, 1 << 20):
                yield self._rows(f, "y", torch.int64, (), s, min(s + (1 << 20), stop))
        self._check_file()


_SAFETENSORS_DTYPES = {"F32": "float32", "F64": "float64"}
_SAFETENSORS_CODES = {torch.float32: "F32", torch.float64: "F64"}


_LITTLE_ENDIAN = __import__("sys").byteorder == "little"


def _data_offsets(path: str) -> dict[str, int]:
    """Where each tensor's bytes start in a safetensors file: 8 + the header's length + its data_offsets."""
    import json

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: 8 + size + int(v["data_offsets"][0]) for k, v in header.items() if k != "__metadata__"}


def _le_bytes(t: Tensor) -> bytes:
    """A tensor's values as little-endian bytes in row-major order (safetensors' encoding)."""
    arr = t.detach().cpu().contiguous().numpy()
    return (arr if _LITTLE_ENDIAN else arr.byteswap()).tobytes()


def batch_unit(method: str, batch_size: int) -> int:
    """Rows per bound pass when certifying with ``method`` in batches of ``batch_size``: pieces that
    start at multiples of it are bounded in the same batches as one pass from row 0 (the linear bound
    re-cuts its input into ``LINEAR_CHUNK`` rows)."""
    from .bounds import LINEAR_CHUNK

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"certification in pieces needs 'batch_size' as a positive integer, got {batch_size!r}")
    return min(batch_size, LINEAR_CHUNK) if method == "linear" else batch_size


def piece_rows(method: str, batch_size: int) -> int:
    """The largest multiple of ``batch_unit`` that is at most ``batch_size`` rows (at least one unit)."""
    unit = batch_unit(method, batch_size)
    return unit * max(1, batch_size // unit)


def shard_ranges(n: int, shards: int, unit: int) -> list[tuple[int, int]]:
    """``shards`` contiguous row ranges ``[start, stop)`` covering ``0..n``, each starting at a multiple of
    ``unit`` and as even as whole units allow (fewer ranges when there are fewer units than shards)."""
    for name, v in (("n", n), ("shards", shards), ("unit", unit)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidInputError(f"shard_ranges: '{name}' must be a positive integer, got {v!r}")
    units = math.ceil(n / unit)
    shards = min(shards, units)
    bounds = [min(n, (units * k // shards) * unit) for k in range(shards + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def rebatch(chunks: Iterable[tuple[Tensor, Tensor]], rows: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Re-cut a stream of ``(x, y)`` chunks into batches of exactly ``rows`` rows (the last one shorter),
    holding at most one batch plus one chunk in memory."""
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    held = 0
    for x, y in chunks:
        while len(x):
            take = min(rows - held, len(x))
            xs.append(x[:take]), ys.append(y[:take])
            x, y = x[take:], y[take:]
            held += take
            if held == rows:
                yield _joined(xs), _joined(ys)
                xs, ys, held = [], [], 0
    if held:
        yield _joined(xs), _joined(ys)


def _joined(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)
