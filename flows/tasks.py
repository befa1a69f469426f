"""The pipeline's steps as Prefect tasks: lidgate's own flows are built from them, and a team that keeps
its own flow calls them from it.

::

    from prefect import flow
    from flows import tasks as lg

    @flow
    def nightly(config_path: str, new_data: list[str]):
        config = lg.load_configuration(config_path)          # plain function: validated config
        champion = lg.load_champion(config)                   # model + LID + lineage (None before v1)
        data = lg.load_data(config, new_data)                 # train / search / certification splits
        validation = lg.validate_data(config, data)           # Great Expectations suites
        model = champion.fresh_model()
        optimizer = lg.projected_optimizer(model, champion, torch.optim.SGD(model.parameters(), lr=0.01))
        my_training_loop(model, optimizer, data.train)        # the team's loop: every step is projected
        cert = lg.certify_candidate(config, model, data, champion)   # lineage re-verified, nested LID
        outcome = lg.register_and_gate(config, model, cert, data, validation, champion)
        return outcome.to_dict()

Each task is a Prefect ``@task`` (``task.fn`` is the plain function). None of them reads or changes
the process environment on import; results are not persisted by Prefect (models and LIDs live in
memory and in MLflow). Everything a step decides is fail closed: a candidate is only ever promoted by
the gate (``components.gate.promote``), and the gate re-checks every certificate itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.failpoints import failpoint
from lid_engine.files import utc_now
from flows.settings import Settings, open_registry, settings_for

if TYPE_CHECKING:
    import torch
    from torch import nn

    from components.config import LidgateConfig
    from components.data import DataSplits
    from components.factory import ModelSpec
    from components.gate import GateDecision
    from lid_engine import LID

__all__ = [
    "Candidate",
    "Certification",
    "Champion",
    "ChampionError",
    "Outcome",
    "Validation",
    "certify_candidate",
    "export_candidate",
    "load_champion",
    "recover_registry",
    "load_configuration",
    "load_data",
    "projected_optimizer",
    "promote_candidate",
    "register_and_gate",
    "register_candidate",
    "train_candidate",
    "validate_data",
]

STEP = {"cache_policy": NO_CACHE, "persist_result": False}  # models and LIDs are not Prefect results


class ChampionError(RuntimeError):
    """The champion cannot be built on: it has no usable LID, or its files fail their checks."""


# ------------------------------------------------------------------------------------ records
@dataclass
class Champion:
    """The promoted version a retrain builds on.

    Attributes:
        version: its version number.
        model: the model rebuilt from its registered spec and weights (do not train this copy:
            use ``fresh_model()``).
        spec: how to rebuild it.
        lid: its certified LID: every update is projected into it.
        lineage: the versions whose certificates a successor must keep: the champion's own lineage
            followed by the champion.
    """

    version: str
    model: nn.Module
    spec: ModelSpec
    lid: LID
    lineage: list[str]

    @property
    def feature_columns(self) -> list[str] | None:
        """The feature columns the champion's own task was read from (None for arrays and loaders)."""
        from components.data import feature_columns

        return feature_columns((self.lid.search_config.get("pipeline") or {}).get("data"))

    @property
    def features_record(self) -> dict | None:
        """How the champion's certification data's features were computed (a loader's or an npz's
        ``features`` record, e.g. a frozen encoder's sha256), or None."""
        from components.data import features_record

        return features_record(self.lid.search_config)

    def fresh_model(self) -> nn.Module:
        """A copy of the champion's model to train (the champion object stays as registered)."""
        import copy

        return copy.deepcopy(self.model)


@dataclass
class Validation:
    """Great Expectations results per data set (``training``, ``search``, ``certification``, ``lookahead``)."""

    passed: bool
    reports: dict[str, dict]

    @property
    def failures(self) -> list[str]:
        return [f"{name}: {c['name']}: {c['detail']}" for name, r in self.reports.items()
                for c in r["checks"] if not c["success"]]


@dataclass
class Candidate:
    """A model proposed as the next version, with where it came from."""

    model: nn.Module
    spec: ModelSpec
    source: str  # "trained" | "submitted" | "given"
    projection: bool
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Certification:
    """What the certification step found for a candidate.

    Attributes:
        task: the task the new LID certifies.
        lineage: one ``{"version", "ok", "failures"}`` per earlier version whose certificate the
            candidate must keep (``components.lineage.LineageCheck.to_dict``).
        lid: the candidate's own LID (nested inside the champion's), or None with ``error`` saying why.
        tau: the threshold of the new LID (τ given, or from the accuracy on the search split).
        search_metric: the candidate's metric on the search split.
        device: where the search ran.
    """

    task: str
    lineage: list[dict]
    lid: LID | None
    tau: float | None = None
    search_metric: float | None = None
    error: str | None = None
    device: str = "cpu"
    biasing: str = "none"
    seconds: float = 0.0
    #: the DSSE envelope signing the LID (``components.signing``), when the configuration signs
    signature: dict | None = None
    #: configured constraints that do not apply to this task's data, and why (``components.constraints``)
    notes: list[str] = field(default_factory=list)
    #: how the counts were computed beyond this process (``flows.shards``): shards, task runs, scheduler
    shards: dict[str, Any] | None = None

    @property
    def lineage_ok(self) -> bool:
        return all(check["ok"] for check in self.lineage)

    @classmethod
    def from_summary(cls, summary: dict[str, Any], lid: LID | None) -> Certification:
        """The result again from ``summary()`` (what the certify flow writes) and the LID it saved."""
        return cls(task=summary["task"], lineage=list(summary.get("lineage", [])), lid=lid, tau=summary.get("tau"),
                   search_metric=summary.get("search_metric"), error=summary.get("error"),
                   device=summary.get("device", "cpu"), biasing=summary.get("biasing", "none"),
                   seconds=float(summary.get("seconds", 0.0)), notes=list(summary.get("notes", [])),
                   shards=summary.get("shards"))

    def summary(self) -> dict[str, Any]:
        """JSON-able summary (what the CLI prints and the flows return)."""
        out: dict[str, Any] = {"task": self.task, "lid": self.lid is not None, "error": self.error,
                               "tau": self.tau, "search_metric": self.search_metric, "device": self.device,
                               "biasing": self.biasing, "seconds": round(self.seconds, 1),
                               "lineage": list(self.lineage), "notes": list(self.notes)}
        if self.shards is not None:
            out["shards"] = dict(self.shards)
        if self.lid is not None:
            from components.constraints import constraint_records, describe

            records = constraint_records(self.lid.search_config)
            out.update({"taus": {t: s.tau for t, s in self.lid.tasks.items()},
                        "constraints": {t: describe(records.get(t), t) for t in self.lid.tasks},
                        "members": len(self.lid), "width_sum": max(self.lid.width_sum()),
                        "certified": {t: self.lid.certified_accuracy(t) for t in self.lid.tasks},
                        "lower_bound": {t: self.lid.lower_bound(t) for t in self.lid.tasks}})
        return out


@dataclass
class Outcome:
    """The result of one pipeline run: the version registered (if any) and the gate's decision."""

    action: str
    version: str | None
    promoted: bool
    reasons: list[dict]
    champion_before: str | None
    champion_after: str | None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "promoted" if self.promoted else ("rejected" if self.version is None else "blocked")

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "version": self.version, "status": self.status, "promoted": self.promoted,
                "reasons": self.reasons, "champion_before": self.champion_before,
                "champion_after": self.champion_after, **self.details}


# ------------------------------------------------------------------------------------ helpers
def load_configuration(path: str | Path) -> LidgateConfig:
    """Read and validate a team's configuration file and put its ``code`` directories on ``sys.path``
    (so its factories, loaders and training function import here and when versions are rebuilt).

    Raises:
        components.config.ConfigError: the file is missing, malformed or invalid (names file and field).
    """
    from components.config import load_config
    from components.factory import use_code_roots

    config = load_config(path)
    use_code_roots(config.code)
    return config


def registry_for(config: LidgateConfig):
    """The MLflow registry of the configuration's model (stored certification data larger than
    ``certification.memory_mb`` is loaded as streams)."""
    return open_registry(settings_for(config))


def _log():
    try:
        return get_run_logger()
    except Exception:  # noqa: BLE001 — called outside a flow or task run (task.fn): log to the module logger
        import logging

        return logging.getLogger("lidgate")


# ------------------------------------------------------------------------------------ tasks
@task(name="load champion", **STEP)
def load_champion(config: LidgateConfig) -> Champion | None:
    """The current champion (model, LID, lineage), or None when the model has no champion yet.

    Raises:
        ChampionError: the champion was registered without a LID, or its LID does not load: a
            retrain on it could not be projected, so none is started (fail closed); or the gate did
            not promote it (an alias moved by hand).
        components.registry.RegistryIntegrityError: one of its artifacts was modified after registration.
    """
    from components import tags

    registry = registry_for(config)
    version = registry.champion()
    if version is None:
        return None
    loaded = registry.load(version=version)
    try:
        decided = tags.status(loaded.tags)
        if decided != tags.STATUS_PROMOTED:
            raise ChampionError(
                f"champion v{version} of {config.name!r} carries no promotion by the gate (its status is {decided!r}: "
                "the alias was moved by hand, or a promotion is under way), so it is not built on; nothing was "
                "trained. `lidgate audit` moves it back to the last promoted version and records the incident")
        if loaded.lid is None:
            raise ChampionError(
                f"champion v{version} of {config.name!r} has no LID certificate (the alias was set outside the "
                "gate?), so an update cannot be projected onto one; nothing was trained")
        return Champion(version=str(version), model=loaded.model, spec=loaded.spec, lid=loaded.lid,
                        lineage=[*loaded.lineage, str(version)])
    finally:
        registry.release(loaded)


def recover_registry(config: LidgateConfig, *, move_alias: bool = False) -> list[dict]:
    """Finish or end what a crashed run left half-done (``components.gate.recover``): a promotion
    the gate decided but did not record is recorded; versions whose run died are marked
    ``incomplete``; with ``move_alias`` a champion the gate did not promote is moved back."""
    from components.gate import recover

    registry = registry_for(config)
    done = recover(registry, move_alias=move_alias)
    done += _finish_export(config, registry) + _clean_staging(settings_for(config))
    for record in done:
        _log().warning("recovery: version %s: %s (%s)", record["version"], record["detail"], record["kind"])
    return done


def _finish_export(config: LidgateConfig, registry) -> list[dict]:
    """Export the champion to ONNX when a crash came between its promotion and its export."""
    from components import tags as tg
    from lid_engine.certificate import head_rows

    champion = registry.champion() if config.export.onnx else None
    if champion is None:
        return []
    info = next((h for h in registry.history() if h.version == champion), None)
    if info is None or info.status != tg.STATUS_PROMOTED or info.tags.get(tg.TAG_ONNX_SHA) \
            or not info.tags.get(tg.TAG_PROMOTED_AT) or not info.tags.get(tg.TAG_CERT_SHA):
        return []
    try:
        loaded = registry.load(version=champion)
        try:
            x = head_rows(next(iter(loaded.cert_data.values())), 4)[0]
            export = export_candidate(config, champion, loaded.model, x)
        finally:
            registry.release(loaded)
    except Exception as exc:  # noqa: BLE001 — recovery goes on; the audit reports the version
        return [{"kind": "export_failed", "version": champion, "at": utc_now(),
                 "detail": f"the champion was never exported, and exporting it now failed: {type(exc).__name__}: {exc}"}]
    return [{"kind": "export_completed", "version": champion, "at": utc_now(),
             "detail": f"the champion was promoted but never exported (a crash); exported to {export['path']}"}]


def _clean_staging(settings: Settings) -> list[dict]:
    """Remove candidate folders left in the staging area, and folders a streamed DataLoader was read into
    (``streams_dir``), by runs that ended without cleaning up: their owner process is gone from this
    host, or (another host's, or unreadable) they are older than a day (a week for streams)."""
    import shutil

    from components.owner import owner_alive
    from flows.certify import CANDIDATE_FILE

    def owner(folder: Path, streams: bool):
        doc = json.loads((folder / ("owner.json" if streams else CANDIDATE_FILE)).read_text(encoding="utf-8"))
        return doc if streams else (json.loads(doc["owner"]) if isinstance(doc.get("owner"), str) else None)

    out = []
    for kind, root, limit_s, what in (("staging_cleaned", settings.staging, 86400, "candidate folder(s)"),
                                      ("streams_cleaned", settings.streams_dir, 7 * 86400, "streamed data folder(s)")):
        removed = []
        for folder in sorted(root.glob("*")) if root.is_dir() else []:
            try:
                alive = owner_alive(owner(folder, kind == "streams_cleaned"))
            except (OSError, ValueError, AttributeError, KeyError, TypeError):
                alive = None
            age_s = time.time() - folder.stat().st_mtime
            if alive is False or (alive is None and age_s > limit_s):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        if removed:
            out.append({"kind": kind, "version": None, "at": utc_now(),
                        "detail": f"removed {len(removed)} {what} left by ended runs: {', '.join(removed[:5])}"})
    return out


@task(name="load data", **STEP)
def load_data(config: LidgateConfig, paths: Sequence[str | Path] = (), task_name: str | None = None,
              dtype: torch.dtype | None = None) -> DataSplits:
    """The task's train / search / certification data: the configuration's ``data`` section, or new
    files (``paths``) in its format, cut by the seeded split (recorded in the provenance).

    ``dtype``: cast the examples to the model's floating dtype (a float64 Parquet file and a float32
    model then agree, whatever training function runs).

    Raises:
        components.data.DataError: a file cannot be read or fails a check (names file and column).
    """
    from components.data import load_splits, load_update

    if paths:
        data = load_update(config, list(paths), task_name)
    else:
        # a streamed DataLoader's rows go to a file under the home (a shared volume beyond one machine)
        data = load_splits(config, scratch=settings_for(config).streams_dir)
        if task_name is not None:
            data.task = task_name
    return data.to_dtype(dtype) if dtype is not None else data


@task(name="validate data", **STEP)
def validate_data(config: LidgateConfig, data: DataSplits, lookahead_dir: str | Path | None = None) -> Validation:
    """Great Expectations suites for the training, search and certification splits (and the lookahead
    buffer when there is one): shape, classes, finite values, the configured value range, and enough
    certification rows for the confidence asked. Never raises for bad data: ``passed`` says."""
    from components.validation import validate_all

    classes = list(config.data.classes or data.classes)
    value_range = tuple(config.data.value_range) if config.data.value_range else None
    common = {"n_features": tuple(data.feature_shape), "classes": classes, "value_range": value_range}
    target = config.spec.tau if config.spec.tau is not None and 0 < config.spec.tau < 1 else 0.85
    sets: dict[str, tuple[Any, Any, dict]] = {
        "training": (*data.train, {"role": "training", "min_rows": 10, **common}),
        "search": (*data.search, {"role": "training", "min_rows": 10, **common}),
        # a streamed certification split is validated a chunk at a time (components.validation)
        "certification": (*((data.certification, None) if data.streamed else data.certification),
                          {"role": "certification", "confidence": config.spec.confidence,
                           "target_lower_bound": target, **common}),
    }
    if lookahead_dir is not None and Path(lookahead_dir).is_dir():
        from components.buffer import LookaheadBuffer

        buffer = LookaheadBuffer.open(lookahead_dir)
        if len(buffer):
            x, y = buffer.data()
            sets["lookahead"] = (x, y, {"role": "lookahead", "n_features": tuple(data.feature_shape),
                                        "classes": sorted({int(c) for c in y.tolist()}), "value_range": value_range})
    reports = {k: r.to_dict() for k, r in validate_all(sets).items()}
    return Validation(passed=all(r["success"] for r in reports.values()), reports=reports)


@task(name="projected optimizer", **STEP)
def projected_optimizer(model: nn.Module, champion: Champion | None, optimizer: torch.optim.Optimizer,
                        strategy: str = "sample_largest_closest", seed: int = 0) -> torch.optim.Optimizer:
    """``optimizer`` wrapped so that every step is projected onto the champion's LID (the model is
    projected into it at once). Before the first version (no champion) the optimizer is returned as is.

    Returns:
        A ``lid_engine.ProjectedOptimizer`` (a ``torch.optim.Optimizer``: schedulers, clipping and
        ``GradScaler`` work with it).
    """
    if champion is None:
        return optimizer
    import lid_engine as le

    return le.ProjectedOptimizer(optimizer, model, champion.lid, strategy=strategy, seed=seed)


@task(name="train candidate", **STEP)
def train_candidate(config: LidgateConfig, model: nn.Module, champion: Champion | None, data: DataSplits, *,
                    projection: bool = True) -> Candidate:
    """Train ``model`` on ``data.train`` with the configured training function (lidgate's built-in loop
    by default), through an Adam optimizer projected onto the champion's LID.

    ``projection=False`` trains without projection — for demonstrations of what the gate blocks.
    After a projected retrain the model is checked against the champion's LID (a training function that
    moved parameters without a step, against the training contract, gets its model projected back, and
    the log says so), and the champion's normalisation statistics (BatchNorm running mean and variance)
    are put back: its LID certifies parameters at those statistics.
    """
    import torch

    import lid_engine as le
    from components.factory import ModelSpec
    from components.training import run_training

    log = _log()
    projected = projection and champion is not None
    lr = float(config.training.kwargs.get("lr", 1e-3)) if config.training.function is None else 1e-3
    base = torch.optim.Adam(model.parameters(), lr=lr)
    optimizer = projected_optimizer.fn(model, champion if projected else None, base,
                                       strategy=config.training.strategy, seed=config.training.seed)
    run_training(config, model, optimizer, data, freeze_norm_stats=projected)
    if projected:
        if not champion.lid.contains(model):
            log.warning("the training function changed parameters after its last optimizer step; projecting them "
                        "back onto the champion's LID")
            le.project_(model, champion.lid, strategy="closest")
        changed = _restore_buffers(model, champion.model)
        if changed:
            log.warning("BatchNorm statistics changed during training (%s); the champion's are put back, since its "
                        "LID certifies the parameters at them: keep BatchNorm layers in eval mode while retraining",
                        ", ".join(changed[:3]))
    spec = champion.spec if champion is not None else ModelSpec(config.model.factory, dict(config.model.kwargs))
    return Candidate(model=model.eval(), spec=spec, source="trained", projection=projected,
                     metrics=_candidate_metrics(model, data, champion, config.spec.metric))


def given_candidate(model: nn.Module, spec: ModelSpec, source: str, data: DataSplits,
                    champion: Champion | None = None, metric: str = "accuracy") -> Candidate:
    """A candidate certified as it is: the first version's given weights, or one trained elsewhere."""
    return Candidate(model=model.eval(), spec=spec, source=source, projection=False,
                     metrics=_candidate_metrics(model, data, champion, metric))


def _candidate_metrics(model: nn.Module, data: DataSplits, champion: Champion | None,
                       metric: str = "accuracy") -> dict[str, float]:
    """The candidate's accuracy on the train and search splits, and the champion's on the search split,
    in the specification's metric (``metric``, recorded as ``metric``)."""
    import lid_engine as le

    balanced = metric == "balanced_accuracy"
    metrics: dict[str, Any] = {
        "metric": metric, "train_accuracy": le.accuracy(model, *data.train, balanced=balanced),
        "search_accuracy": le.accuracy(model, *data.search, balanced=balanced)}
    if champion is not None:
        metrics["champion_search_accuracy"] = le.accuracy(champion.model, *data.search, balanced=balanced)
    return metrics


def model_outputs(model: nn.Module, x: torch.Tensor) -> int:
    """How many outputs (classes) ``model`` gives, from one forward pass on ``x[:1]`` in eval mode."""
    import torch

    with torch.no_grad():
        return int(model.eval()(x[:1]).shape[-1])


def _restore_buffers(model: nn.Module, reference: nn.Module) -> list[str]:
    """Copy ``reference``'s floating buffers into ``model`` where they differ; returns their names."""
    import torch

    theirs = dict(reference.named_buffers())
    changed = []
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            ref = theirs.get(name)
            if ref is not None and buffer.shape == ref.shape and not torch.equal(buffer, ref.to(buffer.device)):
                buffer.copy_(ref)
                changed.append(name)
    return changed


@task(name="certify candidate", **STEP)
def certify_candidate(config: LidgateConfig, model: nn.Module, data: DataSplits, champion: Champion | None, *,
                      lookahead_dir: str | Path | None = None, device: str | None = None,
                      lineage: Sequence[str] | None = None) -> Certification:
    """Re-verify every earlier certificate on the candidate, then certify its own LID.

    1. Lineage: the candidate is checked against the LID of the champion and of every version in
       the champion's lineage (``components.lineage``: recomputed, never read from tags).
    2. The new LID: ``compute_lid`` on the task's search split, certified on its held-out split, at
       τ from ``spec`` (fixed, or from the candidate's accuracy on the search split), nested inside
       the champion's member that contains the candidate, biased towards the lookahead buffer's data
       (Fisher or SI importance, ``search.biasing``) when one exists.

    Nothing here raises for a candidate that fails: the result says why (``error``) and the gate blocks.
    ``lineage`` pins the versions to check (the trainer's champion); default: the champion's.
    """
    import torch

    from flows.shards import shard_counter

    start = time.perf_counter()
    log = _log()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    versions = list(lineage) if lineage is not None else (champion.lineage if champion is not None else [])
    with shard_counter(config.certification) as counter:  # None: count in-process
        result = _certify(config, model, data, champion, versions, lookahead_dir, device, counter, start)
    if counter is not None:
        result.shards = {"shards": config.certification.shards, "tasks": counter.submitted, "cluster": counter.cluster}
        log.info("certified counts from %d shard task runs on Dask (%s)", counter.submitted, counter.cluster)
    return result


def _certify(config: LidgateConfig, model: nn.Module, data: DataSplits, champion: Champion | None,
             versions: list[str], lookahead_dir, device: str, counter, start: float) -> Certification:
    import lid_engine as le

    log = _log()
    result = Certification(task=data.task, lineage=recheck_lineage(registry_for(config), model, versions, counter,
                                                         config.certification.batch_size),
                           lid=None, device=device)
    metric = config.spec.metric
    balanced = metric == "balanced_accuracy"
    result.search_metric = le.accuracy(model, *data.search, balanced=balanced)
    if not result.lineage_ok:
        from lid_engine.verify import UNCHECKED

        failed = [c for c in result.lineage if not c["ok"]]
        lead = ("an earlier certificate could not be re-checked on the candidate (an error while recomputing it)"
                if any(UNCHECKED in f for c in failed for f in c["failures"]) else
                "the candidate fails an earlier certificate")
        result.error = f"{lead}; no new LID is computed: " + "; ".join(
            f"v{c['version']}: {', '.join(c['failures'])}" for c in failed)
        return _done(result, start)
    within = champion.lid if champion is not None else None
    if within is not None and within.member_index(model) is None:
        result.error = f"the candidate lies outside champion v{champion.version}'s LID; no nested LID exists"
        return _done(result, start)
    from components.constraints import joint_confidence, spec_constraints, thresholds

    try:
        constraints, result.notes = spec_constraints(config.spec, data)
        taus = thresholds(config.spec, model, constraints, result.search_metric)
    except ValueError as exc:  # a relative τ without its metric, a group too small to certify
        result.error = str(exc)
        return _done(result, start)
    for note in result.notes:
        log.warning("%s", note)
    result.tau = taus[data.task]
    vacuous = _vacuous_threshold(model, data, result.tau, metric)
    if vacuous:
        result.error = vacuous
        return _done(result, start)
    mask = _lookahead_mask(config, model, lookahead_dir)
    result.biasing = config.search.biasing if mask is not None else "none"
    search = config.search.search_config()
    settings = {f: getattr(search, f) for f in ("iterations", "checkpoints", "batch_size", "method")}
    settings.update(config.search.options)
    if search.method == "linear" and "competitors" not in config.search.options:
        settings["competitors"] = 3  # the search bounds the 3 most dangerous classes; certificates all of them
    try:
        lid = le.compute_lid(
            model.to(device), tasks={c.task: (*c.search, taus[c.task]) for c in constraints},
            cert={c.task: c.certification for c in constraints}, within=within, mask=mask,
            spec_kind={c.task: c.metric for c in constraints},
            confidence=joint_confidence(config.spec.confidence, len(constraints)), seed=config.training.seed,
            device=device, progress=True, counter=counter, cert_batch_size=config.certification.batch_size,
            **settings)
    except le.LidSearchError as exc:
        result.error = str(exc)
        log.warning("LID search failed: %s", exc)
        return _done(result, start)
    finally:
        model.to("cpu")
    lid.search_config["pipeline"] = {"config_sha256": config.sha256(), "data": data.provenance,
                                     "data_sha256": data.fingerprint(),
                                     "constraints": [c.record(taus[c.task]) for c in constraints],
                                     "confidence": config.spec.confidence, "notes": list(result.notes)}
    result.lid = lid
    for c in constraints:
        log.info("LID: %d members, %s certified %.4f ≥ τ %.4f", len(lid), c.describe(),
                 lid.certified_accuracy(c.task), taus[c.task])
    return _done(result, start)


def recheck_lineage(registry, model: nn.Module, versions: Sequence[str], counter=None,
                    batch_size: int | None = 2048) -> list[dict]:
    """``{"version", "ok", "failures"}`` per earlier version: the candidate against each one's LID
    (``components.lineage.verify_lineage``, the one implementation the gate and the audit use too).
    ``counter``: how the certified examples are counted (``flows.shards``; None: in-process)."""
    from components.lineage import verify_lineage

    return [check.to_dict() for check in verify_lineage(registry, model, list(versions), counter=counter,
                                                                 batch_size=batch_size)]


def _vacuous_threshold(model: nn.Module, data: DataSplits, tau: float, metric: str) -> str | None:
    """Why ``tau`` certifies nothing, or None: at or below what a model that ignores its input gets
    (balanced accuracy: 1 / the model's outputs; accuracy: the larger of that and the most frequent
    class's share of the certification data), a certificate at it promises nothing."""
    import torch

    outputs = model_outputs(model, data.search[0])
    chance, why = 1.0 / max(outputs, 1), f"1/{outputs} outputs"
    if metric == "accuracy":
        labels = data.labels("certification")
        majority = float(torch.bincount(labels.long()).max()) / max(len(labels), 1)
        if majority > chance:
            chance, why = majority, "the most frequent class's share of the certification data"
    if tau > chance:
        return None
    return (f"τ = {tau:.4f} is at or below chance level ({why} = {chance:.4f}): a certificate at it would hold "
            "for a model that ignores its input, so none is issued; the candidate's accuracy on the search split "
            "is too low for spec.tau_from_accuracy, or spec.tau is set too low")


def _done(result: Certification, start: float) -> Certification:
    result.seconds = time.perf_counter() - start
    return result


def _lookahead_mask(config: LidgateConfig, model: nn.Module, lookahead_dir: str | Path | None):
    """Frozen-coordinate mask from the lookahead buffer (None without a buffer or without biasing)."""
    if config.search.biasing == "none" or lookahead_dir is None or not Path(lookahead_dir).is_dir():
        return None
    from components.buffer import LookaheadBuffer
    from lid_engine import fisher_importance, importance_mask, si_importance

    buffer = LookaheadBuffer.open(lookahead_dir)
    if len(buffer) == 0:
        return None
    x, y = buffer.data()
    scores = (fisher_importance if config.search.biasing == "fisher" else si_importance)(
        model, x, y, seed=config.training.seed)
    return importance_mask(scores, config.search.frozen_fraction, "lookahead")


@task(name="register candidate", **STEP)
def register_candidate(config: LidgateConfig, candidate: Candidate, certification: Certification, data: DataSplits,
                       validation: Validation, lineage: Sequence[str]) -> str:
    """Register the candidate as a new MLflow model version (status ``pending``) with its LID, its
    certification data, the validation summary and where it came from. Returns the version."""
    from components.gate import SIGNATURE_RECORD
    from components.owner import owner_tag
    from components.tags import (
        TAG_CANDIDATE_SOURCE,
        TAG_CERTIFICATION_ERROR,
        TAG_CONFIG_SHA,
        TAG_DATA_SHA256,
        TAG_OWNER,
        TAG_PROJECTION,
        TAG_TASK,
    )

    from components.constraints import constraint_cert_data

    registry = registry_for(config)
    cert_data = constraint_cert_data(config.spec, data, certification.lid.tasks if certification.lid else None)
    version = registry.register(
        candidate.model.cpu(), candidate.spec, lid=certification.lid, cert_data=cert_data, lineage=list(lineage),
        validation={"passed": validation.passed, "reports": validation.reports,
                    "certification": certification.summary(), "data": data.provenance},
        extra_tags={TAG_CONFIG_SHA: config.sha256(), TAG_TASK: data.task, TAG_DATA_SHA256: data.fingerprint(),
                    TAG_CANDIDATE_SOURCE: candidate.source, TAG_PROJECTION: str(candidate.projection).lower(),
                    TAG_OWNER: owner_tag(),
                    **({TAG_CERTIFICATION_ERROR: certification.error[:2000]} if certification.error else {})},
        example_input=data.head("certification", 2)[0],
    )
    if certification.signature is not None:
        registry.log_record(version, SIGNATURE_RECORD, certification.signature)
    return version


@task(name="promote candidate", **STEP)
def promote_candidate(config: LidgateConfig, version: str, validation: Validation) -> GateDecision:
    """The promotion gate (``components.gate.promote``): every check recomputed, the alias moved only
    if all pass, one gate of this model at a time on this machine. Never raises a check's failure: the
    decision says what happened (``components.lock.LockTimeout`` when another gate held the lock
    for ten minutes)."""
    from components.gate import promote
    from components.lock import promotion_lock
    from components.signing import load_public_keys

    keys = load_public_keys(config.signing.public_keys) or None
    settings = settings_for(config)
    with promotion_lock(settings.home, settings.model_name):  # one gate at a time (components/lock.py)
        return promote(open_registry(settings), version, validation_passed=validation.passed,
                       validation_summary=validation.reports, trusted_keys=keys)


@task(name="export candidate", **STEP)
def export_candidate(config: LidgateConfig, version: str, model: nn.Module, example_input) -> dict:
    """ONNX export of a promoted version with its certificate's sha256 in the metadata, checked
    against torch with onnxruntime and logged to the version's MLflow run; its sha256 and where it
    lies are recorded on the version (the audit re-hashes both copies)."""
    from components.export import export_onnx, log_onnx_to_mlflow
    from components.tags import TAG_CERT_SHA, TAG_MODEL_SHA, TAG_ONNX_ARTIFACT, TAG_ONNX_PATH, TAG_ONNX_SHA

    settings = settings_for(config)
    registry = open_registry(settings)
    loaded = registry.load(version=version)
    try:
        export = export_onnx(
            model, example_input, settings.onnx_dir / f"{registry.model_name}-v{version}.onnx",
            certificate_sha256=loaded.tags.get(TAG_CERT_SHA, ""),
            metadata={"lidgate.version": str(version), "lidgate.model_sha256": loaded.tags.get(TAG_MODEL_SHA, "")},
        )
        log_onnx_to_mlflow(export, loaded.run_id, tracking_uri=settings.tracking_uri)
        registry.set_tags(version, {TAG_ONNX_SHA: export.sha256, TAG_ONNX_ARTIFACT: f"onnx/{Path(export.path).name}",
                                    TAG_ONNX_PATH: str(Path(export.path).resolve())})
    finally:
        registry.release(loaded)
    return {"path": str(export.path), "sha256": export.sha256, "max_abs_diff": export.max_abs_diff}


@task(name="record rejection", **STEP)
def record_rejection(config: LidgateConfig, data: DataSplits, validation: Validation) -> str:
    """Rejected data registers no version; the reason is kept in an MLflow run of the
    ``lidgate-rejections`` experiment (and returned)."""
    from mlflow import MlflowClient

    settings = settings_for(config)
    reason = "data validation failed: " + "; ".join(validation.failures)
    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    experiment = client.get_experiment_by_name("lidgate-rejections")
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(
        "lidgate-rejections", artifact_location=f"{settings.artifact_location.rstrip('/')}/rejections")
    run = client.create_run(experiment_id, run_name=f"rejected {config.name} {data.task}",
                            tags={"lid.status": "rejected", "lid.reason": reason[:4000], "lid.task": data.task,
                                  "lidgate.model_name": config.name})
    client.log_dict(run.info.run_id, {"validation": validation.reports, "data": data.provenance}, "validation.json")
    client.set_terminated(run.info.run_id, "FINISHED")
    return reason


def register_and_gate(config: LidgateConfig, candidate: Candidate, certification: Certification, data: DataSplits,
                      validation: Validation, champion: Champion | None, *, action: str = "retrain",
                      export: bool | None = None) -> Outcome:
    """Register the candidate, run the gate, and export it when promoted (the end of every pipeline).

    Returns:
        The outcome: version, promoted or not, the gate's reasons, the champion before and after.
    """
    lineage = champion.lineage if champion is not None else []
    version = register_candidate(config, candidate, certification, data, validation, lineage)
    failpoint("registered")
    decision = promote_candidate(config, version, validation)
    details: dict[str, Any] = {"task": data.task, "certification": certification.summary(),
                               "candidate": {"source": candidate.source, "projection": candidate.projection,
                                             **candidate.metrics}}
    if decision.promoted and (config.export.onnx if export is None else export):
        try:
            details["onnx"] = export_candidate(config, version, candidate.model, data.head("certification", 4)[0])
            failpoint("exported")
        except Exception as exc:  # noqa: BLE001 — the promotion stands; the missing export is reported
            details["onnx"] = {"error": f"{type(exc).__name__}: {exc}"}
            _log().warning("v%s was promoted but its ONNX export failed: %s", version, exc)
    return Outcome(action=action, version=version, promoted=decision.promoted,
                   reasons=[{"code": r.code, "detail": r.detail} for r in decision.reasons],
                   champion_before=decision.champion_before, champion_after=decision.champion_after,
                   details=details)


def write_summary(settings: Settings, outcome: Outcome) -> Path:
    """Keep the outcome as JSON under the home's ``runs/`` folder (for people and scripts)."""
    from lid_engine.files import atomic_write

    path = settings.home / "runs" / f"{settings.model_name}-{int(time.time() * 1000)}-{outcome.action}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(outcome.to_dict(), indent=2, default=str).encode())
    return path
