"""Where the pipeline keeps its state: the configuration's ``registry`` section, else the environment,
else embedded defaults.

Embedded default (one machine, nothing to start by hand): MLflow on SQLite and artifacts under the
lidgate home, Prefect in ephemeral mode with its home there too. Beyond one machine, point
``registry.tracking_uri`` (or ``MLFLOW_TRACKING_URI``) at the MLflow server and ``PREFECT_API_URL`` at
the Prefect server (deployment/README.md); the home must then be a volume shared by the workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flows.env import home_dir

if TYPE_CHECKING:
    from components.config import LidgateConfig
    from components.registry import Registry


@dataclass(frozen=True)
class Settings:
    """Resolved locations: the lidgate home, the MLflow URIs and the registered model's name; and above
    how many MiB stored certification data are read back as streams (``certification.memory_mb``; None:
    the registry's default)."""

    home: Path
    tracking_uri: str
    registry_uri: str
    artifact_location: str
    model_name: str
    stream_mb: int | None = None

    @property
    def staging(self) -> Path:
        """Candidates between training and registration (shared with the certify worker)."""
        return self.home / "staging"

    @property
    def streams_dir(self) -> Path:
        """Files a streamed certification DataLoader is read into (one folder per reading process)."""
        return self.home / "streams"

    @property
    def lookahead_dir(self) -> Path:
        """The lookahead buffer of upcoming data for this model (biases the next LID)."""
        return self.home / "lookahead" / self.model_name

    @property
    def audit_dir(self) -> Path:
        return self.home / "audit" / self.model_name

    @property
    def onnx_dir(self) -> Path:
        return self.home / "onnx"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def rejections_dir(self) -> Path:
        return self.home / "rejections"


def settings_for(config: LidgateConfig | None = None, *, model_name: str | None = None) -> Settings:
    """The settings of one registered model: a configuration's ``registry`` values where given, else
    ``$LIDGATE_HOME`` / ``$MLFLOW_TRACKING_URI`` / ``$LIDGATE_ARTIFACT_LOCATION``, else files under the home.

    Args:
        config: the team's configuration (its ``name`` is the registered model), or None.
        model_name: the registered model when there is no configuration (default ``$LIDGATE_MODEL_NAME``).

    Returns:
        The settings; the home directory is created.
    """
    reg = config.registry if config is not None else None
    home = Path(reg.home).resolve() if reg is not None and reg.home is not None else home_dir()
    if home.exists() and not home.is_dir():
        raise NotADirectoryError(f"the lidgate home '{home}' exists and is not a directory (LIDGATE_HOME or "
                                 "registry.home)")
    home.mkdir(parents=True, exist_ok=True)
    tracking = (reg.tracking_uri if reg is not None else None) or os.environ.get("MLFLOW_TRACKING_URI") \
        or f"sqlite:///{home / 'mlflow.db'}"
    registry = (reg.registry_uri if reg is not None else None) or os.environ.get("MLFLOW_REGISTRY_URI") or tracking
    artifacts = (reg.artifact_location if reg is not None else None) or os.environ.get("LIDGATE_ARTIFACT_LOCATION") \
        or (home / "mlartifacts").as_uri()
    name = config.name if config is not None else (model_name or os.environ.get("LIDGATE_MODEL_NAME", "lidgate-model"))
    return Settings(home=home, tracking_uri=tracking, registry_uri=registry, artifact_location=artifacts,
                    model_name=name, stream_mb=config.certification.memory_mb if config is not None else None)


def prefect_server_configured() -> bool:
    """True when a real Prefect server is configured (then deployments and work pools are used)."""
    return bool(os.environ.get("PREFECT_API_URL"))


def open_registry(settings: Settings) -> Registry:
    """The MLflow registry for ``settings`` (the one way flows, the demo and the CLI open it)."""
    from components.artifacts import STREAM_ABOVE_MB
    from components.registry import Registry

    return Registry(settings.tracking_uri, settings.model_name, artifact_location=settings.artifact_location,
                    cache_dir=settings.cache_dir, registry_uri=settings.registry_uri,
                    stream_mb=settings.stream_mb or STREAM_ABOVE_MB)
