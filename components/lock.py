"""The promotion lock: one gate at a time per registered model, on one machine.

MLflow has no compare-and-set: the gate's "is the champion still the one I checked against?" and its
alias move are two calls. Two gates deciding at the same moment from the same champion could both pass
the check and both move the alias. Holding this lock around the whole gate makes the second gate see
the first one's champion (and block as ``stale_champion``, or build on it after a retrain).

The lock is an exclusive ``flock`` on ``<home>/locks/<model>.lock``: it covers every process on this
machine that shares the lidgate home (the SQLite default, the local server stack). Processes on other
machines need their own coordination (a single retrain deployment per model: Prefect's work-pool
concurrency limit of 1). The kernel releases the lock when its holder dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LockTimeout", "promotion_lock"]


class LockTimeout(RuntimeError):
    """Another gate held the lock for longer than the timeout."""


@contextlib.contextmanager
def promotion_lock(home: str | Path, model_name: str, timeout_s: float = 600.0) -> Iterator[Path]:
    """Hold the promotion lock of ``model_name`` under ``home`` (waiting up to ``timeout_s``)."""
    directory = Path(home) / "locks"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", model_name) + ".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"another gate of model {model_name!r} held {path} for more than "
                                      f"{timeout_s:.0f} s") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)  # closing releases the lock
