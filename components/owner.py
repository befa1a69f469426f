"""Which process registered something, and whether it still runs: how the next run tells a version
(or an MLflow run) whose process died from one that is still being worked on."""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["GUARD_ENV", "guard_children", "owner_alive", "owner_tag", "reap_orphans"]


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
        proc = psutil.Process(int(owner["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False  # ended, not yet reaped by its parent
        # start times are boot time + ticks; a clock step moves the boot time by whole seconds
        return abs(proc.create_time() - float(owner["started"])) < 2.0
    except psutil.AccessDenied:
        return None  # cannot look: not evidence that it ended
    except (psutil.NoSuchProcess, KeyError, TypeError, ValueError):
        return False


# ------------------------------------------------------------------------------------ child guard
# A command that may start an ephemeral Prefect server (no PREFECT_API_URL) marks itself in this
# variable; every process it starts inherits the mark. When the command dies — even by SIGKILL — its
# guard (and, failing that, the next command's) stops every process that still carries the mark.
GUARD_ENV = "LIDGATE_GUARDED_BY"


def guard_children(poll_s: float = 0.5) -> None:
    """Make sure the processes this one starts (the ephemeral Prefect server) end with it.

    Stops leftovers of earlier commands that died, marks this process's environment, and starts a
    detached guard process that waits for this one to end and then stops the marked processes. A no-op
    when this process is already marked (a nested call).
    """
    import os
    import subprocess
    import sys

    if os.environ.get(GUARD_ENV):
        return
    reap_orphans()
    os.environ[GUARD_ENV] = owner_tag()
    subprocess.Popen([sys.executable, "-m", "components.owner", "--guard", os.environ[GUARD_ENV], str(poll_s)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, env={k: v for k, v in os.environ.items() if k != GUARD_ENV},
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def reap_orphans(owner: str | None = None) -> list[int]:
    """Stop (SIGTERM, then SIGKILL after 5 s) this user's processes whose mark names a dead command,
    or the command ``owner`` (its mark, verbatim); returns their pids."""
    import os

    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "uids"]):
        try:
            if proc.pid == os.getpid() or proc.info["uids"] is None or proc.info["uids"].real != os.getuid():
                continue
            mark = proc.environ().get(GUARD_ENV)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        if not mark or (owner is not None and mark != owner):
            continue
        try:
            if owner is None and owner_alive(json.loads(mark)) is not False:
                continue
        except ValueError:
            continue
        found.append(proc)
    for proc in found:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(found, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in found]


def _guard(owner: str, poll_s: float) -> None:
    """The guard process: wait for ``owner`` to end, then stop what it left running."""
    import time

    record = json.loads(owner)
    while owner_alive(record):
        time.sleep(poll_s)
    reap_orphans(owner)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 4 and sys.argv[1] == "--guard":
        _guard(sys.argv[2], float(sys.argv[3]))
