"""Scheduled retraining: update the champion on new data without breaking what it was certified for.

champion (+ its LID) → validate data (Great Expectations) → train with ``ProjectedOptimizer`` onto
the champion's LID → certify flow (gpu pool, or in-process) → register the version → promotion gate
→ ONNX export of a promoted version. ``bootstrap_flow`` does the same for the very first model.

Fail closed everywhere: the gate is the only place that moves the ``champion`` alias, and anything
that goes wrong before it leaves the alias where it was with the reason recorded in MLflow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import flows  # noqa: F401  (environment defaults before prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.certify import certify_flow, read_result, save_candidate

CERTIFY_DEPLOYMENT = "certify/certify-gpu"


@task(cache_policy=NO_CACHE, persist_result=False)
def validate_inputs(data, lookahead_dir: str | None, confidence: float, target: float) -> dict:
    """GX suites for the training data, the certification data and the lookahead buffer."""
    from components.validation import validate_dataset
    from flows.data import DATASETS

    info = DATASETS[data.dataset]
    common = {"n_features": info["feature_shape"], "classes": list(data.classes), "value_range": info["value_range"]}
    reports = {
        "training": validate_dataset(*data.train, role="training", name=f"{data.name}/train", min_rows=10, **common),
        "search": validate_dataset(*data.search, role="training", name=f"{data.name}/search", min_rows=10, **common),
        "certification": validate_dataset(*data.cert, role="certification", name=f"{data.name}/cert",
                                          confidence=confidence, target_lower_bound=target, **common),
    }
    if lookahead_dir and Path(lookahead_dir).exists():
        from components.buffer import LookaheadBuffer

        buffer = LookaheadBuffer.open(lookahead_dir)
        if len(buffer):
            x, y = buffer.data()
            reports["lookahead"] = validate_dataset(
                x, y, role="lookahead", name="lookahead", n_features=info["feature_shape"],
                classes=sorted({int(c) for c in y.tolist()}), value_range=info["value_range"],
            )
    return {k: r.to_dict() for k, r in reports.items()}


@task(cache_policy=NO_CACHE, persist_result=False)
def train_update(model, data, lid, *, projection: bool, strategy: str, epochs: int, lr: float, batch_size: int, seed: int):
    """Train on the new task; with ``projection`` every Adam step is projected onto the champion's LID."""
    import torch

    import lid_engine as le
    from lid_engine.training import train_classifier

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if projection and lid is not None:
        opt = le.ProjectedOptimizer(opt, model, lid, strategy=strategy, seed=seed)
    return train_classifier(model, *data.train, epochs=epochs, batch_size=batch_size, seed=seed, optimizer=opt,
                            progress=True)


def run_certification(candidate_dir: Path, **params) -> dict:
    """On the gpu work pool through its deployment when a server is configured; else in-process."""
    from flows.settings import prefect_server_configured

    if prefect_server_configured():
        from prefect.deployments import run_deployment

        import os

        timeout = float(os.environ.get("LIDGATE_CERTIFY_TIMEOUT", "7200"))
        run = run_deployment(CERTIFY_DEPLOYMENT, parameters={"candidate_dir": str(candidate_dir), **params},
                             timeout=timeout)
        if run.state is None or not run.state.is_completed():
            # No gpu worker picked it up in time, or it failed: no certificate, so the gate will block.
            raise RuntimeError(
                f"certify deployment run {run.id} is {run.state and run.state.name} after {timeout:.0f} s "
                "(is a worker polling the 'gpu' pool?)"
            )
        return read_result(candidate_dir)
    return certify_flow(candidate_dir=str(candidate_dir), **params)


@task(cache_policy=NO_CACHE, persist_result=False)
def export_promoted(registry, version: str, model, example_input, onnx_dir: Path) -> dict:
    from components.export import export_onnx, log_onnx_to_mlflow

    loaded = registry.load(version=version)
    export = export_onnx(
        model, example_input, onnx_dir / f"{registry.model_name}-v{version}.onnx",
        certificate_sha256=loaded.tags.get("lid.certificate_sha256", ""),
        metadata={"lidgate.version": str(version), "lidgate.model_sha256": loaded.tags.get("lid.model_sha256", "")},
    )
    log_onnx_to_mlflow(export, loaded.run_id)
    registry.release(loaded)
    return {"path": str(export.path), "sha256": export.sha256, "max_abs_diff": export.max_abs_diff}


def _record_rejection(settings, task_ref: str, reports: dict, reason: str) -> None:
    """No version is registered for rejected data; the reason is kept in an MLflow run."""
    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_experiment("lidgate-rejections")
    with mlflow.start_run(run_name=f"rejected {task_ref}"):
        mlflow.set_tags({"lid.status": "rejected", "lid.reason": reason[:4000], "lid.task": task_ref})
        mlflow.log_dict(reports, "validation.json")


def _pipeline(
    *, task_ref: str, bootstrap: bool, projection: bool, strategy: str, epochs: int, lr: float, batch_size: int,
    tau: float | None, tau_delta: float, biasing: str, frozen_fraction: float, lookahead_dir: str | None,
    iterations: int, checkpoints: int, max_train: int | None, max_eval: int | None, confidence: float, seed: int,
    model_name: str | None, factory: str, factory_kwargs: dict | None, export: bool, bound: str,
) -> dict:
    import torch

    from components.gate import promote
    from components.factory import ModelSpec
    from flows.data import load_task
    from flows.settings import get_settings, open_registry
    from lid_engine.training import accuracy

    log = get_run_logger()
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    settings = get_settings(model_name)
    registry = open_registry(settings)
    data = load_task(task_ref, max_train=max_train, max_eval=max_eval, seed=seed)
    lookahead_dir = lookahead_dir or (str(settings.lookahead_dir) if settings.lookahead_dir.exists() else None)

    champion_version = registry.champion()
    if bootstrap:
        if champion_version is not None:
            raise RuntimeError(f"bootstrap: model {settings.model_name!r} already has a champion (v{champion_version})")
        spec = ModelSpec(factory=factory, kwargs=dict(factory_kwargs or {}))
        model, lid, lineage = spec.build(), None, []
    else:
        if champion_version is None:
            raise RuntimeError(f"retrain: model {settings.model_name!r} has no champion yet; run the bootstrap flow first")
        champion = registry.load(version=champion_version)
        spec, model, lid = champion.spec, champion.model, champion.lid
        lineage = list(champion.lineage) + [champion.version]
        registry.release(champion)  # model and LID stay in memory; the downloaded files can go

    reports = validate_inputs(data, lookahead_dir, confidence, tau if tau is not None else 0.85)
    validation_passed = all(r["success"] for r in reports.values())
    summary: dict = {"task": task_ref, "champion_before": champion_version, "validation_passed": validation_passed}
    if not validation_passed:
        failed = [f"{k}: {c['name']}: {c['detail']}" for k, r in reports.items() for c in r["checks"] if not c["success"]]
        reason = "data validation failed — " + "; ".join(failed)
        _record_rejection(settings, task_ref, reports, reason)
        log.error(reason)
        return {**summary, "version": None, "promoted": False, "reasons": [{"code": "validation_failed", "detail": reason}],
                "champion_after": registry.champion()}

    train_update(model, data, lid, projection=projection, strategy=strategy, epochs=epochs, lr=lr,
                 batch_size=batch_size, seed=seed)
    summary["task_accuracy"] = accuracy(model, *data.cert)
    candidate_dir = settings.staging / f"{data.name}-{int(time.time() * 1000)}"
    save_candidate(model, spec, candidate_dir)

    cert = run_certification(
        candidate_dir, task_ref=task_ref, tau=tau, tau_delta=tau_delta, biasing=biasing,
        frozen_fraction=frozen_fraction, lookahead_dir=lookahead_dir, iterations=iterations,
        checkpoints=checkpoints, max_eval=max_eval, confidence=confidence, seed=seed, model_name=settings.model_name,
        bound=bound,
    )
    summary["certification"] = cert
    new_lid = None
    if cert.get("lid"):
        from lid_engine import LID

        new_lid = LID.load(candidate_dir / "lid")
    version = registry.register(
        model.cpu(), spec, lid=new_lid, cert_data={data.name: data.cert}, lineage=lineage,
        validation=reports, extra_tags={"pipeline.task_ref": task_ref, "pipeline.projection": str(projection).lower()},
        example_input=data.cert[0][:2],
    )
    decision = promote(registry, version, validation_passed=validation_passed, validation_summary=reports)
    summary.update({"version": version, "promoted": decision.promoted,
                    "reasons": [{"code": r.code, "detail": r.detail} for r in decision.reasons],
                    "champion_after": decision.champion_after})
    if decision.promoted and export:
        summary["onnx"] = export_promoted(registry, version, model, data.cert[0][:4], settings.onnx_dir)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    log.info("v%s %s", version, "promoted" if decision.promoted else f"blocked: {summary['reasons']}")
    (candidate_dir / "pipeline.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


@flow(name="retrain", log_prints=True)
def retrain_flow(
    task_ref: str = "mnist:2,3",
    projection: bool = True,
    strategy: str = "sample_largest_closest",
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 64,
    tau: float | None = None,
    tau_delta: float = 0.12,
    biasing: str = "fisher",
    frozen_fraction: float = 0.8,
    lookahead_dir: str | None = None,
    iterations: int = 200,
    checkpoints: int = 10,
    max_train: int | None = None,
    max_eval: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    model_name: str | None = None,
    export: bool = True,
    bound: str = "ibp",
) -> dict:
    """Retrain the champion on ``task_ref`` and promote the result only if it is certified safe.

    ``bound`` is the sound bound the new LID is searched and certified with (``certify_flow``)."""
    return _pipeline(
        task_ref=task_ref, bootstrap=False, projection=projection, strategy=strategy, epochs=epochs, lr=lr,
        batch_size=batch_size, tau=tau, tau_delta=tau_delta, biasing=biasing, frozen_fraction=frozen_fraction,
        lookahead_dir=lookahead_dir, iterations=iterations, checkpoints=checkpoints, max_train=max_train,
        max_eval=max_eval, confidence=confidence, seed=seed, model_name=model_name, factory="", factory_kwargs=None,
        export=export, bound=bound,
    )


@flow(name="bootstrap", log_prints=True)
def bootstrap_flow(
    task_ref: str = "mnist:0,1",
    factory: str = "lid_engine.models:mnist_cnn",
    factory_kwargs: dict | None = None,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 64,
    tau: float | None = None,
    tau_delta: float = 0.12,
    iterations: int = 200,
    checkpoints: int = 10,
    max_train: int | None = None,
    max_eval: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    model_name: str | None = None,
    export: bool = True,
    bound: str = "ibp",
) -> dict:
    """Train the first model from scratch on ``task_ref``, certify its LID and make it the champion."""
    return _pipeline(
        task_ref=task_ref, bootstrap=True, projection=False, strategy="closest", epochs=epochs, lr=lr,
        batch_size=batch_size, tau=tau, tau_delta=tau_delta, biasing="none", frozen_fraction=0.0,
        lookahead_dir=None, iterations=iterations, checkpoints=checkpoints, max_train=max_train, max_eval=max_eval,
        confidence=confidence, seed=seed, model_name=model_name, factory=factory, factory_kwargs=factory_kwargs,
        export=export, bound=bound,
    )
