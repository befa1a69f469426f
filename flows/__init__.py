"""Prefect flows and the lidgate CLI: entry points only, no maths here.

Importing this package fixes the process environment the embedded defaults need *before* Prefect,
MLflow or Hugging Face read it: everything lives under ``$LIDGATE_HOME`` (default ``./lidgate-home``),
nothing is downloaded, no telemetry leaves the machine.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path


def _bootstrap_env() -> None:
    home = Path(os.environ.get("LIDGATE_HOME", "lidgate-home")).resolve()
    os.environ.setdefault("LIDGATE_HOME", str(home))
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


_bootstrap_env()
# Great Expectations logs a line per ephemeral context at INFO; keep the flows' output readable.
logging.getLogger("great_expectations").setLevel(logging.WARNING)
