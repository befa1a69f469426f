"""Certification data read from storage a chunk at a time, for sets larger than memory.

* ``ParquetStream`` implements ``lid_engine.CertificationStream`` over a Parquet file's row groups,
  reading each chunk exactly as ``components.data`` reads a whole file, so the counts, the data
  fingerprint and the provenance record are the in-memory ones.
* ``loader_stream`` reads a team's ``torch.utils.data.DataLoader`` (or Dataset) once, batch by batch,
  checking each batch as ``components.data`` checks a loader's arrays, into a safetensors file that
  every later reading (the fingerprint, the counts, shards on process workers, the registry's copy)
  reads again: all of them see the same rows, whatever the loader would give on another pass.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from components.config import DataSection, LidgateConfig
from components.data import (
    DataError,
    _arrays_xy,
    _check_classes,
    _format,
    _labels,
    _reshape,
    _short,
    _table_xy,
    _tensor,
    feature_names,
)
from components.owner import owner_tag
from lid_engine.errors import InvalidInputError
from lid_engine.stream import CertificationStream, GuardedFile, SafetensorsStream

__all__ = ["ParquetStream", "certification_stream", "loader_stream"]


class ParquetStream(GuardedFile, CertificationStream):
    """A Parquet certification file read a bounded chunk at a time, never whole.

    Each chunk is read as ``load_file`` reads the whole file (the same columns, dtype, shape and
    checks), so counts, ``lid_engine.fingerprint_stream`` and ``provenance()`` equal the in-memory
    ones. At most ``memory_mb`` MiB of feature values are staged per chunk (as float64, three copies:
    Arrow, pandas, the array); a row group larger than the budget is refused, since Parquet is read a
    row group at a time. Labels can be read alone (one column). The file must not change while it is
    read, here or on a worker (``lid_engine.stream.GuardedFile``).
    """

    portable = True  # pickles as its path: a worker reopens the file (and checks its sha256)
    _file_error = DataError

    def __init__(self, path: str | Path, data_cfg: DataSection, memory_mb: int = 512) -> None:
        import pyarrow.parquet as pq

        path = Path(path)
        where = str(path)
        if _format(path) != "parquet":
            raise DataError(f"{where}: a streamed certification set is read from Parquet files (row groups); got a "
                            f"{_format(path)} file — convert it, or load it whole")
        if data_cfg.group is not None:
            raise DataError(f"{where}: data.group (worst-group constraints) is not read from a streamed "
                            "certification file; load it whole")
        try:
            self._file = pq.ParquetFile(path)
        except FileNotFoundError:
            raise DataError(f"{where}: no such file") from None
        except Exception as exc:  # noqa: BLE001 — pyarrow raises several types for a bad file
            raise DataError(f"{where}: not a readable Parquet file ({_short(exc)})") from None
        # the columns pd.read_parquet gives: a stored pandas index is not a column of the table
        index = [c for c in (self._file.schema_arrow.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)]
        columns = [str(c) for c in self._file.schema_arrow.names if c not in index]
        features = feature_names(columns, data_cfg, where)
        if data_cfg.shape is not None:  # refused now, as every chunk would be
            _reshape(np.empty((0, len(features))), data_cfg.shape, where)
        # float64 where pandas reads a feature column as numpy float64, as components.data decides per table
        dtypes = self._file.schema_arrow.empty_table().to_pandas().dtypes
        wide = any(dtypes[c] == np.float64 for c in features)
        self.path, self.data_cfg, self.features, self.memory_mb = path, data_cfg, features, memory_mb
        self.n, self.name = int(self._file.metadata.num_rows), where
        self.dtype = torch.float64 if wide else torch.float32
        self.feature_shape = tuple(data_cfg.shape) if data_cfg.shape is not None else (len(features),)
        if self.n == 0:
            raise DataError(f"{where}: the file has 0 rows; expected at least one example")
        budget = memory_mb * 2**20
        self.chunk_rows = max(1, budget // (3 * 8 * len(features)))
        meta = self._file.metadata
        self._starts = [0]
        for i in range(meta.num_row_groups):
            rg = meta.row_group(i)
            staged = 3 * 8 * len(features) * rg.num_rows
            if rg.num_rows > self.chunk_rows and staged > 4 * budget:
                raise DataError(f"{where}: row group {i} holds {rg.num_rows} rows (~{staged / 2**20:.0f} MiB staged), "
                                f"far more than memory_mb = {memory_mb}; rewrite the file with smaller "
                                f"row groups (pyarrow.parquet.write_table(..., row_group_size={self.chunk_rows}))")
            self._starts.append(self._starts[-1] + rg.num_rows)
        self._guard(self._file_sha256())  # what every reader elsewhere must find at this path (the provenance's)
        self._check_header()

    def __getstate__(self) -> dict[str, Any]:  # shards on other processes reopen the file by path
        return {k: v for k, v in super().__getstate__().items() if k != "_file"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        import pyarrow.parquet as pq

        self.__dict__.update(state)  # (unverified: the content is checked before the first read)
        self._file = pq.ParquetFile(self.path)

    def _batches(self, start: int, stop: int, columns: list[str]):
        """(first row, Arrow record batch) of rows ``[start, stop)``, row group by row group."""
        self._check_file()
        for i in range(len(self._starts) - 1):
            lo, hi = self._starts[i], self._starts[i + 1]
            if hi <= start or lo >= stop:
                continue
            row = lo
            for batch in self._file.iter_batches(batch_size=self.chunk_rows, row_groups=[i], columns=columns):
                a, b = max(row, start), min(row + batch.num_rows, stop)
                if b > a:
                    yield a, batch.slice(a - row, b - a)
                row += batch.num_rows
        self._check_file()

    def _read(self, start: int, stop: int) -> Iterator[tuple[Tensor, Tensor]]:
        d = self.data_cfg
        for a, batch in self._batches(start, stop, [*self.features, d.label]):
            with _rows_from(a):
                where = f"{self.name}, rows {a}..{a + batch.num_rows - 1}"
                x, y, _ = _table_xy(batch.to_pandas(), d, where, keep_float64=True)
                if d.classes is not None:
                    _check_classes(y, d.classes, where)
                if d.shape is not None:
                    x = _reshape(x, d.shape, where)
            yield _tensor(x), torch.from_numpy(y)

    def labels(self, start: int = 0, stop: int | None = None) -> Iterator[Tensor]:
        start, stop = self._range(start, stop)
        label = self.data_cfg.label
        for a, batch in self._batches(start, stop, [label]):
            with _rows_from(a):
                where = f"{self.name}, rows {a}..{a + batch.num_rows - 1}"
                y = _labels(batch.to_pandas()[label], where, f"label column {label!r}")
                if self.data_cfg.classes is not None:
                    _check_classes(y, self.data_cfg.classes, where)
            yield torch.from_numpy(y)

    def provenance(self) -> dict[str, Any]:
        """The file's record as ``load_splits`` gives it (path, format, sha256 of the bytes as opened, columns)."""
        return {"path": str(self.path.resolve()), "format": "parquet", "sha256": self.sha256,
                "columns": {"features": list(self.features), "label": self.data_cfg.label}}


def certification_stream(config: LidgateConfig, memory_mb: int = 512) -> ParquetStream:
    """The configuration's certification file (files form, Parquet) as a ``ParquetStream`` read with the
    configuration's columns, shape and classes."""
    d = config.data
    if d.form != "files":
        raise DataError(f"a streamed certification set is the certification file of the files form "
                        f"(data.certification); this configuration uses the {d.form} form")
    return ParquetStream(d.certification, d, memory_mb)


def loader_stream(loader: Any, data_cfg: DataSection, where: str, memory_mb: int | None = None,
                  directory: str | Path | None = None) -> SafetensorsStream:
    """Read a team's certification ``DataLoader`` (or ``Dataset``) once into a safetensors file, a batch at
    a time, and open it as a stream.

    Each batch must be an ``(x, y)`` pair and is checked as ``components.data`` checks a loader's arrays
    (numbers, finite, integer labels ≥ 0, ``data.classes``, ``data.shape`` applied); every batch must
    have the dtype and example shape of the first. With ``memory_mb``, a batch whose features take
    more than that many MiB is refused (the loader's ``batch_size`` sets how much is held at once). A
    Dataset is read in batches of 256 items. A loader that shuffles is refused: the certify flow reads
    the data again and must find the same fingerprint.

    The file lives in a temporary folder (below ``directory``, created if need be; default: the
    system's, ``TMPDIR``) removed when the stream is garbage-collected; the folder's ``owner.json``
    names this process, so a recovery can remove what a process that died left behind.

    Raises:
        DataError: the loader shuffles, raises while reading, or gives a batch that fails a check (named
            by its first row).
    """
    import torch.utils.data as tud

    if isinstance(loader, tud.Dataset):
        loader = tud.DataLoader(loader, batch_size=256, shuffle=False)
    if not isinstance(loader, tud.DataLoader):
        raise DataError(f"{where}: is {type(loader).__name__}; expected a torch.utils.data.DataLoader or Dataset")
    sampler = getattr(loader.batch_sampler, "sampler", None) if loader.batch_sampler is not None else loader.sampler
    if not isinstance(sampler, (tud.SequentialSampler, tud.dataloader._InfiniteConstantSampler)):
        how = f"a {type(sampler).__name__}" if sampler is not None else \
            f"a batch_sampler of type {type(loader.batch_sampler).__name__}"
        raise DataError(f"{where}: the DataLoader reads through {how}; a certification set must come in the same "
                        "order on every reading (shuffle=False, no sampler or batch_sampler)")
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="lidgate-certification-", dir=directory)
    try:
        (Path(folder) / "owner.json").write_text(owner_tag())
        stream = SafetensorsStream.write_chunks(_checked_batches(loader, data_cfg, where, memory_mb),
                                                Path(folder) / "certification.safetensors", name=where)
    except InvalidInputError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise DataError(str(exc)) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    stream.name = where
    if memory_mb is not None:  # later readings hold about memory_mb of it at a time
        row = max(1, math.prod(stream.feature_shape) * stream.dtype.itemsize)
        stream.chunk_rows = max(1, memory_mb * 2**20 // row)
    weakref.finalize(stream, shutil.rmtree, folder, True)
    return stream


@contextmanager
def _rows_from(first: int) -> Iterator[None]:
    """Errors about a chunk whose first row is ``first``: their "row N" (counted within the chunk, as the
    whole-file checks count) becomes the row of the file or loader."""
    try:
        yield
    except DataError as exc:
        raise DataError(re.sub(r"\brow (\d+)", lambda m: f"row {int(m.group(1)) + first}", str(exc))) from None


def _checked_batches(loader: Any, d: DataSection, where: str, memory_mb: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    row = 0
    batches = enumerate(iter(loader))
    while True:
        try:
            index, batch = next(batches)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001 — the team's Dataset or collate function failed
            raise DataError(f"{where}: reading the batch at row {row} raised {type(exc).__name__}: {_short(exc)}") from exc
        here = f"{where}, batch {index} (rows from {row} on)"
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise DataError(f"{here}: is {type(batch).__name__}; expected an (x, y) pair of batched tensors")
        with _rows_from(row):
            x, y = _arrays_xy(batch[0], batch[1], here, "x of the batch", "y of the batch")
            if memory_mb is not None and x.nbytes > memory_mb * 2**20:
                raise DataError(f"{here}: the batch's features take {x.nbytes / 2**20:.1f} MiB, more than "
                                f"certification.memory_mb = {memory_mb}; give the DataLoader a smaller batch_size")
            if d.classes is not None:
                _check_classes(y, d.classes, here)
            if d.shape is not None:
                x = _reshape(x, d.shape, here)
        row += len(y)
        yield _tensor(x), torch.from_numpy(y)
