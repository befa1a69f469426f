"""LID search and projection: what a user relies on when they make updates safe."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lid_engine as le
from benchmarks.cl.data import blobs
from benchmarks.training import train_classifier
from lid_engine.projection import Projector
from lid_engine.search import LidSearchError, _split, search_target
from lid_engine.metrics import accuracy
from tests.helpers.models import mlp
from tests.helpers.sampling import sample_parameters, sampled_outputs


@pytest.fixture(scope="module")
def task():
    """Blobs task 1 (classes 0/1 of a 6-class head), an MLP 2-32-6 trained on it, held-out split."""
    x, y = (torch.from_numpy(a) for a in blobs(n=2400, seed=0))
    keep = y < 2
    x, y = x[keep], y[keep]
    torch.manual_seed(0)
    model = mlp([2, 32, 6])
    train_classifier(model, x[:400], y[:400], epochs=20, batch_size=32, lr=1e-2)
    return model, x[400:], y[400:]


@pytest.fixture(scope="module")
def lid(task):
    model, x, y = task
    acc = accuracy(model, x, y)
    assert acc > 0.95
    return le.compute_lid(model, x, y, tau=0.9, iterations=60, checkpoints=6, batch_size=256,
                          progress=False, seed=0)


def test_search_returns_certified_members_containing_theta(task, lid):
    model, _, _ = task
    assert len(lid) >= 1
    for i, box in enumerate(lid.members):
        assert box.contains(model), f"member {i} does not contain θ"
        cert = lid.certificates[i]["task"]
        assert cert.certified_accuracy >= 0.9
        assert 0 < cert.lower_bound <= cert.certified_accuracy
    assert lid.width_sum()[-1] > 0
    # the boxes grow along the trajectory (finalisation may trim a checkpoint a little below the one before)
    assert lid.width_sum()[-1] > lid.width_sum()[0]


def test_certification_set_is_held_out_from_the_search(task, lid):
    model, x, y = task
    search, cert = _split(x, y, 0.3, seed=0)
    assert lid.certificates[0]["task"].n == len(cert[0])
    assert lid.certificates[0]["task"].data_sha256 == le.fingerprint_data(*cert)
    search_rows = {tuple(r.tolist()) for r in search[0]}
    assert not any(tuple(r.tolist()) in search_rows for r in cert[0])


def test_certificate_is_sound_for_sampled_models(task, lid):
    model, x, y = task
    _, (xc, yc) = _split(x, y, 0.3, seed=0)
    box = lid.members[-1]
    outs = sampled_outputs(model, sample_parameters(box, 2000, seed=1), xc)
    sampled_acc = (outs.argmax(-1) == yc).double().mean(-1)
    assert lid.certificates[-1]["task"].certified_accuracy <= float(sampled_acc.min())


def test_unmeetable_tau_fails_closed_in_one_sentence(task):
    """τ above what the model itself gets right (on the search data or on the held-out data) is refused
    before any search, in one sentence naming τ, the task, the data and the model's own metric."""
    model, x, y = task
    acc = accuracy(model, x, y)
    wrong = (y + 1) % 2  # the model gets (nearly) every example wrong under these labels
    with pytest.raises(LidSearchError, match=r"τ = 0.5 cannot be reached for task 'task'.*search data") as err:
        le.compute_lid(model, x, wrong, tau=0.5, iterations=10, checkpoints=2, progress=False)
    message = str(err.value)
    assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message
    with pytest.raises(LidSearchError, match=r"cannot be reached.*held-out certification data"):
        le.compute_lid(model, x, y, tau=min(acc, 0.9), iterations=10, checkpoints=2, progress=False,
                       cert_x=x[:50], cert_y=(y[:50] + 1) % 2)


def test_masked_coordinates_keep_zero_width(task):
    model, x, y = task
    g = torch.Generator().manual_seed(3)
    mask = {n: torch.rand(p.shape, generator=g) < 0.6 for n, p in model.named_parameters()}
    lid = le.compute_lid(model, x, y, tau=0.85, iterations=30, checkpoints=3, progress=False, mask=mask, keep="all")
    for box in lid.members:
        for n, m in mask.items():
            assert bool((box.width(n)[m] == 0).all())
        assert any(bool((box.width(n)[~m] > 0).any()) for n, m in mask.items())


def test_free_coordinates_start_at_the_width_cap_and_stay_certified(task):
    """Task-IL head rows of unseen classes are free (±max_width); the certificate covers them too."""
    model, x, y = task
    _, (xc, yc) = _split(x, y, 0.3, seed=0)
    head_w, head_b = list(model.named_parameters())[-2:]
    rows = torch.zeros(6, dtype=torch.bool)
    rows[2:] = True  # classes 2..5 are not in this task
    free = {head_w[0]: rows[:, None].expand_as(head_w[1]).clone(), head_b[0]: rows}
    tm = torch.nn.Sequential(*model, le.TaskMask(6, [(0, 1), (2, 3), (4, 5)]).set_task(0))
    lid = le.compute_lid(tm, x, y, tau=0.85, iterations=20, checkpoints=2, progress=False, free=free, keep="all",
                         max_width=3.0)
    box = lid.members[-1]
    for name, m in free.items():
        assert torch.allclose(box.width(name)[m].double(), torch.full_like(box.width(name)[m].double(), 6.0))
        assert float(box.width(name)[~m].max()) < 6.0
    outs = sampled_outputs(tm, sample_parameters(box, 1000, seed=2), xc)
    sampled_acc = (outs.argmax(-1) == yc).double().mean(-1)
    assert lid.certificates[-1]["task"].certified_accuracy <= float(sampled_acc.min())


def test_free_and_frozen_coordinates_cannot_overlap(task):
    model, x, y = task
    both = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()}
    with pytest.raises(le.InvalidInputError, match="both frozen"):
        le.compute_lid(model, x, y, tau=0.8, iterations=2, checkpoints=1, progress=False, mask=both, free=both)
    with pytest.raises(le.InvalidInputError, match="free"):
        le.compute_lid(model, x, y, tau=0.8, iterations=2, checkpoints=1, progress=False, free=[1, 2])


def test_nested_lid_stays_inside_within(task, lid):
    model, x, y = task
    outer = lid.members[0]
    inner = le.compute_lid(model, x, y, tau=0.85, iterations=40, checkpoints=4, progress=False,
                           within=lid, keep="all")
    member = lid.members[lid.member_index(model)]
    for box in inner.members:
        assert box.is_subset(member)
    with pytest.raises(le.InvalidDomainError, match="outside 'within'"):
        shifted = le.Box({n: t + 1.0 for n, t in outer.lower.items()}, {n: t + 1.0 for n, t in outer.upper.items()})
        le.compute_lid(model, x, y, tau=0.85, iterations=5, checkpoints=1, progress=False, within=shifted)


def test_several_tasks_get_one_constraint_each(task):
    model, x, y = task
    half = len(x) // 2
    lid = le.compute_lid(model, tasks={"a": (x[:half], y[:half], 0.85), "b": (x[half:], y[half:], 0.8)},
                         iterations=20, checkpoints=2, progress=False, keep="all")
    assert set(lid.certificates[0]) == {"a", "b"}
    assert len(lid.history[-1]["lambda"]) == 2


@given(tau=st.floats(0, 1), nominal=st.floats(0, 1), margin=st.floats(0, 0.5))
def test_search_target_never_asks_more_than_theta_can_give(tau, nominal, margin):
    target = search_target(tau, nominal, margin)
    assert tau <= target <= min(tau + margin, 1.0) + 1e-12
    if nominal >= tau:
        assert target <= (tau + nominal) / 2 + 1e-12, "half of θ's own slack is left for the box to grow"
    else:
        assert target == tau


def test_a_task_the_model_barely_meets_does_not_collapse_the_box(task):
    """τ = acc/2 on a task the model has not learnt (METHOD.md's Δ rule): the margin must not push the
    target above what θ achieves, or the box would shrink to nothing."""
    model, x, y = task
    wrong = (y + 1) % 2  # the model gets (nearly) every example wrong under these labels
    acc = accuracy(model, x, wrong)
    tau = le.tau_from_accuracy(acc, 0.12)
    lid = le.compute_lid(model, x, wrong, tau=tau, iterations=30, checkpoints=3, progress=False, keep="all",
                         primal_lr=0.5)
    target = lid.search_config["search_targets"]["task"]
    assert tau <= target <= tau + (acc - tau) / 2 + 1e-9
    widths = lid.width_sum()
    assert widths[-1] > widths[0] > 0, "the box keeps growing"
    assert all(c["task"].certified_accuracy >= tau for c in lid.certificates)


def test_bad_search_arguments_are_clear(task):
    model, x, y = task
    with pytest.raises(le.InvalidInputError, match="'checkpoints'"):
        le.compute_lid(model, x, y, tau=0.9, iterations=5, checkpoints=10, progress=False)
    with pytest.raises(le.InvalidInputError, match="tau"):
        le.compute_lid(model, x, y, tau=1.5, progress=False)
    with pytest.raises(le.InvalidInputError, match="mask"):
        le.compute_lid(model, x, y, tau=0.9, mask={"0.weight": torch.zeros(3)}, progress=False)
    with pytest.raises(le.InvalidInputError, match="labels must lie"):
        le.compute_lid(model, x, y + 10, tau=0.9, progress=False)


# ------------------------------------------------------------------------------------ projection
def _random_point(model, scale, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(1e-3, 3.0), st.sampled_from(["closest", "sample_largest_closest"]))
def test_every_projection_lands_inside_and_recertifies(task, lid, seed, scale, strategy):
    model, x, y = task
    m = mlp([2, 32, 6])
    m.load_state_dict(model.state_dict())
    _random_point(m, scale, seed)
    le.project_(m, lid, strategy=strategy, seed=seed)
    index = lid.member_index(m)
    assert index is not None
    _, (xc, yc) = _split(x, y, 0.3, seed=0)
    with torch.no_grad():
        acc = float((m(xc).argmax(1) == yc).double().mean())
    assert acc >= lid.certificates[index]["task"].certified_accuracy


def test_single_box_projection_is_the_euclidean_one(task):
    model, _, _ = task
    box = le.Box.around(model, 0.05)
    m = mlp([2, 32, 6])
    m.load_state_dict(model.state_dict())
    _random_point(m, 0.5, 1)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    le.project_(m, box)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p, before[n].clamp(box.lower[n], box.upper[n]))


def test_projected_optimizer_keeps_model_inside_through_1000_random_steps(task, lid):
    model, x, y = task
    m = mlp([2, 32, 6])
    m.load_state_dict(model.state_dict())
    opt = le.ProjectedOptimizer(torch.optim.Adam(m.parameters(), lr=0.05), m, lid, strategy="sample_largest_closest")
    g = torch.Generator().manual_seed(0)
    for step in range(1000):
        opt.zero_grad()
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        if step % 50 == 0 or step == 999:
            assert lid.member_index(m) is not None, f"left the LID at step {step}"
    assert lid.member_index(m) == opt.current_member


def test_projected_optimizer_state_dict_round_trip(task, lid):
    model, x, y = task
    m = mlp([2, 32, 6])
    m.load_state_dict(model.state_dict())
    opt = le.ProjectedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m, lid)
    loss = torch.nn.functional.cross_entropy(m(x[:64]), (y[:64] + 1) % 2)
    loss.backward()
    opt.step()
    state = opt.state_dict()
    opt2 = le.ProjectedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m, lid)
    opt2.load_state_dict(state)
    assert opt2.current_member == opt.current_member
    assert opt2.param_groups[0]["momentum"] == 0.9
    assert len(opt2.state) == len(opt.state)


def test_best_loss_strategy_picks_the_lowest_loss_member(task, lid):
    model, x, y = task
    m = mlp([2, 32, 6])
    m.load_state_dict(model.state_dict())
    _random_point(m, 1.0, 7)

    def loss_fn(mm):
        return torch.nn.functional.cross_entropy(mm(x[:200]), y[:200])

    proj = Projector(m, lid, "best_loss", loss_fn=loss_fn)
    flat = proj._flat().clone()
    chosen = proj.project_()
    losses = []
    for i in range(len(lid)):
        proj._write(torch.minimum(torch.maximum(flat, proj.lower[i]), proj.upper[i]))
        with torch.no_grad():
            losses.append(float(loss_fn(m)))
    assert losses[chosen] == min(losses)
    with pytest.raises(le.InvalidInputError, match="loss_fn"):
        Projector(m, lid, "best_loss")


def test_projection_into_float64_box_stays_inside_for_float32_model(task):
    model, _, _ = task
    box = le.Box.around(model, 0.01).to(dtype=torch.float64)
    box = le.Box({n: t + 1e-9 for n, t in box.lower.items()}, {n: t + 1e-9 for n, t in box.upper.items()})
    m = mlp([2, 32, 6])
    m.load_state_dict(model.state_dict())
    _random_point(m, 1.0, 2)
    le.project_(m, box)
    assert box.contains(m)


def test_verify_containing_member_only(task, lid, tmp_path):
    """The gate's cheap re-verification still checks the certificate that covers the update."""
    model, x, y = task
    _, (xc, yc) = _split(x, y, 0.3, seed=0)
    lid.save(tmp_path / "lid")
    m = mlp([2, 32, 6])
    m.load_state_dict(model.state_dict())
    _random_point(m, 1.0, 11)
    le.project_(m, lid)
    report = le.verify(tmp_path / "lid", m, xc, yc, allow_update=True, recompute="containing")
    assert report.ok and report.member == lid.member_index(m)
    recomputed = [c.name for c in report.checks if "recomputed" in c.name]
    assert recomputed == [f"member {report.member} / 'task' recomputed"]
    # outside every member: fails even though nothing is recomputed
    _random_point(m, 5.0, 12)
    assert not le.verify(tmp_path / "lid", m, xc, yc, allow_update=True, recompute="containing").ok
    bad = le.verify(tmp_path / "lid", model, xc, yc, recompute="containing")
    assert not bad.ok and "recompute" in bad.failures[0].detail
