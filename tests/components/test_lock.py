"""The promotion lock serialises gates on one machine and is released when its holder is killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from components.lock import LockTimeout, promotion_lock
from tests.helpers.paths import REPO

HOLD = ("import sys, time\nfrom components.lock import promotion_lock\n"
        "with promotion_lock(sys.argv[1], 'm/odel'):\n    print('held', flush=True)\n    time.sleep(60)\n")


def test_a_second_gate_waits_and_the_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout, match="m/odel"):
            with promotion_lock(tmp_path, "m/odel", timeout_s=0.5):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        start = time.monotonic()
        with promotion_lock(tmp_path, "m/odel", timeout_s=10) as path:
            assert time.monotonic() - start < 2 and path.parent == tmp_path / "locks"
    finally:
        holder.kill()
    with promotion_lock(tmp_path, "another"), promotion_lock(tmp_path, "m/odel", timeout_s=0.5):
        pass  # one lock per model
