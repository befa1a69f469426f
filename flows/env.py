"""Environment defaults for lidgate's entry points (the CLI, the demo, the deployment script).

Library imports never change the process environment: a team's own flow that imports
``flows.tasks`` keeps its Prefect home, logging and MLflow settings. Entry points call
``apply_defaults()`` once, before Prefect or MLflow read the environment, so that on one machine
everything lives under ``$LIDGATE_HOME`` (default ``./lidgate-home``), nothing is downloaded and no
telemetry leaves the machine. Values already set in the environment win.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

DEFAULT_HOME = "lidgate-home"


def home_dir() -> Path:
    """``$LIDGATE_HOME`` (default ``./lidgate-home``), absolute; not created."""
    return Path(os.environ.get("LIDGATE_HOME") or DEFAULT_HOME).resolve()


def apply_defaults(home: str | Path | None = None) -> Path:
    """Set the environment defaults of an entry point and return the lidgate home.

    Args:
        home: the lidgate home to use when ``$LIDGATE_HOME`` is not set (e.g. a configuration's
            ``registry.home``); default ``./lidgate-home``.

    Returns:
        The home directory (absolute), created with Prefect's folder inside it.

    Raises:
        NotADirectoryError: the home (or a folder in it) exists and is not a directory.
    """
    if home is not None and not os.environ.get("LIDGATE_HOME"):
        os.environ["LIDGATE_HOME"] = str(Path(home).resolve())
    root = home_dir()
    os.environ.setdefault("LIDGATE_HOME", str(root))
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    for folder in (root, Path(os.environ["PREFECT_HOME"])):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"'{folder}' exists and is not a directory (the lidgate home is $LIDGATE_HOME, "
                                     "or registry.home in the configuration)")
        folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # Great Expectations and MLflow log a line per ephemeral context / new database at INFO; keep the
    # pipeline's output readable.
    for name in ("great_expectations", "great_expectations.data_context.types.base", "mlflow",
                 "mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return root
