"""Which process registered something, and whether it still runs: how the next run tells a version
(or an MLflow run) whose process died from one that is still being worked on."""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["owner_alive", "owner_tag"]


def owner_tag() -> str:
    """This process as JSON: host, pid and the process's start time (a pid reused by another process
    does not look alive)."""
    import os
    import socket

    import psutil

    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "started": psutil.Process().create_time()})


def owner_alive(owner: Mapping | None) -> bool | None:
    """Whether the process that registered a version still runs: True/False on this host, None when
    that cannot be told (another host, or no owner recorded)."""
    import socket

    import psutil

    if not owner or owner.get("host") != socket.gethostname():
        return None
    try:
        # start times are boot time + ticks; a clock step moves the boot time by whole seconds
        return abs(psutil.Process(int(owner["pid"])).create_time() - float(owner["started"])) < 2.0
    except psutil.AccessDenied:
        return None  # cannot look: not evidence that it ended
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return False
