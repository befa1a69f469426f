"""The model store: lidgate's view of one MLflow registered model and its versions.

``Registry.register`` logs a model, its LID and its certification data as one MLflow run (layout
and fingerprints: ``components.artifacts``; tag names: ``components.tags``) and creates a model
version with ``lid.status=pending``. ``Registry.load`` downloads a version afresh, checks every
artifact against the sha256 pinned at registration and rebuilds the model from its ``ModelSpec``
(``components.factory``); anything edited in the store after registration raises
``RegistryIntegrityError``. ``Registry.inspect`` reads the same version leniently for the gate and
audits, listing every problem instead of stopping at the first.

Promotion uses the alias ``champion`` (MLflow stages are deprecated). The alias is moved only by
``components.gate.promote`` through ``Registry.move_champion``; nothing else in lidgate may call it
or MLflow's alias setters (a test enforces it).

MLflow quirks handled here: the SQLite store returns ``ModelVersion.version`` as int and the HTTP
store as str (we always ``str()`` it); a missing alias is answered with INVALID_PARAMETER_VALUE on
the SQL store (we read the registered model's alias map instead).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from torch import Tensor, nn  # noqa: E402

from lid_engine import LID, CertificationStream, fingerprint_model  # noqa: E402
from lid_engine.files import utc_now  # noqa: E402

from . import artifacts as art  # noqa: E402
from . import tags as tg  # noqa: E402
from .owner import owner_tag  # noqa: E402

#: the registering process (``components.owner``) on each registration run, so that a run its
#: process left RUNNING can be told from one still at work
RUN_OWNER_TAG = "lidgate.owner"
from .factory import ModelSpec  # noqa: E402

__all__ = ["LoadedVersion", "Registry", "RegistryError", "RegistryIntegrityError", "VersionInfo"]

_TASK_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}\Z")


class RegistryError(RuntimeError):
    """A registry operation could not be carried out (missing version, bad input, ...)."""


class RegistryIntegrityError(RegistryError):
    """An artifact of a registered version does not match the fingerprint recorded at registration.

    Attributes:
        version: the model version.
        problems: ``(artifact, detail)`` pairs, one per artifact that failed its check.
    """

    def __init__(self, version: str, problems: Sequence[tuple[str, str]]):
        self.version = str(version)
        self.problems = list(problems)
        text = "; ".join(f"{a}: {d}" for a, d in self.problems)
        super().__init__(f"model version {self.version}: artifact integrity check failed: {text}")


# ------------------------------------------------------------------------------------ records
@dataclass
class LoadedVersion:
    """A registered version, downloaded, checked and rebuilt.

    ``problems``: integrity problems ``(artifact, detail)`` — always empty from ``Registry.load``
    (which raises instead); only ``Registry.inspect`` returns a version with problems, and then
    ``model``/``lid`` may be None where the artifact could not be read.
    """

    version: str
    run_id: str
    model: nn.Module | None
    spec: ModelSpec | None
    lid: LID | None
    lid_dir: Path | None
    cert_data: dict[str, tuple[Tensor, Tensor] | CertificationStream]  # streams for files above stream_mb
    lineage: list[str]
    tags: dict[str, str]
    directory: Path | None = None
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def has_lid(self) -> bool:
        """The version was registered with a LID (whether or not it loaded)."""
        return self.tags.get(tg.TAG_HAS_LID) == "true"


@dataclass
class VersionInfo:
    """One row of ``Registry.history``: a version's identity, tags and aliases, nothing downloaded."""

    version: str
    run_id: str
    created: str  # ISO-8601 UTC
    tags: dict[str, str]
    aliases: list[str]
    status: str  # lid.status: pending | promoted | blocked | unknown

    def to_dict(self) -> dict:
        return {"version": self.version, "run_id": self.run_id, "created": self.created, "tags": dict(self.tags),
                "aliases": list(self.aliases), "status": self.status}


# ------------------------------------------------------------------------------------ input checks
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
        if isinstance(xy, CertificationStream):  # written a chunk at a time
            out[t] = xy
            continue
        if not isinstance(xy, (tuple, list)) or len(xy) != 2 or not all(isinstance(v, Tensor) for v in xy):
            raise RegistryError(f"cert_data['{t}'] must be a pair of tensors (x, y) or a lid_engine.CertificationStream")
        x, y = xy
        if len(x) != len(y):
            raise RegistryError(f"cert_data['{t}']: x has {len(x)} rows, y has {len(y)}")
        out[t] = (x, y)
    return out


def _fmt(v: float) -> str:
    return repr(float(v))


def _is_not_found(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


# ------------------------------------------------------------------------------------ registry
class Registry:
    """lidgate's view of one MLflow registered model (default ``lidgate-model``).

    Args:
        tracking_uri: e.g. ``sqlite:////abs/path/mlflow.db`` or ``http://host:port`` (also the
            registry URI).
        model_name: the registered model.
        experiment: the MLflow experiment that holds the registration runs.
        artifact_location: used when the experiment is created (recommended with a SQLite store).
        cache_dir: where artifacts are downloaded (a fresh sub-directory per download, so a
            re-download never overwrites files a caller still uses); default: a private temp dir.
        registry_uri: the model registry, when it is not the tracking server (default: ``tracking_uri``).
        stream_mb: certification data files larger than this many MiB are loaded as streams
            (``lid_engine.SafetensorsStream``, read about that much at a time) instead of tensors.
    """

    def __init__(
        self,
        tracking_uri: str,
        model_name: str = "lidgate-model",
        experiment: str = "lidgate",
        artifact_location: str | Path | None = None,
        cache_dir: str | Path | None = None,
        registry_uri: str | None = None,
        stream_mb: int | None = art.STREAM_ABOVE_MB,
    ):
        from mlflow import MlflowClient

        self.stream_mb = stream_mb
        self.tracking_uri = str(tracking_uri)
        self.registry_uri = str(registry_uri or tracking_uri)
        self.model_name = model_name
        self.experiment_name = experiment
        if artifact_location is not None:
            loc = str(artifact_location)
            if "://" not in loc:
                loc = Path(loc).absolute().as_uri()
            artifact_location = loc
        self.artifact_location = artifact_location
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)
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
        cert_data: Mapping[str, tuple[Tensor, Tensor] | CertificationStream],
        lineage: Sequence[str] = (),
        validation: Mapping | None = None,
        extra_tags: Mapping[str, str] | None = None,
        example_input: Tensor | None = None,
    ) -> str:
        """Log the model, its LID and certification data as one MLflow run and create a model version.

        The version starts with ``lid.status=pending``; only the gate promotes it.

        Args:
            model: the model; ``spec`` must rebuild exactly this architecture (checked).
            spec: how to rebuild it (``components.factory.ModelSpec``).
            lid: its certified LID, or None (the gate then blocks it: ``no_certificate``).
            cert_data: ``{task: (x, y)}``, the held-out certification data of every LID task; a
                ``lid_engine.CertificationStream`` is written a chunk at a time (to the same file).
            lineage: earlier champion versions whose certificates this model must still satisfy
                (oldest first); the last one is recorded as ``lid.parent``.
            validation: the data-validation summary (JSON-able), stored as ``validation.json``.
            extra_tags: more version tags (never ``lid.*``).
            example_input: if given (a batch of at least 2 rows), an MLflow pytorch model (``pt2``)
                is logged too and becomes the version's source.

        Returns:
            The new version (str).

        Raises:
            RegistryError: bad input, unknown lineage version, or a spec that does not rebuild the model.
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
        if example_input is not None:
            if not isinstance(example_input, Tensor):
                raise RegistryError(f"register: 'example_input' must be a tensor, got {type(example_input).__name__}")
            if example_input.shape[0] < 2:  # torch.export makes a size-1 batch dimension static
                raise RegistryError("register: 'example_input' needs a batch of at least 2 rows (a dynamic batch dimension)")
        validation_doc = json.loads(json.dumps(dict(validation) if validation is not None else None,
                                               allow_nan=False, default=str))

        # The spec must rebuild exactly this architecture (load() depends on it).
        state = art.model_state(model)
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
            pins = art.stage_version(stage, state=state, spec=spec, lid=lid, cert_data=cert_data,
                                     validation=validation_doc)
            tags = {
                tg.TAG_STATUS: tg.STATUS_PENDING,
                tg.TAG_HAS_LID: "true" if lid is not None else "false",
                tg.TAG_TASKS: ",".join(sorted(cert_data)),
                **pins,
                tg.TAG_MODEL_SHA: model_sha,
                tg.TAG_LINEAGE: ",".join(lineage),
                tg.TAG_PARENT: lineage[-1] if lineage else "",
                tg.TAG_FACTORY: spec.factory,
                tg.TAG_REGISTERED_AT: utc_now(),
            }
            if lid is not None:
                for t, s in lid.tasks.items():
                    tags[tg.TAG_CERT_ACC + t] = _fmt(lid.certified_accuracy(t))
                    tags[tg.TAG_LOWER_BOUND + t] = _fmt(lid.lower_bound(t))
                    tags[tg.TAG_TAU + t] = _fmt(s.tau)

            run = self.client.create_run(
                self.experiment_id, run_name=f"register-{self.model_name}",
                tags={"lidgate.kind": "registration", "lidgate.model_name": self.model_name,
                      RUN_OWNER_TAG: owner_tag()})
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
                    source, model_id = art.log_pytorch_model(self.client, self.experiment_id, self.tracking_uri,
                                                             run_id, model, example_input)
                    tags[tg.TAG_MLFLOW_MODEL_SHA] = art.mlflow_model_digest(self.tracking_uri, source,
                                                                            Path(tmp) / "mlflow-model")
                tags[tg.TAG_MLFLOW_MODEL] = "pt2" if model_id else "none"
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

    # ---------------------------------------------------------------- read
    def load(self, version: str | None = None, alias: str | None = None) -> LoadedVersion:
        """Download, check and rebuild a version (``version=`` or ``alias=``, e.g. ``"champion"``).

        Every artifact's sha256 must match the tags recorded at registration and the rebuilt model's
        fingerprint must equal ``lid.model_sha256``. The model is rebuilt from ``spec.json`` +
        ``weights.safetensors`` (strict).

        Raises:
            RegistryError: no such version or alias.
            RegistryIntegrityError: naming every artifact that failed its check.
        """
        return self._read(version, alias, strict=True)

    def inspect(self, version: str | None = None, alias: str | None = None) -> LoadedVersion:
        """Read a version leniently: every integrity problem is listed, none raises.

        For the promotion gate and audits, which must report *every* failing check: integrity
        problems go to ``LoadedVersion.problems`` and reading continues with whatever can still be
        read (``model``/``lid`` are None where an artifact could not be read). A factory named by a
        ``spec.json`` whose fingerprint does not match is never imported. A version with problems
        must never be trusted; use ``load`` for anything but reporting.

        Raises:
            RegistryError: no such version or alias (nothing to inspect).
        """
        return self._read(version, alias, strict=False)

    def release(self, loaded: LoadedVersion) -> None:
        """Delete the downloaded copy behind ``loaded`` (its ``lid_dir`` becomes invalid).

        Every ``load`` downloads afresh (a cached copy could hide an artifact edited in the store), so
        long-running callers should release what they no longer need; the gate does.
        """
        d = loaded.directory
        if d is not None and Path(d).resolve().parent == self.cache_dir.resolve():
            shutil.rmtree(d, ignore_errors=True)
        loaded.directory = None

    def _read(self, version: str | None, alias: str | None, *, strict: bool) -> LoadedVersion:
        mv = self._resolve(version, alias)
        version, tags, run_id = str(mv.version), dict(mv.tags or {}), mv.run_id
        dest = self._fresh_dir(version)
        files = art.read_version(lambda rel: art.download(self.tracking_uri, run_id, rel, dest), dest, tags,
                                 lenient=not strict, stream_mb=self.stream_mb)
        files.problems.extend(self._mlflow_model_problems(mv, dest))
        if strict and files.problems:
            raise RegistryIntegrityError(version, files.problems)
        return LoadedVersion(version=version, run_id=run_id, model=files.model, spec=files.spec, lid=files.lid,
                             lid_dir=files.lid_dir, cert_data=files.cert_data, lineage=tg.lineage(tags), tags=tags,
                             directory=dest, problems=files.problems)

    def _mlflow_model_problems(self, mv, dest: Path) -> list[tuple[str, str]]:
        """The MLflow model consumers load (the version's ``source``) against the digest recorded at
        registration: a swapped or edited model is an integrity problem like any pinned file."""
        expected = (mv.tags or {}).get(tg.TAG_MLFLOW_MODEL_SHA)
        if not expected:
            return []
        try:
            actual = art.mlflow_model_digest(self.tracking_uri, mv.source, dest / "mlflow-model")
        except Exception as exc:  # noqa: BLE001 — unreadable is a problem, not a crash
            return [("mlflow model", f"cannot download {mv.source}: {type(exc).__name__}: {exc}")]
        if actual != expected:
            return [("mlflow model", f"the model at {mv.source} (what mlflow.pytorch.load_model loads) hashes to "
                                     f"{actual[:16]}…, registered as {expected[:16]}…: it was changed after registration")]
        return []

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
        v = (rm.aliases or {}).get(tg.CHAMPION_ALIAS)
        return None if v is None else str(v)

    def move_champion(self, version: str | None) -> None:
        """Point the ``champion`` alias at ``version``; ``None`` removes it.

        ONLY ``components.gate.promote`` may call this: it runs every check first and records the
        decision (a test enforces that nothing else in lidgate moves the alias). ``None`` is the
        gate's rollback when a promotion could not be recorded and there was no champion before.
        """
        if version is None:
            self.client.delete_registered_model_alias(self.model_name, tg.CHAMPION_ALIAS)
        else:
            self.client.set_registered_model_alias(self.model_name, tg.CHAMPION_ALIAS, str(version))

    def set_tags(self, version: str, tags: Mapping[str, str]) -> None:
        """Set model-version tags (values are stringified)."""
        for k, v in tags.items():
            self.client.set_model_version_tag(self.model_name, str(version), str(k), str(v))

    def delete_tags(self, version: str, keys: Sequence[str]) -> None:
        """Remove model-version tags (those that are not set are skipped)."""
        present = dict(self._model_version(version).tags or {})
        for k in keys:
            if k in present:
                self.client.delete_model_version_tag(self.model_name, str(version), str(k))

    def log_record(self, version: str, relative: str, obj: Mapping) -> None:
        """Add a JSON record (e.g. a gate decision) to the version's run, as ``relative``.

        Raises:
            RegistryError: ``relative`` is not a ``.json`` path outside the pinned artifacts.
        """
        if not relative.endswith(".json") or relative.startswith(art.PINNED_PREFIXES) \
                or relative == art.ARTIFACT_VALIDATION:
            raise RegistryError(f"log_record: {relative!r} must be a new .json path outside the pinned artifacts")
        mv = self._model_version(version)
        self.client.log_dict(mv.run_id, json.loads(json.dumps(obj, default=str)), relative)

    def read_record(self, version: str, relative: str) -> Any:
        """A JSON record of the version's run (``log_record``), parsed; None when there is none.

        Raises:
            RegistryError: the record exists but is not JSON.
        """
        mv = self._model_version(version)
        with tempfile.TemporaryDirectory(prefix="record-", dir=self.cache_dir) as tmp:
            try:
                path = art.download(self.tracking_uri, mv.run_id, relative, Path(tmp))
            except Exception:  # noqa: BLE001 — MLflow raises various errors for a missing artifact
                return None
            try:
                return json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise RegistryError(f"version {version}: record {relative!r} is not JSON ({exc})") from None

    # ---------------------------------------------------------------- listing and single artifacts
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
                aliases = sorted(set(mv.aliases or []) | set(aliases_of.get(str(mv.version), [])))
                out.append(VersionInfo(version=str(mv.version), run_id=mv.run_id,
                                       created=created.isoformat(timespec="milliseconds"), tags=tags,
                                       aliases=aliases, status=tg.status(tags)))
            token = getattr(page, "token", None)
            if not token:
                break
        out.sort(key=lambda v: int(v.version))
        return out

    def certificate(self, version: str) -> dict:
        """The version's ``lid.json`` (manifest with every certificate) as a dict, checked against its
        registered sha256.

        Raises:
            RegistryError: the version has no LID. RegistryIntegrityError: ``lid.json`` was modified.
        """
        mv = self._model_version(version)
        tags = dict(mv.tags or {})
        if tags.get(tg.TAG_HAS_LID) != "true":
            raise RegistryError(f"model version {version} was registered without a LID (no certificate)")
        path = self.artifact_path(version, art.ARTIFACT_LID_JSON)
        return json.loads(path.read_text(encoding="utf-8"))

    def artifact_path(self, version: str, relative: str) -> Path:
        """Download one artifact of the version's run (fresh copy) and return its local path.

        Artifacts whose sha256 is pinned by a tag (weights, spec, lid.json, cert data, validation)
        are checked.

        Raises:
            RegistryIntegrityError: a pinned artifact does not match its registered sha256.
        """
        mv = self._model_version(version)
        tags = dict(mv.tags or {})
        relative = relative.strip("/")
        path = art.download(self.tracking_uri, mv.run_id, relative, self._fresh_dir(str(mv.version)))
        if art.pin_tag(relative) is not None and path.is_file():
            problem = art.pinned_problem(path, relative, tags)
            if problem is not None:
                raise RegistryIntegrityError(str(mv.version), [(relative, problem)])
        return path
