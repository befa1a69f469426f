"""The MLflow side of lidgate: model versions with their LID, certification data and fingerprints.

One registered model version = one MLflow run whose artifacts are the source of truth::

    model/weights.safetensors     state_dict (parameters and buffers), safetensors — never a pickle
    model/spec.json               how to rebuild the nn.Module: {"factory": "pkg.mod:fn", "kwargs": {...}}
    lid/                          LID.save output (lid.json, nominal.safetensors, members/...), if any
    cert_data/<task>.safetensors  held-out certification data per task: tensors "x" and "y"
    validation.json               the data-validation summary the version was registered with

plus, when an ``example_input`` is given, an MLflow pytorch model (``pytorch_model``, the safe
``pt2`` format) for serving tools. The registered model version carries tags (``lid.*``) that
summarise the certificate and pin the sha256 of every artifact above, so ``load`` detects an
artifact edited in the store after registration (``RegistryIntegrityError``).

Promotion uses the alias ``champion`` (stages are deprecated). The alias is moved only by
``components.gate.promote`` through the private ``Registry._set_champion``; nothing else in lidgate
may call ``set_registered_model_alias`` (a test enforces it).

MLflow quirks handled here: the SQLite store returns ``ModelVersion.version`` as int and the HTTP
store as str (we always ``str()`` it); ``mlflow.pytorch.log_model`` defaults to ``pt2``, which needs
an input example, and reads the *global* tracking URI, so it runs inside a scoped tracking URI
against a ``LoggedModel`` created explicitly in our experiment and run; ``pip_requirements`` are
explicit (inference costs seconds per call).
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from lid_engine import LID, fingerprint_model  # noqa: E402

__all__ = [
    "ARTIFACT_CERT_DIR",
    "ARTIFACT_LID_DIR",
    "ARTIFACT_SPEC",
    "ARTIFACT_VALIDATION",
    "ARTIFACT_WEIGHTS",
    "CHAMPION_ALIAS",
    "LoadedVersion",
    "ModelSpec",
    "Registry",
    "RegistryError",
    "RegistryIntegrityError",
    "STATUS_BLOCKED",
    "STATUS_PENDING",
    "STATUS_PROMOTED",
    "VersionInfo",
    "sha256_file",
]

CHAMPION_ALIAS = "champion"
MLFLOW_MODEL_NAME = "pytorch_model"

ARTIFACT_WEIGHTS = "model/weights.safetensors"
ARTIFACT_SPEC = "model/spec.json"
ARTIFACT_LID_DIR = "lid"
ARTIFACT_LID_JSON = "lid/lid.json"
ARTIFACT_CERT_DIR = "cert_data"
ARTIFACT_VALIDATION = "validation.json"

STATUS_PENDING = "pending"
STATUS_PROMOTED = "promoted"
STATUS_BLOCKED = "blocked"

# version tags
TAG_STATUS = "lid.status"
TAG_TASKS = "lid.tasks"
TAG_HAS_LID = "lid.has_lid"
TAG_CERT_ACC = "lid.certified_accuracy."
TAG_LOWER_BOUND = "lid.lower_bound."
TAG_TAU = "lid.tau."
TAG_CERT_SHA = "lid.certificate_sha256"
TAG_WEIGHTS_SHA = "lid.weights_sha256"
TAG_SPEC_SHA = "lid.spec_sha256"
TAG_VALIDATION_SHA = "lid.validation_sha256"
TAG_MODEL_SHA = "lid.model_sha256"
TAG_DATA_SHA = "lid.cert_data_sha256."
TAG_LINEAGE = "lid.lineage"
TAG_PARENT = "lid.parent"
TAG_FACTORY = "lid.factory"
TAG_MLFLOW_MODEL = "lid.mlflow_model"
TAG_REGISTERED_AT = "lid.registered_at"

PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy"]

_TASK_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$")
_FACTORY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
_URI_LOCK = threading.Lock()


class RegistryError(RuntimeError):
    """A registry operation could not be carried out (missing version, bad input, ...)."""


class RegistryIntegrityError(RegistryError):
    """An artifact of a registered version does not match the fingerprint recorded at registration.

    ``problems``: list of ``(artifact, detail)``; ``version``: the model version.
    """

    def __init__(self, version: str, problems: Sequence[tuple[str, str]]):
        self.version = str(version)
        self.problems = list(problems)
        text = "; ".join(f"{a}: {d}" for a, d in self.problems)
        super().__init__(f"model version {self.version}: artifact integrity check failed: {text}")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------ model spec
@dataclass
class ModelSpec:
    """How to rebuild the nn.Module (never pickled): ``factory(**kwargs)``.

    ``factory``: ``"package.module:function"``, e.g. ``"lid_engine.models:mlp"``; ``kwargs``: JSON-able.
    """

    factory: str
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.factory, str) or not _FACTORY_RE.match(self.factory):
            raise RegistryError(f"ModelSpec: 'factory' must look like 'package.module:function', got {self.factory!r}")
        if not isinstance(self.kwargs, Mapping):
            raise RegistryError(f"ModelSpec: 'kwargs' must be a mapping, got {type(self.kwargs).__name__}")
        try:
            self.kwargs = json.loads(json.dumps(dict(self.kwargs), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"ModelSpec: 'kwargs' must be JSON-serialisable: {exc}") from None

    def build(self) -> nn.Module:
        module_name, fn_name = self.factory.split(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as exc:
            raise RegistryError(f"ModelSpec: cannot import factory {self.factory!r}: {exc}") from None
        model = fn(**self.kwargs)
        if not isinstance(model, nn.Module):
            raise RegistryError(f"ModelSpec: factory {self.factory!r} returned {type(model).__name__}, not an nn.Module")
        return model.eval()

    def to_dict(self) -> dict:
        return {"factory": self.factory, "kwargs": self.kwargs}

    @classmethod
    def from_dict(cls, d) -> ModelSpec:
        if not isinstance(d, Mapping) or set(d) != {"factory", "kwargs"}:
            raise RegistryError(f"ModelSpec: expected exactly the fields factory and kwargs, got {d!r}")
        return cls(d["factory"], d["kwargs"])


# ------------------------------------------------------------------------------------ records
@dataclass
class LoadedVersion:
    """A registered version, downloaded, checked and rebuilt.

    ``problems``: integrity problems ``(artifact, detail)`` — always empty from ``Registry.load``
    (which raises instead); only the gate's lenient load returns a version with problems, and then
    ``model``/``lid`` may be None where the artifact could not be read.
    """

    version: str
    run_id: str
    model: nn.Module | None
    spec: ModelSpec | None
    lid: LID | None
    lid_dir: Path | None
    cert_data: dict[str, tuple[Tensor, Tensor]]
    lineage: list[str]
    tags: dict[str, str]
    directory: Path | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def has_lid(self) -> bool:
        """The version was registered with a LID (whether or not it loaded)."""
        return self.tags.get(TAG_HAS_LID) == "true"


@dataclass
class VersionInfo:
    version: str
    run_id: str
    created: str  # ISO-8601 UTC
    tags: dict[str, str]
    aliases: list[str]
    status: str  # lid.status: pending | promoted | blocked | unknown

    def to_dict(self) -> dict:
        return {"version": self.version, "run_id": self.run_id, "created": self.created, "tags": dict(self.tags),
                "aliases": list(self.aliases), "status": self.status}


# ------------------------------------------------------------------------------------ helpers
def _check_task(task) -> str:
    if not isinstance(task, str) or not _TASK_RE.match(task):
        raise RegistryError(
            f"task name {task!r} must be 1-100 characters of letters, digits, '_', '.', '-' (not starting with '.' or '-')"
        )
    return task


def _check_cert_data(cert_data) -> dict[str, tuple[Tensor, Tensor]]:
    if not isinstance(cert_data, Mapping):
        raise RegistryError(f"'cert_data' must be a mapping task -> (x, y), got {type(cert_data).__name__}")
    out = {}
    for t, xy in cert_data.items():
        _check_task(t)
        if not isinstance(xy, (tuple, list)) or len(xy) != 2 or not all(isinstance(v, Tensor) for v in xy):
            raise RegistryError(f"cert_data['{t}'] must be a pair of tensors (x, y)")
        x, y = xy
        if len(x) != len(y):
            raise RegistryError(f"cert_data['{t}']: x has {len(x)} rows, y has {len(y)}")
        out[t] = (x, y)
    return out


def _fmt(v: float) -> str:
    return repr(float(v))


def _state_for_file(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _is_not_found(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


@contextmanager
def _scoped_tracking_uri(uri: str):
    """``mlflow.pytorch.log_model`` reads the global tracking URI: set it for the call, then restore."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _URI_LOCK:
        previous = tracking_utils._tracking_uri
        env_before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous)
            if env_before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env_before


# ------------------------------------------------------------------------------------ registry
class Registry:
    """lidgate's view of one MLflow registered model (default ``lidgate-model``).

    ``tracking_uri``: e.g. ``sqlite:////abs/path/mlflow.db`` or ``http://host:port`` (also the
    registry URI). ``artifact_location``: used when the experiment is created (recommended with a
    SQLite store). ``cache_dir``: where artifacts are downloaded (a fresh sub-directory per download,
    so a re-download never overwrites files a caller still uses); default: a private temp dir.
    """

    def __init__(
        self,
        tracking_uri: str,
        model_name: str = "lidgate-model",
        experiment: str = "lidgate",
        artifact_location: str | Path | None = None,
        cache_dir: str | Path | None = None,
    ):
        from mlflow import MlflowClient

        self.tracking_uri = str(tracking_uri)
        self.model_name = model_name
        self.experiment_name = experiment
        if artifact_location is not None:
            loc = str(artifact_location)
            if "://" not in loc:
                loc = Path(loc).absolute().as_uri()
            artifact_location = loc
        self.artifact_location = artifact_location
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        if cache_dir is None:
            cache_dir = tempfile.mkdtemp(prefix="lidgate-registry-")
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._experiment_id: str | None = None

    def __repr__(self) -> str:
        return f"Registry({self.tracking_uri!r}, model_name={self.model_name!r})"

    # ---------------------------------------------------------------- experiment / registered model
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment_name)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment_name, artifact_location=self.artifact_location)
                except Exception as exc:  # created concurrently by another process
                    exp = self.client.get_experiment_by_name(self.experiment_name)
                    if exp is None:
                        raise RegistryError(f"cannot create experiment {self.experiment_name!r}: {exc}") from exc
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _ensure_registered_model(self) -> None:
        try:
            self.client.get_registered_model(self.model_name)
            return
        except Exception as exc:
            if not _is_not_found(exc):
                raise
        try:
            self.client.create_registered_model(
                self.model_name, description="lidgate: model versions with locally invariant domain certificates")
        except Exception as exc:
            if getattr(exc, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise

    def _model_version(self, version: str):
        try:
            return self.client.get_model_version(self.model_name, str(version))
        except Exception as exc:
            if _is_not_found(exc):
                raise RegistryError(f"model {self.model_name!r} has no version {version!r}") from None
            raise

    # ---------------------------------------------------------------- register
    def register(
        self,
        model: nn.Module,
        spec: ModelSpec,
        *,
        lid: LID | None,
        cert_data: Mapping[str, tuple[Tensor, Tensor]],
        lineage: Sequence[str] = (),
        validation: Mapping | None = None,
        extra_tags: Mapping[str, str] | None = None,
        example_input: Tensor | None = None,
    ) -> str:
        """Log the model, its LID and certification data as one MLflow run and create a model version.

        The version starts with ``lid.status=pending``; only the gate promotes it. ``lineage``: earlier
        champion versions whose certificates this model must still satisfy (oldest first); the last
        one is recorded as ``lid.parent``. ``example_input``: if given, an MLflow pytorch model
        (``pt2``) is logged too and becomes the version's source. Returns the version (str).
        """
        if not isinstance(model, nn.Module):
            raise RegistryError(f"register: 'model' must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(spec, ModelSpec):
            raise RegistryError(f"register: 'spec' must be a ModelSpec, got {type(spec).__name__}")
        if lid is not None and not isinstance(lid, LID):
            raise RegistryError(f"register: 'lid' must be a lid_engine.LID or None, got {type(lid).__name__}")
        cert_data = _check_cert_data(cert_data)
        if lid is not None and set(lid.tasks) != set(cert_data):
            raise RegistryError(
                f"register: the LID certifies tasks {sorted(lid.tasks)} but cert_data has {sorted(cert_data)}")
        if isinstance(lineage, str):
            raise RegistryError("register: 'lineage' must be a sequence of versions, not a string")
        lineage = [str(v) for v in lineage]
        for v in lineage:
            if not v.isdigit():
                raise RegistryError(f"register: lineage version {v!r} is not a version number")
            self._model_version(v)  # must exist
        extra = {str(k): str(v) for k, v in (extra_tags or {}).items()}
        clash = sorted(k for k in extra if k.startswith("lid."))
        if clash:
            raise RegistryError(f"register: extra_tags may not set lid.* tags ({clash})")
        validation_doc = json.loads(json.dumps(dict(validation) if validation is not None else None,
                                               allow_nan=False, default=str))

        # The spec must rebuild exactly this architecture (load() depends on it).
        state = _state_for_file(model)
        rebuilt = spec.build()
        try:
            rebuilt.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RegistryError(f"register: the spec {spec.factory}({spec.kwargs}) does not rebuild this model: {exc}") from None
        model_sha = fingerprint_model(model)
        if fingerprint_model(rebuilt) != model_sha:
            raise RegistryError("register: the model rebuilt from spec + state_dict has a different fingerprint "
                                "(parameters outside state_dict, or dtype changes)")

        with tempfile.TemporaryDirectory(prefix="lidgate-register-", dir=self.cache_dir) as tmp:
            stage = Path(tmp) / "artifacts"
            (stage / "model").mkdir(parents=True)
            save_file(state, str(stage / ARTIFACT_WEIGHTS), metadata={"format": "lidgate.weights/1"})
            (stage / ARTIFACT_SPEC).write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True))
            if lid is not None:
                lid.save(stage / ARTIFACT_LID_DIR)
            (stage / ARTIFACT_CERT_DIR).mkdir()
            for t, (x, y) in cert_data.items():
                save_file({"x": x.detach().cpu().contiguous().clone(), "y": y.detach().cpu().contiguous().clone()},
                          str(stage / ARTIFACT_CERT_DIR / f"{t}.safetensors"), metadata={"task": t})
            (stage / ARTIFACT_VALIDATION).write_text(json.dumps(validation_doc, indent=2, sort_keys=True))

            tags = {
                TAG_STATUS: STATUS_PENDING,
                TAG_HAS_LID: "true" if lid is not None else "false",
                TAG_TASKS: ",".join(sorted(cert_data)),
                TAG_WEIGHTS_SHA: sha256_file(stage / ARTIFACT_WEIGHTS),
                TAG_SPEC_SHA: sha256_file(stage / ARTIFACT_SPEC),
                TAG_VALIDATION_SHA: sha256_file(stage / ARTIFACT_VALIDATION),
                TAG_MODEL_SHA: model_sha,
                TAG_LINEAGE: ",".join(lineage),
                TAG_PARENT: lineage[-1] if lineage else "",
                TAG_FACTORY: spec.factory,
                TAG_REGISTERED_AT: _utc_now(),
            }
            for t in cert_data:
                tags[TAG_DATA_SHA + t] = sha256_file(stage / ARTIFACT_CERT_DIR / f"{t}.safetensors")
            if lid is not None:
                tags[TAG_CERT_SHA] = sha256_file(stage / ARTIFACT_LID_JSON)
                for t, s in lid.tasks.items():
                    tags[TAG_CERT_ACC + t] = _fmt(lid.certified_accuracy(t))
                    tags[TAG_LOWER_BOUND + t] = _fmt(lid.lower_bound(t))
                    tags[TAG_TAU + t] = _fmt(s.tau)

            run = self.client.create_run(
                self.experiment_id, run_name=f"register-{self.model_name}",
                tags={"lidgate.kind": "registration", "lidgate.model_name": self.model_name})
            run_id = run.info.run_id
            try:
                self.client.log_param(run_id, "factory", spec.factory)
                self.client.log_param(run_id, "model_sha256", model_sha)
                if lid is not None:
                    for t in lid.tasks:
                        self.client.log_metric(run_id, f"certified_accuracy.{t}", lid.certified_accuracy(t))
                        self.client.log_metric(run_id, f"lower_bound.{t}", lid.lower_bound(t))
                self.client.log_artifacts(run_id, str(stage))
                source, model_id = f"{run.info.artifact_uri.rstrip('/')}/model", None
                if example_input is not None:
                    source, model_id = self._log_pytorch_model(run_id, model, example_input)
                tags[TAG_MLFLOW_MODEL] = "pt2" if model_id else "none"
                self._ensure_registered_model()
                mv = self.client.create_model_version(
                    self.model_name, source=source, run_id=run_id, tags={**extra, **tags},
                    description=f"lidgate registration, lineage [{', '.join(lineage)}]", model_id=model_id)
            except BaseException:
                try:
                    self.client.set_terminated(run_id, "FAILED")
                finally:
                    raise
            self.client.set_terminated(run_id, "FINISHED")
        return str(mv.version)

    def _log_pytorch_model(self, run_id: str, model: nn.Module, example_input: Tensor) -> tuple[str, str]:
        """An MLflow pytorch model in the safe ``pt2`` format (needs the input example to trace)."""
        import mlflow

        if not isinstance(example_input, Tensor):
            raise RegistryError(f"register: 'example_input' must be a tensor, got {type(example_input).__name__}")
        example = example_input.detach().cpu().numpy()
        if example.shape[0] < 2:  # torch.export makes a size-1 batch dimension static
            raise RegistryError("register: 'example_input' needs a batch of at least 2 rows (a dynamic batch dimension)")
        logged = self.client.create_logged_model(self.experiment_id, name=MLFLOW_MODEL_NAME, source_run_id=run_id)
        with _scoped_tracking_uri(self.tracking_uri), torch.no_grad():
            mlflow.pytorch.log_model(
                copy.deepcopy(model).eval(), name=MLFLOW_MODEL_NAME, model_id=logged.model_id, run_id=run_id,
                input_example=example, pip_requirements=PIP_REQUIREMENTS, serialization_format="pt2",
            )
        # The SQL registry store resolves a ``models:/<id>`` source through the *global* tracking URI;
        # the logged model's storage location needs no resolution.
        return self.client.get_logged_model(logged.model_id).artifact_location, logged.model_id

    # ---------------------------------------------------------------- read
    def _download(self, run_id: str, artifact_path: str, dest: Path) -> Path:
        import mlflow

        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(dest), tracking_uri=self.tracking_uri)
        return Path(local)

    def _fresh_dir(self, version: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"v{version}-", dir=self.cache_dir))

    def _resolve(self, version: str | None, alias: str | None):
        if (version is None) == (alias is None):
            raise RegistryError("load: give exactly one of 'version' or 'alias'")
        if alias is not None:
            # (get_model_version_by_alias answers a missing alias with INVALID_PARAMETER_VALUE on the
            # SQL store: read the registered model's alias map instead.)
            try:
                aliases = self.client.get_registered_model(self.model_name).aliases or {}
            except Exception as exc:
                if _is_not_found(exc):
                    raise RegistryError(f"no registered model {self.model_name!r}") from None
                raise
            if alias not in aliases:
                raise RegistryError(f"model {self.model_name!r} has no alias {alias!r}")
            return self._model_version(str(aliases[alias]))
        return self._model_version(str(version))

    def load(self, version: str | None = None, alias: str | None = None) -> LoadedVersion:
        """Download, check and rebuild a version (``version=`` or ``alias=``, e.g. ``"champion"``).

        Every artifact's sha256 must match the tags recorded at registration and the rebuilt model's
        fingerprint must equal ``lid.model_sha256``; otherwise ``RegistryIntegrityError`` names the
        artifacts. The model is rebuilt from ``spec.json`` + ``weights.safetensors`` (strict).
        """
        loaded = self._load(version=version, alias=alias, strict=True)
        return loaded

    def _load(self, version: str | None = None, alias: str | None = None, *, strict: bool = True) -> LoadedVersion:
        """``strict=False`` (the gate): collect integrity problems in ``LoadedVersion.problems`` and
        keep going with whatever can still be read, so that every failing check can be reported."""
        mv = self._resolve(version, alias)
        version = str(mv.version)
        tags = dict(mv.tags or {})
        run_id = mv.run_id
        problems: list[tuple[str, str]] = []
        dest = self._fresh_dir(version)

        def fetch(path: str) -> Path | None:
            try:
                return self._download(run_id, path, dest)
            except Exception as exc:  # noqa: BLE001
                problems.append((path, f"cannot download: {type(exc).__name__}: {exc}"))
                return None

        def pinned(path: Path | None, artifact: str, tag: str) -> bool:
            if path is None:
                return False
            if not path.is_file():
                problems.append((artifact, "missing from the artifact store"))
                return False
            expected = tags.get(tag)
            if not expected:
                problems.append((artifact, f"no '{tag}' tag records its fingerprint"))
                return False
            actual = sha256_file(path)
            if actual != expected:
                problems.append((artifact, f"sha256 {actual} differs from the registered {expected} (tag '{tag}'): "
                                           "modified after registration"))
                return False
            return True

        # spec + weights -> model
        model_dir = fetch("model")
        spec = model = None
        spec_path = None if model_dir is None else dest / ARTIFACT_SPEC
        weights_path = None if model_dir is None else dest / ARTIFACT_WEIGHTS
        spec_ok = pinned(spec_path, ARTIFACT_SPEC, TAG_SPEC_SHA)
        weights_ok = pinned(weights_path, ARTIFACT_WEIGHTS, TAG_WEIGHTS_SHA)
        if spec_ok:  # never import a factory named by an unpinned file
            try:
                spec = ModelSpec.from_dict(json.loads(spec_path.read_text(encoding="utf-8")))
            except Exception as exc:  # noqa: BLE001
                problems.append((ARTIFACT_SPEC, f"unreadable: {exc}"))
        if spec is not None and weights_path is not None and weights_path.is_file() and (weights_ok or not strict):
            try:
                model = spec.build()
                model.load_state_dict(load_file(str(weights_path)), strict=True)
                model.eval()
                sha = fingerprint_model(model)
                if sha != tags.get(TAG_MODEL_SHA):
                    problems.append(("model", f"the rebuilt model's fingerprint {sha} differs from the registered "
                                              f"'{TAG_MODEL_SHA}' {tags.get(TAG_MODEL_SHA)}"))
            except Exception as exc:  # noqa: BLE001
                problems.append((ARTIFACT_WEIGHTS, f"cannot rebuild the model: {type(exc).__name__}: {exc}"))
                model = None

        # LID
        lid = lid_dir = None
        if tags.get(TAG_HAS_LID) == "true":
            d = fetch(ARTIFACT_LID_DIR)
            if d is not None:
                lid_dir = d
                lid_ok = pinned(lid_dir / "lid.json", ARTIFACT_LID_JSON, TAG_CERT_SHA)
                if lid_ok or not strict:
                    try:
                        lid = LID.load(lid_dir)
                    except Exception as exc:  # noqa: BLE001
                        problems.append((ARTIFACT_LID_DIR, f"LID.load refused it: {exc}"))
        elif tags.get(TAG_HAS_LID) != "false":
            problems.append(("tags", f"'{TAG_HAS_LID}' tag missing: not a lidgate registration"))

        # certification data
        cert_data: dict[str, tuple[Tensor, Tensor]] = {}
        tasks = [t for t in tags.get(TAG_TASKS, "").split(",") if t]
        if tasks:
            d = fetch(ARTIFACT_CERT_DIR)
            if d is not None:
                present = sorted(p.name for p in d.iterdir())
                unexpected = sorted(set(present) - {f"{t}.safetensors" for t in tasks})
                if unexpected:
                    problems.append((ARTIFACT_CERT_DIR, f"unexpected files {unexpected}"))
                for t in tasks:
                    rel = f"{ARTIFACT_CERT_DIR}/{t}.safetensors"
                    p = d / f"{t}.safetensors"
                    if pinned(p, rel, TAG_DATA_SHA + t) or (not strict and p.is_file()):
                        try:
                            tensors = load_file(str(p))
                            cert_data[t] = (tensors["x"], tensors["y"])
                        except Exception as exc:  # noqa: BLE001
                            problems.append((rel, f"unreadable: {type(exc).__name__}: {exc}"))
        if lid is not None and set(lid.tasks) != set(tasks):
            problems.append(("tags", f"'{TAG_TASKS}' lists {tasks}, the LID certifies {sorted(lid.tasks)}"))

        # validation summary (pinned so an audit can trust it)
        v = fetch(ARTIFACT_VALIDATION)
        pinned(v, ARTIFACT_VALIDATION, TAG_VALIDATION_SHA)

        if strict and problems:
            raise RegistryIntegrityError(version, problems)
        lineage = [x for x in tags.get(TAG_LINEAGE, "").split(",") if x]
        return LoadedVersion(version=version, run_id=run_id, model=model, spec=spec, lid=lid, lid_dir=lid_dir,
                             cert_data=cert_data, lineage=lineage, tags=tags, directory=dest, problems=problems)

    def release(self, loaded: LoadedVersion) -> None:
        """Delete the downloaded copy behind ``loaded`` (its ``lid_dir`` becomes invalid).

        Every ``load`` downloads afresh (a cached copy could hide an artifact edited in the store), so
        long-running callers should release what they no longer need; the gate does.
        """
        d = loaded.directory
        if d is not None and Path(d).resolve().parent == self.cache_dir.resolve():
            shutil.rmtree(d, ignore_errors=True)
        loaded.directory = None

    # ---------------------------------------------------------------- aliases and tags
    def champion(self) -> str | None:
        """The version holding the alias ``champion``, or None (no registered model or no alias).

        Any other error (store unreachable, ...) propagates: callers must not mistake it for "no champion".
        """
        try:
            rm = self.client.get_registered_model(self.model_name)
        except Exception as exc:
            if _is_not_found(exc):
                return None
            raise
        v = (rm.aliases or {}).get(CHAMPION_ALIAS)
        return None if v is None else str(v)

    def _set_champion(self, version: str | None) -> None:
        """Private: ONLY ``components.gate`` calls this. ``None`` removes the alias (gate rollback)."""
        if version is None:
            self.client.delete_registered_model_alias(self.model_name, CHAMPION_ALIAS)
        else:
            self.client.set_registered_model_alias(self.model_name, CHAMPION_ALIAS, str(version))

    def set_tags(self, version: str, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), str(k), str(v))

    def log_record(self, version: str, relative: str, obj: Mapping) -> None:
        """Add a JSON record (e.g. a gate decision) to the version's run, as ``relative``."""
        if not relative.endswith(".json") or relative.startswith(("model/", "lid/", "cert_data/")) \
                or relative == ARTIFACT_VALIDATION:
            raise RegistryError(f"log_record: {relative!r} must be a new .json path outside the pinned artifacts")
        mv = self._model_version(version)
        self.client.log_dict(mv.run_id, json.loads(json.dumps(obj, default=str)), relative)

    # ---------------------------------------------------------------- listing and audit
    def history(self) -> list[VersionInfo]:
        """Every version of the registered model, oldest first."""
        out, token = [], None
        try:
            aliases_of: dict[str, list[str]] = {}
            for alias, v in (self.client.get_registered_model(self.model_name).aliases or {}).items():
                aliases_of.setdefault(str(v), []).append(alias)
        except Exception as exc:
            if _is_not_found(exc):
                return []
            raise
        while True:
            page = self.client.search_model_versions(f"name='{self.model_name}'", max_results=1000, page_token=token)
            for mv in page:
                tags = dict(mv.tags or {})
                created = datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, timezone.utc)
                out.append(VersionInfo(
                    version=str(mv.version), run_id=mv.run_id, created=created.isoformat(timespec="milliseconds"),
                    tags=tags, aliases=sorted(set(mv.aliases or []) | set(aliases_of.get(str(mv.version), []))), status=tags.get(TAG_STATUS, "unknown")))
            token = getattr(page, "token", None)
            if not token:
                break
        out.sort(key=lambda v: int(v.version))
        return out

    def certificate(self, version: str) -> dict:
        """The version's ``lid.json`` (manifest with every certificate) as a dict, checked against its
        registered sha256. Raises ``RegistryError`` when the version has no LID."""
        mv = self._model_version(version)
        tags = dict(mv.tags or {})
        if tags.get(TAG_HAS_LID) != "true":
            raise RegistryError(f"model version {version} was registered without a LID (no certificate)")
        path = self.artifact_path(version, ARTIFACT_LID_JSON)
        return json.loads(path.read_text(encoding="utf-8"))

    def artifact_path(self, version: str, relative: str) -> Path:
        """Download one artifact of the version's run (fresh copy) and return its local path.

        Artifacts whose sha256 is pinned by a tag (weights, spec, lid.json, cert data, validation)
        are checked; a mismatch raises ``RegistryIntegrityError``.
        """
        mv = self._model_version(version)
        tags = dict(mv.tags or {})
        relative = relative.strip("/")
        path = self._download(mv.run_id, relative, self._fresh_dir(str(mv.version)))
        tag = {ARTIFACT_WEIGHTS: TAG_WEIGHTS_SHA, ARTIFACT_SPEC: TAG_SPEC_SHA, ARTIFACT_LID_JSON: TAG_CERT_SHA,
               ARTIFACT_VALIDATION: TAG_VALIDATION_SHA}.get(relative)
        if relative.startswith(ARTIFACT_CERT_DIR + "/") and relative.endswith(".safetensors"):
            tag = TAG_DATA_SHA + relative[len(ARTIFACT_CERT_DIR) + 1:-len(".safetensors")]
        if tag is not None and path.is_file():
            actual = sha256_file(path)
            if actual != tags.get(tag):
                raise RegistryIntegrityError(str(mv.version), [(relative, f"sha256 {actual} differs from the registered "
                                                                          f"{tags.get(tag)} (tag '{tag}')")])
        return path
