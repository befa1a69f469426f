"""Several constraints at once (components.constraints): recall of chosen classes and the worst group's
accuracy beside the overall metric — compiled from the configuration, each one certified soundly
(checked by sampling parameter vectors in every domain, uniform and at vertices), each one blocking
the gate on its own."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lid_engine as le  # noqa: E402
from benchmarks.cl.data import blobs  # noqa: E402
from benchmarks.training import train_classifier  # noqa: E402
from components.config import parse_config  # noqa: E402
from components.constraints import (  # noqa: E402
    ConstraintError,
    constraint_cert_data,
    constraint_records,
    describe,
    joint_confidence,
    spec_constraints,
    thresholds,
)
from components.data import DataSplits  # noqa: E402
from components.factory import ModelSpec  # noqa: E402
from components.gate import promote  # noqa: E402
from components.registry import Registry  # noqa: E402
from tests.helpers.sampling import sample_parameters, sampled_outputs  # noqa: E402

SPEC = ModelSpec("tests.helpers.models:mlp", {"sizes": [2, 16, 4]})


def config_with(spec: dict):
    return parse_config({"version": 1, "name": "m", "model": {"factory": "tests.helpers.models:mlp"},
                         "data": {"source": "x.npz"}, "spec": spec})


def splits(seed: int = 0, n: int = 900, groups: bool = True) -> DataSplits:
    x, y = blobs(n, n_classes=4, std=2.5, seed=seed)
    g = np.where(x[:, 0] > 0, "east", "west")
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    cut = [0, n // 2, 3 * n // 4, n]
    parts = {name: (x[a:b], y[a:b]) for name, a, b in zip(("train", "search", "certification"), cut, cut[1:])}
    gs = {name: g[a:b] for name, a, b in zip(("train", "search", "certification"), cut, cut[1:])}
    return DataSplits(task="t1", provenance={}, feature_shape=(2,), classes=(0, 1, 2, 3),
                      groups=gs if groups else None, **parts)


@pytest.fixture(scope="module")
def data() -> DataSplits:
    return splits()


@pytest.fixture(scope="module")
def model(data):
    torch.manual_seed(0)
    m = SPEC.build()
    train_classifier(m, *data.train, epochs=6, lr=1e-2)
    return m.eval()


SPEC_DOC = {"metric": "balanced_accuracy", "tau_from_accuracy": 0.1, "confidence": 0.9,
            "recall": [{"class": 2, "tau_from_recall": 0.1}, {"class": 0, "tau": 0.5}],
            "worst_group": {"tau_from_accuracy": 0.15}}


# ------------------------------------------------------------------------------------ compiling
def test_constraints_are_subsets_of_the_task(data):
    cons, notes = spec_constraints(config_with(SPEC_DOC).spec, data)
    assert notes == []
    assert [c.task for c in cons] == ["t1", "t1.recall.2", "t1.recall.0", "t1.group.east", "t1.group.west"]
    assert [c.metric for c in cons] == ["balanced_accuracy", "accuracy", "accuracy", "accuracy", "accuracy"]
    recall2 = cons[1]
    assert bool((recall2.certification[1] == 2).all()) and len(recall2.certification[1]) == int(
        (data.certification[1] == 2).sum())
    east = cons[3]
    assert len(east.search[1]) == int((data.groups["search"] == "east").sum())
    assert describe(recall2.record()) == "recall of class 2 on 't1'"
    assert describe(east.record()) == "accuracy of group 'east' of 't1'"
    assert describe(cons[0].record()) == "balanced accuracy on 't1'"
    # the union bound: five claims at 0.98 each hold together with probability ≥ 0.9
    assert joint_confidence(0.9, 5) == pytest.approx(0.98)
    assert set(constraint_cert_data(config_with(SPEC_DOC).spec, data)) == {c.task for c in cons}


def test_constraints_that_do_not_apply_are_named(data):
    no_groups = splits(groups=False)
    doc = {**SPEC_DOC, "recall": [{"class": 3, "tau": 0.5}]}
    without_3 = copy.copy(no_groups)
    keep_s, keep_c = no_groups.search[1] != 3, no_groups.certification[1] != 3
    without_3.search = (no_groups.search[0][keep_s], no_groups.search[1][keep_s])
    without_3.certification = (no_groups.certification[0][keep_c], no_groups.certification[1][keep_c])
    cons, notes = spec_constraints(config_with(doc).spec, without_3)
    assert [c.task for c in cons] == ["t1"]
    assert any("class 3 has no example" in n for n in notes)
    assert any("spec.worst_group" in n and "no group column" in n for n in notes)


def test_small_group_is_refused(data):
    doc = {**SPEC_DOC, "worst_group": {"tau": 0.5, "min_examples": 10_000}}
    with pytest.raises(ConstraintError, match=r"group 'east' of task 't1' has \d+ search example\(s\), fewer than "
                                              r"spec.worst_group.min_examples = 10000"):
        spec_constraints(config_with(doc).spec, data)


def test_relative_thresholds_follow_the_models_own_metric(data, model):
    spec = config_with(SPEC_DOC).spec
    cons, _ = spec_constraints(spec, data)
    search_metric = le.accuracy(model, *data.search, balanced=True)
    taus = thresholds(spec, model, cons, search_metric)
    assert taus["t1"] == le.tau_from_accuracy(search_metric, 0.1)
    assert taus["t1.recall.0"] == 0.5
    recall2 = le.accuracy(model, *cons[1].search)
    assert taus["t1.recall.2"] == le.tau_from_accuracy(recall2, 0.1)
    assert taus["t1.group.west"] == le.tau_from_accuracy(le.accuracy(model, *cons[4].search), 0.15)


def test_config_keeps_old_digests_and_validates_constraints():
    plain = config_with({"metric": "accuracy", "tau": 0.5})
    assert "recall" not in plain.to_dict()["spec"] and "worst_group" not in plain.to_dict()["spec"]
    assert "group" not in plain.to_dict()["data"]
    full = config_with(SPEC_DOC)
    assert full.to_dict()["spec"]["recall"][0] == {"class": 2, "tau": None, "tau_from_recall": 0.1}
    assert parse_config({**full.to_dict(), "code": ["."]}).spec == full.spec  # round trip through to_dict
    with pytest.raises(ValueError, match=r"spec.recall\[1\].class: class 2 appears twice"):
        config_with({**SPEC_DOC, "recall": [{"class": 2, "tau": 0.5}, {"class": 2, "tau": 0.6}]})


# ------------------------------------------------------------------------------------ soundness
def _lid(model, data, spec_doc=SPEC_DOC, iterations=40, seed=0):
    spec = config_with(spec_doc).spec
    cons, _ = spec_constraints(spec, data)
    taus = thresholds(spec, model, cons, le.accuracy(model, *data.search, balanced=True))
    lid = le.compute_lid(copy.deepcopy(model), tasks={c.task: (*c.search, taus[c.task]) for c in cons},
                         cert={c.task: c.certification for c in cons}, spec_kind={c.task: c.metric for c in cons},
                         confidence=joint_confidence(spec.confidence, len(cons)), iterations=iterations,
                         checkpoints=2, progress=False, keep="all", seed=seed)
    return lid, cons, taus


def _sampled_metric(model, box, x, y, metric, n=1500, seed=0):
    outs = sampled_outputs(model, sample_parameters(box, n, seed), x)  # (n, batch, classes)
    correct = (outs.argmax(-1) == y).double()
    if metric == "accuracy":
        return correct.mean(dim=1)
    per_class = [correct[:, y == c].mean(dim=1) for c in torch.unique(y)]
    return torch.stack(per_class).mean(dim=0)


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 10_000))
def test_every_constraint_is_sound_by_sampling(seed):
    """Every parameter vector sampled in every member (uniform and vertices) has, on each constraint's
    certification rows, a metric at least the certified one — and every certified example is classified
    correctly by every sample."""
    data = splits(seed=seed % 50)
    torch.manual_seed(seed)
    model = SPEC.build()
    train_classifier(model, *data.train, epochs=4, lr=1e-2)
    model.eval()
    lid, cons, _ = _lid(model, data, iterations=30, seed=seed)
    assert len(lid.tasks) == 5
    for i, member in enumerate(lid.members):
        for c in cons:
            cert = lid.certificates[i][c.task]
            x, y = c.certification
            sampled = _sampled_metric(model, member, x, y, c.metric, seed=seed + i)
            assert float(sampled.min()) >= cert.certified_accuracy - 1e-12, (c.task, i)
            mask = le.certified_examples(model, member, x, y)
            outs = sampled_outputs(model, sample_parameters(member, 500, seed + 7), x[mask])
            assert bool((outs.argmax(-1) == y[mask]).all()), (c.task, i)
            assert cert.confidence == pytest.approx(joint_confidence(0.9, 5))


# ------------------------------------------------------------------------------------ the gate
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    return d


def _registry(store, name):
    return Registry(f"sqlite:///{store}/mlflow.db", model_name=name, artifact_location=store / "artifacts",
                    cache_dir=store / "cache")


@pytest.mark.parametrize("failing", ["t1", "t1.recall.2", "t1.recall.0", "t1.group.east", "t1.group.west"])
def test_each_constraint_blocks_on_its_own(store, model, data, failing):
    """A candidate whose LID meets every constraint but one is blocked, naming that one constraint."""
    lid, cons, taus = _lid(model, data)
    reg = _registry(store, f"gate-{failing.replace('.', '-')}")
    cert_data = {c.task: c.certification for c in cons}
    champion = reg.register(model, SPEC, lid=lid, cert_data=cert_data, validation={"ok": True})
    assert promote(reg, champion, validation_passed=True).promoted
    # the same model, its LID re-certified with τ of one constraint raised above what it certifies
    specs = dict(lid.tasks)
    specs[failing] = le.Spec(specs[failing].kind, min(1.0, lid.certified_accuracy(failing) + 0.01))
    if lid.certified_accuracy(failing) >= 1.0:
        pytest.skip("this constraint is certified at 1.0; no τ above it")
    strict = le.LID.certify(model, lid.members, cert_data, specs, confidence=lid.confidence)
    strict.search_config = {"pipeline": {"constraints": [c.record(taus[c.task]) for c in cons]}}
    assert {t for t in strict.tasks if not strict.meets_spec(t)} == {failing}
    v = reg.register(model, SPEC, lid=strict, cert_data=cert_data, lineage=[champion], validation={"ok": True})
    d = promote(reg, v, validation_passed=True)
    assert not d.promoted and d.codes == ["below_tau"], d.to_dict()
    below = [r for r in d.to_dict()["reasons"] if r["code"] == "below_tau"]
    assert len(below) == 1 and f"'{failing}'" in below[0]["detail"]
    assert reg.champion() == champion
    assert constraint_records(strict.search_config)[failing]["task"] == failing


def test_constraints_that_cannot_be_certified_fail_before_training(data, model):
    """Bad input, before any training: a group too small for its certificate, and a first task whose
    specification asks for the worst group's accuracy without a group column."""
    from components.data import DataError
    from flows.retrain import _preflight

    small = config_with({**SPEC_DOC, "worst_group": {"tau": 0.5, "min_examples": 10_000}})
    with pytest.raises(DataError, match=r"group 'east' of task 't1' has \d+ search example"):
        _preflight(small, model, data)
    plain = config_with(SPEC_DOC)
    _preflight(plain, model, data, first=True)  # groups present: fine
    with pytest.raises(DataError, match=r"spec.worst_group: the first task 't1' has no group column"):
        _preflight(plain, model, splits(groups=False), first=True)
    _preflight(plain, model, splits(groups=False))  # a later task without groups: the constraint does not apply


def test_recall_of_a_class_that_cannot_exist_is_refused(data, model):
    from components.data import DataError
    from flows.retrain import _preflight

    with pytest.raises(ValueError, match=r"spec.recall\[0\].class: class 5 is not one of data.classes \[0, 1, 2, 3\]"):
        parse_config({"version": 1, "name": "m", "model": {"factory": "tests.helpers.models:mlp"},
                      "data": {"source": "x.npz", "classes": [0, 1, 2, 3]},
                      "spec": {"tau": 0.5, "recall": [{"class": 5, "tau": 0.5}]}})
    with pytest.raises(DataError, match=r"spec.recall: class 7 does not exist: the model has 4 outputs"):
        _preflight(config_with({"tau": 0.5, "recall": [{"class": 7, "tau": 0.5}]}), model, data)
