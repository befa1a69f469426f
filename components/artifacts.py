"""The files of a registered model version: their layout, how they are written, pinned and read back.

One registered model version = one MLflow run whose artifacts are the source of truth::

    model/weights.safetensors     state_dict (parameters and buffers), safetensors — never a pickle
    model/spec.json               how to rebuild the nn.Module (components.factory.ModelSpec)
    lid/                          LID.save output (lid.json, nominal.safetensors, members/...), if any
    cert_data/<task>.safetensors  held-out certification data per task: tensors "x" and "y"
    validation.json               the data-validation summary the version was registered with

Each of these files is *pinned*: its sha256 is recorded in a version tag (``pin_tag``) when it is
staged, and every read checks it again (``pinned_problem``), so a file edited in the artifact store
after registration is detected. Optionally the run also holds an MLflow pytorch model
(``pytorch_model``, the safe ``pt2`` format) for serving tools.

MLflow quirks handled here: ``mlflow.pytorch.log_model`` defaults to ``pt2``, which needs an input
example, and reads the *global* tracking URI, so it runs inside a scoped tracking URI against a
``LoggedModel`` created explicitly in our experiment and run; ``pip_requirements`` are explicit
(inference costs seconds per call).
"""

from __future__ import annotations

import copy
import json
import math
import os
import threading
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lid_engine import LID, CertificationStream, SafetensorsStream, fingerprint_model
from lid_engine.files import file_sha256

from .factory import ModelSpec
from .tags import (
    TAG_CERT_SHA,
    TAG_DATA_SHA,
    TAG_HAS_LID,
    TAG_MODEL_SHA,
    TAG_SPEC_SHA,
    TAG_TASKS,
    TAG_VALIDATION_SHA,
    TAG_WEIGHTS_SHA,
)
from .tags import tasks as tag_tasks

__all__ = [
    "ARTIFACT_CERT_DIR", "ARTIFACT_LID_DIR", "ARTIFACT_LID_JSON", "ARTIFACT_SPEC", "ARTIFACT_VALIDATION",
    "ARTIFACT_WEIGHTS", "MLFLOW_MODEL_NAME", "PINNED_PREFIXES", "VersionFiles", "cert_data_file", "download",
    "log_pytorch_model", "model_state", "pin_tag", "pinned_problem", "read_cert_data", "read_version",
    "stage_version",
]

ARTIFACT_WEIGHTS = "model/weights.safetensors"
ARTIFACT_SPEC = "model/spec.json"
ARTIFACT_LID_DIR = "lid"
ARTIFACT_LID_JSON = "lid/lid.json"
ARTIFACT_CERT_DIR = "cert_data"
ARTIFACT_VALIDATION = "validation.json"
MLFLOW_MODEL_NAME = "pytorch_model"
#: run-relative paths that belong to the pinned files; nothing else may be written there later
PINNED_PREFIXES = ("model/", "lid/", "cert_data/")

_PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy"]
_FIXED_PINS = {ARTIFACT_WEIGHTS: TAG_WEIGHTS_SHA, ARTIFACT_SPEC: TAG_SPEC_SHA, ARTIFACT_LID_JSON: TAG_CERT_SHA,
               ARTIFACT_VALIDATION: TAG_VALIDATION_SHA}
_URI_LOCK = threading.Lock()
#: stored certification data larger than this many MiB is read back as a stream (``read_cert_data``)
STREAM_ABOVE_MB = 1024


def cert_data_file(task: str) -> str:
    """The run-relative path of a task's certification data."""
    return f"{ARTIFACT_CERT_DIR}/{task}.safetensors"


def pin_tag(relative: str) -> str | None:
    """The version tag that records the sha256 of the artifact at ``relative``, or None if unpinned.

    The LID's other files are pinned through ``lid.json``, which records their sha256 itself.
    """
    relative = relative.strip("/")
    if relative in _FIXED_PINS:
        return _FIXED_PINS[relative]
    prefix, suffix = ARTIFACT_CERT_DIR + "/", ".safetensors"
    if relative.startswith(prefix) and relative.endswith(suffix) and "/" not in relative[len(prefix):]:
        return TAG_DATA_SHA + relative[len(prefix):-len(suffix)]
    return None


def pinned_problem(path: Path | None, relative: str, tags: Mapping[str, str]) -> str | None:
    """Why the downloaded ``path`` of artifact ``relative`` is not the registered file, or None if it is."""
    if path is None or not path.is_file():
        return "missing from the artifact store"
    tag = pin_tag(relative)
    expected = tags.get(tag) if tag else None
    if not expected:
        return f"no '{tag}' tag records its fingerprint"
    actual = file_sha256(path)
    if actual != expected:
        return f"sha256 {actual} differs from the registered {expected} (tag '{tag}'): modified after registration"
    return None


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """The state_dict as contiguous CPU copies, ready for ``safetensors`` (which refuses shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def stage_version(
    directory: Path,
    *,
    state: Mapping[str, Tensor],
    spec: ModelSpec,
    lid: LID | None,
    cert_data: Mapping[str, tuple[Tensor, Tensor] | CertificationStream],
    validation: object,
) -> dict[str, str]:
    """Write every file of a version into ``directory`` (empty or absent); returns ``{pin tag: sha256}``.

    A task's certification data may be a ``lid_engine.CertificationStream``: it is written a chunk at a
    time, to the same bytes as the tensors it holds.

    ``validation`` must already be JSON-able (the registry normalises it).
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model").mkdir()
    save_file(dict(state), str(directory / ARTIFACT_WEIGHTS), metadata={"format": "lidgate.weights/1"})
    spec.save(directory / ARTIFACT_SPEC)
    if lid is not None:
        lid.save(directory / ARTIFACT_LID_DIR)
    (directory / ARTIFACT_CERT_DIR).mkdir()
    for t, data in cert_data.items():
        if isinstance(data, CertificationStream):  # written a chunk at a time: the bytes save_file would write
            SafetensorsStream.write_chunks(data.chunks(), directory / cert_data_file(t), metadata={"task": t},
                                           name=f"cert_data['{t}'] ({data.name})")
            continue
        x, y = data
        save_file({"x": x.detach().cpu().contiguous().clone(), "y": y.detach().cpu().contiguous().clone()},
                  str(directory / cert_data_file(t)), metadata={"task": t})
    (directory / ARTIFACT_VALIDATION).write_text(json.dumps(validation, indent=2, sort_keys=True))
    pinned = [ARTIFACT_WEIGHTS, ARTIFACT_SPEC, ARTIFACT_VALIDATION, *(cert_data_file(t) for t in cert_data)]
    if lid is not None:
        pinned.append(ARTIFACT_LID_JSON)
    return {pin_tag(rel): file_sha256(directory / rel) for rel in pinned}


def read_cert_data(path: Path, stream_mb: int | None = STREAM_ABOVE_MB,
                   sha256: str | None = None) -> tuple[Tensor, Tensor] | SafetensorsStream:
    """``(x, y)`` from a task's certification data file, or, for a file larger than ``stream_mb`` MiB, a
    ``lid_engine.SafetensorsStream`` over it that reads about ``stream_mb`` MiB at a time (None: always
    tensors); a stream checks the file against ``sha256`` (its pin) again before its first read."""
    if stream_mb is not None and path.stat().st_size > stream_mb * 2**20:
        stream = SafetensorsStream(path)
        if sha256:
            stream.pin(sha256)
        row = max(1, math.prod(stream.feature_shape) * stream.dtype.itemsize)
        stream.chunk_rows = max(1, stream_mb * 2**20 // row)
        return stream
    tensors = load_file(str(path))
    return tensors["x"], tensors["y"]


@dataclass
class VersionFiles:
    """What ``read_version`` could read of a version's files, and every problem it found.

    ``problems``: ``(artifact, detail)``; ``model``/``spec``/``lid`` are None where unreadable.
    """

    model: nn.Module | None = None
    spec: ModelSpec | None = None
    lid: LID | None = None
    lid_dir: Path | None = None
    cert_data: dict[str, tuple[Tensor, Tensor] | SafetensorsStream] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)


def read_version(fetch: Callable[[str], Path], directory: Path, tags: Mapping[str, str], *,
                 lenient: bool, stream_mb: int | None = STREAM_ABOVE_MB) -> VersionFiles:
    """Download a version's files with ``fetch(relative)`` into ``directory``, check and rebuild them.

    Every pinned file is checked against its tag, and the rebuilt model's fingerprint against
    ``lid.model_sha256``; each failure is listed in ``problems`` and reading goes on. The factory
    of a ``spec.json`` that fails its check is never imported. ``lenient=False``: a file that
    failed its check is not used (its object stays None). ``lenient=True`` (the gate and audits,
    which report every failing check): weights, LID and certification data that fail their sha256
    are still read, so that the checks after them can run and be reported too. Certification data
    files larger than ``stream_mb`` MiB are opened as streams (``read_cert_data``).
    """
    out = VersionFiles()
    problems = out.problems

    def get(relative: str) -> Path | None:
        try:
            return fetch(relative)
        except Exception as exc:  # noqa: BLE001
            problems.append((relative, f"cannot download: {type(exc).__name__}: {exc}"))
            return None

    def pinned(path: Path | None, relative: str) -> bool:
        if path is None:
            return False  # the download failure is already listed
        problem = pinned_problem(path, relative, tags)
        if problem is not None:
            problems.append((relative, problem))
        return problem is None

    # spec + weights -> model
    model_dir = get("model")
    spec_path = None if model_dir is None else directory / ARTIFACT_SPEC
    weights_path = None if model_dir is None else directory / ARTIFACT_WEIGHTS
    spec_ok = pinned(spec_path, ARTIFACT_SPEC)
    weights_ok = pinned(weights_path, ARTIFACT_WEIGHTS)
    if spec_ok:  # never import a factory named by an unpinned file
        try:
            out.spec = ModelSpec.load(spec_path)
        except Exception as exc:  # noqa: BLE001
            problems.append((ARTIFACT_SPEC, f"unreadable: {exc}"))
    if out.spec is not None and weights_path is not None and weights_path.is_file() and (weights_ok or lenient):
        try:
            model = out.spec.build()
            model.load_state_dict(load_file(str(weights_path)), strict=True)
            out.model = model.eval()
            sha = fingerprint_model(model)
            if sha != tags.get(TAG_MODEL_SHA):
                problems.append(("model", f"the rebuilt model's fingerprint {sha} differs from the registered "
                                          f"'{TAG_MODEL_SHA}' {tags.get(TAG_MODEL_SHA)}"))
        except Exception as exc:  # noqa: BLE001
            problems.append((ARTIFACT_WEIGHTS, f"cannot rebuild the model: {type(exc).__name__}: {exc}"))
            out.model = None

    # LID
    if tags.get(TAG_HAS_LID) == "true":
        lid_dir = get(ARTIFACT_LID_DIR)
        if lid_dir is not None:
            out.lid_dir = lid_dir
            if pinned(lid_dir / "lid.json", ARTIFACT_LID_JSON) or lenient:
                try:
                    out.lid = LID.load(lid_dir)
                except Exception as exc:  # noqa: BLE001
                    problems.append((ARTIFACT_LID_DIR, f"LID.load refused it: {exc}"))
    elif tags.get(TAG_HAS_LID) != "false":
        problems.append(("tags", f"'{TAG_HAS_LID}' tag missing: not a lidgate registration"))

    # certification data
    tasks = tag_tasks(tags)
    if tasks:
        cert_dir = get(ARTIFACT_CERT_DIR)
        if cert_dir is not None:
            unexpected = sorted({p.name for p in cert_dir.iterdir()} - {f"{t}.safetensors" for t in tasks})
            if unexpected:
                problems.append((ARTIFACT_CERT_DIR, f"unexpected files {unexpected}"))
            for t in tasks:
                rel = cert_data_file(t)
                path = directory / rel
                if pinned(path, rel) or (lenient and path.is_file()):
                    try:
                        out.cert_data[t] = read_cert_data(path, stream_mb, tags.get(pin_tag(rel)))
                    except Exception as exc:  # noqa: BLE001
                        problems.append((rel, f"unreadable: {type(exc).__name__}: {exc}"))
    if out.lid is not None and set(out.lid.tasks) != set(tasks):
        problems.append(("tags", f"'{TAG_TASKS}' lists {tasks}, the LID certifies {sorted(out.lid.tasks)}"))

    # validation summary (pinned so an audit can trust it)
    pinned(get(ARTIFACT_VALIDATION), ARTIFACT_VALIDATION)
    return out


def download(tracking_uri: str, run_id: str, relative: str, dest: Path) -> Path:
    """Download one artifact (file or directory) of ``run_id`` into ``dest``; returns its local path."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=relative, dst_path=str(dest),
                                                tracking_uri=tracking_uri)
    return Path(local)


def directory_digest(directory: Path) -> str:
    """sha256 over every file below ``directory``: its relative path and its own sha256, sorted (a
    file added, removed, renamed or changed changes the digest)."""
    import hashlib

    lines = sorted(f"{p.relative_to(directory).as_posix()}\t{file_sha256(p)}" for p in directory.rglob("*") if p.is_file())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def mlflow_model_digest(tracking_uri: str, source: str, dest: Path) -> str:
    """``directory_digest`` of the MLflow model at ``source`` (a version's ``source``: what
    ``mlflow.pytorch.load_model("models:/NAME@champion")`` loads), downloaded into ``dest``."""
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dest), tracking_uri=tracking_uri)
    return directory_digest(Path(local))


def log_pytorch_model(client, experiment_id: str, tracking_uri: str, run_id: str, model: nn.Module,
                      example: Tensor) -> tuple[str, str]:
    """Log an MLflow pytorch model (``pt2``) in ``run_id``; returns ``(source, model_id)`` for the version.

    ``example``: a batch of at least 2 rows (torch.export makes a size-1 batch dimension static).
    """
    import mlflow

    logged = client.create_logged_model(experiment_id, name=MLFLOW_MODEL_NAME, source_run_id=run_id)
    with _scoped_tracking_uri(tracking_uri), torch.no_grad():
        mlflow.pytorch.log_model(
            copy.deepcopy(model).eval(), name=MLFLOW_MODEL_NAME, model_id=logged.model_id, run_id=run_id,
            input_example=example.detach().cpu().numpy(), pip_requirements=_PIP_REQUIREMENTS,
            serialization_format="pt2",
        )
    # The SQL registry store resolves a ``models:/<id>`` source through the *global* tracking URI;
    # the logged model's storage location needs no resolution.
    return client.get_logged_model(logged.model_id).artifact_location, logged.model_id


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
