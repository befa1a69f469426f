"""Where the pipeline keeps its state, from environment variables with embedded defaults.

Embedded default (one machine, nothing to start by hand): MLflow on SQLite and artifacts under
``$LIDGATE_HOME``, Prefect in ephemeral mode with its home there too. Beyond one machine, point
``MLFLOW_TRACKING_URI`` at the MLflow server and ``PREFECT_API_URL`` at the Prefect server
(deployment/README.md); ``LIDGATE_HOME`` must then be a volume shared by the workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    tracking_uri: str
    artifact_location: str
    model_name: str

    @property
    def staging(self) -> Path:
        return self.home / "staging"

    @property
    def lookahead_dir(self) -> Path:
        return self.home / "lookahead"

    @property
    def audit_dir(self) -> Path:
        return self.home / "audit"

    @property
    def onnx_dir(self) -> Path:
        return self.home / "onnx"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"


def get_settings(model_name: str | None = None) -> Settings:
    home = Path(os.environ.get("LIDGATE_HOME", "lidgate-home")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
    artifacts = os.environ.get("LIDGATE_ARTIFACT_LOCATION") or (home / "mlartifacts").as_uri()
    name = model_name or os.environ.get("LIDGATE_MODEL_NAME", "lidgate-mnist")
    return Settings(home=home, tracking_uri=tracking, artifact_location=artifacts, model_name=name)


def prefect_server_configured() -> bool:
    """True when a real Prefect server is configured (then deployments and work pools are used)."""
    return bool(os.environ.get("PREFECT_API_URL"))


def open_registry(settings: Settings):
    """The MLflow registry for ``settings`` (the one way flows, the demo and the CLI open it)."""
    from components.registry import Registry

    return Registry(settings.tracking_uri, settings.model_name, artifact_location=settings.artifact_location,
                    cache_dir=settings.cache_dir)
