"""lidgate's own flows, built from ``flows.tasks``: every one takes the team's configuration file.

* ``bootstrap_flow(config)``: train the first version on the configuration's data (or take given
  weights), certify its LID, register it, promote it.
* ``retrain_flow(config, data=[...])``: train the champion on new data with every optimizer step
  projected onto its LID, certify (earlier certificates re-verified, a nested LID for the new
  data), register, gate, export.
* ``submit_flow(config, weights)``: a candidate trained elsewhere: certify it against the champion's
  LID, register, gate.

The flows' parameters are JSON (a file path, data paths), so the same calls run from the CLI, from a
schedule and from a Prefect deployment; the ``gpu`` worker certifies exactly what the ``cpu`` worker
trained (``flows.certify``). Fail closed everywhere: only the gate moves the ``champion`` alias, and
what goes wrong before it leaves the alias where it was, with the reason recorded.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow

from components.data import check_same_extractor, check_same_features
from components.failpoints import failpoint
from components.owner import owner_tag
from flows import tasks
from flows.certify import run_certification, save_candidate
from flows.settings import settings_for

if TYPE_CHECKING:
    from components.config import LidgateConfig
    from components.data import DataSplits
    from flows.tasks import Champion

ACTIONS = ("bootstrap", "retrain", "submit")


class PipelineError(RuntimeError):
    """A pipeline cannot start: bootstrap with a champion already there, retrain without one, bad weights."""


def run_pipeline(config_path: str | Path, action: str, *, data: Sequence[str] = (), task: str | None = None,
                 weights: str | None = None, projection: bool = True) -> tasks.Outcome:
    """One pipeline run (the body of every flow here; call it inside a flow).

    Args:
        config_path: the team's configuration file.
        action: ``"bootstrap"``, ``"retrain"`` or ``"submit"``.
        data: new data files (retrain, submit); default: the configuration's data.
        task: the name of the new data's task (default: the first file's stem).
        weights: a safetensors state dict (submit: required; bootstrap: instead of training).
        projection: retrain only: ``False`` trains without projecting onto the champion's LID (what
            the gate must block; for demonstrations).

    Returns:
        The outcome (version, promoted, reasons, champion before/after).

    Raises:
        PipelineError, components.config.ConfigError, components.data.DataError,
        components.factory.FactoryError, flows.tasks.ChampionError: bad input; nothing was registered.
    """
    if action not in ACTIONS:
        raise PipelineError(f"action must be one of {ACTIONS}, got {action!r}")
    start = time.perf_counter()
    config = tasks.load_configuration(config_path)
    settings = settings_for(config)
    tasks.recover_registry(config)
    champion = tasks.load_champion(config)
    if action == "bootstrap" and champion is not None:
        raise PipelineError(f"{config.name!r} already has a champion (v{champion.version}); use "
                            "`lidgate retrain` to update it")
    if action != "bootstrap" and champion is None:
        raise PipelineError(f"{config.name!r} has no champion yet; run `lidgate bootstrap {config_path}` first")
    if action == "submit" and not weights:
        raise PipelineError("submit needs the candidate's weights (--weights FILE.safetensors)")
    model, spec, source = _base_model(config, action, champion, weights)
    dtype = _float_dtype(model)
    data_splits = tasks.load_data(config, list(data), task, dtype=dtype)
    if champion is not None and config.data.features is None:
        check_same_features(champion.feature_columns, data_splits, "--data" if data else "data")
    if champion is not None:
        check_same_extractor(champion.features_record, data_splits, "--data" if data else "data")
    _preflight(config, model, data_splits, first=action == "bootstrap")
    lookahead = settings.lookahead_dir if action != "bootstrap" else None
    validation = tasks.validate_data(config, data_splits, lookahead)
    before = champion.version if champion is not None else None
    if not validation.passed:
        reason = tasks.record_rejection(config, data_splits, validation)
        outcome = tasks.Outcome(action=action, version=None, promoted=False,
                                reasons=[{"code": "validation_failed", "detail": reason}],
                                champion_before=before, champion_after=before, details={"task": data_splits.task})
        tasks.write_summary(settings, outcome)
        return outcome

    if source == "train":
        candidate = tasks.train_candidate(config, model, champion, data_splits, projection=projection)
    else:
        candidate = tasks.given_candidate(model, spec, source, data_splits, champion, config.spec.metric)
    record = {"config": str(Path(config_path).resolve()), "config_sha256": config.sha256(),
              "data_paths": [str(Path(p).resolve()) for p in data], "task": data_splits.task,
              "dtype": str(dtype).removeprefix("torch."), "data_sha256": data_splits.fingerprint(), "champion": before,
              "lineage": champion.lineage if champion is not None else [], "action": action,
              "biasing": action != "bootstrap", "owner": owner_tag()}
    candidate_dir = save_candidate(settings.staging / f"{config.name}-{action}-{int(time.time() * 1000)}",
                                   candidate.model, candidate.spec, record)
    try:
        failpoint("trained")
        certification = run_certification(candidate_dir)
        failpoint("certified")
        outcome = tasks.register_and_gate(config, candidate, certification, data_splits, validation, champion,
                                          action=action)
    finally:  # the candidate is registered (or refused) by now; a crash leaves it for recover_registry
        shutil.rmtree(candidate_dir, ignore_errors=True)
    outcome.details["seconds"] = round(time.perf_counter() - start, 1)
    outcome.details["summary"] = str(tasks.write_summary(settings, outcome))
    return outcome


def _base_model(config: LidgateConfig, action: str, champion: Champion | None, weights: str | None):
    """``(model, spec, source)``: the model to train (``source="train"``) or to certify as it is
    (``"given"``: the first version's weights, ``"submitted"``: a candidate trained elsewhere)."""
    if action == "retrain":
        assert champion is not None
        return champion.fresh_model(), champion.spec, "train"
    if action == "submit":
        assert champion is not None and weights is not None
        model = champion.spec.build(config.code)
        _load_weights(model, Path(weights), "--weights")
        return model, champion.spec, "submitted"
    spec, model, from_mlflow = _first_model(config)
    path = Path(weights) if weights else config.model.weights
    if path is not None:
        _load_weights(model, Path(path), "--weights" if weights else "model.weights")
        return model, spec, "given"
    return model, spec, "given" if from_mlflow else "train"


def _float_dtype(model):
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _preflight(config: LidgateConfig, model, data: DataSplits, first: bool = False) -> None:
    """What would otherwise fail after minutes of training: signing keys that do not load, layers the
    bound engine cannot follow, labels the model's outputs cannot hold, and constraints of the
    specification that cannot be certified on this data (a group too small; on the first task, a
    worst-group constraint without a group column)."""
    from components.constraints import ConstraintError, spec_constraints
    from components.data import DataError, check_model_outputs
    from components.signing import load_private_key, load_public_keys
    from flows.settings import prefect_server_configured
    from lid_engine.bounds import ibp, linear

    if config.signing.private_key is not None and not prefect_server_configured():
        # certification runs here: a key that does not load fails now, not after training (the gpu
        # worker of a deployment holds its own key)
        load_private_key(config.signing.private_key)
    load_public_keys(config.signing.public_keys)
    layers = ibp.check_supported(model)
    if config.search.bound == "linear":
        linear.walk(model, layers)  # a chain the chain walk cannot relax is traced: tracing errors surface now
    try:
        spec_constraints(config.spec, data)
    except ConstraintError as exc:
        raise DataError(str(exc)) from None
    for name, _ in data.items():
        outputs = check_model_outputs(model, data.head(name, 256)[0], f"task '{data.task}', split '{name}'")
        y = data.labels(name)  # (a streamed split's labels are read without its features)
        if int(y.max()) >= outputs or int(y.min()) < 0:
            raise DataError(f"task '{data.task}', split '{name}': labels go from {int(y.min())} to {int(y.max())}, "
                            f"but the model has {outputs} outputs; expected class ids 0..{outputs - 1}")
    for r in config.spec.recall:
        if r.cls >= outputs:
            raise DataError(f"spec.recall: class {r.cls} does not exist: the model has {outputs} outputs (classes "
                            f"0..{outputs - 1})")
        if first and not all(bool((y == r.cls).any()) for _, (_, y) in data.items()):
            raise DataError(f"spec.recall: class {r.cls} has no example in some split of the first task '{data.task}'; "
                            "expected examples of every class whose recall is certified")
    if first and config.spec.worst_group is not None and data.groups is None:
        raise DataError(f"spec.worst_group: the first task '{data.task}' has no group column; expected data.group (the "
                        "column or .npz array of each row's group) or a loader returning 'group'")


def _first_model(config: LidgateConfig):
    """``(spec, model, from_mlflow)`` of the first version: built by the factory (its initialisation drawn
    with ``training.seed``, so a bootstrap is reproducible), or a registered version."""
    import torch

    from components.factory import ModelSpec
    from components.registry import Registry

    if config.model.factory is not None:
        spec = ModelSpec(config.model.factory, dict(config.model.kwargs))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.training.seed)
            return spec, spec.build(config.code, field="model.factory"), False
    ref = config.model.mlflow
    assert ref is not None
    settings = settings_for(config)
    source = Registry(settings.tracking_uri, ref.name, cache_dir=settings.cache_dir, registry_uri=settings.registry_uri)
    loaded = source.load(version=ref.version) if ref.version is not None else source.load(alias=ref.alias)
    try:
        return loaded.spec, loaded.model, True
    finally:
        source.release(loaded)


def _load_weights(model, path: Path, field: str) -> None:
    from components.weights import load_weights

    load_weights(model, path, field=field)


# ------------------------------------------------------------------------------------ flows
@flow(name="bootstrap")
def bootstrap_flow(config: str, weights: str | None = None) -> dict:
    """Train (or take ``weights`` for) the first version, certify its LID and make it the champion."""
    return run_pipeline(config, "bootstrap", weights=weights).to_dict()


@flow(name="retrain")
def retrain_flow(config: str, data: list[str] | None = None, task: str | None = None, projection: bool = True) -> dict:
    """Retrain the champion on ``data`` (default: the configuration's) with projection onto its LID;
    promote the result only if it is certified safe."""
    return run_pipeline(config, "retrain", data=data or [], task=task, projection=projection).to_dict()


@flow(name="submit")
def submit_flow(config: str, weights: str, data: list[str] | None = None, task: str | None = None) -> dict:
    """Certify a candidate trained elsewhere (``weights``) against the champion's LID; register and gate it."""
    return run_pipeline(config, "submit", data=data or [], task=task, weights=weights).to_dict()
