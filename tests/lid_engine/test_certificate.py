"""Certificates, LIDs on disk and ``verify``: what an auditor relies on.

* The Clopper–Pearson bound is the textbook one (closed forms, the binomial tail identity,
  monotonicity) and never optimistic.
* ``certify_box`` is sound: its certified count never exceeds the accuracy of any of 1000 parameter
  vectors sampled in the box (half of them vertices), per example too.
* A saved LID loads back equal; ``verify`` passes on it and fails — naming the check — on every
  single-field change of ``lid.json``, a flipped bit in any file, another model, other data.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from scipy.stats import binom
from torch import nn

import lid_engine as le
from lid_engine import Box, Spec
from lid_engine.certificate import (
    Certificate,
    certify_box,
    clopper_pearson_lower,
    fingerprint_data,
    fingerprint_model,
    fingerprint_tensors,
)
from lid_engine.errors import CertificateError, InvalidDomainError, InvalidInputError
from lid_engine.lid import LID, manifest_digest
from lid_engine.spec import certified_mask
from lid_engine.verify import verify
from tests.helpers.sampling import sample_parameters, sampled_outputs

RADII = (0.001, 0.01)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def make_data(model: nn.Module, n: int = 240, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g).to(next(model.parameters()).dtype)
    with torch.no_grad():
        y = model(x).argmax(1)
    flip = torch.rand(n, generator=g) < 0.1  # some wrong labels, so not everything is certified
    y[flip] = (y[flip] + 1) % 3
    return x, y


@pytest.fixture(scope="module")
def setup():
    model = mlp()
    x, y = make_data(model)
    lid = LID.certify(
        model, [Box.around(model, r) for r in RADII], {"task": (x, y)}, {"task": Spec("accuracy", 0.8)},
        search_config={"note": "test", "radii": list(RADII)},
    )
    return model, x, y, lid


@pytest.fixture(scope="module")
def saved(setup, tmp_path_factory) -> Path:
    _, _, _, lid = setup
    return lid.save(tmp_path_factory.mktemp("lid") / "lid")


@pytest.fixture
def copy_of(saved, tmp_path):
    def _copy() -> Path:
        return Path(shutil.copytree(saved, tmp_path / "copy"))

    return _copy


# ------------------------------------------------------------------------------- Clopper–Pearson
@pytest.mark.parametrize("n", [1, 10, 400])
@pytest.mark.parametrize("alpha", [0.05, 0.01, 0.005])
def test_cp_all_successes_closed_form(n, alpha):
    assert clopper_pearson_lower(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-9)
    assert clopper_pearson_lower(n, n, alpha) <= alpha ** (1 / n)  # never optimistic


def test_cp_zero_successes_is_zero():
    assert clopper_pearson_lower(0, 50, 0.05) == 0.0


@pytest.mark.parametrize("k,n", [(1, 10), (5, 10), (9, 10), (85, 100), (340, 400)])
def test_cp_binomial_tail_identity(k, n):
    """The lower bound p_L solves P(Bin(n, p_L) ≥ k) = alpha (and is at most that)."""
    p = clopper_pearson_lower(k, n, 0.05)
    assert binom.sf(k - 1, n, p) == pytest.approx(0.05, rel=1e-8)
    assert binom.sf(k - 1, n, p) <= 0.05


def test_cp_known_value():
    assert clopper_pearson_lower(5, 10, 0.05) == pytest.approx(0.22244, abs=1e-5)


def test_cp_monotone():
    ks = [clopper_pearson_lower(k, 100, 0.05) for k in range(101)]
    assert all(a < b for a, b in zip(ks, ks[1:]))
    assert clopper_pearson_lower(90, 100, 0.05) > clopper_pearson_lower(90, 101, 0.05)  # more trials, same k
    assert clopper_pearson_lower(900, 1000, 0.05) > clopper_pearson_lower(90, 100, 0.05)  # same rate, more data
    assert clopper_pearson_lower(90, 100, 0.01) < clopper_pearson_lower(90, 100, 0.05)  # more confidence


@pytest.mark.parametrize("k,n,alpha", [(-1, 5, 0.05), (6, 5, 0.05), (1, 0, 0.05), (1, 5, 0.0), (1, 5, 1.0), (True, 5, 0.1), (1.5, 5, 0.1)])
def test_cp_rejects_bad_arguments(k, n, alpha):
    with pytest.raises(InvalidInputError):
        clopper_pearson_lower(k, n, alpha)


# ------------------------------------------------------------------------------- fingerprints
def test_fingerprints_see_every_change():
    a = {"w": torch.zeros(2, 3), "b": torch.ones(3)}
    base = fingerprint_tensors(a)
    assert base == fingerprint_tensors({"b": torch.ones(3), "w": torch.zeros(2, 3)})  # order-free
    assert base != fingerprint_tensors({"w": torch.zeros(3, 2), "b": torch.ones(3)})  # shape
    assert base != fingerprint_tensors({"w": torch.zeros(2, 3, dtype=torch.float64), "b": torch.ones(3)})  # dtype
    assert base != fingerprint_tensors({"v": torch.zeros(2, 3), "b": torch.ones(3)})  # name
    c = {k: v.clone() for k, v in a.items()}
    c["w"][1, 2] = -0.0  # same value, different bits
    assert base != fingerprint_tensors(c)


def test_model_fingerprint_covers_buffers():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    base = fingerprint_model(m)
    m[1].running_mean += 1e-3
    assert fingerprint_model(m) != base


def test_data_fingerprint_canonical_labels():
    x = torch.randn(4, 2)
    assert fingerprint_data(x, torch.tensor([0, 1, 2, 1])) == fingerprint_data(x, torch.tensor([0, 1, 2, 1], dtype=torch.int32))
    assert fingerprint_data(x, torch.tensor([0, 1, 2, 1])) != fingerprint_data(x, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(InvalidInputError):
        fingerprint_data(x, torch.tensor([0.5, 1.0, 2.0, 1.0]))


# ------------------------------------------------------------------------------- certify_box
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_certify_box_is_sound_by_sampling(dtype):
    """Certified count ≤ correct count of every one of 1000 sampled parameter vectors, per example too.

    The sampled forward passes run in the certification dtype (the bound's rounding guarantee is
    for that arithmetic)."""
    model = mlp(3).to(dtype)
    x, y = make_data(model, 300, 4)
    box = Box.around(model, 0.02)
    cert = certify_box(model, box, x, y, Spec(), dtype=dtype)
    assert 0 < cert.certified < cert.n  # a non-trivial case
    lo, hi = le.bound_logits(model, box, x, mode="certify", dtype=dtype)
    mask = certified_mask(lo, hi, y)
    assert int(mask.sum()) == cert.certified
    params = sample_parameters(box, 1000, seed=7)
    preds = sampled_outputs(model, params, x).argmax(-1)  # (1000, N)
    correct = preds == y
    assert bool(correct[:, mask].all()), "a certified example is misclassified by a parameter vector in the box"
    assert int(correct.sum(1).min()) >= cert.certified


def test_float64_certificate_covers_the_float32_model():
    """A 1e-8 logit margin is certified by float64 bounds, but the float32 model ties and predicts
    class 0: the certificate must also hold in the model's own arithmetic, so it must not count it."""
    m = nn.Sequential(nn.Linear(2, 2, bias=False)).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    x, y = torch.tensor([[1.0, 1e-8]]), torch.tensor([1])
    assert int(m(x).argmax(1)) == 0  # the float32 model is wrong on it
    box = Box.point(m)
    lo, hi = le.bound_logits(m, box, x, mode="certify", dtype=torch.float64)
    assert bool(certified_mask(lo, hi, y).all())  # float64 arithmetic alone would certify it
    cert = certify_box(m, box, x, y, Spec())
    assert cert.certified == 0
    assert (cert.dtype, cert.evaluation_dtypes) == ("float64", ["float64", "float32"])
    assert certify_box(m.double(), box.to(dtype=torch.float64), x.double(), y, Spec()).evaluation_dtypes == ["float64"]


def test_certify_box_fields_and_balanced_bound():
    model = mlp()
    x, y = make_data(model)
    box = Box.around(model, 0.01)
    cert = certify_box(model, box, x, y, Spec("balanced_accuracy", 0.5), task="t", member=1, n_domains=4, confidence=0.9)
    assert cert.problems() == []
    assert (cert.task, cert.member, cert.n_domains, cert.kind, cert.dtype) == ("t", 1, 4, "balanced_accuracy", "float64")
    assert cert.n == len(x) and sum(c["n"] for c in cert.per_class.values()) == len(x)
    assert cert.model_sha256 == fingerprint_model(model)
    assert cert.domain_sha256 == fingerprint_tensors(box.tensors())
    assert cert.data_sha256 == fingerprint_data(x, y)
    recalls = [c["certified"] / c["n"] for c in cert.per_class.values()]
    assert cert.certified_accuracy == pytest.approx(sum(recalls) / len(recalls))
    a = 0.1 / 4 / len(cert.per_class)
    expected = sum(clopper_pearson_lower(c["certified"], c["n"], a) for c in cert.per_class.values()) / len(cert.per_class)
    assert cert.lower_bound == pytest.approx(expected, rel=1e-12)
    assert cert.lower_bound <= cert.certified_accuracy


def test_certify_box_accuracy_bound():
    model = mlp()
    x, y = make_data(model)
    cert = certify_box(model, Box.around(model, 0.01), x, y, Spec(), n_domains=3, confidence=0.95)
    assert cert.certified_accuracy == cert.certified / cert.n
    assert cert.lower_bound == pytest.approx(clopper_pearson_lower(cert.certified, cert.n, 0.05 / 3), rel=1e-11)


@pytest.mark.parametrize("kwargs", [{"confidence": 1.0}, {"confidence": 0.0}, {"n_domains": 0}, {"member": -1},
                                    {"dtype": torch.float16}, {"task": ""}])
def test_certify_box_rejects_bad_arguments(kwargs):
    model = mlp()
    x, y = make_data(model, 20)
    with pytest.raises(InvalidInputError):
        certify_box(model, Box.around(model, 0.01), x, y, Spec(), **kwargs)


def test_certify_box_rejects_bad_labels():
    model = mlp()
    x, _ = make_data(model, 20)
    with pytest.raises(InvalidInputError, match="labels must lie in"):
        certify_box(model, Box.around(model, 0.01), x, torch.full((20,), 3), Spec())


# ------------------------------------------------------------------------------- Certificate (de)serialisation
def test_certificate_round_trip(setup):
    cert = setup[3].certificates[0]["task"]
    d = json.loads(json.dumps(cert.to_dict()))
    assert Certificate.from_dict(d) == cert


@pytest.mark.parametrize("change", [
    lambda d: d.pop("lower_bound"),
    lambda d: d.update(extra=1),
    lambda d: d.update(n=True),
    lambda d: d.update(n=float(d["n"])),
    lambda d: d.update(tau="0.8"),
    lambda d: d.update(confidence=1.0),
    lambda d: d.update(format="lidgate.certificate/0"),
    lambda d: d.update(bound_method="crown"),
    lambda d: d.update(dtype="float16"),
    lambda d: d.update(evaluation_dtypes=["float32"]),
    lambda d: d.update(evaluation_dtypes="float64"),
    lambda d: d.update(model_sha256="abc"),
    lambda d: d.update(created_at="2025-01-01T00:00:00"),  # no time zone
    lambda d: d.update(per_class={"0": {"n": 1}}),
    lambda d: d.update(certified=d["n"] + 1),
])
def test_certificate_strict_fields(setup, change):
    d = setup[3].certificates[0]["task"].to_dict()
    change(d)
    with pytest.raises(CertificateError):
        Certificate.from_dict(d)


# ------------------------------------------------------------------------------- LID
def test_lid_union_guarantee_is_the_min(setup):
    _, _, _, lid = setup
    certs = [c["task"] for c in lid.certificates]
    assert lid.certified_accuracy() == min(c.certified_accuracy for c in certs)
    assert lid.lower_bound("task") == min(c.lower_bound for c in certs)
    assert certs[0].certified >= certs[1].certified  # the larger box certifies no more
    assert all(c.n_domains == 2 for c in certs)
    assert len(lid) == 2 and list(lid) == lid.members
    assert lid.width_sum()[0] < lid.width_sum()[1]
    assert lid.member_index(setup[0]) == 0


def test_lid_rejects_member_without_nominal():
    model = mlp()
    x, y = make_data(model, 30)
    shifted = Box({n: t + 1.0 for n, t in Box.around(model, 0.01).lower.items()},
                  {n: t + 1.0 for n, t in Box.around(model, 0.01).upper.items()})
    with pytest.raises(InvalidDomainError, match="member 1 does not contain"):
        LID.certify(model, [Box.around(model, 0.01), shifted], {"task": (x, y)}, {"task": Spec()})


def test_lid_certify_input_errors():
    model = mlp()
    x, y = make_data(model, 30)
    with pytest.raises(InvalidInputError, match="'data' has tasks"):
        LID.certify(model, [Box.around(model, 0.01)], {"a": (x, y)}, {"b": Spec()})
    with pytest.raises(InvalidInputError, match="n_domains"):
        LID.certify(model, [Box.around(model, 0.01)] * 2, {"a": (x, y)}, {"a": Spec()}, n_domains=1)


def test_lid_subset_keeps_union_bound(setup):
    _, _, _, lid = setup
    sub = lid.subset([1])
    c = sub.certificates[0]["task"]
    assert len(sub) == 1 and c.member == 0 and c.n_domains == 2
    assert c.lower_bound == lid.certificates[1]["task"].lower_bound
    assert sub.search_config["member_indices"] == [1]


def test_lid_round_trip(setup, saved):
    _, _, _, lid = setup
    loaded = LID.load(saved)
    assert loaded.certificates == lid.certificates
    assert loaded.tasks == lid.tasks
    assert loaded.search_config == lid.search_config
    assert loaded.model_sha256 == lid.model_sha256 and loaded.architecture_sha256 == lid.architecture_sha256
    assert loaded.created_at == lid.created_at and loaded.engine_version == lid.engine_version
    for a, b in zip(loaded.members, lid.members):
        for n in a.names:
            assert torch.equal(a.lower[n], b.lower[n]) and torch.equal(a.upper[n], b.upper[n])
    for n in lid.nominal:
        assert torch.equal(loaded.nominal[n], lid.nominal[n])
    assert loaded.manifest(json.loads((saved / "lid.json").read_text())["files"]) == json.loads((saved / "lid.json").read_text())


def test_lid_save_refuses_non_empty_directory(setup, tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(le.LidError, match="not empty"):
        setup[3].save(tmp_path)


def test_lid_load_names_tampered_member(copy_of):
    d = copy_of()
    path = d / "members" / "001" / "domain.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CertificateError, match=r"members/001/domain\.safetensors"):
        LID.load(d)


# ------------------------------------------------------------------------------- verify
def test_verify_ok(setup, saved):
    model, x, y, _ = setup
    report = verify(saved, model, x, y)
    assert report.ok, report.summary()
    assert not report.failures
    names = [c.name for c in report.checks]
    assert "member 1 / 'task' recomputed" in names and "model fingerprint" in names
    assert json.loads(json.dumps(report.to_dict()))["ok"] is True


def _leaves(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, prefix + (i,))
    else:
        yield prefix


def _mutate(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.01 if value + 0.01 <= 1.0 else value - 0.01
    if isinstance(value, str):
        if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
            return ("0" if value[0] != "0" else "1") + value[1:]
        if value.startswith("20") and "T" in value:
            return "2001-01-01T00:00:00+00:00"
        if value == "float64":
            return "float32"
        if value == "accuracy":
            return "balanced_accuracy"
        return value + "x"
    raise TypeError(value)


def _manifest_for_paths():
    model = mlp()
    x, y = make_data(model, 60)
    lid = LID.certify(model, [Box.around(model, r) for r in RADII], {"task": (x, y)}, {"task": Spec("accuracy", 0.8)},
                      search_config={"note": "test", "radii": list(RADII)})
    return lid.manifest({f: "0" * 64 for f in ["nominal.safetensors", "members/000/domain.safetensors",
                                               "members/000/domain.json", "members/001/domain.safetensors",
                                               "members/001/domain.json"]})


LEAF_PATHS = list(_leaves(_manifest_for_paths()))
# Not claims: nothing to recompute them from. Only the digest (an integrity check, not a signature)
# protects them; every *claim* is recomputed even when an adversary re-seals the digest.
METADATA = {("created_at",), ("engine_version",), ("tasks", "task", "temperature")}


def _is_metadata(path) -> bool:
    return (path in METADATA or path[0] == "search_config"
            or (path[0] == "members" and len(path) == 5 and path[4] in ("created_at", "engine_version")))


def _set(obj, path, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


@pytest.mark.parametrize("path", LEAF_PATHS, ids=lambda p: "/".join(map(str, p)))
def test_verify_rejects_every_single_field_change(setup, copy_of, path):
    model, x, y, _ = setup
    d = copy_of()
    manifest = json.loads((d / "lid.json").read_text())
    _set(manifest, path, _mutate(_get(manifest, path)))
    (d / "lid.json").write_text(json.dumps(manifest))
    report = verify(d, model, x, y)
    assert not report.ok
    assert "lid.json" in [c.name for c in report.failures]


@pytest.mark.parametrize("path", [p for p in LEAF_PATHS if p != ("digest",)], ids=lambda p: "/".join(map(str, p)))
def test_verify_rejects_resealed_claims(setup, copy_of, path):
    """An adversary who edits a field and recomputes the digest: every claim is still recomputed."""
    model, x, y, _ = setup
    d = copy_of()
    manifest = json.loads((d / "lid.json").read_text())
    _set(manifest, path, _mutate(_get(manifest, path)))
    manifest["digest"] = manifest_digest(manifest)
    (d / "lid.json").write_text(json.dumps(manifest))
    report = verify(d, model, x, y)
    if _is_metadata(path):
        assert report.ok, report.summary()
    else:
        assert not report.ok, f"changing {path} went unnoticed"
        if path == ("format",):  # a structural field: the manifest is refused outright
            assert "has format" in report.failures[0].detail
        else:
            assert report.failures and all(c.name != "lid.json" for c in report.failures)


NUMERIC_PATHS = [p for p in LEAF_PATHS if isinstance(_get(_manifest_for_paths(), p), (int, float))
                 and not isinstance(_get(_manifest_for_paths(), p), bool) and p[0] != "search_config"]


@pytest.mark.parametrize("path", NUMERIC_PATHS, ids=lambda p: "/".join(map(str, p)))
def test_a_resealed_number_too_large_for_a_float_fails_by_name(setup, copy_of, path):
    """JSON integers have no size limit: 10**400 must be refused like any bad value, not crash float()."""
    model, x, y, _ = setup
    d = copy_of()
    manifest = json.loads((d / "lid.json").read_text())
    _set(manifest, path, 10**400)
    manifest["digest"] = manifest_digest(manifest)
    (d / "lid.json").write_text(json.dumps(manifest))
    report = verify(d, model, x, y)  # never raises
    assert not report.ok
    with pytest.raises(CertificateError):
        LID.load(d)


FILES = ["nominal.safetensors", "members/000/domain.safetensors", "members/001/domain.safetensors",
         "members/000/domain.json"]


@pytest.mark.parametrize("rel", FILES)
@pytest.mark.parametrize("where", ["header", "middle", "end"])
def test_verify_rejects_flipped_bit(setup, copy_of, rel, where):
    model, x, y, _ = setup
    d = copy_of()
    path = d / rel
    raw = bytearray(path.read_bytes())
    pos = {"header": 10, "middle": len(raw) // 2, "end": len(raw) - 2}[where]
    raw[pos] ^= 0x04
    path.write_bytes(bytes(raw))
    report = verify(d, model, x, y)
    assert not report.ok
    assert f"file {rel}" in [c.name for c in report.failures]


def test_verify_reports_missing_file(setup, copy_of):
    model, x, y, _ = setup
    d = copy_of()
    (d / "members" / "000" / "domain.safetensors").unlink()
    report = verify(d, model, x, y)
    assert not report.ok
    assert {"file members/000/domain.safetensors", "member 0 domain"} <= {c.name for c in report.failures}
    (d / "lid.json").unlink()
    report = verify(d, model, x, y)
    assert not report.ok and report.failures[0].name == "lid.json"


def test_verify_rejects_other_model(setup, saved):
    model, x, y, _ = setup
    other = mlp()
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-6
    report = verify(saved, other, x, y)
    assert not report.ok
    assert [c.name for c in report.failures] == ["model fingerprint"]


def test_verify_rejects_other_architecture(setup, saved):
    model, x, y, _ = setup
    other = nn.Sequential(nn.Linear(5, 16), nn.Sigmoid(), nn.Linear(16, 3))
    other.load_state_dict(model.state_dict())
    report = verify(saved, other, x, y)
    assert not report.ok
    assert "model architecture" in [c.name for c in report.failures]


def test_verify_rejects_other_data(setup, saved):
    model, x, y, _ = setup
    y2 = y.clone()
    y2[0] = (y2[0] + 1) % 3
    x2 = x.clone()
    x2[3, 2] += 1e-3
    for xs, ys in ((x, y2), (x2, y)):
        report = verify(saved, model, xs, ys)
        assert not report.ok
        assert "data 'task' fingerprint" in [c.name for c in report.failures]
    report = verify(saved, model)  # no data: nothing can be recomputed, fail closed
    assert not report.ok and "data 'task'" in [c.name for c in report.failures]


def test_verify_dtype_must_match(setup, saved):
    model, x, y, _ = setup
    assert verify(saved, model, x, y, dtype=torch.float64).ok
    report = verify(saved, model, x, y, dtype=torch.float32)
    assert not report.ok and "member 0 / 'task' recomputed" in [c.name for c in report.failures]


def test_verify_allow_update(setup, saved):
    model, x, y, _ = setup
    inside = mlp()
    with torch.no_grad():
        inside[0].weight[0, 0] += 0.005  # outside member 0 (radius 0.001), inside member 1 (0.01)
    assert not verify(saved, inside, x, y).ok
    report = verify(saved, inside, x, y, allow_update=True)
    assert report.ok, report.summary()
    assert report.member == 1
    outside = mlp()
    with torch.no_grad():
        outside[2].bias[1] -= 0.02
    report = verify(saved, outside, x, y, allow_update=True)
    assert not report.ok
    assert [c.name for c in report.failures] == ["model inside LID"]


def test_verify_allow_update_rejects_changed_buffers(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(50, 4)
    y = model(x).argmax(1).detach()
    LID.certify(model, [Box.around(model, 0.01)], {"t": (x, y)}, {"t": Spec()}).save(tmp_path / "lid")
    assert verify(tmp_path / "lid", model, x, y).ok
    model[1].running_var *= 1.5
    report = verify(tmp_path / "lid", model, x, y, allow_update=True)
    assert not report.ok and "model buffers" in [c.name for c in report.failures]


def test_verify_several_tasks(tmp_path):
    model = mlp()
    xa, ya = make_data(model, 50, 2)
    xb, yb = make_data(model, 40, 3)
    lid = LID.certify(model, [Box.around(model, 0.005)], {"a": (xa, ya), "b": (xb, yb)},
                      {"a": Spec(), "b": Spec("balanced_accuracy", 0.5)})
    lid.save(tmp_path / "lid")
    assert verify(tmp_path / "lid", model, data={"a": (xa, ya), "b": (xb, yb)}).ok
    report = verify(tmp_path / "lid", model, data={"a": (xa, ya), "b": (xa, ya)})
    assert not report.ok and "data 'b' fingerprint" in [c.name for c in report.failures]
    assert not verify(tmp_path / "lid", model, xa, ya).ok  # ambiguous: which task?
    with pytest.raises(le.LidError, match="several tasks"):
        lid.certified_accuracy()
    assert lid.certified_accuracy("b") == lid.certificates[0]["b"].certified_accuracy
