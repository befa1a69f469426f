"""The certification flow: re-check a candidate against every earlier certificate, then certify its own
LID nested inside the champion's.

It has its own deployment on the ``gpu`` work pool (CUDA when present). The training flows hand a
candidate over through a folder on the shared lidgate home (``candidate_dir``):

    candidate.json        the configuration file's path and sha256, the data files and task, the
                          data's fingerprint, the champion and lineage the candidate was trained on
    weights.safetensors   the candidate's state dict (no pickles)
    spec.json             how to rebuild the module
    → lid/, certify.json  written here: the new LID and the summary

The certify flow loads the configuration and the data itself and refuses to certify unless both hash
to what the trainer recorded, and it checks the lineage the trainer pinned (not whatever the
``champion`` alias says by then): the worker certifies exactly what was trained, on the data it was
trained for. Without a Prefect server it runs in-process as a subflow, through the same folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow

from components.signing import SIGNATURE_FILE, sign_lid
from flows.settings import prefect_server_configured

if TYPE_CHECKING:
    from torch import nn

    from components.factory import ModelSpec
    from flows.tasks import Certification

CANDIDATE_FILE = "candidate.json"
RESULT_FILE = "certify.json"
WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "spec.json"
LID_DIR = "lid"
CERTIFY_DEPLOYMENT = "certify/certify-gpu"


class CandidateError(RuntimeError):
    """A candidate folder cannot be certified: missing files, or a configuration or data that do not
    hash to what the trainer recorded."""


def save_candidate(candidate_dir: str | Path, model: nn.Module, spec: ModelSpec, record: dict[str, Any]) -> Path:
    """Write a candidate folder (weights, spec and ``candidate.json``, the last written last)."""
    from safetensors.torch import save_file

    from lid_engine.files import atomic_write

    candidate_dir = Path(candidate_dir)
    candidate_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(candidate_dir / WEIGHTS_FILE))
    spec.save(candidate_dir / SPEC_FILE)
    atomic_write(candidate_dir / CANDIDATE_FILE, json.dumps(record, indent=2, sort_keys=True))
    return candidate_dir


def load_candidate(candidate_dir: str | Path) -> tuple[dict[str, Any], ModelSpec, nn.Module]:
    """``(record, spec, model)`` of a candidate folder; the model is rebuilt from spec + weights (strict)."""
    from safetensors.torch import load_file

    from components.factory import ModelSpec

    candidate_dir = Path(candidate_dir)
    path = candidate_dir / CANDIDATE_FILE
    if not path.is_file():
        raise CandidateError(f"'{candidate_dir}' holds no {CANDIDATE_FILE}: not a candidate folder")
    record = json.loads(path.read_text(encoding="utf-8"))
    spec = ModelSpec.load(candidate_dir / SPEC_FILE)
    model = spec.build()
    model.load_state_dict(load_file(str(candidate_dir / WEIGHTS_FILE)), strict=True)
    return record, spec, model.eval()


@flow(name="certify")
def certify_flow(candidate_dir: str) -> dict:
    """Certify the candidate in ``candidate_dir``; writes ``lid/`` and ``certify.json`` there and returns
    the summary (``lid`` is false with ``error`` saying why when no certificate could be made)."""
    from components.constraints import constraint_cert_data
    from components.registry import RegistryError
    from flows import tasks

    directory = Path(candidate_dir)
    path = directory / CANDIDATE_FILE
    if not path.is_file():
        raise CandidateError(f"'{directory}' holds no {CANDIDATE_FILE}: not a candidate folder")
    record = json.loads(path.read_text(encoding="utf-8"))
    config = tasks.load_configuration(record["config"])
    if config.sha256() != record["config_sha256"]:
        raise CandidateError(
            f"the configuration '{record['config']}' hashes to {config.sha256()[:12]}… here but to "
            f"{record['config_sha256'][:12]}… where the candidate was trained; certify the same file")
    _, _, model = load_candidate(directory)
    import torch

    dtype = getattr(torch, record["dtype"]) if record.get("dtype") else None
    data = tasks.load_data.fn(config, record["data_paths"], record["task"], dtype=dtype)
    if data.fingerprint() != record["data_sha256"]:
        same = "certify on the same files"
        if config.data.form == "loader" and not record["data_paths"]:
            same = (f"data.loader.function {config.data.loader.function} must return the same rows on every call "
                    "(seed its randomness; a DataLoader without shuffling)")
        raise CandidateError(f"the data of task '{record['task']}' differ here from where the candidate was trained "
                             f"(fingerprints differ); {same}")
    registry = tasks.registry_for(config)
    champion = None
    if record.get("champion"):
        try:
            loaded = registry.load(version=record["champion"])
        except RegistryError as exc:
            return _write(directory, {"task": data.task, "lid": False, "lineage": [],
                                      "error": f"champion v{record['champion']} cannot be loaded: {exc}"})
        try:
            if loaded.lid is not None:
                champion = tasks.Champion(version=str(loaded.version), model=loaded.model, spec=loaded.spec,
                                          lid=loaded.lid, lineage=list(record["lineage"]))
        finally:
            registry.release(loaded)
    lookahead = tasks.settings_for(config).lookahead_dir
    result = tasks.certify_candidate(config, model, data, champion, lineage=record["lineage"],
                                     lookahead_dir=lookahead if record.get("biasing", True) else None)
    if result.lid is not None:
        result.lid.save(directory / LID_DIR, overwrite=True)
        if config.signing.private_key is not None:
            sign_lid(directory / LID_DIR, directory / SIGNATURE_FILE, config.signing.private_key, model,
                     result.lid, constraint_cert_data(config.spec, data, result.lid.tasks))
    return _write(directory, result.summary())


def _write(directory: Path, summary: dict) -> dict:
    from lid_engine.files import atomic_write

    atomic_write(directory / RESULT_FILE, json.dumps(summary, indent=2, default=str))
    return summary


def run_certification(candidate_dir: Path) -> Certification:
    """Certify a saved candidate: through the ``certify-gpu`` deployment when a Prefect server is
    configured (the gpu pool), else in-process. Returns the result with its LID loaded from disk.

    Raises:
        RuntimeError: the deployment run did not complete (no worker, crash, timeout): the caller
            registers no certificate, so the gate blocks (fail closed).
    """
    from flows.tasks import Certification
    from lid_engine import LID

    if prefect_server_configured():
        from prefect.deployments import run_deployment

        timeout = float(os.environ.get("LIDGATE_CERTIFY_TIMEOUT", "7200"))
        run = run_deployment(CERTIFY_DEPLOYMENT, parameters={"candidate_dir": str(candidate_dir)}, timeout=timeout)
        if run.state is None or not run.state.is_completed():
            raise RuntimeError(f"certify deployment run {run.id} is {run.state and run.state.name} after {timeout:.0f} s "
                               "(is a worker polling the 'gpu' pool?)")
    else:
        certify_flow(candidate_dir=str(candidate_dir))
    path = Path(candidate_dir) / RESULT_FILE
    if not path.is_file():
        raise RuntimeError(f"certification produced no result file at {path}")
    summary = json.loads(path.read_text(encoding="utf-8"))
    lid = LID.load(Path(candidate_dir) / LID_DIR) if summary.get("lid") else None
    result = Certification.from_summary(summary, lid)
    signature = Path(candidate_dir) / SIGNATURE_FILE
    if lid is not None and signature.is_file():
        result.signature = json.loads(signature.read_text(encoding="utf-8"))
    return result
