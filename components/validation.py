"""Data checks with Great Expectations 1.24.1 (ephemeral context, pandas data source).

Every data set that enters the pipeline — training data, the lookahead buffer (METHOD.md §3.2: the
next task's data that biases the LID) and certification data (METHOD.md §4: the Clopper–Pearson
population claim) — is checked before use, and a bad set is refused with a report that says *what*
is wrong and *where*.

How a check runs
----------------
* Structural checks that a table cannot express are Python pre-checks, reported as
  :class:`DataCheck` like the rest: ``shape`` (x is at least 2-D with the stated per-example
  shape, y is 1-D with one label per example) and ``dtype`` (floating features, integer labels).
* Everything else is a real GX expectation in an :class:`~great_expectations.ExpectationSuite`, run
  by a :class:`~great_expectations.ValidationDefinition` on a whole-dataframe batch of a pandas
  data source in an ephemeral context. The table has one row per example: the flattened features
  ``f0 … f{d-1}`` (omitted above :data:`MAX_FEATURE_COLUMNS` columns), the label column ``y``, and
  three per-row aggregates of the features: ``x_nonfinite`` (how many NaN/±inf), ``x_min`` and
  ``x_max`` (over the finite values; null when a row has none).

  - ``rows``: ``ExpectTableRowCountToBeBetween(min_value=min_rows)``;
  - ``finite``: ``ExpectColumnValuesToBeBetween("x_nonfinite", max_value=0)``;
  - ``labels``: ``ExpectColumnValuesToBeInSet("y", classes)``;
  - ``range`` (with ``value_range``): ``ExpectColumnValuesToBeBetween`` on ``x_min`` (≥ low) and on
    ``x_max`` (≤ high), reported as one check;
  - ``confidence_rows`` (role ``"certification"`` with ``confidence`` and ``target_lower_bound``):
    ``ExpectTableRowCountToBeBetween(min_value=min_rows_for_confidence(confidence, target))``.

Why per-row aggregates instead of one expectation per feature column: GX evaluates each column
expectation separately; on 10k MNIST rows, 784 ``ExpectColumnValuesToNotBeNull`` alone take ~8 s
(measured), whereas the three aggregate columns are checked in ~0.1 s with the same verdicts (a row
has a NaN/inf iff ``x_nonfinite > 0``; every finite value lies in ``[lo, hi]`` iff
``lo ≤ x_min`` and ``x_max ≤ hi``). Non-finite values are excluded from ``x_min``/``x_max`` so
that the ``finite`` and ``range`` checks report disjoint problems.

``great_expectations`` is imported lazily (the import costs ~2.4 s); the pre-checks and
:func:`min_rows_for_confidence` never import it. An empty data set fails with a clear message
without reaching GX; an expectation that raises inside GX fails its check (fail closed).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = [
    "MAX_FEATURE_COLUMNS",
    "ROLES",
    "DataCheck",
    "ValidationReport",
    "min_rows_for_confidence",
    "validate_all",
    "validate_dataset",
]

#: The three places data enter lidgate.
ROLES = ("training", "lookahead", "certification")
#: Above this many features per example the raw ``f*`` columns are left out of the GX table (the
#: checks use the per-row aggregates either way); keeps e.g. 3×224×224 images from building a
#: 150k-column DataFrame.
MAX_FEATURE_COLUMNS = 4096
_PARTIAL = 5  # how many unexpected rows GX reports back per expectation


# ----------------------------------------------------------------------------------- report types
@dataclass
class DataCheck:
    """One check's outcome; ``detail`` says what was checked or what is wrong, and where."""

    name: str
    success: bool
    detail: str
    #: the GX expectation type(s) that decided it, or ``"python pre-check"`` / ``"skipped"``
    expectation: str = ""


@dataclass
class ValidationReport:
    """All checks of one data set; ``success`` is true only if every check passed."""

    dataset: str
    role: str
    success: bool
    n_rows: int
    checks: list[DataCheck] = field(default_factory=list)

    def failures(self) -> list[DataCheck]:
        return [c for c in self.checks if not c.success]

    def summary(self) -> str:
        bad = self.failures()
        head = (
            f"{'PASS' if self.success else 'FAIL'}: {self.role} data {self.dataset!r} ({_rows(self.n_rows)}): "
            + (f"all {len(self.checks)} checks passed" if self.success else f"{len(bad)} of {len(self.checks)} checks failed")
        )
        lines = [head]
        for c in self.checks:
            lines.append(f"  [{'ok' if c.success else 'FAILED'}] {c.name}: {c.detail}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return self.summary()


# ----------------------------------------------------------------------------------- statistics
def min_rows_for_confidence(confidence: float, target_lower_bound: float) -> int:
    """Fewest certification rows for which a perfect score can certify ``target_lower_bound``.

    With ``k = n`` certified out of ``n``, the one-sided Clopper–Pearson lower bound at level
    ``α = 1 − confidence`` is ``α^{1/n}``, which is ``≥ target`` iff ``n ≥ ln(α) / ln(target)``
    (e.g. confidence 0.95, target 0.9 → 29). Fewer rows can never certify the target, whatever
    the model. The closed form is checked against (and, at a rounding tie, moved to agree with)
    :func:`lid_engine.clopper_pearson_lower`, the routine that writes certificates, so "need ≥ N
    rows" here means exactly that the certificate code can reach the target with N rows.
    """
    c, t = _unit_open("confidence", confidence), _unit_open("target_lower_bound", target_lower_bound)
    from lid_engine.certificate import clopper_pearson_lower  # lazy: pulls torch

    alpha = 1.0 - c
    n = max(1, math.ceil(math.log(alpha) / math.log(t)))
    while clopper_pearson_lower(n, n, alpha) < t:
        n += 1
    while n > 1 and clopper_pearson_lower(n - 1, n - 1, alpha) >= t:
        n -= 1
    return n


def _unit_open(what: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number strictly between 0 and 1, got {v!r}")
    v = float(v)
    if not 0.0 < v < 1.0:
        raise ValueError(f"{what} must lie strictly between 0 and 1, got {v!r}")
    return v


# ----------------------------------------------------------------------------------- arguments
def _feature_shape(n_features: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(n_features, (int, np.integer)) and not isinstance(n_features, bool):
        shape: tuple[int, ...] = (int(n_features),)
    elif isinstance(n_features, Sequence) and not isinstance(n_features, str):
        shape = tuple(int(s) for s in n_features)
    else:
        raise ValueError(f"n_features must be an int or a tuple of ints, got {n_features!r}")
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"n_features must describe a non-empty per-example shape, got {n_features!r}")
    return shape


def _classes(classes: Sequence[int]) -> list[int]:
    try:
        out = [int(c) for c in classes]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"classes must be a sequence of ints, got {classes!r}") from exc
    if not out:
        raise ValueError("classes must not be empty")
    if any(isinstance(c, bool) or float(c) != int(c) for c in classes):
        raise ValueError(f"classes must be integers, got {classes!r}")
    return sorted(set(out))


@dataclass
class _Args:
    name: str
    role: str
    shape: tuple[int, ...]
    classes: list[int]
    min_rows: int
    value_range: tuple[float, float] | None
    confidence: float | None
    target: float | None


def _parse_args(
    *, role: str, name: str, n_features: Any, classes: Any, min_rows: Any = 1, value_range: Any = None,
    confidence: Any = None, target_lower_bound: Any = None,
) -> _Args:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if isinstance(min_rows, bool) or not isinstance(min_rows, (int, np.integer)) or min_rows < 0:
        raise ValueError(f"min_rows must be an int ≥ 0, got {min_rows!r}")
    vr = None
    if value_range is not None:
        try:
            lo, hi = (float(v) for v in value_range)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"value_range must be a (low, high) pair, got {value_range!r}") from exc
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            raise ValueError(f"value_range must satisfy low ≤ high, got {value_range!r}")
        vr = (lo, hi)
    conf = tgt = None
    if (confidence is None) != (target_lower_bound is None):
        raise ValueError("confidence and target_lower_bound must be given together (or neither)")
    if confidence is not None:
        if role != "certification":
            raise ValueError(
                f"confidence/target_lower_bound only apply to role='certification' (got role={role!r})"
            )
        conf = _unit_open("confidence", confidence)
        tgt = _unit_open("target_lower_bound", target_lower_bound)
    return _Args(name, role, _feature_shape(n_features), _classes(classes), int(min_rows), vr, conf, tgt)


# ----------------------------------------------------------------------------------- arrays
@dataclass
class _Arr:
    values: np.ndarray | None  # numpy view, or None when not readable as numbers
    dtype: str  # the caller's dtype, as its library names it
    floating: bool
    integer: bool


def _as_array(v: Any) -> _Arr:
    """numpy view of a tensor/array plus the caller's dtype facts (bfloat16/float16 widened)."""
    mod = type(v).__module__
    if mod.startswith("torch"):
        import torch

        if not isinstance(v, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor or numpy array, got {type(v).__name__}")
        t = v.detach().cpu()
        fl = t.is_floating_point()
        it = not fl and not t.is_complex() and t.dtype != torch.bool
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        try:
            arr = t.numpy()
        except (TypeError, RuntimeError):  # exotic dtypes (float8, quantised…)
            arr = None
        return _Arr(arr, str(v.dtype).replace("torch.", ""), fl, it)
    arr = np.asarray(v)
    fl = np.issubdtype(arr.dtype, np.floating)
    it = np.issubdtype(arr.dtype, np.integer)
    dtype = str(arr.dtype)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if not (fl or it or arr.dtype == np.bool_):
        try:  # object/str/complex: readable as real numbers or not at all
            if np.iscomplexobj(arr):
                raise TypeError("complex")
            arr = arr.astype(np.float64)
        except (TypeError, ValueError):
            arr = None
    return _Arr(arr, dtype, fl, it)


# ----------------------------------------------------------------------------------- GX session
class _GXSession:
    """One ephemeral GX context with a pandas data source; builds a suite per data set."""

    def __init__(self) -> None:
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import ProgressBarsConfig

        # That module sets its own logger to INFO on import and then logs one line per ephemeral context.
        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
        self.gx, self.gxe = gx, gxe
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.source = self.context.data_sources.add_pandas("lidgate")
        self._ids = itertools.count()

    def run(self, label: str, df: Any, expectations: list[tuple[str, Any]]) -> dict[str, Any]:
        """Run ``expectations`` ((key, expectation) pairs) on ``df``; returns key → GX result."""
        gx = self.gx
        uid = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)[:80]}-{next(self._ids)}"
        asset = self.source.add_dataframe_asset(name=f"asset-{uid}")
        batch = asset.add_batch_definition_whole_dataframe(f"batch-{uid}")
        suite = self.context.suites.add(gx.ExpectationSuite(name=f"suite-{uid}"))
        for _key, exp in expectations:
            suite.add_expectation(exp)
        vd = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validation-{uid}", data=batch, suite=suite)
        )
        result = vd.run(
            batch_parameters={"dataframe": df},
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": _PARTIAL},
        )
        out: dict[str, Any] = {}
        for r in result.results:
            key = (r.expectation_config.meta or {}).get("lidgate_check")
            if key is not None:
                out[key] = r
        return out


def _gx_failed(r: Any) -> str | None:
    """The exception text when GX raised while evaluating an expectation, else None."""
    info = getattr(r, "exception_info", None) or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "unknown error")
    for v in info.values():  # multi-metric form: {metric_id: {...}}
        if isinstance(v, Mapping) and v.get("raised_exception"):
            return str(v.get("exception_message") or "unknown error")
    return None


def _rows(k: int) -> str:
    return f"{k} row" if k == 1 else f"{k} rows"


def _fmt(v: float) -> str:
    return f"{v:g}"


def _classes_text(classes: list[int]) -> str:
    return "[" + ", ".join(str(c) for c in classes) + "]"


# What each check says, for a set in memory and a streamed one alike (``where``: " (first at row …)" or "").
def _rows_detail(ok: bool, n: int, need: int) -> str:
    return f"row count {n}" + (f" ≥ {need}" if ok else f" < required {need}")


def _finite_detail(ok: bool, n: int, d: int, count: int = 0, where: str = "") -> str:
    return f"features: no NaN/inf in {n} rows × {d} values" if ok else f"features: NaN/inf in {_rows(count)}{where}"


def _labels_detail(ok: bool, n: int, classes: list[int], count: int = 0, where: str = "") -> str:
    cls = _classes_text(classes)
    return (f"label column: all {n} labels in task classes {cls}" if ok else
            f"label column: {_rows(count)} outside task classes {cls}{where}")


def _range_detail(ok: bool, lo: float, hi: float, parts: Sequence[str] = (), where: str = "") -> str:
    return (f"features: all finite values within [{_fmt(lo)}, {_fmt(hi)}]" if ok else
            f"features: values outside [{_fmt(lo)}, {_fmt(hi)}]: {', '.join(parts)}{where}")


def _confidence_detail(ok: bool, n: int, need: int, a: _Args) -> str:
    if ok:
        return f"{n} rows ≥ {need} needed to certify ≥ {_fmt(a.target)} at confidence {_fmt(a.confidence)}"
    return (f"too small for the stated confidence: need ≥ {need} rows to certify ≥ {_fmt(a.target)} "
            f"at confidence {_fmt(a.confidence)} (have {n})")


# ----------------------------------------------------------------------------------- validation
def _validate(session_factory: Any, x: Any, y: Any, a: _Args) -> ValidationReport:
    checks: list[DataCheck] = []
    pre = "python pre-check"
    xa, ya = _as_array(x), _as_array(y)
    xv, yv = xa.values, ya.values

    # ---- shape (pre-check): a table cannot tell us the per-example shape
    problems: list[str] = []
    structural = True  # can the rows of x and y be lined up at all?
    if xv is None or yv is None:
        structural = False
    else:
        if xv.ndim < 2:
            problems.append(f"x must be at least 2-D (examples × features), got shape {tuple(xv.shape)}")
            structural = False
        elif tuple(xv.shape[1:]) != a.shape:
            problems.append(f"x: per-example shape {tuple(xv.shape[1:])} but the task expects {a.shape}")
        if yv.ndim != 1:
            problems.append(f"y must be 1-D (one label per example), got shape {tuple(yv.shape)}")
            structural = False
        if xv.ndim >= 1 and yv.ndim >= 1 and xv.shape[0] != yv.shape[0]:
            problems.append(f"x has {xv.shape[0]} examples but y has {yv.shape[0]} labels")
            structural = False
    n = int(xv.shape[0]) if xv is not None and xv.ndim >= 1 else 0
    for what, arr in (("x", xa), ("y", ya)):
        if arr.values is None:
            problems.append(f"{what} (dtype {arr.dtype}) cannot be read as an array of real numbers")
    if xv is None:
        try:
            n = len(x)
        except TypeError:
            pass
    if problems:
        checks.append(DataCheck("shape", False, "; ".join(problems), pre))
    else:
        checks.append(DataCheck("shape", True, f"x {tuple(xv.shape)} (per-example {a.shape}), y {tuple(yv.shape)}", pre))

    # ---- dtype (pre-check)
    dproblems = []
    if not xa.floating:
        dproblems.append(f"features: dtype {xa.dtype} is not floating point (expected float16/32/64)")
    if not ya.integer:
        dproblems.append(f"labels: dtype {ya.dtype} is not an integer type")
    checks.append(
        DataCheck("dtype", not dproblems, "; ".join(dproblems) or f"features {xa.dtype}, labels {ya.dtype}", pre)
    )

    gx_names = ["rows", "finite", "labels"] + (["range"] if a.value_range else []) + (
        ["confidence_rows"] if a.confidence is not None else []
    )
    need_conf = min_rows_for_confidence(a.confidence, a.target) if a.confidence is not None else None

    if not structural:
        for nm in gx_names:
            checks.append(DataCheck(nm, False, "not checked: x and y do not line up as a table (see 'shape')", "skipped"))
        return ValidationReport(a.name, a.role, False, n, checks)

    if n == 0:  # no GX run on an empty table: report clearly instead
        for nm in gx_names:
            if nm == "rows":
                checks.append(DataCheck("rows", False, f"empty data set: 0 rows (need ≥ {max(1, a.min_rows)})", pre))
            elif nm == "confidence_rows":
                checks.append(DataCheck(nm, False, _confidence_detail(False, 0, need_conf, a), pre))
            else:
                checks.append(DataCheck(nm, False, "not checked: the data set is empty", "skipped"))
        return ValidationReport(a.name, a.role, False, 0, checks)

    # ---- the GX table
    import pandas as pd

    flat = xv.reshape(n, -1)
    d = flat.shape[1]
    finite, aggregates = _aggregates(flat, yv)
    if 0 < d <= MAX_FEATURE_COLUMNS:
        feats = pd.DataFrame(flat, columns=[f"f{i}" for i in range(d)])
        df = pd.concat([feats, aggregates], axis=1)
    else:
        df = aggregates

    session = session_factory()
    gxe = session.gxe
    meta = _meta
    exps: list[tuple[str, Any]] = [
        ("rows", gxe.ExpectTableRowCountToBeBetween(min_value=a.min_rows, meta=meta("rows"))),
        *_row_expectations(gxe, a),
    ]
    if need_conf is not None:
        exps.append(("confidence_rows", gxe.ExpectTableRowCountToBeBetween(min_value=need_conf, meta=meta("confidence_rows"))))
    types = {k: type(e).__name__ for k, e in exps}
    try:
        res = session.run(f"{a.role}-{a.name}", df, exps)
        run_error = None
    except Exception as exc:  # noqa: BLE001 — fail closed with the reason
        res, run_error = {}, f"{type(exc).__name__}: {exc}"

    def get(key: str) -> tuple[Any, str | None]:
        if run_error is not None:
            return None, f"Great Expectations run failed: {run_error}"
        r = res.get(key)
        if r is None:
            return None, "Great Expectations returned no result for this expectation"
        err = _gx_failed(r)
        return r, (f"Great Expectations raised while checking: {err}" if err else None)

    def first_row(r: Any) -> int | None:
        idx = r.result.get("partial_unexpected_index_list") or []
        return int(idx[0]) if idx else None

    # rows
    r, err = get("rows")
    if err:
        checks.append(DataCheck("rows", False, err, types["rows"]))
    else:
        checks.append(DataCheck("rows", bool(r.success), _rows_detail(bool(r.success), n, a.min_rows), types["rows"]))

    # finite
    r, err = get("finite")
    if err:
        checks.append(DataCheck("finite", False, err, types["finite"]))
    elif r.success:
        checks.append(DataCheck("finite", True, _finite_detail(True, n, d), types["finite"]))
    else:
        cnt = int(r.result.get("unexpected_count", 0))
        i = first_row(r)
        where = ""
        if i is not None:
            j = int(np.flatnonzero(~finite[i])[0])
            where = f" (first at row {i}: column f{j} = {flat[i, j]})"
        checks.append(DataCheck("finite", False, _finite_detail(False, n, d, cnt, where), types["finite"]))

    # labels
    r, err = get("labels")
    if err:
        checks.append(DataCheck("labels", False, err, types["labels"]))
    elif r.success:
        checks.append(DataCheck("labels", True, _labels_detail(True, n, a.classes), types["labels"]))
    else:
        cnt = int(r.result.get("unexpected_count", 0))
        i = first_row(r)
        where = f" (first at row {i}: value {yv[i].item()})" if i is not None else ""
        checks.append(DataCheck("labels", False, _labels_detail(False, n, a.classes, cnt, where), types["labels"]))

    # range
    if a.value_range:
        lo, hi = a.value_range
        typ = f"{types['range_low']} (x_min, x_max)"
        (rl, el), (rh, eh) = get("range_low"), get("range_high")
        if el or eh:
            checks.append(DataCheck("range", False, el or eh, typ))
        elif rl.success and rh.success:
            checks.append(DataCheck("range", True, _range_detail(True, lo, hi), typ))
        else:
            parts, firsts = [], []
            if not rl.success:
                parts.append(f"below {_fmt(lo)} in {_rows(int(rl.result.get('unexpected_count', 0)))}")
                firsts.append(first_row(rl))
            if not rh.success:
                parts.append(f"above {_fmt(hi)} in {_rows(int(rh.result.get('unexpected_count', 0)))}")
                firsts.append(first_row(rh))
            firsts = [f for f in firsts if f is not None]
            where = ""
            if firsts:
                i = min(firsts)
                bad = finite[i] & ((flat[i] < lo) | (flat[i] > hi))
                j = int(np.flatnonzero(bad)[0])
                where = f" (first at row {i}: column f{j} = {flat[i, j]})"
            checks.append(DataCheck("range", False, _range_detail(False, lo, hi, parts, where), typ))

    # confidence_rows
    if need_conf is not None:
        r, err = get("confidence_rows")
        if err:
            checks.append(DataCheck("confidence_rows", False, err, types["confidence_rows"]))
        else:
            ok = bool(r.success)
            checks.append(DataCheck("confidence_rows", ok, _confidence_detail(ok, n, need_conf, a), types["confidence_rows"]))

    return ValidationReport(a.name, a.role, all(c.success for c in checks), n, checks)


def _meta(key: str) -> dict[str, str]:
    return {"lidgate_check": key}


def _row_expectations(gxe: Any, a: _Args) -> list[tuple[str, Any]]:
    """The expectations on each row's aggregates: ``finite``, ``labels`` and (with a value range) the two
    halves of ``range``."""
    exps = [("finite", gxe.ExpectColumnValuesToBeBetween(column="x_nonfinite", max_value=0, meta=_meta("finite"))),
            ("labels", gxe.ExpectColumnValuesToBeInSet(column="y", value_set=a.classes, meta=_meta("labels")))]
    if a.value_range:
        lo, hi = a.value_range
        exps.append(("range_low", gxe.ExpectColumnValuesToBeBetween(column="x_min", min_value=lo, meta=_meta("range_low"))))
        exps.append(("range_high", gxe.ExpectColumnValuesToBeBetween(column="x_max", max_value=hi,
                                                                     meta=_meta("range_high"))))
    return exps


def _aggregates(flat: np.ndarray, yv: np.ndarray) -> tuple[np.ndarray, Any]:
    """``(finite mask, table)`` of rows ``flat`` (examples × features) with labels ``yv``: the table has the
    columns ``y``, ``x_nonfinite``, ``x_min`` and ``x_max`` (over the finite values; NaN when none)."""
    import pandas as pd

    n, d = flat.shape
    finite = np.isfinite(flat)
    nonfinite = d - finite.sum(axis=1)
    with np.errstate(invalid="ignore"):
        row_min = np.where(finite, flat, np.inf).min(axis=1).astype(np.float64) if d else np.full(n, np.nan)
        row_max = np.where(finite, flat, -np.inf).max(axis=1).astype(np.float64) if d else np.full(n, np.nan)
    no_finite = nonfinite == d
    row_min[no_finite] = np.nan
    row_max[no_finite] = np.nan
    table = pd.DataFrame({"y": yv, "x_nonfinite": nonfinite.astype(np.int64), "x_min": row_min, "x_max": row_max})
    return finite, table


#: rows of per-row aggregates (32 bytes each) checked by one GX run when a stream is validated
STREAM_BLOCK_ROWS = 1 << 20


def _validate_stream(session_factory: Any, stream: Any, a: _Args, block_rows: int | None = None) -> ValidationReport:
    """``_validate`` for a ``lid_engine.CertificationStream``: its features are read a chunk at a time and
    reduced to the per-row aggregates as they come; GX checks the aggregates a block of ``block_rows``
    rows at a time (``finite``, ``labels``, ``range``, counts added over the blocks), and the row counts
    of the blocks with ``ExpectColumnSumToBeBetween`` (``rows``, ``confidence_rows``). The raw ``f*``
    columns are left out: the checks never use them."""
    import pandas as pd

    block_rows = block_rows or STREAM_BLOCK_ROWS
    pre = "python pre-check (streamed)"
    checks: list[DataCheck] = []
    shape = tuple(stream.feature_shape)
    if shape != a.shape:
        checks.append(DataCheck("shape", False, f"x: per-example shape {shape} but the task expects {a.shape}", pre))
    else:
        checks.append(DataCheck("shape", True, f"x ({stream.n}, {', '.join(map(str, shape))}) read in chunks from "
                                               f"{stream.name}, y ({stream.n},)", pre))
    checks.append(DataCheck("dtype", True, f"features {str(stream.dtype).replace('torch.', '')}, labels int64", pre))
    session = session_factory()
    gxe = session.gxe
    exps = _row_expectations(gxe, a)
    types = {k: type(e).__name__ for k, e in exps}
    bad: dict[str, int] = {k: 0 for k, _ in exps}
    failed: set[str] = set()  # checks GX failed on some block
    first: dict[str, str] = {}  # check -> where it first failed
    errors: dict[str, str] = {}
    blocks: list[int] = []
    pending: list[Any] = []
    held = row = 0
    lo, hi = a.value_range if a.value_range else (None, None)

    def run_block() -> None:
        nonlocal pending, held
        table = pd.concat(pending, ignore_index=True)
        start = row - len(table)
        try:  # (an expectation belongs to one suite: each block's are built afresh)
            res = session.run(f"{a.role}-{a.name}-rows{start}", table, _row_expectations(gxe, a))
        except Exception as exc:  # noqa: BLE001 — fail closed with the reason
            res = {}
            for k, _ in exps:
                errors.setdefault(k, f"Great Expectations run failed on rows {start}..{row - 1}: {type(exc).__name__}: "
                                     f"{exc}")
        for k, _ in exps:
            r = res.get(k)
            if k in errors:
                continue
            if r is None or _gx_failed(r):
                errors[k] = (f"Great Expectations raised while checking rows {start}..{row - 1}: {_gx_failed(r)}"
                             if r is not None else "Great Expectations returned no result for this expectation")
            elif not r.success:  # the verdict is GX's; the count only says how many rows
                failed.add(k)
                bad[k] += int(r.result.get("unexpected_count", 0))
        blocks.append(len(table))
        pending, held = [], 0

    for xb, yb in stream.chunks():
        flat = xb.reshape(len(xb), -1).numpy()
        yv = yb.numpy()
        finite, table = _aggregates(flat, yv)
        # where each check first fails, found while the chunk's features are still in memory
        if "finite" not in first and not finite.all():
            i, j = (int(v) for v in np.argwhere(~finite)[0])
            first["finite"] = f"first at row {row + i}: column f{j} = {flat[i, j]}"
        if "labels" not in first:
            out = np.flatnonzero(~np.isin(yv, a.classes))
            if len(out):
                first["labels"] = f"first at row {row + int(out[0])}: value {int(yv[out[0]])}"
        if a.value_range and "range" not in first:
            outside = finite & ((flat < lo) | (flat > hi))
            if outside.any():
                i, j = (int(v) for v in np.argwhere(outside)[0])
                first["range"] = f"first at row {row + i}: column f{j} = {flat[i, j]}"
        pending.append(table)
        held += len(table)
        row += len(table)
        if held >= block_rows:
            run_block()
    if pending:
        run_block()
    n = row
    d = math.prod(shape)

    def where(key: str) -> str:
        return f" ({first[key]})" if key in first else ""

    if "finite" in errors:
        checks.append(DataCheck("finite", False, errors["finite"], types["finite"]))
    else:
        ok = "finite" not in failed
        checks.append(DataCheck("finite", ok, _finite_detail(ok, n, d, bad["finite"], where("finite")), types["finite"]))
    if "labels" in errors:
        checks.append(DataCheck("labels", False, errors["labels"], types["labels"]))
    else:
        ok = "labels" not in failed
        checks.append(DataCheck("labels", ok, _labels_detail(ok, n, a.classes, bad["labels"], where("labels")),
                                types["labels"]))
    if a.value_range:
        typ = f"{types['range_low']} (x_min, x_max)"
        err = errors.get("range_low") or errors.get("range_high")
        if err:
            checks.append(DataCheck("range", False, err, typ))
        else:
            parts = [f"{side} {_fmt(v)} in {_rows(bad[k])}" for side, v, k in
                     (("below", lo, "range_low"), ("above", hi, "range_high")) if k in failed]
            checks.append(DataCheck("range", not parts, _range_detail(not parts, lo, hi, parts, where("range")), typ))
    # the row counts: a real expectation over the blocks' sizes
    need_conf = min_rows_for_confidence(a.confidence, a.target) if a.confidence is not None else None
    counts = [("rows", a.min_rows)] + ([("confidence_rows", need_conf)] if need_conf is not None else [])
    count_exps = [(k, gxe.ExpectColumnSumToBeBetween(column="rows", min_value=v, meta=_meta(k))) for k, v in counts]
    try:
        res, run_error = session.run(f"{a.role}-{a.name}-blocks", pd.DataFrame({"rows": blocks}), count_exps), None
    except Exception as exc:  # noqa: BLE001
        res, run_error = {}, f"Great Expectations run failed: {type(exc).__name__}: {exc}"
    for key, need in counts:
        typ = f"ExpectColumnSumToBeBetween (rows of {len(blocks)} streamed block(s))"
        r = res.get(key)
        err = run_error or (None if r is not None and not _gx_failed(r) else
                            f"Great Expectations raised while checking: {_gx_failed(r)}" if r is not None else
                            "Great Expectations returned no result for this expectation")
        if err:
            checks.append(DataCheck(key, False, err, typ))
        else:
            ok = bool(r.success)
            detail = _rows_detail(ok, n, need) if key == "rows" else _confidence_detail(ok, n, need, a)
            checks.append(DataCheck(key, ok, detail, typ))
    order = ["shape", "dtype", "rows", "finite", "labels", "range", "confidence_rows"]
    checks.sort(key=lambda c: order.index(c.name))
    return ValidationReport(a.name, a.role, all(c.success for c in checks), n, checks)


def validate_dataset(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    *,
    role: str,
    name: str,
    n_features: int | tuple,
    classes: Sequence[int],
    min_rows: int = 1,
    value_range: tuple[float, float] | None = None,
    confidence: float | None = None,
    target_lower_bound: float | None = None,
) -> ValidationReport:
    """Check one data set with a GX suite; never raises for bad *data* (the report says what's wrong).

    ``n_features``: the per-example shape — an int ``d`` means ``(d,)``, a tuple is matched exactly
    (MNIST images from ``examples.mnist.data.load_mnist``: ``(1, 28, 28)``). ``classes``: the
    task's label set. ``value_range``: inclusive bounds for every finite feature value.
    ``confidence`` + ``target_lower_bound`` (certification only): the set must have at least
    :func:`min_rows_for_confidence` rows. Bad *arguments* raise ``ValueError``.

    ``x`` may be a ``lid_engine.CertificationStream`` (``y`` None): read a chunk at a time, the same checks
    run on each row's aggregates a block at a time (``_validate_stream``).
    """
    a = _parse_args(
        role=role, name=name, n_features=n_features, classes=classes, min_rows=min_rows,
        value_range=value_range, confidence=confidence, target_lower_bound=target_lower_bound,
    )
    from components.data import _is_stream

    if _is_stream(x) and y is None:
        return _validate_stream(_GXSession, x, a)
    return _validate(_GXSession, x, y, a)


def validate_all(datasets: Mapping[str, tuple[Any, Any, dict]]) -> dict[str, ValidationReport]:
    """Validate several data sets in one GX context: ``{name: (x, y, kwargs)}`` → ``{name: report}``.

    ``kwargs`` are :func:`validate_dataset`'s keyword arguments (``role``, ``n_features``,
    ``classes``, …); the mapping key is the data set's name. All arguments are checked before any
    data set is validated.
    """
    parsed: dict[str, tuple[Any, Any, _Args]] = {}
    for key, item in datasets.items():
        try:
            x, y, kwargs = item
        except (TypeError, ValueError) as exc:
            raise ValueError(f"validate_all: {key!r} must map to (x, y, kwargs)") from exc
        kwargs = dict(kwargs)
        if kwargs.setdefault("name", key) != key:
            raise ValueError(f"validate_all: {key!r} has a different name={kwargs['name']!r} in its kwargs")
        parsed[key] = (x, y, _parse_args(**kwargs))
    session: list[_GXSession] = []

    def shared() -> _GXSession:  # built on first use: a batch of empty/broken sets never imports GX
        if not session:
            session.append(_GXSession())
        return session[0]

    from components.data import _is_stream

    return {key: _validate_stream(shared, x, a) if _is_stream(x) and y is None else _validate(shared, x, y, a)
            for key, (x, y, a) in parsed.items()}
