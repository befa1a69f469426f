"""Shared helpers: robust wall-clock timing on a noisy shared CPU, and the machine description."""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
WARMUP = 1  # discarded rounds
REPEATS = 9  # measured rounds (≥ 7)


@dataclass
class Stat:
    """Per-call seconds over the measured rounds (the warm-up round is discarded)."""

    times: list[float]
    inner: int

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)


def cpu_model() -> str:
    name = platform.processor() or ""
    if not name or name in ("x86_64", "i386", "aarch64"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
            for line in out.splitlines():
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except (OSError, subprocess.SubprocessError):
            pass
    return name or platform.machine()


def machine_header() -> list[str]:
    """Markdown lines describing where and when the numbers were taken."""
    return [
        f"- date (UTC): {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"- CPU: {cpu_model()} (`platform.processor()` = {platform.processor()!r}), "
        f"{os.cpu_count()} logical CPUs visible; `torch.get_num_threads()` = {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.platform()}",
        f"- load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
    ]


def calibrate(fn: Callable[[], object], min_time: float = 0.04, max_inner: int = 500) -> int:
    """Calls per timed round so that one round lasts ≥ ``min_time`` (timer noise ≪ signal)."""
    fn()
    t0 = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t0, 1e-7)
    return int(min(max_inner, max(1, math.ceil(min_time / dt))))


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int = REPEATS, warmup: int = WARMUP, min_time: float = 0.04
) -> dict[str, Stat]:
    """Time several variants in interleaved rounds, so machine noise hits all of them alike.

    Each round runs every variant ``inner`` times back to back; the per-call time of a round is the
    round's time / ``inner``. The first ``warmup`` rounds are discarded.
    """
    inner = {k: calibrate(f, min_time) for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(warmup + repeats):
            for k, f in fns.items():
                n = inner[k]
                t0 = time.perf_counter()
                for _ in range(n):
                    f()
                dt = (time.perf_counter() - t0) / n
                if r >= warmup:
                    times[k].append(dt)
    finally:
        if was_enabled:
            gc.enable()
    return {k: Stat(times[k], inner[k]) for k in fns}


def fmt_time(s: float) -> str:
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


def log(msg: str) -> None:
    print(msg, flush=True)
    sys.stdout.flush()
