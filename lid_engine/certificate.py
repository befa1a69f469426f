"""Certificates: what an auditor can re-check about one domain on one task.

A ``Certificate`` records a *deterministic* claim and a *statistical* one:

* **On the certification set** (deterministic): ``certified`` of the ``n`` examples are classified
  correctly by *every* parameter vector in the domain (sound IBP or linear margin bounds, as
  ``bound_method`` says — a traced graph's linear bound lists the ops it crossed with IBP intervals
  in ``linear_fallbacks``; floating-point rounding included). So every θ' in the domain has accuracy ≥ ``certified_accuracy`` on that set
  (balanced accuracy for ``kind == "balanced_accuracy"``).
* **On the population** (finite-sample, one-sided Clopper–Pearson): if the ``n`` certification
  examples are i.i.d. draws from the deployment distribution and were not used to choose the
  domain, then with probability ≥ ``confidence`` over that draw, every θ' in the domain has
  population (balanced) accuracy ≥ ``lower_bound``, *simultaneously for all ``n_domains`` domains
  certified on this data* (Bonferroni union bound):

  - accuracy: ``lower_bound = CP_lower(certified, n, α / n_domains)`` with ``α = 1 − confidence``;
  - balanced accuracy: with ``C`` the classes present in the certification set,
    ``lower_bound = mean_c CP_lower(certified_c, n_c, α / (n_domains · C))``: the union bound over
    the ``n_domains · C`` per-class recall bounds makes all of them hold at once with probability
    ≥ 1 − α, and the balanced accuracy is their mean. (Conditional on the class counts, the examples
    of class c are i.i.d. from P(x | y = c), so each per-class bound is a valid CP bound.) The claim
    is about the classes present in the certification set.

``n_domains`` must count *every* domain that was certified on the same data and could have been
reported, including ones discarded afterwards because their certificate was too low — otherwise
the selection would invalidate the union bound. ``LID.subset`` keeps the original count.

**Floating point.** Both bounds in certification mode enclose the exact real-number outputs *and*
any floating-point forward pass carried out in the arithmetic of the bound computation (``dtype``). A
float32 model certified with ``dtype=float64`` would therefore not be covered when it runs in its own
float32 arithmetic (a 1e-8 logit margin certified in float64 can vanish in a float32 forward). So an
example counts as certified only if it is certified in ``dtype`` *and* in every other precision the
model's parameters are stored in; ``evaluation_dtypes`` records them all, and the claim covers exact
arithmetic and IEEE evaluation in each (plain dot-product kernels, no TF32, no Winograd/FFT
convolutions, gradual underflow).

Fingerprints (sha256) bind the certificate to the nominal model (parameters and buffers), the
architecture, the domain's tensors and the certification data, so ``lid_engine.verify`` can
recompute every number from the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

import torch
from torch import Tensor, nn

from .bounds import MARGIN_METHODS, ibp, linear
from .bounds.linear_graph import graph_linear_margins
from . import numerics as rounding
from .model_graph import ModelGraph
from .domains import Box
from .zonotope import Zonotope
from .errors import CertificateError, InvalidInputError
from .files import utc_now
from .spec import SPEC_KINDS, Spec, certified_in_every_dtype, evaluation_dtypes
from .stream import CertificationStream, piece_rows, rebatch

CERTIFICATE_FORMAT = "lidgate.certificate/1"
BOUND_METHODS = MARGIN_METHODS  # "ibp", "linear": both sound under floating point
BOUND_NAMES = {"ibp": "IBP bounds", "linear": "linear margin bounds (intersected with IBP)"}
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}
BUFFER_PREFIX = "buffer:"
# The quantile routine is accurate to a few ulps; the bound is lowered by this relative amount so
# that its floating-point error can only make the reported bound more conservative.
CP_SAFETY = 1e-12
# certification data: tensors in memory, or a stream read a chunk at a time (lid_engine.stream)
CertData = tuple[Tensor, Tensor] | CertificationStream

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# fields added after certificates of this format were first written: absent in those, defaulted
OPTIONAL_FIELDS = frozenset({"linear_fallbacks"})


# ----------------------------------------------------------------------------------- fingerprints
def _tensor_bytes(t: Tensor) -> bytes:
    if t.layout != torch.strided or t.is_quantized:
        raise InvalidInputError(f"fingerprint: only dense tensors can be fingerprinted, got layout {t.layout}")
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _put(h, data: bytes) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def fingerprint_tensors(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the sorted names and, per tensor, its dtype, shape and raw bytes (CPU, contiguous).

    Every field is length-prefixed, so no two different mappings share an encoding.
    """
    if not isinstance(tensors, Mapping):
        raise InvalidInputError(f"fingerprint_tensors: expected a mapping name -> tensor, got {type(tensors).__name__}")
    h = _tensors_hash(len(tensors))
    for name in sorted(tensors):
        if not isinstance(name, str):
            raise InvalidInputError(f"fingerprint_tensors: names must be strings, got {name!r}")
        t = tensors[name]
        if not isinstance(t, Tensor):
            raise InvalidInputError(f"fingerprint_tensors: '{name}' must be a torch.Tensor, got {type(t).__name__}")
        _put_header(h, name, t.dtype, t.shape)
        _put(h, _tensor_bytes(t))
    return h.hexdigest()


def _tensors_hash(count: int):
    """sha256 started on the ``fingerprint_tensors`` encoding of ``count`` tensors."""
    h = hashlib.sha256()
    _put(h, b"lidgate.tensors/1")
    h.update(struct.pack("<Q", count))
    return h


def _put_header(h, name: str, dtype: torch.dtype, shape) -> None:
    """One tensor's name, dtype and shape as ``fingerprint_tensors`` encodes them (its bytes follow)."""
    _put(h, name.encode("utf-8"))
    _put(h, str(dtype).removeprefix("torch.").encode("ascii"))
    h.update(struct.pack("<Q", len(shape)))
    for s in shape:
        h.update(struct.pack("<Q", int(s)))


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors ``fingerprint_model`` covers: parameters by name, buffers as ``buffer:NAME``."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"fingerprint_model: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    state: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if name.startswith(BUFFER_PREFIX):
            raise InvalidInputError(f"fingerprint_model: parameter name '{name}' collides with the buffer prefix")
        state[name] = p
    for name, b in model.named_buffers():
        state[BUFFER_PREFIX + name] = b
    return state


def fingerprint_model(model: nn.Module) -> str:
    """sha256 of the model's parameters and buffers (buffers named ``buffer:NAME``)."""
    return fingerprint_tensors(model_state(model))


def fingerprint_architecture(model: nn.Module) -> str:
    """sha256 of the module tree: every submodule's path, class and ``extra_repr()``.

    Parameters do not say what is computed with them (a convolution's stride, an activation, the
    active task of a ``TaskMask``); this fingerprint does, so a certificate cannot be re-used for a
    different function with the same weights.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"fingerprint_architecture: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    h = hashlib.sha256()
    _put(h, b"lidgate.architecture/1")
    for path, m in model.named_modules(remove_duplicate=False):
        cls = type(m)
        _put(h, f"{path}\t{cls.__module__}.{cls.__qualname__}\t{m.extra_repr()}".encode("utf-8"))
    return h.hexdigest()


def canonical_labels(y: Tensor, where: str = "fingerprint_data") -> Tensor:
    """Labels as int64 (integer-valued floats accepted), as they are fingerprinted and certified."""
    if not isinstance(y, Tensor):
        raise InvalidInputError(f"{where}: 'y' must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.is_floating_point():
        if not bool(torch.isfinite(y).all()) or not bool((y == y.round()).all()):
            raise InvalidInputError(f"{where}: 'y' holds non-integer labels")
    elif y.dtype == torch.bool or y.is_complex():
        raise InvalidInputError(f"{where}: 'y' must hold integer class indices, got dtype {y.dtype}")
    return y.detach().to("cpu", torch.int64)


def fingerprint_data(x: Tensor, y: Tensor) -> str:
    """sha256 of the certification data: ``x`` exactly as given (dtype included), labels as int64."""
    if not isinstance(x, Tensor):
        raise InvalidInputError(f"fingerprint_data: 'x' must be a torch.Tensor, got {type(x).__name__}")
    return fingerprint_tensors({"x": x, "y": canonical_labels(y)})


def fingerprint_stream(data: CertificationStream) -> str:
    """``fingerprint_data`` of a stream's rows, read a chunk at a time: sha256 receives exactly the bytes
    ``fingerprint_tensors({"x": X, "y": Y})`` gives it for the concatenated ``X`` and ``Y`` (the byte
    lengths are known from the header, so the length prefixes come first as there)."""
    if not isinstance(data, CertificationStream):
        raise InvalidInputError(f"fingerprint_stream: expected a CertificationStream, got {type(data).__name__}")
    h = _tensors_hash(2)
    x_bytes = data.n * math.prod(data.feature_shape) * data.dtype.itemsize
    # the labels certified are those of chunks(); labels() is only a cheaper way to read them again, so the
    # two readings must agree (their digests are compared below)
    from_chunks, from_labels = hashlib.sha256(), hashlib.sha256()

    def xs():
        for x, y in data.chunks():
            from_chunks.update(_tensor_bytes(y))
            yield x

    def ys():
        for y in data.labels():
            y = canonical_labels(y, data.name)
            from_labels.update(_tensor_bytes(y))
            yield y

    for name, dtype, shape, nbytes, pieces in (
            ("x", data.dtype, (data.n, *data.feature_shape), x_bytes, xs()),
            ("y", torch.int64, (data.n,), data.n * 8, ys())):
        _put_header(h, name, dtype, shape)
        h.update(struct.pack("<Q", nbytes))  # _put's length prefix; the bytes follow a chunk at a time
        seen = 0
        for t in pieces:
            b = _tensor_bytes(t)
            seen += len(b)
            h.update(b)
        if seen != nbytes:
            raise InvalidInputError(f"{data.name}: the stream gave {seen} bytes of '{name}', its header says {nbytes}")
    if from_chunks.digest() != from_labels.digest():
        raise InvalidInputError(f"{data.name}: the stream's labels() differ from the labels of its chunks(); a "
                                "stream must give the same rows on every reading")
    return h.hexdigest()


def data_fingerprint(data: CertData) -> str:
    """``fingerprint_data`` of a pair ``(x, y)`` or ``fingerprint_stream`` of a stream."""
    return fingerprint_stream(data) if isinstance(data, CertificationStream) else fingerprint_data(*data)


# ----------------------------------------------------------------------------------- statistics
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


MAX_COUNT = 2**53  # counts a float64 holds exactly; anything larger in a manifest is not a real count


def _brief(v) -> str:
    """repr for an error message, cut short (a forged manifest may hold a 400-digit number)."""
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _is_finite_real(v) -> bool:
    """A real number a float can hold: a JSON integer such as 10**400 overflows float()."""
    try:
        return _is_real(v) and math.isfinite(float(v))
    except OverflowError:
        return False


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper–Pearson lower bound: P(p ≥ bound) ≥ 1 − alpha for k successes in n trials.

    ``beta.ppf(alpha, k, n − k + 1)``, 0 when ``k == 0``, lowered by a relative ``CP_SAFETY`` so
    the quantile routine's rounding cannot make it optimistic.
    """
    if not _is_int(k) or not _is_int(n):
        raise InvalidInputError(f"clopper_pearson_lower: 'k' and 'n' must be integers, got k={k!r}, n={n!r}")
    if n < 1 or not 0 <= k <= n:
        raise InvalidInputError(f"clopper_pearson_lower: need n ≥ 1 and 0 ≤ k ≤ n, got k={k}, n={n}")
    if not _is_finite_real(alpha) or not 0.0 < float(alpha) < 1.0:
        raise InvalidInputError(f"clopper_pearson_lower: 'alpha' must lie in (0, 1), got {alpha!r}")
    if k == 0:
        return 0.0
    from scipy.stats import beta

    p = float(beta.ppf(float(alpha), int(k), int(n) - int(k) + 1))
    if not math.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ArithmeticError(f"clopper_pearson_lower: scipy returned {p} for k={k}, n={n}, alpha={alpha}")
    return max(0.0, p * (1.0 - CP_SAFETY))


def hard_metric(kind: str, certified: int, n: int, per_class: Mapping[str, Mapping[str, int]]) -> float:
    """The certified metric on the set: ``certified / n`` or the mean per-class certified recall."""
    if kind == "accuracy":
        return certified / n
    classes = sorted(per_class, key=int)
    return math.fsum(per_class[c]["certified"] / per_class[c]["n"] for c in classes) / len(classes)


def population_lower_bound(
    kind: str, certified: int, n: int, per_class: Mapping[str, Mapping[str, int]], confidence: float, n_domains: int
) -> float:
    """The certificate's population lower bound (see the module docstring for the statement)."""
    alpha = (1.0 - confidence) / n_domains
    if kind == "accuracy":
        return clopper_pearson_lower(certified, n, alpha)
    classes = sorted(per_class, key=int)
    a = alpha / len(classes)
    return math.fsum(clopper_pearson_lower(per_class[c]["certified"], per_class[c]["n"], a) for c in classes) / len(classes)


# ----------------------------------------------------------------------------------- certificate
def _engine_version() -> str:
    from . import __version__  # lazy: lid_engine/__init__ may import this module

    return __version__


@dataclass(frozen=True)
class Certificate:
    """A sound certificate for one domain (``member``) on one task. See the module docstring."""

    task: str
    kind: str
    tau: float
    n: int
    certified: int
    certified_accuracy: float
    confidence: float
    n_domains: int
    lower_bound: float
    per_class: dict[str, dict[str, int]]
    model_sha256: str
    architecture_sha256: str
    domain_sha256: str
    data_sha256: str
    bound_method: str = "ibp"
    dtype: str = "float64"
    evaluation_dtypes: list[str] = field(default_factory=lambda: ["float64"])
    engine_version: str = field(default_factory=_engine_version)
    created_at: str = field(default_factory=utc_now)
    member: int = 0
    format: str = CERTIFICATE_FORMAT
    # bound_method "linear" on a traced graph: the ops the linear bound crossed with their IBP interval
    # (no linear relaxation known for them; lid_engine.bounds.linear_graph), by node name
    linear_fallbacks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("tau", "certified_accuracy", "confidence", "lower_bound"):
            v = getattr(self, name)
            if not _is_finite_real(v):
                raise CertificateError(f"Certificate: '{name}' must be a finite number, got {_brief(v)}")
            object.__setattr__(self, name, float(v))
        for name in ("n", "certified", "n_domains", "member"):
            if not _is_int(getattr(self, name)) or abs(getattr(self, name)) > MAX_COUNT:
                raise CertificateError(f"Certificate: '{name}' must be an integer of at most 2**53 in size, "
                                       f"got {_brief(getattr(self, name))}")
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("task", "kind", "model_sha256", "architecture_sha256", "domain_sha256", "data_sha256",
                     "bound_method", "dtype", "engine_version", "created_at", "format"):
            if not isinstance(getattr(self, name), str):
                raise CertificateError(f"Certificate: '{name}' must be a string, got {getattr(self, name)!r}")
        if self.format != CERTIFICATE_FORMAT:
            raise CertificateError(f"Certificate: 'format' is {self.format!r}, expected {CERTIFICATE_FORMAT!r}")
        if not self.task:
            raise CertificateError("Certificate: 'task' must be a non-empty string")
        if self.kind not in SPEC_KINDS:
            raise CertificateError(f"Certificate: 'kind' must be one of {SPEC_KINDS}, got {self.kind!r}")
        if self.bound_method not in BOUND_METHODS:
            raise CertificateError(
                f"Certificate: 'bound_method' {self.bound_method!r} is not a sound certification method "
                f"(supported: {BOUND_METHODS})"
            )
        if self.dtype not in DTYPES:
            raise CertificateError(f"Certificate: 'dtype' must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        ev = self.evaluation_dtypes
        if (not isinstance(ev, list) or not ev or ev[0] != self.dtype or len(set(map(str, ev))) != len(ev)
                or not all(isinstance(d, str) and d in DTYPES for d in ev)):
            raise CertificateError(
                f"Certificate: 'evaluation_dtypes' must be a list of distinct names from {tuple(DTYPES)} starting "
                f"with 'dtype' ({self.dtype!r}), got {ev!r}"
            )
        object.__setattr__(self, "evaluation_dtypes", list(ev))
        fb = self.linear_fallbacks
        if not isinstance(fb, list) or not all(isinstance(o, str) and o for o in fb):
            raise CertificateError(f"Certificate: 'linear_fallbacks' must be a list of op names, got {fb!r}")
        if fb and self.bound_method != "linear":
            raise CertificateError("Certificate: 'linear_fallbacks' is only meaningful with bound_method 'linear'")
        object.__setattr__(self, "linear_fallbacks", list(fb))
        for name in ("model_sha256", "architecture_sha256", "domain_sha256", "data_sha256"):
            if not _SHA_RE.match(getattr(self, name)):
                raise CertificateError(f"Certificate: '{name}' must be 64 lowercase hex digits, got {getattr(self, name)!r}")
        if not self.engine_version:
            raise CertificateError("Certificate: 'engine_version' must be a non-empty string")
        try:
            ts = datetime.fromisoformat(self.created_at)
        except ValueError:
            raise CertificateError(f"Certificate: 'created_at' is not an ISO-8601 time: {self.created_at!r}") from None
        if ts.tzinfo is None or ts.utcoffset().total_seconds() != 0:
            raise CertificateError(f"Certificate: 'created_at' must be in UTC (+00:00), got {self.created_at!r}")
        if not 0.0 <= self.tau <= 1.0:
            raise CertificateError(f"Certificate: 'tau' must lie in [0, 1], got {self.tau}")
        if not 0.0 < self.confidence < 1.0:
            raise CertificateError(f"Certificate: 'confidence' must lie in (0, 1), got {self.confidence}")
        if self.n < 1 or not 0 <= self.certified <= self.n:
            raise CertificateError(f"Certificate: need n ≥ 1 and 0 ≤ certified ≤ n, got certified={self.certified}, n={self.n}")
        if self.n_domains < 1:
            raise CertificateError(f"Certificate: 'n_domains' must be ≥ 1, got {self.n_domains}")
        if self.member < 0:
            raise CertificateError(f"Certificate: 'member' must be ≥ 0, got {self.member}")
        if not 0.0 <= self.certified_accuracy <= 1.0 or not 0.0 <= self.lower_bound <= 1.0:
            raise CertificateError("Certificate: 'certified_accuracy' and 'lower_bound' must lie in [0, 1]")
        object.__setattr__(self, "per_class", _check_per_class(self.per_class))

    # ---------------------------------------------------------------- derived
    @property
    def alpha(self) -> float:
        """Per-domain error probability of the population bound (before the per-class split)."""
        return (1.0 - self.confidence) / self.n_domains

    @property
    def meets_tau(self) -> bool:
        return self.certified_accuracy >= self.tau

    @property
    def spec(self) -> Spec:
        return Spec(self.kind, self.tau)

    def problems(self) -> list[str]:
        """Self-consistency: every derived number recomputes from the stored counts. Empty = consistent."""
        out = []
        if sum(c["n"] for c in self.per_class.values()) != self.n:
            out.append(f"per_class counts sum to {sum(c['n'] for c in self.per_class.values())}, not n = {self.n}")
        if sum(c["certified"] for c in self.per_class.values()) != self.certified:
            out.append(
                f"per_class certified counts sum to {sum(c['certified'] for c in self.per_class.values())}, "
                f"not certified = {self.certified}"
            )
        if out:
            return out
        metric = hard_metric(self.kind, self.certified, self.n, self.per_class)
        if self.certified_accuracy != metric:
            out.append(f"certified_accuracy is {self.certified_accuracy!r} but the counts give {metric!r}")
        lb = population_lower_bound(self.kind, self.certified, self.n, self.per_class, self.confidence, self.n_domains)
        if not math.isclose(self.lower_bound, lb, rel_tol=1e-10, abs_tol=1e-12):
            out.append(
                f"lower_bound is {self.lower_bound!r} but Clopper–Pearson at confidence {self.confidence} over "
                f"{self.n_domains} domain(s) gives {lb!r}"
            )
        return out

    def statement(self) -> str:
        """The two claims in words."""
        metric = "balanced accuracy" if self.kind == "balanced_accuracy" else "accuracy"
        return (
            f"Every parameter vector in domain {self.member} has {metric} ≥ {self.certified_accuracy:.4f} on the "
            f"{self.n} certification examples of task '{self.task}' ({self.certified} certified; sound "
            f"{BOUND_NAMES[self.bound_method]}"
            f"{'; IBP intervals at ' + ', '.join(self.linear_fallbacks) if self.linear_fallbacks else ''}, "
            f"covering exact arithmetic and IEEE evaluation in {' and '.join(self.evaluation_dtypes)} with dot-product "
            f"kernels and gradual underflow). If those examples are i.i.d. from the deployment distribution and unseen by the "
            f"search, then with probability ≥ {self.confidence:g} every such parameter vector has population "
            f"{metric} ≥ {self.lower_bound:.4f} (one-sided Clopper–Pearson, union bound over "
            f"{self.n_domains} domain(s))."
        )

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["per_class"] = {c: dict(v) for c, v in self.per_class.items()}
        d["evaluation_dtypes"] = list(self.evaluation_dtypes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Certificate:
        """Strict: every field present (but ``OPTIONAL_FIELDS``, added later), no unknown field, every type checked."""
        if not isinstance(d, Mapping):
            raise CertificateError(f"Certificate.from_dict: expected a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - set(d) - OPTIONAL_FIELDS), sorted(set(d) - names)
        if missing or unknown:
            raise CertificateError(f"Certificate.from_dict: missing fields {missing}, unknown fields {unknown}")
        return cls(**dict(d))


def _check_per_class(per_class) -> dict[str, dict[str, int]]:
    if not isinstance(per_class, Mapping) or not per_class:
        raise CertificateError(f"Certificate: 'per_class' must be a non-empty mapping class -> counts, got {per_class!r}")
    out = {}
    for c, v in per_class.items():
        if not isinstance(c, str) or not re.fullmatch(r"0|[1-9][0-9]*", c):
            raise CertificateError(f"Certificate: per_class key {c!r} must be a class index written as a string")
        if not isinstance(v, Mapping) or set(v) != {"n", "certified"}:
            raise CertificateError(f"Certificate: per_class['{c}'] must be {{'n': int, 'certified': int}}, got {v!r}")
        n, k = v["n"], v["certified"]
        if not _is_int(n) or not _is_int(k) or n < 1 or not 0 <= k <= n:
            raise CertificateError(f"Certificate: per_class['{c}'] needs integers n ≥ 1 and 0 ≤ certified ≤ n, got {v!r}")
        out[c] = {"n": int(n), "certified": int(k)}
    return {c: out[c] for c in sorted(out, key=int)}


# ----------------------------------------------------------------------------------- certify
def _check_dtype(dtype, where: str) -> str:
    for name, d in DTYPES.items():
        if dtype == d:
            return name
    raise InvalidInputError(f"{where}: 'dtype' must be torch.float32 or torch.float64, got {dtype!r}")


@dataclass(frozen=True)
class Counts:
    """Certified counts of a set of examples; ``a + b`` is exactly the counts of both sets together, so
    shards and chunks add up to what one pass gives (per class in ascending class order, as one pass
    lists them)."""

    n: int
    certified: int
    per_class: dict[str, dict[str, int]]
    evaluation_dtypes: tuple[str, ...]

    def __add__(self, other: Counts) -> Counts:
        if not isinstance(other, Counts):
            return NotImplemented
        if self.evaluation_dtypes != other.evaluation_dtypes:
            raise InvalidInputError(f"Counts: cannot add counts evaluated in {list(self.evaluation_dtypes)} and "
                                    f"{list(other.evaluation_dtypes)}")
        zero = {"n": 0, "certified": 0}
        per_class = {c: {k: self.per_class.get(c, zero)[k] + other.per_class.get(c, zero)[k] for k in ("n", "certified")}
                     for c in sorted(self.per_class.keys() | other.per_class.keys(), key=int)}
        return Counts(self.n + other.n, self.certified + other.certified, per_class, self.evaluation_dtypes)

    @classmethod
    def total(cls, parts: Iterable[Counts]) -> Counts:
        """The sum of ``parts`` (at least one)."""
        parts = list(parts)
        if not parts:
            raise InvalidInputError("Counts.total: no counts to add (an empty certification set?)")
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out


# what certify_box, LID.certify and compute_lid call to count (``counter=``): ``count_certified`` by default, or
# one that spreads the rows over workers (lidgate's flows shard them on Dask) and adds the parts
Counter = Callable[..., Counts]


def count_certified(
    model: nn.Module, box: Box | Zonotope, data: CertData, *, dtype: torch.dtype = torch.float64,
    batch_size: int | None = 2048, method: str = "ibp", rows: tuple[int, int] | None = None,
    where: str = "certify_box",
) -> Counts:
    """The certified ``Counts`` of ``box`` on ``data`` (rows ``[start, stop)`` with ``rows``): tensors
    ``(x, y)``, or a ``CertificationStream`` counted a piece at a time in bounded memory.

    An example is certified when it is certified in ``dtype`` and in every other precision the model
    is stored in (see the module docstring), so the count also holds for the model's own arithmetic.
    Pieces are bounded in the batches one pass over all rows uses (``lid_engine.stream``), so rows
    split at ``stream.shard_ranges`` add up to the one-pass counts exactly.
    """
    if not isinstance(box, (Box, Zonotope)):
        raise InvalidInputError(f"{where}: 'box' must be a lid_engine Box or Zonotope, got {type(box).__name__}")
    if method not in BOUND_METHODS:  # no silent fallback to IBP for a name this engine does not know
        raise InvalidInputError(f"{where}: 'method' must be one of {BOUND_METHODS}, got {method!r}")
    if isinstance(data, CertificationStream):
        start, stop = (0, data.n) if rows is None else rows
        pieces = rebatch(data.chunks(start, stop), piece_rows(method, batch_size))
        return Counts.total(_counts(model, box, x, y, dtype, batch_size, where, method) for x, y in pieces)
    if not isinstance(data, (tuple, list)) or len(data) != 2 or not all(isinstance(v, Tensor) for v in data):
        raise InvalidInputError(f"{where}: the certification data must be a pair of tensors (x, y) or a "
                                f"CertificationStream, got {type(data).__name__}")
    x, y = data
    if rows is not None:
        a, b = rows
        if not (_is_int(a) and _is_int(b) and 0 <= a < b <= len(x)):
            raise InvalidInputError(f"{where}: 'rows' must be (start, stop) with 0 ≤ start < stop ≤ {len(x)}, got {rows!r}")
        x, y = x[a:b], y[a:b]
    return _counts(model, box, x, y, dtype, batch_size, where, method)


def _counts(model, box, x: Tensor, y: Tensor, dtype, batch_size, where: str, method: str) -> Counts:
    mask, yy, _, dtypes = certified_in_every_dtype(model, box, x, canonical_labels(y, where), method, dtype,
                                                   batch_size, where)
    names = tuple(_check_dtype(d, where) for d in dtypes)
    mask = mask.cpu()
    yy = yy.cpu()
    per_class = {}
    for c in torch.unique(yy).tolist():
        sel = yy == c
        per_class[str(int(c))] = {"n": int(sel.sum()), "certified": int(mask[sel].sum())}
    return Counts(len(yy), int(mask.sum()), per_class, names)


def certified_counts(
    model: nn.Module, box: Box | Zonotope, x: Tensor, y: Tensor, *, dtype: torch.dtype = torch.float64,
    batch_size: int | None = 2048, where: str = "certify_box", method: str = "ibp",
) -> tuple[int, int, dict[str, dict[str, int]], list[str]]:
    """(n, certified, per_class, evaluation dtypes) of the sound certificate of ``box`` on ``(x, y)``
    with bound ``method`` (``BOUND_METHODS``): ``count_certified`` as a tuple."""
    c = count_certified(model, box, (x, y), dtype=dtype, batch_size=batch_size, method=method, where=where)
    return c.n, c.certified, c.per_class, list(c.evaluation_dtypes)


def certify_box(
    model: nn.Module,
    box: Box | Zonotope,
    x: Tensor | CertificationStream,
    y: Tensor | None,
    spec: Spec,
    *,
    task: str = "task",
    member: int = 0,
    n_domains: int = 1,
    confidence: float = 0.95,
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = 2048,
    model_sha256: str | None = None,
    method: str = "ibp",
    counter: Counter | None = None,
) -> Certificate:
    """Certify ``box`` for ``spec`` on the held-out ``(x, y)``: sound counts, fingerprints, CP bound.

    ``box`` may also be a ``Zonotope`` (``domain_sha256`` then fingerprints ``Zonotope.tensors()``;
    the LID and ``verify`` hold boxes only).

    ``model`` supplies the architecture and buffers (and, unless ``model_sha256`` is given, the
    nominal fingerprint). ``n_domains`` is the size of the union bound (see the module docstring).

    ``x`` may be a ``CertificationStream`` (``y`` None): data larger than memory, counted and
    fingerprinted a chunk at a time. ``counter``: what counts (``count_certified``'s signature; default
    ``count_certified``), e.g. one that shards the rows over workers; its counts must cover every row.
    """
    where = "certify_box"
    if not isinstance(spec, Spec):
        raise InvalidInputError(f"{where}: 'spec' must be a lid_engine Spec, got {type(spec).__name__}")
    if not isinstance(task, str) or not task:
        raise InvalidInputError(f"{where}: 'task' must be a non-empty string, got {task!r}")
    if not _is_int(member) or member < 0:
        raise InvalidInputError(f"{where}: 'member' must be an integer ≥ 0, got {member!r}")
    if not _is_int(n_domains) or n_domains < 1:
        raise InvalidInputError(f"{where}: 'n_domains' must be an integer ≥ 1, got {n_domains!r}")
    if not _is_finite_real(confidence) or not 0.0 < float(confidence) < 1.0:
        raise InvalidInputError(f"{where}: 'confidence' must lie strictly between 0 and 1, got {confidence!r}")
    dtype_name = _check_dtype(dtype, where)
    if isinstance(x, CertificationStream):
        if y is not None:
            raise InvalidInputError(f"{where}: with a CertificationStream as 'x', 'y' must be None (the stream holds the labels)")
        data: CertData = x
    elif not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InvalidInputError(f"{where}: 'x' and 'y' must be torch tensors (or 'x' a CertificationStream)")
    else:
        data = (x, y)
    if len(x) < 1:
        raise InvalidInputError(f"{where}: the certification set is empty (n must be ≥ 1)")
    if model_sha256 is None:
        model_sha256 = fingerprint_model(model)
    if method not in BOUND_METHODS:
        raise InvalidInputError(f"{where}: 'method' must be one of {BOUND_METHODS}, got {method!r}")
    counts = (counter or count_certified)(model, box, data, dtype=dtype, batch_size=batch_size, method=method,
                                          where=where)
    if not isinstance(counts, Counts) or counts.n != len(x) or counts.certified > counts.n or \
            {k: v["n"] for k, v in counts.per_class.items()} != class_sizes(data, where):
        raise InvalidInputError(f"{where}: the counter returned {counts!r} for {len(x)} rows of classes "
                                f"{class_sizes(data, where)}; its counts must cover every row exactly once")
    n, certified, per_class, evaluated = counts.n, counts.certified, counts.per_class, list(counts.evaluation_dtypes)
    confidence = float(confidence)
    return Certificate(
        task=task,
        kind=spec.kind,
        tau=float(spec.tau),
        n=n,
        certified=certified,
        certified_accuracy=hard_metric(spec.kind, certified, n, per_class),
        confidence=confidence,
        n_domains=int(n_domains),
        lower_bound=population_lower_bound(spec.kind, certified, n, per_class, confidence, int(n_domains)),
        per_class=per_class,
        model_sha256=model_sha256,
        architecture_sha256=fingerprint_architecture(model),
        domain_sha256=fingerprint_tensors(box.tensors()),
        data_sha256=data_fingerprint(data),
        bound_method=method,
        linear_fallbacks=linear_fallbacks(model, box, *head_rows(data, 8)) if method == "linear" else [],
        dtype=dtype_name,
        evaluation_dtypes=evaluated,
        member=int(member),
    )


def class_sizes(data: CertData, where: str = "class_sizes") -> dict[str, int]:
    """Examples per class (ascending, as ``Counts`` lists them) of ``(x, y)`` or of a stream's labels."""
    labels = data.labels() if isinstance(data, CertificationStream) else [canonical_labels(data[1], where)]
    total = torch.zeros(0, dtype=torch.int64)
    for y in labels:
        counts = torch.bincount(y.cpu())
        if len(counts) > len(total):
            counts[: len(total)] += total
            total = counts
        else:
            total[: len(counts)] += counts
    return {str(c): int(total[c]) for c in torch.nonzero(total).flatten().tolist()}


def head_rows(data: CertData, k: int) -> tuple[Tensor, Tensor]:
    """The first ``k`` rows of ``(x, y)`` or of a stream (which then reads only those) as tensors."""
    return data.head(k) if isinstance(data, CertificationStream) else (data[0][:k], data[1][:k])


def linear_fallbacks(model: nn.Module, domain: Box | Zonotope, x: Tensor, y: Tensor) -> list[str]:
    """The ops the linear bound crossed with their IBP interval when bounding ``model`` over ``domain``
    (empty for a chain): the walk's record on a few of the examples — its path does not depend on their
    values, only on the model, the domain's widths and the shapes."""
    layers = linear.walk(model, ibp.check_supported(model))
    if not isinstance(layers, ModelGraph):
        return []
    box = domain.bounding_box() if isinstance(domain, Zonotope) else domain
    xs, ys = x[:8], y[:8]
    found: list[str] = []
    with torch.no_grad(), rounding.certification_backend():
        box = box.to(xs.device, torch.float64)
        graph_linear_margins(model, layers, box, xs.to(torch.float64), ys.to(xs.device, torch.long), certify=True,
                             fallbacks=found)
    return found


__all__ = [
    "BOUND_METHODS",
    "BOUND_NAMES",
    "CERTIFICATE_FORMAT",
    "Certificate",
    "CertData",
    "Counter",
    "Counts",
    "certified_counts",
    "count_certified",
    "data_fingerprint",
    "certify_box",
    "clopper_pearson_lower",
    "evaluation_dtypes",
    "fingerprint_architecture",
    "fingerprint_data",
    "fingerprint_model",
    "fingerprint_stream",
    "fingerprint_tensors",
    "hard_metric",
    "linear_fallbacks",
    "model_state",
    "population_lower_bound",
]
