"""Fetch a registered version for use: every byte a consumer loads is checked before it is handed over.

``lidgate fetch models:/NAME@champion --out DIR`` (``fetch_version`` below) downloads the version and
refuses it unless

* every pinned artifact (weights, spec, certificate, domains, certification data) and the MLflow model
  that ``mlflow.pytorch.load_model`` returns hash to what registration recorded, and the rebuilt
  model's fingerprint is the certified one (``Registry.load``);
* the gate promoted it (``lid.status = promoted``);
* its own certificates and those of every earlier champion in its lineage hold for it, recomputed;
* with trusted keys, its certificate is signed by one of them over exactly these artifacts;
* its ONNX export, when there is one, hashes to what was recorded at export.

Only then is ``DIR`` written: ``weights.safetensors``, ``spec.json``, ``lid/``, ``cert_data/``,
``mlflow-model/``, ``model.onnx`` (if exported) and ``fetch.json`` (what was checked, with digests).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["FetchRefused", "fetch_version", "parse_model_uri"]

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))$")


class FetchRefused(RuntimeError):
    """The version is genuine but must not be used: not promoted, or a certificate does not hold."""


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` → ``(name, alias, version)``.

    Raises:
        ValueError: anything else, saying what was expected.
    """
    m = _URI.match(uri.strip())
    if m is None:
        raise ValueError(f"model URI {uri!r}: expected models:/NAME@ALIAS (e.g. models:/digits@champion) "
                         "or models:/NAME/VERSION")
    return m["name"], m["alias"], m["version"]


def fetch_version(registry, out: str | Path, *, alias: str | None = None, version: str | None = None,
                  trusted_keys: Sequence | None = None) -> dict[str, Any]:
    """Check one version (``alias=`` or ``version=``) as the module docstring says and copy it to ``out``
    (absent or empty). Returns the ``fetch.json`` record.

    Raises:
        RegistryError: no such version or alias.
        RegistryIntegrityError: an artifact does not hash to its recorded digest (nothing is written).
        SignatureError: trusted keys were given and the signature is missing, unknown or wrong.
        FetchRefused: not promoted, or a certificate does not hold (nothing is written).
    """
    from components import tags as tg
    from components.artifacts import ARTIFACT_LID_DIR, ARTIFACT_SPEC, ARTIFACT_WEIGHTS, download
    from components.gate import signature_problem
    from components.lineage import check_version, verify_lineage
    from components.registry import RegistryIntegrityError
    from components.signing import SignatureError
    from lid_engine.files import file_sha256

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out: '{out}' exists and is not an empty directory")
    loaded = registry.load(version=version, alias=alias)
    try:
        v = loaded.version
        status = tg.status(loaded.tags)
        if status != tg.STATUS_PROMOTED:
            raise FetchRefused(f"version {v} has lid.status {status!r}: only versions the gate promoted are handed "
                               "out (see `lidgate audit`)")
        if loaded.lid is None:
            raise FetchRefused(f"version {v} carries no certificate")
        checks = [check_version(loaded, loaded.model, v)]
        checks += verify_lineage(registry, loaded.model, [e for e in loaded.lineage if e != v])
        failed = [f"v{c.version}: {'; '.join(c.failures)}" for c in checks if not c.ok]
        if failed:
            raise FetchRefused(f"version {v}: certificates do not hold — " + " | ".join(failed))
        signed = None
        if trusted_keys:
            problem = signature_problem(registry, loaded, trusted_keys)
            if problem is not None:
                raise SignatureError(f"version {v}: {problem}")
            signed = "verified"
        onnx = None
        if loaded.tags.get(tg.TAG_ONNX_SHA):
            ref = loaded.tags.get(tg.TAG_ONNX_ARTIFACT, "")
            onnx = download(registry.tracking_uri, loaded.run_id, ref, loaded.directory / "onnx-fetch")
            actual = file_sha256(onnx)
            if actual != loaded.tags[tg.TAG_ONNX_SHA]:
                raise RegistryIntegrityError(v, [("onnx", f"{ref} hashes to {actual[:16]}…, exported as "
                                                          f"{loaded.tags[tg.TAG_ONNX_SHA][:16]}…")])

        staging = out.with_name(f".{out.name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        d = loaded.directory
        shutil.copy2(d / ARTIFACT_WEIGHTS, staging / "weights.safetensors")
        shutil.copy2(d / ARTIFACT_SPEC, staging / "spec.json")
        shutil.copytree(loaded.lid_dir, staging / ARTIFACT_LID_DIR)
        if (d / "cert_data").is_dir():
            shutil.copytree(d / "cert_data", staging / "cert_data")
        if (d / "mlflow-model").is_dir():
            shutil.copytree(d / "mlflow-model", staging / "mlflow-model")
        if onnx is not None:
            shutil.copy2(onnx, staging / "model.onnx")
        record = {
            "format": "lidgate.fetch/1", "model_name": registry.model_name, "version": v, "alias": alias,
            "status": status, "model_sha256": loaded.tags.get(tg.TAG_MODEL_SHA),
            "weights_sha256": loaded.tags.get(tg.TAG_WEIGHTS_SHA), "certificate_sha256": loaded.tags.get(tg.TAG_CERT_SHA),
            "mlflow_model_sha256": loaded.tags.get(tg.TAG_MLFLOW_MODEL_SHA), "onnx_sha256": loaded.tags.get(tg.TAG_ONNX_SHA),
            "signature": signed or "not checked (no trusted keys given)",
            "certificates_checked": [c.to_dict() for c in checks],
            "tasks": {t: {"metric": s.kind, "tau": s.tau, "certified": loaded.lid.certified_accuracy(t),
                          "population_lower_bound": loaded.lid.lower_bound(t)} for t, s in loaded.lid.tasks.items()},
        }
        (staging / "fetch.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
        if out.exists():
            out.rmdir()
        staging.rename(out)
        return record
    finally:
        registry.release(loaded)
