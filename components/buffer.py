"""The lookahead data buffer: examples of the NEXT task, collected before it is trained.

METHOD.md §3.2: importance scores (Fisher / SI) computed on the *upcoming* task's data decide which
parameter coordinates may have width in the LID ("lookahead" biasing). This buffer collects those
examples as they arrive, checks every incoming batch with Great Expectations
(:func:`components.validation.validate_dataset` with ``role="lookahead"``) and persists them.

On disk (one directory per buffer)
----------------------------------
* ``data-<sha256[:32]>.safetensors`` — tensors ``x`` (float32, ``(n, *feature_shape)``) and ``y``
  (int64, ``(n,)``); never pickle. The name is content-addressed.
* ``manifest.json`` — n, shapes, dtypes, classes, feature shape, capacity, value range, the data
  file's name and sha256, created/updated timestamps, and ``sources``: one note per batch whose rows
  are still held, oldest first (``source``, ``added_at``, ``n_rows`` added, ``n_kept`` still held,
  ``sha256`` of the batch), so the notes describe exactly the current rows (``Σ n_kept == n``).

Crash safety: every write goes to a temporary file in the same directory, is fsynced and then
renamed with ``os.replace``. The new data file gets a new (content-addressed) name, so the old
manifest keeps pointing at the old, intact data file until the manifest itself is replaced — that
rename is the single commit point. A crash at any moment leaves either the old or the new buffer,
both valid; stray files are removed by the next successful write. :meth:`LookaheadBuffer.open`
verifies the data file against the manifest's sha256 (and re-checks shapes, dtypes, labels and
finiteness) and raises :class:`BufferCorruptError` on any mismatch.

One writer per directory at a time (in-process writes are serialised by a lock; there is no
cross-process lock).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .validation import DataCheck, ValidationReport, _as_array, _rows, validate_dataset

__all__ = [
    "BufferCorruptError",
    "BufferRejectedError",
    "LookaheadBuffer",
    "LookaheadBufferError",
]

FORMAT = "lidgate.lookahead_buffer"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_DATA_RE = re.compile(r"^data-[0-9a-f]{32}\.safetensors$")
_TMP_PREFIX = ".tmp-"
X_DTYPE, Y_DTYPE = np.float32, np.int64


class LookaheadBufferError(RuntimeError):
    """Base class of the buffer's errors."""


class BufferRejectedError(LookaheadBufferError):
    """A batch failed validation; nothing was added. ``.report`` is the full validation report."""

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        super().__init__("lookahead buffer rejected the batch (nothing was added):\n" + report.summary())


class BufferCorruptError(LookaheadBufferError):
    """The buffer on disk does not match its manifest (tampered with or damaged)."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serialize(x: np.ndarray, y: np.ndarray) -> bytes:
    from safetensors.numpy import save

    return save({"x": np.ascontiguousarray(x, dtype=X_DTYPE), "y": np.ascontiguousarray(y, dtype=Y_DTYPE)})


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temp file + ``os.replace`` (readers see old or new)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _check_config(feature_shape: Any, classes: Any, capacity: Any, value_range: Any) -> tuple:
    try:
        fs = tuple(int(s) for s in feature_shape)
    except TypeError as exc:
        raise ValueError(f"feature_shape must be a tuple of ints, got {feature_shape!r}") from exc
    if not fs or any(s < 1 for s in fs):
        raise ValueError(f"feature_shape must be a non-empty tuple of positive ints, got {feature_shape!r}")
    cls = sorted({int(c) for c in classes})
    if not cls:
        raise ValueError("classes must not be empty")
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity must be None or an int ≥ 1, got {capacity!r}")
        capacity = int(capacity)
    vr = None
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not lo <= hi:
            raise ValueError(f"value_range must satisfy low ≤ high, got {value_range!r}")
        vr = (lo, hi)
    return fs, cls, capacity, vr


class LookaheadBuffer:
    """Validated, persistent, capacity-bounded store of the next task's examples.

    ``LookaheadBuffer(directory, feature_shape=..., classes=...)`` creates an empty buffer there, or
    attaches to the one already there if its configuration is the same (otherwise ``ValueError``;
    use :meth:`open` to load whatever is there). ``capacity`` keeps the newest rows. ``value_range``
    (optional) adds a feature-range check to every batch.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        feature_shape: tuple[int, ...],
        classes: Sequence[int],
        capacity: int | None = None,
        value_range: tuple[float, float] | None = None,
    ) -> None:
        fs, cls, cap, vr = _check_config(feature_shape, classes, capacity, value_range)
        self._lock = threading.Lock()
        self.directory = Path(directory)
        if (self.directory / MANIFEST).exists():
            other = LookaheadBuffer.open(self.directory)
            mine = {"feature_shape": fs, "classes": cls, "capacity": cap, "value_range": vr}
            theirs = {
                "feature_shape": other.feature_shape, "classes": other.classes,
                "capacity": other.capacity, "value_range": other.value_range,
            }
            if mine != theirs:
                raise ValueError(
                    f"{self.directory} already holds a lookahead buffer with {theirs}, not {mine}; "
                    "use LookaheadBuffer.open() to load it or choose another directory"
                )
            self._adopt(other._manifest, other._x, other._y)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        now = _now()
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "feature_shape": list(fs),
            "classes": cls,
            "capacity": cap,
            "value_range": list(vr) if vr else None,
            "created": now,
            "n_added_total": 0,
            "n_evicted_total": 0,
            "sources": [],
        }
        x = np.zeros((0, *fs), dtype=X_DTYPE)
        y = np.zeros((0,), dtype=Y_DTYPE)
        self._manifest, self._x, self._y = {}, x, y  # so _commit's cleanup has a state to compare with
        self._commit(x, y, manifest)

    # ------------------------------------------------------------------------------ properties
    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self._manifest["feature_shape"])

    @property
    def classes(self) -> list[int]:
        return list(self._manifest["classes"])

    @property
    def capacity(self) -> int | None:
        return self._manifest["capacity"]

    @property
    def value_range(self) -> tuple[float, float] | None:
        vr = self._manifest["value_range"]
        return tuple(vr) if vr is not None else None

    @property
    def manifest(self) -> dict:
        """A copy of the current manifest."""
        return json.loads(json.dumps(self._manifest))

    def __len__(self) -> int:
        return int(self._y.shape[0])

    def sha256(self) -> str:
        """sha256 of the data file (the manifest records it; :meth:`open` re-checks it)."""
        return self._manifest["sha256"]

    def data(self) -> tuple[Tensor, Tensor]:
        """``(x, y)`` as fresh tensors: float32 ``(n, *feature_shape)`` and int64 ``(n,)``, oldest first."""
        return torch.from_numpy(self._x.copy()), torch.from_numpy(self._y.copy())

    def __repr__(self) -> str:
        return (
            f"LookaheadBuffer({str(self.directory)!r}, n={len(self)}, feature_shape={self.feature_shape}, "
            f"classes={self.classes}, capacity={self.capacity})"
        )

    # ------------------------------------------------------------------------------ writes
    def add(self, x: Tensor | np.ndarray, y: Tensor | np.ndarray, *, source: str = "") -> ValidationReport:
        """Validate a batch and append it (all or nothing); returns the passing report.

        Raises :class:`BufferRejectedError` (with ``.report``) when the batch fails any check; the
        buffer, in memory and on disk, is then unchanged. With a capacity, the oldest rows go first.
        """
        if not isinstance(source, str):
            raise ValueError(f"source must be a string, got {type(source).__name__}")
        xa = _as_array(x)
        overflow = None
        if xa.floating and xa.values is not None:
            # validate exactly what will be stored (float32), so a reopened buffer passes the same checks
            with np.errstate(over="ignore", invalid="ignore"):
                x_store = xa.values.astype(X_DTYPE)
            if xa.values.ndim >= 1 and len(xa.values):
                rows = (np.isfinite(xa.values) & ~np.isfinite(x_store)).reshape(len(x_store), -1).any(axis=1)
                overflow = rows if rows.any() else None
            x_checked: Any = x_store
        else:
            x_checked = x  # not floating: let the dtype check report it
        report = validate_dataset(
            x_checked, y, role="lookahead", name=f"lookahead buffer {self.directory.name or self.directory}",
            n_features=self.feature_shape, classes=self.classes, min_rows=1, value_range=self.value_range,
        )
        if overflow is not None:  # e.g. float64 1e300 is finite but becomes inf in float32
            i = int(np.flatnonzero(overflow)[0])
            report.checks.append(
                DataCheck(
                    "float32", False,
                    f"features: {_rows(int(overflow.sum()))} overflow float32 storage (first at row {i})",
                    "python pre-check",
                )
            )
            report.success = False
        if not report.success:
            raise BufferRejectedError(report)
        xn = np.asarray(x_checked, dtype=X_DTYPE)
        yn = np.asarray(_as_array(y).values, dtype=Y_DTYPE)
        k = len(yn)
        with self._lock:
            m = self.manifest
            new_x = np.concatenate([self._x, xn]) if len(self._x) else np.ascontiguousarray(xn)
            new_y = np.concatenate([self._y, yn]) if len(self._y) else np.ascontiguousarray(yn)
            m["sources"].append(
                {"source": source, "added_at": _now(), "n_rows": k, "n_kept": k, "sha256": _sha256(_serialize(xn, yn))}
            )
            m["n_added_total"] += k
            evict = len(new_y) - self.capacity if self.capacity is not None else 0
            if evict > 0:
                new_x, new_y = new_x[evict:], new_y[evict:]
                m["n_evicted_total"] += evict
                left = evict
                for entry in m["sources"]:  # oldest first: account the evicted rows to their batches
                    take = min(left, entry["n_kept"])
                    entry["n_kept"] -= take
                    left -= take
                m["sources"] = [e for e in m["sources"] if e["n_kept"] > 0]
            self._commit(new_x, new_y, m)
        return report

    def clear(self) -> None:
        """Empty the buffer (atomically, like :meth:`add`); configuration and ``created`` are kept."""
        with self._lock:
            m = self.manifest
            m["sources"] = []
            m["cleared"] = _now()
            self._commit(np.zeros((0, *self.feature_shape), dtype=X_DTYPE), np.zeros((0,), dtype=Y_DTYPE), m)

    def _commit(self, x: np.ndarray, y: np.ndarray, manifest: dict) -> None:
        """Persist (x, y, manifest) crash-safely, then make it the in-memory state."""
        x = np.ascontiguousarray(x, dtype=X_DTYPE)
        y = np.ascontiguousarray(y, dtype=Y_DTYPE)
        blob = _serialize(x, y)
        digest = _sha256(blob)
        data_name = f"data-{digest[:32]}.safetensors"
        m = dict(manifest)
        m.update(
            data_file=data_name,
            sha256=digest,
            n=int(len(y)),
            shapes={"x": list(x.shape), "y": list(y.shape)},
            dtypes={"x": np.dtype(X_DTYPE).name, "y": np.dtype(Y_DTYPE).name},
            updated=_now(),
        )
        data_path = self.directory / data_name
        old_data = self._manifest.get("data_file")
        placed = False
        try:
            if data_name != old_data:
                _write_atomic(data_path, blob)
                placed = True
            _write_atomic(self.directory / MANIFEST, (json.dumps(m, indent=2) + "\n").encode())  # commit point
        except BaseException:
            if placed:  # not referenced by the (old) manifest: remove, best effort
                try:
                    os.unlink(data_path)
                except OSError:
                    pass
            raise
        self._adopt(m, x, y)
        self._cleanup()

    def _cleanup(self) -> None:
        """Remove data files the manifest does not name and temp files of interrupted writes."""
        keep = self._manifest["data_file"]
        for p in self.directory.iterdir():
            if p.name == keep:
                continue
            if _DATA_RE.match(p.name) or p.name.startswith(_TMP_PREFIX):
                try:
                    p.unlink()
                except OSError:
                    pass

    def _adopt(self, manifest: dict, x: np.ndarray, y: np.ndarray) -> None:
        x.flags.writeable = False
        y.flags.writeable = False
        self._manifest, self._x, self._y = manifest, x, y

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def open(cls, directory: str | Path) -> LookaheadBuffer:
        """Load a buffer from disk, verifying the data file against the manifest.

        ``FileNotFoundError`` if there is no buffer; :class:`BufferCorruptError` if the manifest is
        unreadable, names a bad file, or the data do not match its sha256, shapes, dtypes, classes.
        """
        directory = Path(directory)
        mpath = directory / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"no lookahead buffer at {directory} (missing {MANIFEST})")

        def corrupt(msg: str) -> BufferCorruptError:
            return BufferCorruptError(f"lookahead buffer at {directory}: {msg}")

        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise corrupt(f"{MANIFEST} is not readable JSON ({exc})") from exc
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise corrupt(f"{MANIFEST} is not a lidgate lookahead-buffer manifest")
        if m.get("version") != FORMAT_VERSION:
            raise corrupt(f"unsupported manifest version {m.get('version')!r} (this lidgate reads {FORMAT_VERSION})")
        required = ("data_file", "sha256", "n", "shapes", "dtypes", "feature_shape", "classes", "capacity", "value_range", "sources")
        missing = [k for k in required if k not in m]
        if missing:
            raise corrupt(f"{MANIFEST} lacks {missing}")
        data_name = m["data_file"]
        if not isinstance(data_name, str) or not _DATA_RE.match(data_name):
            raise corrupt(f"{MANIFEST} names an invalid data file {data_name!r}")
        try:
            fs, classes, capacity, vr = _check_config(m["feature_shape"], m["classes"], m["capacity"], m["value_range"])
        except (TypeError, ValueError) as exc:
            raise corrupt(f"{MANIFEST} has an invalid configuration ({exc})") from exc
        try:
            blob = (directory / data_name).read_bytes()
        except OSError as exc:
            raise corrupt(f"data file {data_name} is missing or unreadable ({exc})") from exc
        digest = _sha256(blob)
        if digest != m["sha256"]:
            raise corrupt(
                f"data file {data_name} has sha256 {digest} but the manifest records {m['sha256']}: "
                "it was modified outside lidgate (tampered with or damaged)"
            )
        from safetensors.numpy import load

        try:
            tensors = load(blob)
        except Exception as exc:  # noqa: BLE001 — any parse failure means a bad file
            raise corrupt(f"data file {data_name} is not valid safetensors ({exc})") from exc
        if set(tensors) != {"x", "y"}:
            raise corrupt(f"data file {data_name} holds tensors {sorted(tensors)}, expected ['x', 'y']")
        x, y = tensors["x"], tensors["y"]
        n = m["n"]
        if not isinstance(m["shapes"], dict) or not isinstance(n, int) or not isinstance(m["sources"], list):
            raise corrupt(f"{MANIFEST} has malformed 'shapes', 'n' or 'sources'")
        problems = []
        if x.dtype != X_DTYPE or y.dtype != Y_DTYPE:
            problems.append(f"dtypes x={x.dtype}, y={y.dtype} (expected float32, int64)")
        if list(x.shape) != m["shapes"].get("x") or list(y.shape) != m["shapes"].get("y") or len(y) != n:
            problems.append(f"shapes x={list(x.shape)}, y={list(y.shape)} differ from the manifest's {m['shapes']}, n={n}")
        if tuple(x.shape[1:]) != fs:
            problems.append(f"per-example shape {tuple(x.shape[1:])} is not feature_shape {fs}")
        if problems:
            raise corrupt("; ".join(problems))
        if n and not np.isin(y, classes).all():
            raise corrupt(f"labels outside the buffer's classes {classes}")
        if n and not np.isfinite(x).all():
            raise corrupt("features contain NaN/inf")
        if vr is not None and n and (x.min() < vr[0] or x.max() > vr[1]):
            raise corrupt(f"features outside value_range {list(vr)}")
        if capacity is not None and n > capacity:
            raise corrupt(f"holds {n} rows, more than its capacity {capacity}")
        kept = sum(int(e.get("n_kept", 0)) for e in m["sources"] if isinstance(e, dict))
        if kept != n:
            raise corrupt(f"source notes account for {kept} rows but the data hold {n}")
        self = cls.__new__(cls)
        self._lock = threading.Lock()
        self.directory = directory
        self._adopt(m, np.ascontiguousarray(x), np.ascontiguousarray(y))
        return self
