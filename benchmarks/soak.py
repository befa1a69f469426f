"""Soundness soak: 10⁶ sampled parameter vectors across the architecture matrix, zero violations.

    python -m benchmarks.soak                    # 10⁶ vectors → results/soak.{md,json}
    python -m benchmarks.soak --samples 20000    # fewer, same matrix
    python -m benchmarks.soak --quick            # 2 vectors per row (a smoke test); writes nothing

Every row of the matrix — architecture (``benchmarks/soak_matrix.py``: every supported layer and model
family: chains, residual graphs, attention blocks, LoRA adapters, partial-width domains) × dtype
(float32, float64) × bound method (``ibp`` logit bounds, ``linear`` margin bounds) × mode (``certify``,
``search``) × relative radius — draws its share of the parameter vectors from
``Box.relative_around(model, radius)`` (half uniform, half random vertices) and counts the forward-pass
outputs on a fixed random input that fall outside the bounds (``lid_engine.testing.check_soundness``;
each vector evaluated by its own plain forward pass and, batched, through ``torch.func.vmap``).
Certify-mode bounds must hold exactly under floating point; search-mode bounds are sound in real
arithmetic only and are checked up to ``SEARCH_RTOL`` (as the engine's tests do). The radii run from
the rounding scale (1e-6 relative: a few float32 ulps, where the rounding terms of the certify mode
carry the claim) to 1e-2 (where the bounds of deep graphs are already loose). Exits with status 1 on
any violation, or if a zero-width domain fails to enclose the nominal forward pass.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shlex
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

import lid_engine as le
from benchmarks._common import RESULTS, log, machine_header
from benchmarks.soak_matrix import ARCHITECTURES, Architecture
from benchmarks.text import git_state
from lid_engine.testing import check_soundness

TOTAL = 1_000_000
DTYPES = {"float32": torch.float32, "float64": torch.float64}
METHODS = ("ibp", "linear")
MODES = ("certify", "search")
RADII = (1e-6, 1e-3, 1e-2)  # relative: ±radius·|θ_i| on every coordinate with width
SEARCH_RTOL = {"float32": 1e-5, "float64": 1e-12}  # search mode: outputs within rtol·(1 + |z|) count as inside
BATCH = 1024  # parameter vectors drawn together
EVALUATIONS = ("plain", "vmap")  # every vector: its own forward pass, and the batch through torch.func.vmap
# tiny ops: a second thread only adds synchronisation (the quick run took 32 s with torch's 2 threads, 7 s with one,
# on this loaded 2-core machine)
THREADS = 1
FORMAT = 1


@dataclass(frozen=True)
class Row:
    """One cell of the matrix."""

    architecture: str
    dtype: str
    method: str
    mode: str
    radius: float

    @property
    def label(self) -> str:
        return f"{self.architecture}/{self.dtype}/{self.method}/{self.mode}/{self.radius:g}"

    @property
    def seed(self) -> int:
        return zlib.crc32(self.label.encode()) % 2**31


def matrix(architectures: list[Architecture] = ARCHITECTURES) -> list[Row]:
    """Every row, architecture-major."""
    return [Row(a.name, d, m, mode, r)
            for a, d, m, mode, r in itertools.product(architectures, DTYPES, METHODS, MODES, RADII)]


def shares(total: int, rows: int) -> list[int]:
    """``total`` parameter vectors split over ``rows`` as evenly as integers allow."""
    base, extra = divmod(total, rows)
    return [base + (i < extra) for i in range(rows)]


def run_row(row: Row, samples: int, arch: Architecture) -> dict:
    """Draw ``samples`` parameter vectors for ``row``; its result as a JSON-ready dict."""
    model, x, y, names = arch.instance()
    box = le.Box.relative_around(model, row.radius, names=names)
    rtol = SEARCH_RTOL[row.dtype] if row.mode == "search" else 0.0
    t0 = time.perf_counter()
    report = check_soundness(model, box, x, samples=samples, dtypes=(DTYPES[row.dtype],), seed=row.seed,
                             batch=BATCH, y=y, method=row.method, mode=row.mode, rtol=rtol,
                             evaluations=EVALUATIONS)
    seconds = time.perf_counter() - t0
    with_width = sum(int((box.upper[n] > box.lower[n]).sum()) for n in box.names)
    return {**asdict(row), "label": row.label, "seed": row.seed, "samples": samples, "examples": len(x),
            "parameters": box.numel(), "with_width": with_width, "rtol": rtol, "violations": report.violations,
            "max_excess": report.max_excess, "worst_excess": report.worst_excess,
            "nominal_enclosed": report.nominal_enclosed, "seconds": seconds}


def soak(total: int, architectures: list[Architecture] = ARCHITECTURES, progress: bool = False) -> list[dict]:
    """Run the whole matrix with ``total`` parameter vectors (at least one per row)."""
    rows = matrix(architectures)
    if total < len(rows):
        raise ValueError(f"soak: {total} samples cannot cover the {len(rows)} rows of the matrix (one each at least)")
    by_name = {a.name: a for a in architectures}
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for i, (row, n) in enumerate(zip(rows, shares(total, len(rows)))):
            results.append(run_row(row, n, by_name[row.architecture]))
            r = results[-1]
            if progress:
                flag = "" if r["violations"] == 0 and r["nominal_enclosed"] else "  <-- VIOLATION"
                log(f"[{i + 1}/{len(rows)}] {row.label}: {n} vectors, {r['violations']} violations, "
                    f"max excess {r['max_excess']:.3g}, {r['seconds']:.2f} s{flag}")
    finally:
        torch.set_num_threads(threads)
    return results


def failed(results: list[dict]) -> list[dict]:
    return [r for r in results if r["violations"] or not r["nominal_enclosed"]]


def write(results: list[dict], command: str, seconds: float, out: Path) -> None:
    """``soak.json`` and ``soak.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    git = git_state()
    doc = {"format": FORMAT, "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "git": git, "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                   "threads": THREADS},
           "settings": {"radii": list(RADII), "search_rtol": SEARCH_RTOL, "batch": BATCH,
                        "evaluations": list(EVALUATIONS)},
           "total_samples": sum(r["samples"] for r in results), "violations": sum(r["violations"] for r in results),
           "seconds": seconds, "rows": results}
    (out / "soak.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "soak.md").write_text(report(doc) + "\n")


def report(doc: dict) -> str:
    rows = doc["rows"]
    bad = failed(rows)
    lines = [
        "# Soundness soak",
        "",
        f"**{doc['total_samples']:,} sampled parameter vectors over {len(rows)} matrix rows: "
        f"{doc['violations']} violations**{'' if not bad else f' — {len(bad)} rows FAILED'}; "
        f"every zero-width domain encloses the nominal forward pass: {all(r['nominal_enclosed'] for r in rows)}. "
        f"Wall time {doc['seconds']:.0f} s.",
        "",
        f"- command: `{doc['command']}` (`make bench-soak`; also run by `make bench`)",
        f"- code: git commit `{doc['git']['commit']}`{' (working tree dirty)' if doc['git']['dirty'] else ''}",
        *machine_header(),
        f"- torch threads during the soak: {doc['machine']['threads']}",
        "",
        "Each row draws its parameter vectors from `Box.relative_around(model, radius)` (±radius·|θ| on the "
        "coordinates with width; the partial and LoRA rows give width to some parameters only), alternately "
        "uniform inside and at a random vertex, and evaluates the model at each on a fixed random input of 8 "
        "examples twice — its own plain forward pass, and the batch of vectors through `torch.func.vmap` "
        "(another summation order) — so every vector's outputs are checked twice "
        "(`lid_engine.testing.check_soundness`). `ibp` rows check every logit against `bound_logits`; `linear` "
        "rows check every margin z_y − z_j (labels: the model's predictions, every fourth shifted) against "
        "`bound_margins(method=\"linear\")`. A violation is an output outside its bound (NaN included). "
        "*max excess* is the largest (lo − z, z − hi) over every sampled output of the row: ≤ 0 when all "
        "are inside; 0 in certify mode only where an output is a constant that the bound states exactly "
        "(TaskMask's fill logits); in search mode also where a vertex reaches an exact bound. "
        f"Search-mode bounds are sound in real arithmetic only; they are checked up to "
        f"rtol·(1 + |z|) with rtol = {doc['settings']['search_rtol']['float32']:g} (float32), "
        f"{doc['settings']['search_rtol']['float64']:g} (float64), and a small positive max excess there "
        "is rounding. Certify-mode rows allow no tolerance.",
        "",
        "## The architectures",
        "",
        "| architecture | layers and ops | parameters | with width |",
        "|---|---|---:|---:|",
    ]
    archs = {a.name: a for a in ARCHITECTURES}
    seen = {}
    for r in rows:
        seen.setdefault(r["architecture"], r)
    for name, r in seen.items():
        covers = archs[name].covers if name in archs else ""
        lines.append(f"| {name} | {covers} | {r['parameters']:,} | {r['with_width']:,} (at radius {r['radius']:g}) |")
    lines += ["", "## Totals", "", "| over | value | samples | violations |", "|---|---|---:|---:|"]
    for key in ("architecture", "dtype", "method", "mode", "radius"):
        for value in dict.fromkeys(r[key] for r in rows):
            part = [r for r in rows if r[key] == value]
            lines.append(f"| {key} | {value:g} |" if isinstance(value, float) else f"| {key} | {value} |")
            lines[-1] += f" {sum(r['samples'] for r in part):,} | {sum(r['violations'] for r in part)} |"
    lines += [
        "",
        "## Rows",
        "",
        "| architecture | dtype | method | mode | radius | samples | examples | violations | max excess | "
        "nominal enclosed | seconds |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['architecture']} | {r['dtype']} | {r['method']} | {r['mode']} | {r['radius']:g} | "
                     f"{r['samples']:,} | {r['examples']} | {r['violations']} | {r['max_excess']:.3g} | "
                     f"{'yes' if r['nominal_enclosed'] else 'NO'} | {r['seconds']:.2f} |")
    if bad:
        lines += ["", "## Failures (reproduce with the row's seed)", ""]
        lines += [f"- {r['label']}: seed {r['seed']}, {r['violations']} violations, worst excess "
                  f"{r['worst_excess']:.3g}, nominal enclosed {r['nominal_enclosed']}" for r in bad]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=TOTAL, help=f"parameter vectors in all (default {TOTAL:,})")
    parser.add_argument("--quick", action="store_true", help="two vectors per row, nothing written (a smoke test)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where soak.{md,json} go (default benchmarks/results; --quick writes only with --out)")
    args = parser.parse_args(argv)
    total = 2 * len(matrix()) if args.quick else args.samples
    command = shlex.join(["python", "-m", "benchmarks.soak", *argv])
    log(f"soundness soak: {total:,} parameter vectors over {len(matrix())} rows")
    t0 = time.perf_counter()
    results = soak(total, progress=True)
    seconds = time.perf_counter() - t0
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        write(results, command, seconds, out)
        log(f"wrote {out / 'soak.md'} and {out / 'soak.json'}")
    bad = failed(results)
    log(f"{sum(r['samples'] for r in results):,} vectors, {sum(r['violations'] for r in results)} violations, "
        f"{len(bad)} failed rows, {seconds:.0f} s")
    for r in bad:
        log(f"FAILED {r['label']} (seed {r['seed']}): {r['violations']} violations, worst excess "
            f"{r['worst_excess']:.3g}, nominal enclosed {r['nominal_enclosed']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
