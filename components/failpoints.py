"""Failpoints: named step boundaries where a fault-injection run kills the process.

``LIDGATE_FAILPOINT=<name>`` makes :func:`failpoint` send SIGKILL to the current process when the
pipeline reaches that boundary — the harshest crash there is (no ``finally``, no ``atexit``). It is
what ``benchmarks/reliability.py`` uses to show that a crash at any step leaves the registry in a
state the next run or the audit puts right. Unset (always, in normal operation) it does nothing.

The boundaries, in pipeline order: ``trained``, ``certified``, ``registered``, ``gate_intent`` (the
gate's intent is recorded, its decision not yet), ``committed`` (the promotion is recorded, the alias
not yet moved), ``alias_moved`` (moved, the intent not yet cleared, nothing exported), ``exported``.
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV", "POINTS", "failpoint"]

ENV = "LIDGATE_FAILPOINT"
POINTS = ("trained", "certified", "registered", "gate_intent", "committed", "alias_moved", "exported")


def failpoint(name: str) -> None:
    """SIGKILL this process if ``$LIDGATE_FAILPOINT`` names this boundary; otherwise return at once."""
    assert name in POINTS, name
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
