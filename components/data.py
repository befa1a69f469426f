"""Data sources named by a configuration, read into the three splits lidgate works with.

A task's data has three disjoint parts with distinct jobs: ``train`` (the update), ``search``
(shapes the LID) and ``certification`` (held out: the population claim rests on data the search
never saw). A configuration names them in one of three forms (``data`` section):

(a) one file per split; (b) one file plus a seeded random split; (c) a team's loader function.

Files are Parquet, CSV (feature columns + a label column) or ``.npz`` (arrays ``x`` and ``y``).
Nothing is unpickled (``np.load(allow_pickle=False)``) and nothing is downloaded. Every problem
with the data is a ``DataError`` naming the file (or loader), the column/array/split and what was
expected, instead of a traceback from inside pandas or numpy.

Each ``DataSplits`` records its provenance (file paths and sha256 of their bytes, the split's seed
and fractions and a fingerprint of the row assignment, or the loader reference and arguments), so a
certificate can say exactly which data it was computed on.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from components.config import DATA_SUFFIXES, DataSection, LidgateConfig, SplitSection

if TYPE_CHECKING:
    from lid_engine.stream import CertificationStream

__all__ = [
    "SPLIT_NAMES",
    "DataError",
    "DataSplits",
    "check_same_extractor",
    "describe_features",
    "features_mismatch",
    "features_record",
    "check_same_features",
    "feature_columns",
    "file_provenance",
    "load_file",
    "load_splits",
    "load_update",
    "seeded_split",
    "split_indices",
]

SPLIT_NAMES = ("train", "search", "certification")
# What a loader may return as one mapping (instead of (x, y) or per-split data): the arrays, each row's
# group (for spec.worst_group), and a JSON record of how the features were computed (a frozen encoder's
# digest, say), which enters the data's fingerprint.
LOADER_KEYS = ("x", "y", "group", "features")
Pair = tuple[Tensor, Tensor]


class DataError(ValueError):
    """Data that cannot be used: the message names the file or loader, the column/array/split and
    what was expected."""


# -------------------------------------------------------------------------------- DataSplits
@dataclass
class DataSplits:
    """A task's train / search / certification data, with where it came from.

    Attributes:
        task: the task name certificates use (``data.task``).
        train, search, certification: ``(x, y)``; ``x`` float32 (float64 when the source holds
            float64) with shape ``(n, *feature_shape)``, ``y`` int64 class ids of shape ``(n,)``.
            ``certification`` is a ``lid_engine.CertificationStream`` instead when the configuration
            streams it (``certification.memory_mb``): read a chunk at a time, never whole (``streamed``).
        provenance: JSON-able record of the source (see the module docstring).
        feature_shape: the shape of one example.
        classes: the class ids (configured, or the sorted labels present in any split).
        groups: per split, each row's group name (str array), when the data has a group column
            (``data.group``, or a loader's ``group``); None otherwise.
    """

    task: str
    train: Pair
    search: Pair
    certification: Pair | CertificationStream
    provenance: dict[str, Any]
    feature_shape: tuple[int, ...]
    classes: tuple[int, ...]
    groups: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        for name, part in self.items():
            if name == "certification" and _is_stream(part):
                if tuple(part.feature_shape) != tuple(self.feature_shape):
                    raise DataError(f"DataSplits: the streamed certification split ({part.name}) has examples of shape "
                                    f"{tuple(part.feature_shape)}, expected feature_shape {tuple(self.feature_shape)}")
                if self.groups is not None:
                    raise DataError("DataSplits: a streamed certification split has no groups (data.group needs the "
                                    "set in memory)")
                continue
            x, y = part
            if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
                raise DataError(f"DataSplits: split '{name}' must be a pair of tensors")
            if y.dtype != torch.int64 or y.dim() != 1 or len(x) != len(y) or len(y) == 0:
                raise DataError(f"DataSplits: split '{name}' must hold n ≥ 1 rows with int64 labels of shape (n,), "
                                f"got x {tuple(x.shape)} and y {tuple(y.shape)} {y.dtype}")
            if tuple(x.shape[1:]) != tuple(self.feature_shape):
                raise DataError(f"DataSplits: split '{name}' has examples of shape {tuple(x.shape[1:])}, "
                                f"expected feature_shape {tuple(self.feature_shape)}")
            if self.groups is not None and (name not in self.groups or len(self.groups[name]) != len(y)):
                raise DataError(f"DataSplits: split '{name}' needs one group per row")

    def items(self) -> list[tuple[str, Pair]]:
        """``[("train", (x, y)), ("search", …), ("certification", …)]``."""
        return [(name, getattr(self, name)) for name in SPLIT_NAMES]

    @property
    def streamed(self) -> bool:
        """Whether the certification split is a stream (read a chunk at a time) rather than tensors."""
        return _is_stream(self.certification)

    def head(self, name: str, k: int) -> Pair:
        """The first ``k`` rows of split ``name`` as tensors (a stream reads only those)."""
        part = getattr(self, name)
        return part.head(k) if _is_stream(part) else (part[0][:k], part[1][:k])

    def labels(self, name: str) -> Tensor:
        """Every label of split ``name`` (a stream's are read without its features: 8 bytes a row)."""
        part = getattr(self, name)
        return torch.cat(list(part.labels())) if _is_stream(part) else part[1]

    def fingerprints(self) -> dict[str, str]:
        """sha256 of each split as ``lid_engine.fingerprint_data`` computes it (what a certificate records;
        a streamed split is read once, a chunk at a time, to the same digest)."""
        from lid_engine import data_fingerprint  # lazy: lid_engine pulls in the search's dependencies

        return {name: data_fingerprint(part) for name, part in self.items()}

    def to_dtype(self, dtype: torch.dtype) -> DataSplits:
        """The same data with the examples cast to ``dtype`` (a model's floating dtype); recorded in the
        provenance. A file read as float64 and a float32 model agree this way, for every training function
        (a streamed split is cast a chunk at a time as it is read)."""
        if all((part.dtype if _is_stream(part) else part[0].dtype) == dtype for _, part in self.items()):
            return self
        cast = {name: part.astype(dtype) if _is_stream(part) else (part[0].to(dtype), part[1])
                for name, part in self.items()}
        return DataSplits(task=self.task, train=cast["train"], search=cast["search"],
                          certification=cast["certification"], provenance={**self.provenance, "dtype": str(dtype)},
                          feature_shape=self.feature_shape, classes=self.classes, groups=self.groups)

    def feature_columns(self) -> list[str] | None:
        """The feature columns read from tabular files, in order (None for arrays and loaders)."""
        return feature_columns(self.provenance)

    def fingerprint(self) -> str:
        """sha256 over the task name, every split's tensors (dtype, shape and bytes) and, when present,
        the groups and what the loader said the features were computed with (``provenance["features"]``,
        such as a frozen encoder's digest)."""
        body: dict[str, Any] = {"task": self.task, "splits": self.fingerprints()}
        if self.groups is not None:
            body["groups"] = {name: _groups_sha256(g) for name, g in self.groups.items()}
        if self.provenance.get("features") is not None:
            body["features"] = self.provenance["features"]
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")).hexdigest()


# ------------------------------------------------------------------------------ public API
def feature_columns(provenance: Mapping[str, Any] | None) -> list[str] | None:
    """The feature columns a ``DataSplits.provenance`` records for its tabular files, in order (None when
    the data came from arrays or a loader)."""
    if not isinstance(provenance, Mapping):
        return None
    files = provenance.get("files")
    records = list(files.values()) if isinstance(files, Mapping) else list(files or [])
    if provenance.get("form") == "source":
        records = [provenance.get("source", {})]
    columns = [(r.get("columns") or {}).get("features") for r in records if isinstance(r, Mapping)]
    return list(columns[0]) if columns and columns[0] is not None else None


def features_record(search_config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """How the certification data of a LID were computed, from its ``search_config``: the ``features``
    record ``lidgate certify`` stores, or the one in the pipeline's data provenance; None without one."""
    config = search_config if isinstance(search_config, Mapping) else {}
    pipeline = config.get("pipeline") if isinstance(config.get("pipeline"), Mapping) else {}
    data = pipeline.get("data") if isinstance(pipeline.get("data"), Mapping) else {}
    found = config.get("features", data.get("features"))
    return found if isinstance(found, dict) else None


def describe_features(record: Mapping[str, Any] | None) -> str:
    """A ``features`` record in words: its encoder, digest and recipe (or the whole record)."""
    if record is None:
        return "an unrecorded feature extractor (no 'features' record)"
    return (" ".join(str(record[k]) for k in ("encoder", "encoder_sha256", "recipe") if k in record)
            or json.dumps(record, sort_keys=True))


def features_mismatch(expected: Mapping[str, Any], got: Mapping[str, Any] | None) -> str | None:
    """None when ``got`` is the ``expected`` features record, else which of their keys differ (in words)."""
    if got == expected:
        return None
    return _listing(sorted(k for k in set(got or {}) | set(expected) if (got or {}).get(k) != expected.get(k)))


def check_same_extractor(expected: Mapping[str, Any] | None, data: DataSplits, what: str) -> None:
    """Refuse new data whose features were computed otherwise than the champion's (its ``features``
    record: a frozen encoder's name and sha256, say). A head certified on one encoder's embeddings
    promises nothing about another's, so mixing them in one lineage is an error, not a warning.

    Raises:
        DataError: naming both records.
    """
    got = data.provenance.get("features")
    differ = None if expected is None else features_mismatch(expected, got)
    if differ is not None:
        raise DataError(f"{what}: features computed by {describe_features(got)}, but the champion was certified on "
                        f"features computed by {describe_features(expected)} (the records differ in {differ}); "
                        "expected data from the same feature extractor (re-embed it with the champion's encoder)")


def check_same_features(expected: Sequence[str] | None, data: DataSplits, what: str) -> None:
    """Refuse new data whose feature columns differ from ``expected`` (names or order).

    Without ``data.features`` in the configuration the features are "every column but the label", in
    the file's order: a renamed, added or reordered column would silently feed the model other inputs.

    Raises:
        DataError: naming the missing, unexpected or reordered columns.
    """
    got = data.feature_columns()
    if expected is None or got is None or list(expected) == list(got):
        return
    missing = [c for c in expected if c not in got]
    extra = [c for c in got if c not in expected]
    if missing or extra:
        detail = f"missing {_listing(missing)}, unexpected {_listing(extra)}"
    else:
        detail = "the same columns in another order"
    raise DataError(f"{what}: feature columns differ from those {_listing(list(expected))} the champion was trained "
                    f"on ({detail}); expected the same columns (or list them in data.features, which are then "
                    "selected by name)")


def load_splits(config: LidgateConfig, scratch: str | Path | None = None) -> DataSplits:
    """Load the task a configuration's ``data`` section names.

    With ``certification.memory_mb`` the certification split is a stream (``DataSplits.streamed``): the
    Parquet ``data.certification`` file read by row groups, or the DataLoader a loader returns for it
    written batch by batch to a temporary safetensors file (``components.streaming``) in a folder below
    ``scratch`` (the pipeline passes one under the lidgate home; default: the system's temporary folder).

    Args:
        config: a validated configuration (paths already resolved; ``code`` directories are where
            a loader function is imported from).

    Returns:
        The three splits, checked: numeric finite features, integer labels ≥ 0 (within
        ``data.classes`` when given), ``data.shape`` applied, no split empty.

    Raises:
        DataError: a file is missing or malformed, a loader returned something unusable, the data
            fail a check, or two split files have the same content.
        components.factory.FactoryError: ``data.loader.function`` cannot be imported.
    """
    d = config.data
    groups: dict[str, np.ndarray] | None = None
    if d.form == "files":
        splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        records: dict[str, dict[str, Any]] = {}
        read = {}
        for name in SPLIT_NAMES:
            path = getattr(d, name)
            if name == "certification" and config.certification.memory_mb is not None:
                from components.streaming import ParquetStream  # (it imports this module)

                stream = ParquetStream(path, d, config.certification.memory_mb)
                splits[name], records[name], read[name] = stream, stream.provenance(), None
                continue
            x, y, records[name], read[name] = _read_file(path, d, need_group=True)
            splits[name] = (x, y)
        _refuse_shared_files(records)
        provenance: dict[str, Any] = {"form": "files", "files": records}
        groups = _all_or_none(read, "data (train/search/certification files)")
    elif d.form == "source":
        assert d.source is not None and d.split is not None  # DataSection guarantees the form's keys
        x, y, record, group = _read_file(d.source, d, need_group=True)
        splits, split_record, groups = _split_arrays(x, y, d.split, where=str(d.source), group=group)
        provenance = {"form": "source", "source": record, "split": split_record}
    else:
        assert d.loader is not None
        splits, provenance, groups = _from_loader(config, scratch)
    provenance["shape"] = list(d.shape) if d.shape else None
    return _assemble(d, splits, provenance, groups)


def load_update(config: LidgateConfig, paths: Sequence[str | Path], task: str | None = None) -> DataSplits:
    """New data for a retrain: one or more files in the configuration's format, joined and cut into
    train / search / certification by the seeded split.

    The split is ``data.split`` when the configuration has one, else the default (0.6 / 0.2 / 0.2,
    seed 0); its fractions, seed and row assignment are recorded in the provenance, and so are every
    file's path and sha256. The task is named ``task``, else after the first file (its stem).

    Args:
        config: the validated configuration (``data.features``, ``label``, ``shape``, ``classes`` apply).
        paths: Parquet, CSV or ``.npz`` files with the configured columns (arrays ``x``, ``y``).
        task: the new task's name (letters, digits, ``_ . -``); default: the first file's stem.

    Returns:
        The new data's three splits.

    Raises:
        DataError: no file, a file that cannot be read or fails a check, the same file twice, files
            whose examples differ in shape, or a task name that cannot be used.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("--data: expected at least one data file (Parquet, CSV or .npz)")
    d = config.data
    name = task if task is not None else re.sub(r"[^A-Za-z0-9_.-]", "-", paths[0].stem).strip(".-") or "update"
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", name):
        raise DataError(f"task name {name!r}: expected 1-100 characters from A-Z a-z 0-9 _ . - (not starting with . or -)")
    xs, ys, gs, records, seen = [], [], [], [], {}
    for path in paths:
        x, y, record, group = _read_file(path, d)
        if record["sha256"] in seen:
            raise DataError(f"{path}: the same content as {seen[record['sha256']]}; expected each file once")
        seen[record["sha256"]] = path
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise DataError(f"{path}: examples of shape {list(x.shape[1:])}, {paths[0]} has {list(xs[0].shape[1:])}; "
                            "expected one shape")
        columns = (record.get("columns") or {}).get("features")
        first = (records[0].get("columns") or {}).get("features") if records else None
        if records and columns != first:
            raise DataError(f"{path}: feature columns {_listing(list(columns or []))} differ from {paths[0]}'s "
                            f"{_listing(list(first or []))}; expected the same columns in every file")
        xs.append(x), ys.append(y), gs.append(group), records.append(record)
    x = np.concatenate(xs) if len(xs) > 1 else xs[0]
    y = np.concatenate(ys) if len(ys) > 1 else ys[0]
    group = _all_or_none(dict(zip(map(str, paths), gs)), "--data")
    if group is not None:
        group = np.concatenate([group[str(p)] for p in paths])
    split = d.split if d.split is not None else SplitSection()
    splits, split_record, groups = _split_arrays(x, y, split, where=", ".join(str(p) for p in paths), group=group)
    provenance = {"form": "update", "files": records, "split": split_record,
                  "shape": list(d.shape) if d.shape else None}
    described = {json.dumps(r.get("features"), sort_keys=True) for r in records}
    if len(described) > 1:
        raise DataError(f"--data: the files say their features were computed differently ('features' of "
                        f"{_listing([str(p) for p in paths])} differ); expected features of one kind")
    if records[0].get("features") is not None:
        provenance["features"] = records[0]["features"]
    out = _assemble(d, splits, provenance, groups)
    out.task = name
    return out


def load_file(path: str | Path, data_cfg: DataSection) -> Pair:
    """Read one Parquet, CSV or ``.npz`` file into ``(x, y)`` with the ``data`` section's columns and shape.

    Args:
        path: the file (relative paths: against the current directory).
        data_cfg: ``config.data``; its ``features``, ``label``, ``shape`` and ``classes`` apply.

    Returns:
        ``(x, y)`` tensors: ``x`` float32 (float64 when the file holds float64 features),
        ``y`` int64.

    Raises:
        DataError: missing file, unknown format, unreadable bytes, missing or non-numeric columns,
            NaN/inf, bad labels, a shape that does not fit a row, or no rows.
    """
    x, y, _, _ = _read_file(Path(path), data_cfg)
    return _tensor(x), torch.from_numpy(y)


def file_provenance(path: str | Path) -> dict[str, Any]:
    """``{"path": resolved path, "format": …, "sha256": of the file's bytes}`` for one data file.

    Raises:
        DataError: the file is missing, unreadable or of an unknown format.
    """
    path = Path(path)
    return _record(path, _format(path), _read_bytes(path))


def split_indices(n: int, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """The rows each split receives in a seeded random split of ``n`` rows.

    A simple random sample without replacement: one ``numpy.random.default_rng(seed)``
    permutation of the rows, cut into consecutive pieces. Not stratified by class, on purpose: the
    finite-sample bound of a certificate assumes the certification set is a random sample of the
    population, which a stratified draw is not. Piece sizes are ``fraction × n`` rounded by the
    largest-remainder rule (ties go to the earlier split), so they always sum to ``n``; each
    piece's indices are returned sorted, so splits keep the source's row order.

    Args:
        n: number of rows.
        fractions: ``{"train": …, "search": …, "certification": …}``, each > 0, summing to 1 (±1e-9).
        seed: the permutation's seed (≥ 0).

    Returns:
        ``{"train": idx, "search": idx, "certification": idx}``: disjoint int64 arrays covering 0..n-1.

    Raises:
        ValueError: malformed ``fractions`` or ``seed``.
        DataError: a split would receive 0 rows.
    """
    if set(fractions) != set(SPLIT_NAMES):
        raise ValueError(f"split_indices: fractions must have exactly the keys {SPLIT_NAMES}, got {sorted(fractions)}")
    values = [float(fractions[name]) for name in SPLIT_NAMES]
    if not all(math.isfinite(v) and v > 0 for v in values) or abs(sum(values) - 1.0) > 1e-9:
        raise ValueError(f"split_indices: fractions must be > 0 and sum to 1, got {dict(fractions)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"split_indices: seed must be an integer ≥ 0, got {seed!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"split_indices: n must be an integer ≥ 0, got {n!r}")
    total = sum(values)
    ideal = [v / total * n for v in values]
    counts = [math.floor(v) for v in ideal]
    by_remainder = sorted(range(3), key=lambda i: (-(ideal[i] - counts[i]), i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    for name, count, frac in zip(SPLIT_NAMES, counts, values):
        if count == 0:
            raise DataError(f"split '{name}' would receive 0 of {n} rows (fraction {frac:g}); "
                            "expected more rows or a larger fraction")
    perm = np.random.default_rng(seed).permutation(n)
    bounds = np.cumsum([0] + counts)
    return {name: np.sort(perm[bounds[i]: bounds[i + 1]]).astype(np.int64) for i, name in enumerate(SPLIT_NAMES)}


def seeded_split(x: Tensor | np.ndarray, y: Tensor | np.ndarray, fractions: Mapping[str, float],
                 seed: int) -> dict[str, tuple[Any, Any]]:
    """Split ``(x, y)`` into train / search / certification by ``split_indices`` (see there for how).

    Args:
        x: examples, one per row (tensor or array).
        y: labels, ``len(y) == len(x)``.
        fractions: ``{"train": …, "search": …, "certification": …}``, each > 0, summing to 1.
        seed: the permutation's seed.

    Returns:
        ``{"train": (x, y), "search": (x, y), "certification": (x, y)}``, same types as the input.

    Raises:
        ValueError: malformed arguments or ``len(x) != len(y)``.
        DataError: a split would receive 0 rows.
    """
    if len(x) != len(y):
        raise ValueError(f"seeded_split: x has {len(x)} rows but y has {len(y)}")
    idx = split_indices(len(x), fractions, seed)
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        return {k: (x[torch.from_numpy(i)], y[torch.from_numpy(i)]) for k, i in idx.items()}
    return {k: (x[i], y[i]) for k, i in idx.items()}


# ------------------------------------------------------------------------------ files
def _format(path: Path) -> str:
    fmt = DATA_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown data format {path.suffix or '(no extension)'!r}; expected a file ending "
                        f"in {', '.join(DATA_SUFFIXES)}")
    return fmt


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a data file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def _record(path: Path, fmt: str, raw: bytes) -> dict[str, Any]:
    return {"path": str(path.resolve()), "format": fmt, "sha256": hashlib.sha256(raw).hexdigest()}


def _read_file(path: Path, d: DataSection, need_group: bool = False
               ) -> tuple[np.ndarray, np.ndarray, dict[str, Any], np.ndarray | None]:
    """(x, y, provenance record, groups or None) of one file; the bytes hashed are the bytes parsed.

    Groups (``data.group``) are read where the file has them: new data without the column or array
    has none (the pipeline then applies no group constraint to its task, and says so); the
    configuration's own data (``need_group``) must have it."""
    fmt = _format(path)
    raw = _read_bytes(path)
    where = str(path)
    if fmt == "npz":
        for key in ("features", "label"):
            if key in d.model_fields_set:
                raise DataError(f"{where}: data.{key} applies to tabular files (Parquet, CSV); an .npz archive "
                                "holds arrays 'x' and 'y'")
        x, y = read_npz(raw, where)
        group = read_npz_group(raw, d.group, where) if d.group is not None else None
        if need_group and d.group is not None and group is None:
            with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
                found = list(archive.files)
            raise DataError(f"{where}: no array {d.group!r} (data.group); expected each row's group there "
                            f"({_listing(found)} found)")
        features = read_npz_features(raw, where)
        columns = None
    else:
        table = _read_table(raw, fmt, where)
        group = None
        present = [str(c) for c in table.columns]
        if need_group and d.group is not None and d.group not in present:
            raise DataError(f"{where}: no column {d.group!r} (data.group); expected each row's group there "
                            f"(columns: {_listing(present)})")
        if d.group is not None and d.group in present:
            group = _group_values(table[d.group].to_numpy(), where, f"group column {d.group!r}")
            table = table.drop(columns=[c for c in table.columns if str(c) == d.group])
        x, y, names = _table_xy(table, d, where, keep_float64=fmt == "parquet")
        columns = {"features": names, "label": d.label}
        features = None
    _check_rows(x, where, "the file")
    if d.classes is not None:
        _check_classes(y, d.classes, where)
    if d.shape is not None:
        x = _reshape(x, d.shape, where)
    record = _record(path, fmt, raw)
    if columns is not None:
        record["columns"] = columns  # the feature columns actually read, in order
    if group is not None:
        if len(group) != len(y):
            raise DataError(f"{where}: the group {d.group!r} has {len(group)} rows, the labels {len(y)}; expected one "
                            "group per row")
        record["group"] = d.group
    if features is not None:
        record["features"] = features
    return x, y, record, group


def _read_table(raw: bytes, fmt: str, where: str) -> pd.DataFrame:
    if fmt == "parquet":
        try:
            return pd.read_parquet(io.BytesIO(raw))
        except Exception as exc:  # noqa: BLE001 — pyarrow raises several types for a bad file
            raise DataError(f"{where}: not a readable Parquet file ({_short(exc)})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not a CSV file: not UTF-8 text (byte {exc.start})") from None
    if "\x00" in text:
        raise DataError(f"{where}: not a CSV file: it contains NUL bytes")
    try:
        return pd.read_csv(io.StringIO(text))
    except pd.errors.EmptyDataError:
        raise DataError(f"{where}: empty CSV file; expected a header row naming the columns") from None
    except Exception as exc:  # noqa: BLE001 — ParserError and friends
        raise DataError(f"{where}: not a valid CSV file ({_short(exc)})") from None


def _table_xy(df: pd.DataFrame, d: DataSection, where: str, *,
              keep_float64: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    columns = [str(c) for c in df.columns]
    features = feature_names(columns, d, where)
    df = df.set_axis(columns, axis=1)
    _check_rows(df, where, "the file")
    for c in features:
        _check_numeric_column(df[c], c, where)
    # CSV text has no precision of its own (pandas parses it as float64), so it reads as float32;
    # a binary float64 column is kept as float64 rather than silently rounded.
    wide = keep_float64 and any(df[c].dtype == np.float64 for c in features)
    x = np.empty((len(df), len(features)), dtype=np.float64)
    for j, c in enumerate(features):
        x[:, j] = df[c].to_numpy(dtype=np.float64, na_value=np.nan)
    x = _finite_features(x, where, [f"feature column {c!r}" for c in features],
                         np.float64 if wide else np.float32, table=True)
    y = _labels(df[d.label], where, f"label column {d.label!r}")
    return x, y, features


def feature_names(columns: list[str], d: DataSection, where: str) -> list[str]:
    """The feature columns of a table with ``columns`` (``data.features``, else every column but the
    label), checked: no column twice, the label and every named feature present, at least one feature."""
    if len(set(columns)) != len(columns):
        dup = next(c for c in columns if columns.count(c) > 1)
        raise DataError(f"{where}: column {dup!r} appears more than once")
    available = _listing(columns)
    if d.label not in columns:
        raise DataError(f"{where}: no label column {d.label!r} (set data.label); available columns: {available}")
    features = list(d.features) if d.features is not None else [c for c in columns if c != d.label]
    missing = [c for c in features if c not in columns]
    if missing:
        raise DataError(f"{where}: feature column(s) {_listing(missing)} not found (data.features); "
                        f"available columns: {available}")
    if not features:
        raise DataError(f"{where}: no feature columns besides the label {d.label!r}")
    return features


def _check_numeric_column(s: pd.Series, name: str, where: str) -> None:
    if pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_complex_dtype(s.dtype):
        return
    row = _first_non_number(s)
    if row is not None:
        raise DataError(f"{where}: feature column {name!r} is not numeric: row {row} holds "
                        f"{_brief(s.iloc[row])}; expected numbers")
    raise DataError(f"{where}: feature column {name!r} is not numeric (dtype {s.dtype}); expected numbers")


def _first_non_number(s: pd.Series) -> int | None:
    """Row of the first value in a text/object column that does not parse as a number (None: none)."""
    if not (s.dtype == object or pd.api.types.is_string_dtype(s.dtype)):
        return None
    bad = np.flatnonzero((pd.to_numeric(s, errors="coerce").isna() & s.notna()).to_numpy())
    return int(bad[0]) if len(bad) else None


def _npz_member(raw: bytes, name: str, where: str, expected: str) -> np.ndarray | None:
    """The optional array ``name`` of an .npz archive, or None when it has none; never through pickle."""
    with np.load(io.BytesIO(raw), allow_pickle=False) as archive:
        if name not in archive.files:
            return None
        try:
            return archive[name]
        except ValueError:
            raise DataError(f"{where}: array {name!r} holds Python objects; expected {expected}") from None


def read_npz_features(raw: bytes, where: str) -> dict[str, Any] | None:
    """The optional ``features`` member of an .npz archive: a 0-d string array holding a JSON object that
    says how the features were computed (a frozen encoder's digest, say); it enters the data's fingerprint."""
    value = _npz_member(raw, "features", where, "a 0-d string array with a JSON object")
    if value is None:
        return None
    if value.dtype.kind != "U" or value.ndim != 0:
        raise DataError(f"{where}: array 'features' has dtype {value.dtype} and shape {list(value.shape)}; expected a "
                        "0-d string array holding a JSON object (how the features were computed)")
    try:
        record = json.loads(str(value))
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: array 'features' is not JSON ({exc.msg} at position {exc.pos})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: array 'features' holds {type(record).__name__}; expected a JSON object")
    return record


def read_npz_group(raw: bytes, name: str, where: str) -> np.ndarray | None:
    """The group array ``name`` of an .npz archive (strings or integers), or None when it has none."""
    values = _npz_member(raw, name, where, "group names, strings or integers (numpy 'U' or integer dtype; "
                                           "data.group)")
    return None if values is None else _group_values(values, where, f"array {name!r} (data.group)")


def _group_values(values: Any, where: str, what: str) -> np.ndarray:
    """Group names as a str array: strings or integers, one per row, none missing."""
    arr = _as_numpy(values, where, what) if not (isinstance(values, np.ndarray) and values.dtype.kind == "O") \
        else values
    if arr.ndim != 1:
        raise DataError(f"{where}: {what} has shape {list(arr.shape)}; expected one group per row (1 dimension)")
    if arr.dtype.kind == "O":  # pandas text columns
        bad = [i for i, v in enumerate(arr) if not isinstance(v, (str, int, np.integer)) or isinstance(v, bool)]
        if bad:
            raise DataError(f"{where}: {what} holds {_brief(arr[bad[0]])} at row {bad[0]}; expected a group name "
                            "(text or an integer) in every row")
    elif arr.dtype.kind not in "Uiu":
        raise DataError(f"{where}: {what} has dtype {arr.dtype}; expected group names (text or integers)")
    out = np.array([str(v) for v in arr.tolist()], dtype=str)
    empty = np.flatnonzero(np.char.str_len(out) == 0) if len(out) else []
    if len(empty):
        raise DataError(f"{where}: {what} is empty at row {int(empty[0])}; expected a group name in every row")
    return out


def _groups_sha256(groups: np.ndarray) -> str:
    h = hashlib.sha256(b"lidgate.groups/1")
    for g in groups.tolist():
        data = str(g).encode("utf-8")
        h.update(struct.pack("<Q", len(data)))
        h.update(data)
    return h.hexdigest()


def _all_or_none(groups: Mapping[str, np.ndarray | None], where: str) -> dict[str, np.ndarray] | None:
    """Groups from every source, or from none: some files with a group column and some without is an error."""
    have = [k for k, g in groups.items() if g is not None]
    if not have:
        return None
    if len(have) != len(groups):
        missing = [k for k, g in groups.items() if g is None]
        raise DataError(f"{where}: {_listing(missing)} has no group column/array (data.group) but "
                        f"{_listing(have)} has; expected it in every file or in none")
    return dict(groups)  # type: ignore[arg-type]


def read_npz(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception:  # noqa: BLE001 — numpy's message talks about pickles for any non-numpy file
        raise DataError(f"{where}: not an .npz archive; expected a file written by numpy.savez with arrays "
                        "'x' and 'y'") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{where}: holds a single .npy array; expected an .npz archive with arrays 'x' and 'y'")
    with archive:
        names = list(archive.files)
        arrays = {}
        for key in ("x", "y"):
            if key not in names:
                raise DataError(f"{where}: no array {key!r}; expected arrays 'x' (features) and 'y' (labels), "
                                f"found {_listing(names)}")
            try:
                arrays[key] = archive[key]
            except ValueError as exc:
                if "pickle" in str(exc).lower() or "object" in str(exc).lower():
                    raise DataError(f"{where}: array {key!r} holds Python objects; object arrays are not allowed "
                                    "(they load through pickle); expected a numeric array") from None
                raise DataError(f"{where}: array {key!r} cannot be read ({_short(exc)})") from None
            except Exception as exc:  # noqa: BLE001 — a truncated or corrupt member
                raise DataError(f"{where}: array {key!r} cannot be read ({_short(exc)})") from None
    return _arrays_xy(arrays["x"], arrays["y"], where, "array 'x'", "array 'y'")


# ------------------------------------------------------------------------------ checks
def check_model_outputs(model: torch.nn.Module, x: Tensor, where: str, rows: int = 256) -> int:
    """The model's number of outputs (classes), from a forward pass in eval mode on the first ``rows``
    examples; refuses data on which the model's outputs are NaN or infinite (features so large that the
    first layers overflow), naming the largest feature, before any search or bound sees them."""
    p = next(model.parameters(), None)
    sample = x[:rows]
    if p is not None:
        sample = sample.to(p.device, p.dtype if p.is_floating_point() else sample.dtype)
    with torch.no_grad():
        out = model.eval()(sample)
    if not torch.isfinite(out).all():
        biggest = float(sample.detach().abs().max())
        raise DataError(f"{where}: the model's outputs on these features are NaN or infinite (largest |feature| "
                        f"{biggest:.3g}); expected features the model can take — rescale or standardise them")
    return int(out.shape[-1])


def _arrays_xy(x: Any, y: Any, where: str, xname: str, yname: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels given as arrays (npz, loader results): checked and normalised."""
    x = _as_numpy(x, where, xname)
    y = _as_numpy(y, where, yname)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where}: {xname} has dtype {x.dtype}; expected numbers")
    if x.ndim < 2:
        raise DataError(f"{where}: {xname} has shape {x.shape}; expected one row per example "
                        "(at least 2 dimensions: rows × features)")
    if y.ndim != 1:
        raise DataError(f"{where}: {yname} has shape {y.shape}; expected one label per row (1 dimension)")
    if len(x) != len(y):
        raise DataError(f"{where}: {xname} has {len(x)} rows but {yname} has {len(y)} labels; "
                        "expected one label per row")
    wide = x.dtype == np.float64
    x = _finite_features(x.astype(np.float64, copy=False), where, [xname], np.float64 if wide else np.float32,
                         table=False)
    return x, _labels(y, where, yname)


def _as_numpy(v: Any, where: str, name: str) -> np.ndarray:
    if isinstance(v, Tensor):
        t = v.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()  # numpy has no bfloat16
        return t.numpy()
    if isinstance(v, np.ndarray):
        arr = v
    else:
        try:
            arr = np.asarray(v)
        except Exception as exc:  # noqa: BLE001 — ragged nested lists and the like
            raise DataError(f"{where}: {name} cannot be read as an array ({_short(exc)})") from None
    if arr.dtype.kind == "O":
        raise DataError(f"{where}: {name} holds Python objects; object arrays are not allowed, expected numbers")
    return arr


def _finite_features(x: np.ndarray, where: str, names: list[str], dtype: type, *, table: bool) -> np.ndarray:
    """Refuse NaN/inf (naming the column or array and the first row), then cast to ``dtype``.

    ``names``: one per column when ``table`` (``x`` 2-D), else ``[array name]`` for ``x`` of any rank.
    """
    bad = ~np.isfinite(x)
    if bad.any():
        what, row, index = _first_bad(bad, names, table)
        value = x[(row, *index)] if index else x[row, names.index(what)]
        kind = "NaN (a missing value)" if np.isnan(value) else str(value)
        raise DataError(f"{where}: {what} holds {kind} at row {row}{_index_text(index)} (rows count from 0; "
                        f"{int(bad.sum())} non-finite in all); expected finite numbers")
    if dtype is np.float64:
        return x.astype(np.float64, copy=False)
    with np.errstate(over="ignore"):
        out = x.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        what, row, index = _first_bad(bad, names, table)
        raise DataError(f"{where}: {what} holds a value too large for float32 at row {row}{_index_text(index)}; "
                        "expected values within ±3.4e38 (or float64 data)")
    return out


def _first_bad(bad: np.ndarray, names: list[str], table: bool) -> tuple[str, int, tuple[int, ...]]:
    """(column or array name, first row, index within the row for arrays) of the first True in ``bad``."""
    if table:  # a table: the first offending column in feature order, then its first row
        col = int(np.flatnonzero(bad.any(axis=0))[0])
        return names[col], int(np.flatnonzero(bad[:, col])[0]), ()
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    return names[0], first[0], first[1:]


def _index_text(index: tuple[int, ...]) -> str:
    return f" (position {list(index)} within the row)" if index else ""


def _labels(values: pd.Series | np.ndarray, where: str, what: str) -> np.ndarray:
    """Integer class ids ≥ 0 as int64; integral floats (1.0) are accepted, anything else is named."""
    if isinstance(values, pd.Series):
        s = values
        if s.dtype == bool or pd.api.types.is_bool_dtype(s.dtype):
            raise DataError(f"{where}: {what} holds true/false values; expected integer class ids ≥ 0")
        if not pd.api.types.is_numeric_dtype(s.dtype) or pd.api.types.is_complex_dtype(s.dtype):
            row = _first_non_number(s)
            example = f": row {row} holds {_brief(s.iloc[row])}" if row is not None else ""
            raise DataError(f"{where}: {what} is not numeric (dtype {s.dtype}){example}; "
                            "expected integer class ids ≥ 0")
        if pd.api.types.is_integer_dtype(s.dtype) and not s.isna().any():
            arr = s.to_numpy()
        else:
            arr = s.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        arr = values
        if arr.dtype.kind == "b":
            raise DataError(f"{where}: {what} holds true/false values; expected integer class ids ≥ 0")
        if arr.dtype.kind not in "iuf":
            raise DataError(f"{where}: {what} has dtype {arr.dtype}; expected integer class ids ≥ 0")
    if arr.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(arr) | (arr != np.round(arr)))
        if len(bad):
            shown = "NaN (a missing value)" if np.isnan(arr[bad[0]]) else _brief(arr[bad[0]])
            raise DataError(f"{where}: {what} holds {shown} at row {bad[0]}; expected integer class ids ≥ 0")
        if np.any(arr > np.iinfo(np.int64).max):
            row = int(np.flatnonzero(arr > np.iinfo(np.int64).max)[0])
            raise DataError(f"{where}: {what} holds {_brief(arr[row])} at row {row}; expected class ids that fit int64")
    elif arr.dtype.kind == "u" and np.any(arr > np.iinfo(np.int64).max):
        row = int(np.flatnonzero(arr > np.iinfo(np.int64).max)[0])
        raise DataError(f"{where}: {what} holds {arr[row]} at row {row}; expected class ids that fit int64")
    negative = np.flatnonzero(arr < 0)
    if len(negative):
        raise DataError(f"{where}: {what} holds {_brief(arr[negative[0]])} at row {negative[0]}; "
                        "expected integer class ids ≥ 0")
    return arr.astype(np.int64)


def _reshape(x: np.ndarray, shape: Iterable[int], where: str) -> np.ndarray:
    shape = tuple(shape)
    per_row = int(np.prod(x.shape[1:]))
    need = int(np.prod(shape))
    if per_row != need:
        raise DataError(f"{where}: data.shape {list(shape)} holds {need} values per row, but each row has "
                        f"{per_row} (shape {list(x.shape[1:])}); expected a shape whose product is {per_row}")
    return x.reshape((len(x), *shape))


def _check_rows(x: np.ndarray | pd.DataFrame, where: str, what: str) -> None:
    if len(x) == 0:
        raise DataError(f"{where}: {what} has 0 rows; expected at least one example")


def _check_classes(y: np.ndarray, classes: Iterable[int], where: str) -> None:
    allowed = np.array(sorted(set(classes)), dtype=np.int64)
    bad = np.flatnonzero(~np.isin(y, allowed))
    if len(bad):
        raise DataError(f"{where}: label {int(y[bad[0]])} at row {bad[0]} is not one of data.classes "
                        f"{allowed.tolist()} ({len(bad)} such row(s) in all)")


def _refuse_shared_files(records: Mapping[str, Mapping[str, Any]]) -> None:
    # Soundness rule 5: the certification set must be data the search never saw; the same bytes
    # named twice is the one overlap that can be caught without comparing rows.
    seen: dict[str, str] = {}
    for name in SPLIT_NAMES:
        digest = records[name]["sha256"]
        if digest in seen:
            raise DataError(f"{records[name]['path']}: data.{name} has the same content as data.{seen[digest]}; "
                            "expected disjoint train, search and certification data")
        seen[digest] = name


# ------------------------------------------------------------------------------ splitting
def _split_arrays(x: np.ndarray, y: np.ndarray, split: SplitSection, *, where: str, group: np.ndarray | None = None
                  ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any], dict[str, np.ndarray] | None]:
    try:
        idx = split_indices(len(x), split.fractions(), split.seed)
    except DataError as exc:
        raise DataError(f"{where}: data.split: {exc}") from None
    record = {**split.fractions(), "seed": split.seed, "rows": len(x),
              "assignment_sha256": _assignment_sha256(idx, len(x))}
    groups = None if group is None else {k: group[i] for k, i in idx.items()}
    return {k: (x[i], y[i]) for k, i in idx.items()}, record, groups


def _assignment_sha256(idx: Mapping[str, np.ndarray], n: int) -> str:
    """sha256 of which split each row went to: detects a change in numpy's permutation stream."""
    assignment = np.empty(n, dtype=np.uint8)
    for code, name in enumerate(SPLIT_NAMES):
        assignment[idx[name]] = code
    h = hashlib.sha256(b"lidgate.split/1")
    h.update(struct.pack("<Q", n))
    h.update(assignment.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ loaders
def _from_loader(config: LidgateConfig, scratch: str | Path | None = None
                 ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any], dict[str, np.ndarray] | None]:
    from components.factory import resolve

    d = config.data
    assert d.loader is not None and d.split is not None
    ref, kwargs = d.loader.function, dict(d.loader.kwargs)
    fn = resolve(ref, field="data.loader.function", roots=config.code)
    where = f"data.loader.function {ref}"
    try:
        result = fn(**kwargs)
    except Exception as exc:  # noqa: BLE001 — the team's code failed: say which and why
        raise DataError(f"{where}: calling it raised {type(exc).__name__}: {exc}") from exc
    provenance: dict[str, Any] = {"form": "loader", "loader": {"function": ref, "kwargs": kwargs}}
    groups = None
    if isinstance(result, Mapping) and {"x", "y"} <= set(result):
        extra = sorted(set(map(str, result)) - set(LOADER_KEYS))
        if extra:
            raise DataError(f"{where}: returned a dict with unknown keys {_listing(extra)}; expected "
                            f"{_listing(list(LOADER_KEYS))}")
        x, y = _arrays_xy(result["x"], result["y"], where, "'x' of the result", "'y' of the result")
        if d.classes is not None:
            _check_classes(y, d.classes, where)
        group = None
        if result.get("group") is not None:
            group = _group_values(result["group"], where, "'group' of the result")
            if len(group) != len(y):
                raise DataError(f"{where}: 'group' of the result has {len(group)} rows, 'y' {len(y)}; expected one "
                                "group per row")
        features = result.get("features")
        if features is not None:
            if not isinstance(features, Mapping):
                raise DataError(f"{where}: 'features' of the result is {type(features).__name__}; expected a mapping "
                                "saying how the features were computed (JSON values)")
            try:
                provenance["features"] = json.loads(json.dumps(dict(features), sort_keys=True, allow_nan=False))
            except (TypeError, ValueError) as exc:
                raise DataError(f"{where}: 'features' of the result is not JSON ({exc})") from None
        provenance["returned"] = "arrays"
        splits, provenance["split"], groups = _split_arrays(x, y, d.split, where=where, group=group)
    elif isinstance(result, Mapping):
        if set(result) != set(SPLIT_NAMES):
            raise DataError(f"{where}: returned a dict with keys {_listing([str(k) for k in result])}; expected "
                            f"exactly {_listing(list(SPLIT_NAMES))}, or 'x' and 'y' (with optional 'group' and "
                            "'features')")
        splits = {name: _pair(result[name], where, f"split '{name}'") for name in SPLIT_NAMES[:2]}
        splits["certification"] = _certification_split(result["certification"], config, where, scratch)
        if d.classes is not None:
            for name, part in splits.items():
                if not _is_stream(part):  # a stream's rows were checked as they were read
                    _check_classes(part[1], d.classes, f"{where} (y of the split '{name}')")
        provenance["returned"] = "splits"
    else:
        if isinstance(result, torch.utils.data.Dataset):
            x, y = _materialise(result, where)
            provenance["returned"] = "dataset"
        elif isinstance(result, (tuple, list)) and len(result) == 2:
            x, y = _pair(result, where, "result")
            provenance["returned"] = "arrays"
        else:
            raise DataError(f"{where}: returned {type(result).__name__}; expected (x, y), a dict with keys x, y (and "
                            "optionally group, features), a dict with keys train, search and certification, or a "
                            "torch.utils.data.Dataset of (x, y) pairs")
        if d.classes is not None:
            _check_classes(y, d.classes, where)
        splits, provenance["split"], _ = _split_arrays(x, y, d.split, where=where)
    if config.certification.memory_mb is not None and not _is_stream(splits["certification"]):
        raise DataError(f"{where}: certification.memory_mb asks for a streamed certification set, but the loader "
                        f"returned it in memory ({provenance['returned']}); return a dict whose 'certification' is a "
                        "torch.utils.data.DataLoader (or Dataset), or remove memory_mb")
    if d.shape is not None:  # (a stream was reshaped as it was read)
        splits = {k: v if _is_stream(v) else (_reshape(v[0], d.shape, f"{where} (split '{k}')"), v[1])
                  for k, v in splits.items()}
    return splits, provenance, groups


def _certification_split(value: Any, config: LidgateConfig, where: str, scratch: str | Path | None) -> Any:
    """A loader's certification split: ``(x, y)`` arrays, or a DataLoader / Dataset — streamed into a file
    with ``certification.memory_mb``, else read whole."""
    if not isinstance(value, (torch.utils.data.DataLoader, torch.utils.data.Dataset)):
        return _pair(value, where, "split 'certification'")
    from components.streaming import loader_stream  # (it imports this module)

    what = f"{where} (split 'certification')"
    stream = loader_stream(value, config.data, what, config.certification.memory_mb, directory=scratch)
    if config.certification.memory_mb is not None:
        return stream
    x, y = stream.head(stream.n)  # not streamed: read whole, as arrays from a loader are
    return x.numpy(), y.numpy()


def _pair(value: Any, where: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise DataError(f"{where}: {what} is {type(value).__name__}; expected an (x, y) pair")
    return _arrays_xy(value[0], value[1], where, f"x of the {what}", f"y of the {what}")


def _materialise(ds: torch.utils.data.Dataset, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Read every ``(x, y)`` item of a Dataset (map-style by index, iterable by iteration)."""
    if isinstance(ds, torch.utils.data.IterableDataset):
        items: Iterable[Any] = ds
    else:
        try:
            n = len(ds)  # type: ignore[arg-type]
        except TypeError:
            raise DataError(f"{where}: returned a map-style Dataset without __len__; expected len() "
                            "or a torch.utils.data.IterableDataset") from None
        items = (ds[i] for i in range(n))
    xs: list[np.ndarray] = []
    ys: list[Any] = []
    i = 0
    try:
        for i, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise DataError(f"{where}: Dataset item {i} is {type(item).__name__}; expected an (x, y) pair")
            x = _as_numpy(item[0], where, f"x of Dataset item {i}")
            if xs and x.shape != xs[0].shape:
                raise DataError(f"{where}: x of Dataset item {i} has shape {list(x.shape)}, item 0 has "
                                f"{list(xs[0].shape)}; expected every example to have the same shape")
            label = _as_numpy(item[1], where, f"y of Dataset item {i}")
            if label.size != 1:
                raise DataError(f"{where}: y of Dataset item {i} has shape {list(label.shape)}; expected one label")
            xs.append(x)
            ys.append(label.reshape(()))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 — the team's Dataset failed while reading an item
        raise DataError(f"{where}: reading Dataset item {i} raised {type(exc).__name__}: {exc}") from exc
    if not xs:
        raise DataError(f"{where}: returned an empty Dataset; expected (x, y) items")
    x_all = np.stack(xs)
    if x_all.ndim == 1:
        x_all = x_all[:, None]  # scalar examples: one feature each
    return _arrays_xy(x_all, np.stack(ys), where, "x of the Dataset", "y of the Dataset")


# ------------------------------------------------------------------------------ assembly
def _assemble(d: DataSection, splits: Mapping[str, tuple[np.ndarray, np.ndarray]],
              provenance: dict[str, Any], groups: Mapping[str, np.ndarray] | None = None) -> DataSplits:
    where = _source_name(d)
    stream = splits["certification"] if _is_stream(splits["certification"]) else None
    arrays = [n for n in SPLIT_NAMES if not (stream is not None and n == "certification")]
    for name in arrays:
        _check_rows(splits[name][0], f"{where}", f"split '{name}'")
    shapes = {name: tuple(splits[name][0].shape[1:]) for name in arrays}
    if stream is not None:
        shapes["certification"] = tuple(stream.feature_shape)
    if len(set(shapes.values())) != 1:
        raise DataError(f"{where}: the splits have examples of different shapes "
                        f"({', '.join(f'{k} {list(v)}' for k, v in shapes.items())}); expected one shape")
    # Splits read from differently typed files are brought to the widest type rather than refused.
    wide = any(splits[n][0].dtype == np.float64 for n in arrays) or (stream is not None and stream.dtype == torch.float64)
    dtype = np.float64 if wide else np.float32
    labels = [splits[n][1] for n in arrays] + ([] if stream is None else [y.numpy() for y in stream.labels()])
    if d.classes is not None:  # each source was checked against them where its rows are numbered
        classes = tuple(sorted(d.classes))
    else:
        classes = tuple(int(c) for c in np.unique(np.concatenate(labels)))
    provenance["rows"] = {name: len(stream) if name == "certification" and stream is not None
                          else int(len(splits[name][0])) for name in SPLIT_NAMES}
    tensors = {name: (_tensor(splits[name][0].astype(dtype, copy=False)), torch.from_numpy(splits[name][1]))
               for name in arrays}
    if stream is not None:
        tensors["certification"] = stream.astype(torch.float64 if wide else torch.float32)
    return DataSplits(task=d.task, train=tensors["train"], search=tensors["search"],
                      certification=tensors["certification"], provenance=provenance,
                      feature_shape=shapes["train"], classes=classes,
                      groups=None if groups is None else {k: np.asarray(groups[k]) for k in SPLIT_NAMES})


def _is_stream(value: Any) -> bool:
    """Whether a split (or a data set handed to validation) is a ``lid_engine.CertificationStream``; the
    engine is imported only when something other than a pair, a tensor or an array is met."""
    if isinstance(value, (tuple, list, Tensor, np.ndarray)):
        return False
    from lid_engine.stream import CertificationStream

    return isinstance(value, CertificationStream)


def _source_name(d: DataSection) -> str:
    if d.form == "files":
        return "data (train/search/certification files)"
    if d.form == "source":
        return str(d.source)
    assert d.loader is not None
    return f"data.loader.function {d.loader.function}"


def _tensor(x: np.ndarray) -> Tensor:
    # A loader may hand back read-only arrays (np.broadcast_to, memory maps): torch needs its own copy.
    return torch.from_numpy(np.ascontiguousarray(x) if x.flags.writeable else np.array(x, order="C"))


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return (shown + f", … ({len(names)} in all)" if len(names) > limit else shown) or "none"


def _brief(v: Any) -> str:
    r = repr(v.item() if isinstance(v, np.generic) else v)
    return r if len(r) <= 40 else r[:37] + "..."


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
