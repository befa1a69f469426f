"""The configuration file a team versions next to its code: schema, loader and errors.

One file (YAML, TOML or JSON) says everything lidgate needs to know about a team's model: how to
build it, which data certify it, what must hold (the specification), how to train it and where its
versions are registered. ``load_config`` reads and validates it, resolves relative paths against
the file's own folder (so the file works from any working directory), and returns a frozen
``LidgateConfig``. Every problem, from a YAML syntax error to a fraction out of range, is one
``ConfigError`` that names the file, the field path (``data.split.train``) and what was expected.

``LidgateConfig.to_dict()`` and ``sha256()`` give the configuration back as written (relative paths
stay relative, defaults filled in), so the digest does not depend on where the checkout lives; the
certificate and the registry record it to say which configuration produced a version.

This module must import fast (the CLI validates configurations before anything heavy): torch and
lid_engine are imported lazily, and only where a value must be checked against them.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    SerializationInfo,
    ValidationError,
    ValidationInfo,
    model_validator,
)

if TYPE_CHECKING:
    from lid_engine import SearchConfig

__all__ = [
    "CONFIG_SUFFIXES",
    "DATA_SUFFIXES",
    "FORMAT_VERSION",
    "ConfigError",
    "CertificationSection",
    "ConfigProblem",
    "DataSection",
    "ExportSection",
    "LidgateConfig",
    "LoaderSection",
    "MlflowModelRef",
    "ModelSection",
    "GroupConstraint",
    "RecallConstraint",
    "RegistrySection",
    "SearchSection",
    "SpecSection",
    "SplitSection",
    "TrainingSection",
    "load_config",
    "parse_config",
]

FORMAT_VERSION = 1
CONFIG_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}
# The data file formats lidgate reads (components/data.py); checked here too so that a typo in a
# file name is a configuration error before any data is touched.
DATA_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".npz": "npz"}
# Keyword arguments of lidgate's built-in training loop (components.training.builtin_fit) that a
# configuration may set; ``seed`` comes from ``training.seed``. A test keeps the two in step.
BUILTIN_TRAINING_KWARGS = {"epochs": "an integer ≥ 1", "batch_size": "an integer ≥ 1",
                           "lr": "a number > 0", "progress": "true or false"}
# SearchConfig fields that have their own key in the ``search`` section (or are internal).
_SEARCH_OWN_KEYS = {"iterations": "search.iterations", "checkpoints": "search.checkpoints",
                    "batch_size": "search.batch_size", "method": "search.bound"}
_SEARCH_INTERNAL = {"history"}
_OPTIONAL_SECTIONS = ("training", "search", "registry", "export", "signing", "certification")


# ------------------------------------------------------------------------------------ errors
class ConfigProblem(NamedTuple):
    """One problem in a configuration: the dotted field path ('' for the whole file) and what is wrong."""

    field: str
    message: str


class ConfigError(ValueError):
    """A configuration file (or mapping) that cannot be used.

    The message is one paragraph naming the file, each offending field path and what was expected.
    ``problems`` lists them as ``ConfigProblem(field, message)``; ``field`` is the first one's path.
    """

    def __init__(self, file: str | Path | None, problems: Sequence[ConfigProblem]):
        self.file = Path(file) if file is not None else None
        self.problems = list(problems)
        self.field = self.problems[0].field if self.problems else ""
        where = f"configuration {self.file}" if self.file is not None else "configuration"
        parts = [f"{p.field}: {p.message}" if p.field else p.message for p in self.problems]
        if len(parts) == 1:
            text = f"{where}: {parts[0]}"
        else:
            text = f"{where} has {len(parts)} problems: " + "; ".join(f"({i}) {p}" for i, p in enumerate(parts, 1))
        super().__init__(text if text.endswith((".", "?")) else text + ".")


class _Invalid(ValueError):
    """Raised inside validators: what was expected, what was found, and where below the current field."""

    def __init__(self, expected: str, got: Any = ..., *, at: Sequence[str | int] = (), message: str | None = None):
        self.at = tuple(at)
        if message is None:
            message = f"expected {expected}" + ("" if got is ... else f", got {_show(got)}")
        self.message = message
        super().__init__(message)


def _show(value: Any) -> str:
    """A value as the author wrote it in YAML/JSON terms, cut short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError):
        text = f"{type(value).__name__} {value!s}"
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------- field validators
def _number_in(lo: float | None, hi: float | None, *, lo_open: bool = False, hi_open: bool = False):
    """A float field constrained to an interval, with the interval spelt out in the error."""
    if lo is not None and hi is not None:
        text = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        text = f"a number {'>' if lo_open else '≥'} {lo:g}"
    else:
        text = "a finite number"

    def check(v: float) -> float:
        ok = math.isfinite(v)
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v < hi if hi_open else v <= hi
        if not ok:
            raise _Invalid(text, v)
        return float(v)

    return AfterValidator(check)


def _int_at_least(lo: int):
    def check(v: int) -> int:
        if v < lo:
            raise _Invalid(f"an integer ≥ {lo}", v)
        return v

    return AfterValidator(check)


def _pattern(regex: str, text: str, max_len: int = 100):
    compiled = re.compile(regex)

    def check(v: str) -> str:
        if not 1 <= len(v) <= max_len or not compiled.fullmatch(v):
            raise _Invalid(text, v)
        return v

    return AfterValidator(check)


_REF_RE = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*"


def _jsonable(v: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments must survive canonical JSON (they enter the configuration's digest)."""

    def walk(x: Any, at: tuple[str | int, ...]) -> None:
        if x is None or isinstance(x, (str, bool, int)):
            return
        if isinstance(x, float):
            if not math.isfinite(x):
                raise _Invalid("a finite number", x, at=at)
            return
        if isinstance(x, list):
            for i, item in enumerate(x):
                walk(item, at + (i,))
            return
        if isinstance(x, dict):
            for k, item in x.items():
                if not isinstance(k, str):
                    raise _Invalid("string keys", k, at=at)
                walk(item, at + (k,))
            return
        raise _Invalid("a JSON value (string, number, true/false, null, list or mapping)", x, at=at)

    walk(v, ())
    return v


def _path_in(v: Any) -> Any:
    if isinstance(v, Path):
        return v
    if not isinstance(v, str) or not v.strip():
        raise _Invalid("a path (a non-empty string)", v)
    return Path(v).expanduser()


def _resolve(p: Path, info: ValidationInfo) -> Path:
    # Relative paths are relative to the configuration file's folder, not to the working
    # directory: the file is versioned next to the code and data it names. Not normalised (no
    # resolve()), so to_dict() can give back exactly what was written.
    base = (info.context or {}).get("base_dir") if isinstance(info.context, dict) else None
    return p if p.is_absolute() or base is None else Path(base) / p


def _path_out(p: Path, info: SerializationInfo) -> str:
    base = (info.context or {}).get("base_dir") if isinstance(info.context, dict) else None
    if base is not None:
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            pass
    return p.as_posix()


def _data_file(p: Path) -> Path:
    if p.suffix.lower() not in DATA_SUFFIXES:
        raise _Invalid(f"a data file ending in {', '.join(DATA_SUFFIXES)}", p.as_posix())
    return p


def _weights_file(p: Path) -> Path:
    if p.suffix.lower() != ".safetensors":
        raise _Invalid("a .safetensors file (pickled weights are not loaded)", p.as_posix())
    return p


def _version_in(v: Any) -> Any:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return str(v)
    if isinstance(v, str) and re.fullmatch(r"[1-9][0-9]*", v):
        return v
    raise _Invalid('a registered version number such as "3"', v)


def _distinct(text: str):
    def check(v: list) -> list:
        if len(set(v)) != len(v):
            raise _Invalid(text, v)
        return v

    return AfterValidator(check)


def _pair(v: list[float]) -> list[float]:
    if len(v) != 2 or not all(math.isfinite(x) for x in v) or v[0] > v[1]:
        raise _Invalid("[low, high] with finite low ≤ high", v)
    return [float(x) for x in v]


ConfigPath = Annotated[Path, BeforeValidator(_path_in), AfterValidator(_resolve), PlainSerializer(_path_out)]
DataFile = Annotated[Path, BeforeValidator(_path_in), AfterValidator(_data_file), AfterValidator(_resolve),
                     PlainSerializer(_path_out)]
WeightsFile = Annotated[Path, BeforeValidator(_path_in), AfterValidator(_weights_file), AfterValidator(_resolve),
                        PlainSerializer(_path_out)]
Ref = Annotated[str, _pattern(_REF_RE, 'a reference "package.module:callable"', max_len=500)]
# ``kwargs:`` with nothing under it is YAML's null: read as "no arguments".
Kwargs = Annotated[dict[str, Any], BeforeValidator(lambda v: {} if v is None else v), AfterValidator(_jsonable)]
ModelName = Annotated[str, _pattern(r"[A-Za-z0-9_.-]+", "1-100 characters from A-Z a-z 0-9 _ . -")]
Alias = Annotated[str, _pattern(r"[A-Za-z0-9_-]+", "an alias of 1-100 characters from A-Z a-z 0-9 _ -")]
Version = Annotated[str, BeforeValidator(_version_in)]
Fraction = Annotated[float, _number_in(0.0, 1.0, lo_open=True, hi_open=True)]
Probability = Annotated[float, _number_in(0.0, 1.0)]
Seed = Annotated[int, _int_at_least(0)]
Positive = Annotated[int, _int_at_least(1)]
Column = Annotated[str, _pattern(r".+", "a column name (a non-empty string)", max_len=1000)]


def _only_one(obj: BaseModel, names: Sequence[str], what: str) -> str | None:
    given = [n for n in names if getattr(obj, n) is not None]
    if len(given) != 1:
        got = "none of them" if not given else " and ".join(given)
        raise _Invalid(f"exactly one of {what}", message=f"expected exactly one of {what}, got {got}")
    return given[0]


# --------------------------------------------------------------------------------- sections
class _Section(BaseModel):
    # strict: no silent coercion ("1.5" is not a number, true is not 1); frozen: the digest
    # computed from a loaded configuration stays the configuration's digest.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class MlflowModelRef(_Section):
    """A model version already in an MLflow registry: ``name`` plus ``version`` or ``alias``."""

    name: ModelName
    version: Version | None = None
    alias: Alias | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> MlflowModelRef:
        _only_one(self, ("version", "alias"), "version or alias")
        return self


class ModelSection(_Section):
    """How the model is built: a factory callable, or a version already registered in MLflow."""

    factory: Ref | None = None
    kwargs: Kwargs = Field(default_factory=dict)
    mlflow: MlflowModelRef | None = None
    weights: WeightsFile | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        _only_one(self, ("factory", "mlflow"), "model.factory or model.mlflow")
        if self.mlflow is not None and self.kwargs:
            raise _Invalid("", at=("kwargs",), message="applies to model.factory only; remove it or use a factory")
        if self.mlflow is not None and self.weights is not None:
            raise _Invalid("", at=("weights",),
                           message="applies to model.factory only; a model from MLflow brings its own weights")
        return self


class SplitSection(_Section):
    """Fractions of one data set given to each split, and the seed of the random assignment."""

    train: Fraction = 0.6
    search: Fraction = 0.2
    certification: Fraction = 0.2
    seed: Seed = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitSection:
        total = self.train + self.search + self.certification
        if abs(total - 1.0) > 1e-9:
            raise _Invalid("", message=f"expected train + search + certification to sum to 1, got {total:.12g}")
        return self

    def fractions(self) -> dict[str, float]:
        """``{"train": …, "search": …, "certification": …}``."""
        return {"train": self.train, "search": self.search, "certification": self.certification}


class LoaderSection(_Section):
    """A team's data-loading function, called with ``kwargs``."""

    function: Ref
    kwargs: Kwargs = Field(default_factory=dict)


class DataSection(_Section):
    """The task the first version is certified on, in exactly one of three forms (``form``).

    * ``"files"``: ``train``, ``search`` and ``certification`` files (all three);
    * ``"source"``: one ``source`` file cut by the seeded ``split``;
    * ``"loader"``: a ``loader`` function (its ``(x, y)`` or Dataset result is cut by ``split``).

    ``features`` (default: every column but the label) and ``label`` apply to Parquet/CSV files;
    ``.npz`` files hold arrays ``x`` and ``y``. ``group`` names the column (Parquet/CSV) or array (.npz)
    that holds each row's group, for ``spec.worst_group``; it is not a feature. ``shape`` reshapes each row; ``classes`` are the
    expected class ids (default: those present); ``value_range`` is for data validation.
    ``split`` is filled in (0.6/0.2/0.2, seed 0) for the source and loader forms, None otherwise.
    """

    task: Annotated[str, _pattern(r"[A-Za-z0-9_.-]+",
                                  "a task name of 1-100 characters from A-Z a-z 0-9 _ . -")] = "task"
    train: DataFile | None = None
    search: DataFile | None = None
    certification: DataFile | None = None
    source: DataFile | None = None
    split: SplitSection | None = None
    loader: LoaderSection | None = None
    features: Annotated[list[Column], Field(min_length=1), _distinct("distinct column names")] | None = None
    label: Column = "label"
    group: Column | None = None
    shape: Annotated[list[Positive], Field(min_length=1)] | None = None
    classes: Annotated[list[Seed], Field(min_length=1), _distinct("distinct class ids")] | None = None
    value_range: Annotated[list[float], AfterValidator(_pair)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_split(cls, data: Any) -> Any:
        # The split only exists for the forms that need one; filled in here so to_dict() shows it.
        if isinstance(data, dict) and ("source" in data or "loader" in data) and data.get("split") is None:
            data = {**data, "split": {}}
        return data

    @model_validator(mode="after")
    def _one_form(self) -> DataSection:
        forms = {"files": [n for n in ("train", "search", "certification") if getattr(self, n) is not None],
                 "source": ["source"] if self.source is not None else [],
                 "loader": ["loader"] if self.loader is not None else []}
        present = [f for f, keys in forms.items() if keys]
        if len(present) != 1:
            got = "none of them" if not present else " and ".join("+".join(forms[f]) for f in present)
            raise _Invalid("", message="expected exactly one data form: (a) train + search + certification files, "
                                       f"(b) source (with split) or (c) loader, got {got}")
        if present == ["files"]:
            for name in ("train", "search", "certification"):
                if getattr(self, name) is None:
                    raise _Invalid("", at=(name,), message="missing: the files form needs train, search and "
                                                           "certification files")
            if self.split is not None:
                raise _Invalid("", at=("split",), message="applies to data.source or data.loader; the files form "
                                                          "names its splits itself")
        if self.loader is not None:
            for name in ("features", "label", "group"):
                if name in self.model_fields_set:
                    raise _Invalid("", at=(name,), message="applies to data files; a data.loader function "
                                                           "returns features, labels and groups itself")
        if self.features is not None and self.label in self.features:
            raise _Invalid("", at=("features",), message=f"must not include the label column {self.label!r}")
        if self.group is not None and (self.group == self.label or self.group in (self.features or [])):
            raise _Invalid("", at=("group",), message=f"{self.group!r} is the label or a feature column; expected "
                                                      "a column of its own")
        return self

    @property
    def form(self) -> Literal["files", "source", "loader"]:
        """Which of the three forms this section uses."""
        return "files" if self.train is not None else "source" if self.source is not None else "loader"


def _threshold(fixed: float | None, delta: float | None, metric: float | None, what: str, key: str) -> float:
    """τ given, or the paper's rule τ = max(m − Δ, m/2) from the model's own metric ``m`` on the search split."""
    if fixed is not None:
        return fixed
    if metric is None or not 0.0 <= metric <= 1.0:
        raise ValueError(f"{key} needs the {what} on the search split in [0, 1], got {metric!r}")
    from lid_engine import tau_from_accuracy  # lazy: torch

    assert delta is not None  # the section's _one_threshold
    return tau_from_accuracy(metric, delta)


class RecallConstraint(_Section):
    """The recall of one class (its accuracy on the examples of that class) must reach τ_k, for every
    model in the LID: ``tau`` fixed, or ``tau_from_recall`` below the model's own recall on the search
    split (τ_k = max(r − Δ, r/2)). Written ``{class: 0, tau: 0.8}``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, serialize_by_alias=True)

    cls: Seed = Field(alias="class")
    tau: Probability | None = None
    tau_from_recall: Probability | None = None

    @model_validator(mode="after")
    def _one_threshold(self) -> RecallConstraint:
        _only_one(self, ("tau", "tau_from_recall"), "tau or tau_from_recall")
        return self

    def threshold(self, recall: float | None = None) -> float:
        """τ_k from ``recall`` (the model's recall of the class on the search split) when relative."""
        return _threshold(self.tau, self.tau_from_recall, recall, f"recall of class {self.cls}",
                          "spec.recall.tau_from_recall")


class GroupConstraint(_Section):
    """The worst group's accuracy must reach τ_g, for every model in the LID: every group of the data's
    group column (``data.group``, or the group a loader returns) is one constraint. ``tau`` fixed, or
    ``tau_from_accuracy`` below the model's own accuracy on that group's search examples."""

    tau: Probability | None = None
    tau_from_accuracy: Probability | None = None
    min_examples: Positive = 30

    @model_validator(mode="after")
    def _one_threshold(self) -> GroupConstraint:
        _only_one(self, ("tau", "tau_from_accuracy"), "tau or tau_from_accuracy")
        return self

    def threshold(self, accuracy: float | None = None) -> float:
        """τ_g (from ``accuracy``, the model's accuracy on the group's search examples, when relative)."""
        return _threshold(self.tau, self.tau_from_accuracy, accuracy, "group's accuracy",
                          "spec.worst_group.tau_from_accuracy")


class SpecSection(_Section):
    """What must hold: the metric, its threshold τ (fixed or from accuracy) and the confidence, plus
    optional further constraints that must hold at the same time: the recall of chosen classes
    (``recall``) and the worst group's accuracy (``worst_group``). Each is its own constraint in the LID
    search and its own certificate; together they hold with probability ≥ ``confidence`` (the
    confidence is split over the constraints by a union bound)."""

    metric: Literal["accuracy", "balanced_accuracy"] = "accuracy"
    tau: Probability | None = None
    tau_from_accuracy: Probability | None = None
    confidence: Fraction = 0.95
    recall: list[RecallConstraint] = Field(default_factory=list)
    worst_group: GroupConstraint | None = None

    @model_validator(mode="after")
    def _one_threshold(self) -> SpecSection:
        _only_one(self, ("tau", "tau_from_accuracy"), "spec.tau or spec.tau_from_accuracy")
        classes = [r.cls for r in self.recall]
        for i, c in enumerate(classes):
            if c in classes[:i]:
                raise _Invalid("", at=("recall", i, "class"), message=f"class {c} appears twice; expected one "
                                                                       "recall constraint per class")
        return self

    def threshold(self, accuracy: float | None = None) -> float:
        """τ: ``tau`` as given, or the paper's rule τ = max(acc − Δ, acc/2) from ``accuracy``.

        Args:
            accuracy: the model's metric on the search split; needed with ``tau_from_accuracy``.

        Returns:
            The threshold τ.

        Raises:
            ValueError: ``tau_from_accuracy`` is set and ``accuracy`` is missing or outside [0, 1].
        """
        return _threshold(self.tau, self.tau_from_accuracy, accuracy, "accuracy", "spec.tau_from_accuracy")


class TrainingSection(_Section):
    """The training function (``None``: lidgate's built-in loop), its arguments and projection strategy."""

    function: Ref | None = None
    kwargs: Kwargs = Field(default_factory=dict)
    strategy: Literal["closest", "sample_largest_closest", "best_loss"] = "sample_largest_closest"
    seed: Seed = 0

    @model_validator(mode="after")
    def _builtin_kwargs(self) -> TrainingSection:
        if self.function is not None:
            return self  # a team's function: its signature is checked when it is imported
        for key, value in self.kwargs.items():
            if key == "seed":
                raise _Invalid("", at=("kwargs", key), message="set training.seed instead")
            if key not in BUILTIN_TRAINING_KWARGS:
                raise _Invalid("", at=("kwargs", key), message=_unknown_key_text(
                    key, BUILTIN_TRAINING_KWARGS,
                    owner=" (lidgate's built-in training loop: training.function is null)"))
            ok = {"epochs": _is_int(value) and value >= 1, "batch_size": _is_int(value) and value >= 1,
                  "lr": _is_number(value) and value > 0, "progress": isinstance(value, bool)}[key]
            if not ok:
                raise _Invalid(BUILTIN_TRAINING_KWARGS[key], value, at=("kwargs", key))
        return self


class SearchSection(_Section):
    """The LID search: size, bound, lookahead biasing and further ``lid_engine.SearchConfig`` fields."""

    iterations: Positive = 200
    checkpoints: Positive = 10
    batch_size: Positive = 500
    bound: Literal["ibp", "linear"] = "ibp"
    biasing: Literal["fisher", "si", "none"] = "fisher"
    frozen_fraction: Annotated[float, _number_in(0.0, 1.0, hi_open=True)] = 0.8
    options: Kwargs = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> SearchSection:
        if self.checkpoints > self.iterations:
            raise _Invalid("", at=("checkpoints",),
                           message=f"expected at most search.iterations ({self.iterations}), got {self.checkpoints}")
        if self.options:
            _check_search_options(self)
        return self

    def search_config(self) -> SearchConfig:
        """The ``lid_engine.SearchConfig`` this section describes (imports lid_engine, hence torch)."""
        from lid_engine import SearchConfig

        options = {k: tuple(v) if isinstance(v, list) else v for k, v in self.options.items()}
        return SearchConfig(iterations=self.iterations, checkpoints=self.checkpoints, batch_size=self.batch_size,
                            method=self.bound, **options)


def _check_search_options(section: SearchSection) -> None:
    """Names and types of ``search.options`` against SearchConfig's fields, then SearchConfig.validate().

    Imports lid_engine (and torch) only when options are given: the common configuration stays fast.
    """
    from lid_engine import SearchConfig
    from lid_engine.errors import LidError

    fields = {f.name: f for f in dataclasses.fields(SearchConfig)}
    allowed = sorted(n for n in fields if n not in _SEARCH_OWN_KEYS and n not in _SEARCH_INTERNAL)
    for key, value in section.options.items():
        if key in _SEARCH_OWN_KEYS:
            raise _Invalid("", at=("options", key), message=f"set {_SEARCH_OWN_KEYS[key]} instead")
        if key not in allowed:
            raise _Invalid("", at=("options", key),
                           message=_unknown_key_text(key, allowed, owner=" (not a lid_engine.SearchConfig field)"))
        default = fields[key].default
        expected = ("an integer" if _is_int(default) else "a number" if isinstance(default, float)
                    else "a list of two numbers" if isinstance(default, tuple) else None)
        ok = (expected is None or (expected == "an integer" and _is_int(value))
              or (expected == "a number" and _is_number(value))
              or (expected.startswith("a list") and isinstance(value, list) and len(value) == 2
                  and all(_is_number(v) for v in value)))
        if not ok:
            raise _Invalid(expected or "", value, at=("options", key))
    try:
        section.search_config().validate()
    except LidError as exc:  # "compute_lid: invalid 'alpha' = 2.0": point at the option
        name = re.search(r"'(\w+)'", str(exc))
        at = ("options", name.group(1)) if name and name.group(1) in section.options else ("options",)
        raise _Invalid("", at=at, message=f"rejected by lid_engine.SearchConfig: {exc}") from None
    except TypeError as exc:
        raise _Invalid("", at=("options",), message=f"rejected by lid_engine.SearchConfig: {exc}") from None


class RegistrySection(_Section):
    """Where versions are registered. ``None`` means the entry point's default (environment or home).

    URIs are handed to MLflow unchanged; only ``home`` is a path (relative to the configuration file).
    """

    tracking_uri: str | None = None
    registry_uri: str | None = None
    artifact_location: str | None = None
    home: ConfigPath | None = None


class ExportSection(_Section):
    """What is exported when a version is promoted."""

    onnx: bool = True


class SigningSection(_Section):
    """Signed certificates (``components.signing``). ``private_key``: the Ed25519 key the certify
    worker signs each certificate with (PEM; keep it on that machine). ``public_keys``: the keys the
    gate trusts; when any is listed, a candidate whose certificate is unsigned, signed by another key,
    or signed over other artifacts is blocked (``signature_invalid``)."""

    private_key: ConfigPath | None = None
    public_keys: list[ConfigPath] = Field(default_factory=list)


class CertificationSection(_Section):
    """How the certified counts are computed beyond one process (``flows.shards``). The certificate is
    the same either way: shards and chunks add up exactly to one pass.

    ``shards``: pieces of the certification set counted in parallel on Dask through Prefect's Dask
    task runner (1: in-process, no cluster). ``workers``: size of the local cluster (default: the
    smaller of ``shards`` and the CPU count). ``processes``: process workers (default: only when a
    Prefect server is configured; without one every process worker would start its own temporary
    server), else threads. ``scheduler``: the address of an existing Dask scheduler
    (``tcp://host:8786``) instead of a local cluster. ``batch_size``: rows per bound pass when certifying (shards start at multiples
    of it, so it also caps how finely a small certification set can be sharded).

    ``memory_mb``: stream the certification set instead of loading it whole, holding at most about this
    many MiB of its features at a time (``components.streaming``): a Parquet ``data.certification`` file
    (files form) is read by row groups, and a ``data.loader`` that returns its certification split as a
    ``torch.utils.data.DataLoader`` is read batch by batch into a file. Stored versions' certification
    data larger than this are read back as streams too. Not with the source form, ``data.group``,
    ``spec.recall`` or ``spec.worst_group`` (those select rows of the set in memory)."""

    shards: Positive = 1
    workers: Positive | None = None
    processes: bool | None = None
    scheduler: Annotated[str, _pattern(r"(tcp|tls|inproc|ucx)://\S+", "a Dask scheduler address such as tcp://host:8786",
                                       max_len=500)] | None = None
    batch_size: Positive = 2048
    memory_mb: Positive | None = None


class LidgateConfig(_Section):
    """A validated configuration file. Build it with ``load_config`` (or ``parse_config``).

    Attributes:
        version: the format version (1).
        name: the registered model name in MLflow.
        code: directories put on ``sys.path`` to import ``module:attr`` references from.
        model: ``ModelSection`` (factory + kwargs + optional weights, or an MLflow version).
        data: ``DataSection`` (the first task's data).
        spec: ``SpecSection`` (metric, τ, confidence).
        training: ``TrainingSection`` (function, kwargs, projection strategy, seed).
        search: ``SearchSection`` (the LID search).
        registry: ``RegistrySection`` (None values: the entry point's defaults).
        export: ``ExportSection``.
        signing: ``SigningSection`` (signing key of the certify worker, keys the gate trusts).
        certification: ``CertificationSection`` (counts sharded on Dask).

    Paths are absolute (relative ones were resolved against ``base_dir``, the file's folder), except
    on a configuration built directly in Python, where they stay as given and ``base_dir`` is the
    current working directory.
    """

    version: int
    name: ModelName
    code: list[ConfigPath] = Field(default_factory=lambda: ["."], validate_default=True)
    model: ModelSection
    data: DataSection
    spec: SpecSection
    training: TrainingSection = Field(default_factory=TrainingSection)
    search: SearchSection = Field(default_factory=SearchSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    export: ExportSection = Field(default_factory=ExportSection)
    signing: SigningSection = Field(default_factory=SigningSection)
    certification: CertificationSection = Field(default_factory=CertificationSection)

    _base_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # ``training:`` with every key commented out is YAML's null: it means "all defaults".
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in _OPTIONAL_SECTIONS and v is None)}
        return data

    @model_validator(mode="after")
    def _known_version(self) -> LidgateConfig:
        if self.version != FORMAT_VERSION:
            raise _Invalid(f"{FORMAT_VERSION} (the only configuration format version)", self.version, at=("version",))
        if self.data.classes is not None:
            for i, r in enumerate(self.spec.recall):
                if r.cls not in self.data.classes:
                    raise _Invalid("", at=("spec", "recall", i, "class"),
                                   message=f"class {r.cls} is not one of data.classes {sorted(self.data.classes)}")
        if self.certification.memory_mb is not None:
            self._check_streamable()
        return self

    def _check_streamable(self) -> None:
        """``certification.memory_mb`` streams the certification set: only sources that can be read in
        pieces, and no constraint that selects rows of it in memory."""
        at = ("certification", "memory_mb")
        d = self.data
        if d.form == "source":
            raise _Invalid("", at=at, message="a streamed certification set comes from a Parquet data.certification "
                                              "file or a data.loader that returns a DataLoader; the source form splits "
                                              "one file in memory (remove memory_mb, or give the three files)")
        if d.form == "files" and d.certification is not None \
                and DATA_SUFFIXES.get(d.certification.suffix.lower()) != "parquet":
            raise _Invalid("", at=at, message=f"a streamed data.certification file is read by Parquet row groups; "
                                              f"{d.certification.name} is not a Parquet file (convert it, or remove "
                                              "memory_mb)")
        for used, name in ((d.group is not None, "data.group"), (bool(self.spec.recall), "spec.recall"),
                           (self.spec.worst_group is not None, "spec.worst_group")):
            if used:
                raise _Invalid("", at=at, message=f"{name} selects rows of the certification set in memory, so it "
                                                  "cannot be streamed; remove memory_mb or the constraint")

    def model_post_init(self, context: Any, /) -> None:
        base = context.get("base_dir") if isinstance(context, dict) else None
        self._base_dir = Path(base) if base is not None else None

    @property
    def base_dir(self) -> Path:
        """The folder relative paths were resolved against (the configuration file's folder)."""
        return self._base_dir if self._base_dir is not None else Path.cwd()

    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-able data: every key with its default filled in, paths as written
        (relative to ``base_dir`` when they lie below it), so it is stable across checkouts."""
        context = {"base_dir": self._base_dir} if self._base_dir is not None else None
        out = self.model_dump(mode="json", context=context)
        # The optional constraints appear only when set: configurations written before they existed keep
        # their digest (registered versions record it).
        for section, key, empty in (("spec", "recall", []), ("spec", "worst_group", None), ("data", "group", None)):
            if out[section].get(key) == empty:
                del out[section][key]
        if out["certification"] == CertificationSection().model_dump(mode="json"):
            del out["certification"]
        return out

    def canonical_json(self) -> str:
        """``to_dict()`` as canonical JSON: sorted keys, no whitespace, ASCII only — without the
        ``certification`` section: where the counts are computed (in how many shards, on which cluster)
        gives the same certificate, and the rows per bound pass at most which sound rounding a borderline
        example gets; none of it is what produced a version."""
        out = self.to_dict()
        out.pop("certification", None)
        return json.dumps(out, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)

    def sha256(self) -> str:
        """sha256 (hex) of ``canonical_json()``: which configuration produced a version."""
        return hashlib.sha256(self.canonical_json().encode("ascii")).hexdigest()


# ------------------------------------------------------------------------------- loading
def load_config(path: str | Path) -> LidgateConfig:
    """Read, validate and resolve a configuration file.

    Args:
        path: a ``.yaml``/``.yml``, ``.toml`` or ``.json`` file.

    Returns:
        The validated configuration; relative paths resolved against the file's folder, which is
        kept as ``config.base_dir``.

    Raises:
        ConfigError: the file is missing, unreadable, not valid YAML/TOML/JSON, or does not follow
            the schema; the message names the file, the field path and what was expected.
    """
    file = Path(path)
    kind = CONFIG_SUFFIXES.get(file.suffix.lower())
    if kind is None:
        raise ConfigError(file, [ConfigProblem("", f"expected a file ending in {', '.join(CONFIG_SUFFIXES)}, "
                                                   f"got {file.suffix or 'no extension'!r}")])
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(file, [ConfigProblem("", "no such file")]) from None
    except OSError as exc:
        raise ConfigError(file, [ConfigProblem("", f"cannot be read ({exc.strerror or exc})")]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(file, [ConfigProblem("", f"is not UTF-8 text (byte {exc.start})")]) from None
    data = _PARSERS[kind](text, file)
    return parse_config(data, base_dir=file.resolve().parent, file=file)


def parse_config(data: Any, *, base_dir: str | Path | None = None, file: str | Path | None = None) -> LidgateConfig:
    """Validate configuration data already parsed into Python objects.

    Args:
        data: the document (a mapping) as YAML/TOML/JSON parsers return it.
        base_dir: the folder relative paths are resolved against; ``None`` keeps them as given.
        file: the file the data came from, named in error messages.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: ``data`` does not follow the schema.
    """
    if not isinstance(data, dict):
        raise ConfigError(file, [ConfigProblem("", "expected a mapping of sections at the top level, "
                                                   f"got {_show(data)}")])
    version = data.get("version", ...)
    if version is ...:  # checked first: a file in another format would otherwise report every key
        raise ConfigError(file, [ConfigProblem("version", f"missing: the format version ({FORMAT_VERSION}) "
                                                          "is required")])
    if not (_is_int(version) and version == FORMAT_VERSION):
        raise ConfigError(file, [ConfigProblem("version", f"expected {FORMAT_VERSION} (the only configuration "
                                                          f"format version), got {_show(version)}")])
    base = Path(base_dir).resolve() if base_dir is not None else None
    try:
        return LidgateConfig.model_validate(data, context={"base_dir": base} if base is not None else None)
    except ValidationError as exc:
        raise ConfigError(file, [_problem(e) for e in exc.errors(include_url=False)]) from None


def _parse_yaml(text: str, file: Path) -> Any:
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 — _YamlLoader is a SafeLoader
    except _DuplicateKey as exc:
        raise ConfigError(file, [ConfigProblem(exc.field, exc.message)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(file, [ConfigProblem("", f"is not valid YAML{where}: {problem}")]) from None


def _parse_toml(text: str, file: Path) -> Any:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, [ConfigProblem("", f"is not valid TOML: {exc}")]) from None


def _parse_json(text: str, file: Path) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise _DuplicateKey(k, "")
            out[k] = v
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except _DuplicateKey as exc:
        raise ConfigError(file, [ConfigProblem("", f"key {exc.key!r} appears twice in one mapping")]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(file, [ConfigProblem("", f"is not valid JSON at line {exc.lineno}, column {exc.colno}: "
                                                   f"{exc.msg}")]) from None


_PARSERS: dict[str, Callable[[str, Path], Any]] = {"yaml": _parse_yaml, "toml": _parse_toml, "json": _parse_json}


class _DuplicateKey(Exception):
    def __init__(self, key: str, where: str):
        self.key = key
        self.field = ""
        self.message = f"key {key!r} appears twice in one mapping{where}"
        super().__init__(self.message)


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a number (YAML 1.2) and refuses duplicate keys.

    PyYAML follows YAML 1.1, where ``lr: 1e-3`` is the *string* "1e-3" and a repeated key silently
    wins; both would reach a team's training function unnoticed.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<' merges are resolved by SafeLoader itself
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys are reported by SafeLoader
            if key in seen:
                raise _DuplicateKey(str(key), f" (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


# ------------------------------------------------------------------------ error conversion
_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
    "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys", "int_from_float": "an integer", "finite_number": "a finite number",
    "none_required": "null",
}


def _problem(error: Mapping[str, Any]) -> ConfigProblem:
    """One pydantic error as a ConfigProblem: the dotted path plus 'expected …, got …'."""
    loc = list(error.get("loc", ()))
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    got = error.get("input", ...)
    cause = ctx.get("error")
    if isinstance(cause, _Invalid):
        return ConfigProblem(_dotted(loc + list(cause.at)), cause.message)
    if loc and loc[-1] == "[key]":
        return ConfigProblem(_dotted(loc[:-2]), f"expected string keys, got {_show(loc[-2])}")
    if kind == "missing":
        return ConfigProblem(_dotted(loc), "required key is missing")
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        return ConfigProblem(_dotted(loc), _unknown_key_text(str(loc[-1]), allowed))
    if kind == "literal_error":
        expected = f"one of {ctx.get('expected', '')}"
    elif kind in ("too_short", "too_long"):
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        expected = f"a list of {'at least' if kind == 'too_short' else 'at most'} {bound} item(s)"
    elif kind in _EXPECTED:
        expected = _EXPECTED[kind]
    else:
        message = str(error.get("msg", kind))
        expected = message[0].lower() + message[1:] if message else kind
    return ConfigProblem(_dotted(loc), f"expected {expected}" + ("" if got is ... else f", got {_show(got)}"))


def _dotted(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _fields_at(loc: Sequence[Any]) -> list[str]:
    """The keys allowed in the section at ``loc`` (walking the schema by field names)."""
    model: type[BaseModel] = LidgateConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        inner = _model_in(field.annotation) if field is not None else None
        if inner is None:
            return []
        model = inner
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _unknown_key_text(key: str, allowed: Sequence[str] | Mapping[str, Any], owner: str = "") -> str:
    names = sorted(allowed)
    text = f"unknown key {key!r}{owner}; allowed keys: {', '.join(names) if names else 'none'}"
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return text + (f"; did you mean {close[0]!r}?" if close else "")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
