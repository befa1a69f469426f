"""ProjectedOptimizer, CoefficientOptimizer and attach_projection as torch optimizers.

What a user who brings torch tooling relies on: LR schedulers change the step, gradient clipping
between backward and step is honoured, ``GradScaler.step`` projects (and a step it skips for inf
gradients leaves the model where it was, inside the domain), step and state-dict hooks run, a
resume from a saved state continues the same trajectory bit for bit, and after every step the
model lies inside the domain. The projection itself stays bit-identical to ``Projector.project_``
after each inner step: committed benchmark results depend on it.
"""

from __future__ import annotations

import copy
import gc
import io

import pytest
import torch
from torch import nn

import lid_engine as le
from lid_engine.errors import InvalidInputError
from lid_engine.projection import Projector

KINDS = ("projected", "hook", "coefficients")


# ---------------------------------------------------------------------------------- helpers
def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _data(seed: int = 0, n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _lid(model: nn.Module) -> le.LID:
    """Three certified boxes of different shapes around θ (tau 0: certification always holds), so
    the projector has members to choose between."""
    head = [n for n, _ in model.named_parameters()][-2:]
    body = [n for n, _ in model.named_parameters()][:2]
    members = [le.Box.around(model, 0.02), le.Box.around(model, 0.15, names=head),
               le.Box.around(model, 0.1, names=body)]
    x, y = _data(9, 40)
    return le.LID.certify(model, members, {"task": (x, y)}, {"task": le.Spec(tau=0.0)})


def _segment(model: nn.Module, reach: float = 1.0, lo: float = 0.0, hi: float = 1.0) -> le.Zonotope:
    """One generator moving the head; coefficient range [lo, hi]; no residual (no offsets)."""
    g = torch.Generator().manual_seed(2)
    head = list(model.named_parameters())[-2:]
    z = le.Zonotope.segment(model, {n: p.detach() + reach * torch.randn(p.shape, generator=g) for n, p in head})
    return le.Zonotope(z.centre, z.generators, torch.tensor([lo], dtype=torch.float64),
                       torch.tensor([hi], dtype=torch.float64), z.residual)


class Setup:
    """One way of training safely: ``opt`` is what the training loop steps (and a scheduler or
    GradScaler is given), ``domain`` what the model must stay in, ``handle`` the hook's handle."""

    def __init__(self, kind: str, model: nn.Module, domain, lr: float, inner=torch.optim.SGD,
                 strategy: str = "closest", seed: int = 0, **kw):
        self.kind, self.model, self.domain, self.handle = kind, model, domain, None
        if kind == "projected":
            self.opt = le.ProjectedOptimizer(inner(model.parameters(), lr=lr, **kw), model, domain, strategy, seed=seed)
        elif kind == "hook":
            self.opt = inner(model.parameters(), lr=lr, **kw)
            self.handle = le.attach_projection(self.opt, model, domain, strategy, seed=seed)
        else:
            self.opt = le.CoefficientOptimizer(model, domain, lr=lr, optimizer=inner, **kw)

    def position(self) -> torch.Tensor:
        """Where the optimizer is: the coefficients for CoefficientOptimizer, θ otherwise."""
        if self.kind == "coefficients":
            return self.opt.coefficients.detach().clone()
        return _flat(self.model)

    def gradient(self) -> torch.Tensor:
        """The gradient the optimizer steps on (read after ``step``)."""
        if self.kind == "coefficients":
            return self.opt.coefficients.grad.detach().clone()
        return torch.cat([p.grad.reshape(-1) for p in self.model.parameters()]).clone()


def _setup(kind: str, *, lr: float = 0.1, wide: bool = True, inner=torch.optim.SGD, seed: int = 0,
           dtype: torch.dtype = torch.float32, **kw) -> Setup:
    """``wide``: a domain the steps below never reach the edge of, so a step is exactly lr × gradient."""
    model = _model(seed, dtype)
    if kind == "coefficients":
        domain = _segment(model, 1.0, -100.0, 100.0) if wide else _segment(model, 1.0, 0.0, 0.1)
    else:
        domain = le.Box.around(model, 10.0) if wide else _lid(model)
    return Setup(kind, model, domain, lr, inner, **kw)


# ---------------------------------------------------------------------------------- they are optimizers
@pytest.mark.parametrize("kind", ["projected", "coefficients"])
def test_they_are_torch_optimizers_sharing_groups_state_and_defaults(kind) -> None:
    s = _setup(kind, inner=torch.optim.Adam)
    opt, inner = s.opt, s.opt.optimizer
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    opt.param_groups[0]["lr"] = 0.25
    assert inner.param_groups[0]["lr"] == 0.25
    x, y = _data()
    opt.zero_grad()
    _loss(s.model, x, y).backward()
    opt.step()
    saved = copy.deepcopy(inner.state_dict())
    inner.load_state_dict(saved)  # torch replaces its lists here: the wrapper must follow
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert len(opt.state) == len(opt.param_groups[0]["params"])


def test_add_param_group_reaches_the_wrapped_optimizer_and_coefficients_refuse_it() -> None:
    model = _model()
    first, head = list(model[0].parameters()), list(model[2].parameters())
    box = le.Box.around(model, 0.05)
    opt = le.ProjectedOptimizer(torch.optim.SGD(first, lr=0.1), model, box)
    opt.add_param_group({"params": head, "lr": 0.01})  # unfreezing a layer during fine-tuning
    assert len(opt.optimizer.param_groups) == 2 and opt.optimizer.param_groups[1]["lr"] == 0.01
    before = _flat(model[2])
    x, y = _data()
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()
    assert not torch.equal(_flat(model[2]), before) and box.contains(model)
    co = le.CoefficientOptimizer(_model(), _segment(_model()), lr=0.1)
    with pytest.raises(InvalidInputError, match="add_param_group cannot add"):
        co.add_param_group({"params": [torch.zeros(1, requires_grad=True)]})


# ---------------------------------------------------------------------------------- bit-identical projection
@pytest.mark.parametrize("strategy", ["closest", "sample_largest_closest"])
@pytest.mark.parametrize("domain_kind", ["lid", "zonotope"])
def test_projected_trajectory_is_bit_identical_to_projecting_by_hand(strategy, domain_kind) -> None:
    model = _model(3)
    domain = _lid(model) if domain_kind == "lid" else _segment(model, 1.0)
    by_hand = copy.deepcopy(model)
    hand_domain = copy.deepcopy(domain)  # a zonotope keeps its own warm start
    opt = le.ProjectedOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), model, domain, strategy, seed=7)
    inner = torch.optim.Adam(by_hand.parameters(), lr=0.05)
    if domain_kind == "lid":
        projector = Projector(by_hand, hand_domain, strategy, seed=7)
        project = projector.project_
    else:
        def project() -> int:
            hand_domain.project_(by_hand)
            return 0
    project()
    x, y = _data(1)
    y = (y + 1) % 3  # pull away from what θ predicts: the projection has work to do
    clamped = 0
    for _ in range(40):
        for m, o in ((model, opt), (by_hand, inner)):
            o.zero_grad()
            _loss(m, x, y).backward()
        inner.step()
        free = _flat(by_hand)
        member = project()
        opt.step()
        clamped += int(not torch.equal(free, _flat(by_hand)))
        assert torch.equal(_flat(model), _flat(by_hand))
        assert opt.current_member == member
        assert domain.contains(model)
    assert clamped > 10  # the projection did move the parameters
    if domain_kind == "lid":
        assert opt.projector.switches == projector.switches


# ---------------------------------------------------------------------------------- LR schedulers
def _train(s: Setup, steps: int, after_step=None, seed: int = 0) -> tuple[list[float], list[float]]:
    """Plain SGD steps; returns the learning rate of each step and |step| / |lr × gradient|."""
    x, y = _data(seed)
    lrs, ratios = [], []
    for i in range(steps):
        before = s.position()
        s.opt.zero_grad()
        _loss(s.model, x, y).backward()
        lr = s.opt.param_groups[0]["lr"]
        s.opt.step()
        assert s.domain.contains(s.model), f"left the domain at step {i}"
        lrs.append(lr)
        ratios.append(float((s.position() - before).norm() / (lr * s.gradient().norm())))
        if after_step is not None:
            after_step(i)
    return lrs, ratios


@pytest.mark.parametrize("scheduler", ["step", "onecycle", "plateau"])
@pytest.mark.parametrize("kind", KINDS)
def test_lr_schedulers_change_the_effective_step(kind, scheduler) -> None:
    s = _setup(kind, lr=0.05, dtype=torch.float64)  # OneCycleLR ends at lr 1e-6: steps below float32's resolution
    if scheduler == "step":
        sched = torch.optim.lr_scheduler.StepLR(s.opt, step_size=2, gamma=0.5)
        after = lambda i: sched.step()  # noqa: E731
    elif scheduler == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(s.opt, max_lr=0.2, total_steps=8, cycle_momentum=False)
        after = lambda i: sched.step()  # noqa: E731
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(s.opt, factor=0.5, patience=0)
        after = lambda i: sched.step(1.0 + i)  # a metric that only gets worse: every step halves lr
    lrs, ratios = _train(s, 8, after)
    assert len(set(lrs)) >= 3, lrs  # the scheduler moved the learning rate ...
    assert all(r == pytest.approx(1.0, rel=1e-6) for r in ratios), ratios  # ... and every step followed it
    expected = {"step": [0.05, 0.05, 0.025, 0.025], "plateau": [0.05, 0.05, 0.025, 0.0125]}.get(scheduler)
    if expected:
        assert lrs[:4] == pytest.approx(expected)


# ---------------------------------------------------------------------------------- gradient clipping
@pytest.mark.parametrize("kind", KINDS)
def test_clipping_the_models_gradients_between_backward_and_step_is_honoured(kind) -> None:
    max_norm, lr = 1e-3, 0.1
    free, clipped = _setup(kind, lr=lr), _setup(kind, lr=lr)
    x, y = _data()
    for s, clip in ((free, False), (clipped, True)):
        before = s.position()
        s.opt.zero_grad()
        _loss(s.model, x, y).backward()
        if clip:
            norm = torch.nn.utils.clip_grad_norm_(s.model.parameters(), max_norm)
            assert float(norm) > 10 * max_norm  # clipping does cut this gradient
        model_grad = [p.grad.detach().double().reshape(-1) for p in s.model.parameters()]
        s.opt.step()
        assert s.domain.contains(s.model)
        s.moved = s.position() - before
        if kind == "coefficients":  # the step follows the clipped model gradient through the chain rule
            names = [n for n, _ in s.model.named_parameters()]
            expected = sum(s.domain.generators[n].reshape(1, -1) @ g for n, g in zip(names, model_grad)
                           if n in s.domain.generators)
            torch.testing.assert_close(s.moved, -lr * expected, rtol=1e-9, atol=0)
    bound = lr * max_norm * (1 + 1e-5)
    if kind == "coefficients":
        bound *= float(torch.cat([g.reshape(-1) for g in clipped.domain.generators.values()]).norm())
    assert float(clipped.moved.norm()) <= bound < float(free.moved.norm())


def test_clipping_the_coefficients_gradients_is_honoured_and_clipping_both_sides_is_refused() -> None:
    max_norm, lr = 1e-4, 0.1
    s = _setup("coefficients", lr=lr)
    x, y = _data()
    before = s.position()
    s.opt.zero_grad()
    _loss(s.model, x, y).backward()
    own = [p for g in s.opt.param_groups for p in g["params"]]
    norm = float(torch.nn.utils.clip_grad_norm_(own, max_norm))
    assert norm > 10 * max_norm
    s.opt.step()
    assert float((s.position() - before).norm()) == pytest.approx(lr * max_norm * norm / (norm + 1e-6), rel=1e-9)
    s.opt.zero_grad()
    _loss(s.model, x, y).backward()
    torch.nn.utils.clip_grad_norm_(own, max_norm)
    torch.nn.utils.clip_grad_norm_(s.model.parameters(), max_norm)
    snap = _flat(s.model)
    with pytest.raises(InvalidInputError, match="both the model's gradients and the coefficients' gradients"):
        s.opt.step()
    assert torch.equal(_flat(s.model), snap)


def test_coefficient_gradients_accumulate_over_backward_passes_and_follow_gradients_set_by_hand() -> None:
    s = _setup("coefficients", lr=0.1)
    x, y = _data()
    s.opt.zero_grad()
    _loss(s.model, x[:32], y[:32]).backward()
    _loss(s.model, x[32:], y[32:]).backward()  # gradient accumulation
    g = s.domain.generators
    names = [n for n, _ in s.model.named_parameters() if n in g]
    by_hand = sum(g[n].reshape(1, -1) @ dict(s.model.named_parameters())[n].grad.double().reshape(-1) for n in names)
    torch.testing.assert_close(s.opt.coefficients.grad, by_hand, rtol=1e-12, atol=0)
    s.opt.zero_grad()
    for p in s.model.parameters():  # no backward at all: gradients written by hand
        p.grad = torch.ones_like(p)
    before = s.position()
    s.opt.step()
    by_hand = sum(g[n].reshape(1, -1) @ torch.ones(g[n][0].numel(), dtype=torch.float64) for n in names)
    torch.testing.assert_close(s.position() - before, -0.1 * by_hand, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------- AMP GradScaler
def _amp_run(kind: str, scaled: bool, steps: int = 6) -> tuple[Setup, torch.amp.GradScaler, list[torch.Tensor]]:
    s = _setup(kind, lr=0.05, wide=False, inner=torch.optim.Adam)
    scaler = torch.amp.GradScaler("cpu", enabled=scaled)
    x, y = _data(1)
    y = (y + 1) % 3
    path = []
    for i in range(steps):
        s.opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = _loss(s.model, x, y)
        scaler.scale(loss).backward()
        scaler.step(s.opt)
        scaler.update()
        assert s.domain.contains(s.model), f"left the domain at step {i}"
        path.append(_flat(s.model))
    return s, scaler, path


@pytest.mark.parametrize("kind", KINDS)
def test_grad_scaler_steps_are_projected_like_unscaled_ones(kind) -> None:
    scaled, scaler, path = _amp_run(kind, True)
    _, _, plain = _amp_run(kind, False)
    assert scaler.get_scale() == 65536.0  # no step was skipped
    for a, b in zip(path, plain):  # power-of-two scaling is exact: the same trajectory
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert not torch.equal(path[0], path[-1])
    if kind != "coefficients":  # the projection held parameters at the edge of the current member
        box = scaled.domain.members[(scaled.handle or scaled.opt).current_member]
        edges = torch.cat([torch.cat([box.lower[n].reshape(-1), box.upper[n].reshape(-1)]) for n in box.names])
        assert bool(torch.isin(_flat(scaled.model), edges.float()).any())
    else:
        assert float(scaled.opt.coefficients.detach()) in (0.0, 0.1)  # held at an end of the segment


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_the_grad_scaler_skips_for_inf_gradients_leaves_the_model_inside(kind) -> None:
    s, scaler, _ = _amp_run(kind, True, steps=2)
    snap, member = _flat(s.model), (s.handle or s.opt).current_member if kind != "coefficients" else None
    x, y = _data(1)
    s.opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(s.model, x, y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(s.opt)
    scaler.update()
    assert scaler.get_scale() == 32768.0  # the scaler saw the inf and backed off
    assert torch.equal(_flat(s.model), snap) and s.domain.contains(s.model)
    if member is not None:
        assert (s.handle or s.opt).current_member == member
    s.opt.zero_grad()  # and training goes on
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scaler.scale(_loss(s.model, x, (y + 1) % 3)).backward()
    scaler.step(s.opt)
    scaler.update()
    assert not torch.equal(_flat(s.model), snap) and s.domain.contains(s.model)


# ---------------------------------------------------------------------------------- state_dict round trips
# Steps far outside the LID's members: softmax(size / distance) is then no longer one-hot, so which
# member the projection lands in depends on the sampling generator
_RESUME_LR = {"projected": 1.0, "hook": 1.0, "coefficients": 0.05}


def _resumable(kind: str, seed: int = 4, domain=None) -> Setup:
    """A model, its domain (an LID sampled between, or a zonotope with residual), Adam and StepLR.
    ``domain`` given: a fresh model (another seed) on that domain, as after a restart."""
    model = _model(seed)
    if domain is None and kind == "coefficients":
        g = torch.Generator().manual_seed(5)
        params = dict(model.named_parameters())
        domain = le.Zonotope(
            {n: p.detach() for n, p in params.items()},
            {n: 0.05 * torch.randn((2, *p.shape), generator=g, dtype=torch.float64) for n, p in params.items()},
            -torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
            {n: 0.01 * torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()})
    elif domain is None:
        domain = _lid(model)
    s = Setup(kind, model, domain, _RESUME_LR[kind], torch.optim.Adam, "sample_largest_closest", seed=11)
    s.sched = torch.optim.lr_scheduler.StepLR(s.opt, step_size=3, gamma=0.7)
    return s


def _steps(s: Setup, first: int, n: int) -> list[torch.Tensor]:
    path = []
    for i in range(first, first + n):
        x, y = _data(100 + i, 32)
        s.opt.zero_grad()
        _loss(s.model, x, (y + i) % 3).backward()
        s.opt.step()
        s.sched.step()
        assert s.domain.contains(s.model)
        path.append(_flat(s.model))
    return path


def _save(s: Setup) -> bytes:
    buffer = io.BytesIO()
    state = {"model": s.model.state_dict(), "opt": s.opt.state_dict(), "sched": s.sched.state_dict()}
    if s.handle is not None:
        state["projection"] = s.handle.state_dict()
    torch.save(state, buffer)
    return buffer.getvalue()


def _resume(kind: str, saved: bytes, domain) -> Setup:
    """Everything from the saved bytes: the model's parameters, then the optimizer on them."""
    state = torch.load(io.BytesIO(saved), weights_only=False)
    model = _model(99)  # another starting point
    model.load_state_dict(state["model"])
    s = Setup(kind, model, domain, _RESUME_LR[kind], torch.optim.Adam, "sample_largest_closest", seed=11)
    s.sched = torch.optim.lr_scheduler.StepLR(s.opt, step_size=3, gamma=0.7)
    s.opt.load_state_dict(state["opt"])
    s.sched.load_state_dict(state["sched"])
    if s.handle is not None:
        s.handle.load_state_dict(state["projection"])
    return s


@pytest.mark.parametrize("kind", KINDS)
def test_a_resume_from_a_saved_state_continues_the_same_trajectory(kind) -> None:
    s = _resumable(kind)
    _steps(s, 0, 6)
    saved = _save(s)
    expected = _steps(s, 6, 8)
    resumed = _resume(kind, saved, copy.deepcopy(s.domain))
    got = _steps(resumed, 6, 8)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert resumed.opt.param_groups[0]["lr"] == s.opt.param_groups[0]["lr"] < _RESUME_LR[kind]
    if kind != "coefficients":
        assert (resumed.handle or resumed.opt).current_member == (s.handle or s.opt).current_member
        # the sampling generator is part of the state: a resume without it goes elsewhere
        lost = _resume(kind, saved, s.domain)
        (lost.handle or lost.opt).projector.generator.manual_seed(12345)
        assert not all(torch.equal(a, b) for a, b in zip(expected, _steps(lost, 6, 8)))


def test_bad_states_are_refused_by_name_and_change_nothing() -> None:
    s = _resumable("projected")
    _steps(s, 0, 3)
    good = copy.deepcopy(s.opt.state_dict())
    sgd = le.ProjectedOptimizer(torch.optim.SGD(s.model.parameters(), lr=0.1), s.model, s.domain).state_dict()
    cases = [
        ({"optimizer": good["optimizer"]}, "expected the dict state_dict"),
        ({**good, "projector": {**good["projector"], "current": 7}}, "not one of this domain's 3 members"),
        ({**good, "projector": {**good["projector"], "generator": torch.zeros(3, dtype=torch.uint8)}}, "'generator'"),
        ({**good, "projector": {"current": 0}}, "'projector' must be"),
        (sgd, "is not a state of Adam"),
        ({**good, "optimizer": "adam"}, "'optimizer' must be the dict"),
    ]
    for state, match in cases:
        snapshot = copy.deepcopy(s.opt.state_dict())
        with pytest.raises(InvalidInputError, match=match):
            s.opt.load_state_dict(state)
        after = s.opt.state_dict()
        assert after["projector"]["current"] == snapshot["projector"]["current"]
        assert torch.equal(after["projector"]["generator"], snapshot["projector"]["generator"])
        assert after["optimizer"]["param_groups"] == snapshot["optimizer"]["param_groups"]
    handle = le.attach_projection(torch.optim.SGD(s.model.parameters(), 0.1), s.model, s.domain)
    with pytest.raises(InvalidInputError, match="'projector' must be"):
        handle.load_state_dict({"current": None})


# ---------------------------------------------------------------------------------- hooks
@pytest.mark.parametrize("kind", ["projected", "coefficients"])
def test_step_hooks_run_around_the_projected_step(kind) -> None:
    s = _setup(kind, lr=0.05, wide=False, inner=torch.optim.Adam)
    seen = []
    pre = s.opt.register_step_pre_hook(lambda opt, args, kwargs: seen.append(("pre", _flat(s.model))))
    post = s.opt.register_step_post_hook(lambda opt, args, kwargs: seen.append(
        ("post", _flat(s.model), s.domain.contains(s.model))))
    saves = []
    s.opt.register_state_dict_post_hook(lambda opt, state: saves.append(sorted(state)))
    x, y = _data(1)
    for _ in range(3):
        s.opt.zero_grad()
        _loss(s.model, x, (y + 1) % 3).backward()
        s.opt.step()
        assert torch.equal(seen[-1][1], _flat(s.model)) and seen[-1][2]  # post-hooks see the projected model
    assert [k for k, *_ in seen] == ["pre", "post"] * 3
    assert not torch.equal(seen[0][1], seen[1][1])
    s.opt.state_dict()
    assert saves and "optimizer" in saves[0]
    pre.remove()
    post.remove()
    s.opt.step()
    assert len(seen) == 6


def test_the_hook_variant_projects_like_projected_optimizer_and_its_handle_removes_it() -> None:
    model, ours = _model(5), _model(5)
    lid = _lid(model)
    wrapped = le.ProjectedOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), model, lid,
                                    "sample_largest_closest", seed=3)
    own = torch.optim.Adam(ours.parameters(), lr=0.05)  # a team's own optimizer object
    handle = le.attach_projection(own, ours, lid, "sample_largest_closest", seed=3)
    assert isinstance(handle.projector, Projector) and "attached" in repr(handle)
    x, y = _data(2)
    for _ in range(20):
        for m, o in ((model, wrapped), (ours, own)):
            o.zero_grad()
            _loss(m, x, (y + 2) % 3).backward()
            o.step()
        assert torch.equal(_flat(model), _flat(ours)) and lid.contains(ours)
        assert handle.current_member == wrapped.current_member
    handle.remove()
    for _ in range(20):  # without the hook nothing holds the model in
        own.zero_grad()
        _loss(ours, x, (y + 2) % 3).backward()
        own.step()
    assert not lid.contains(ours)
    with le.attach_projection(own, ours, lid) as scoped:
        assert lid.contains(ours) and scoped.attached  # projected at once
    assert not scoped.attached


def test_coefficient_optimizers_made_one_after_another_do_not_pile_up_hooks() -> None:
    model = _model()
    z = _segment(model)
    for _ in range(5):  # one per task, as the CL benchmark does
        le.CoefficientOptimizer(model, z, lr=0.1)
    gc.collect()
    assert all(len(p._post_accumulate_grad_hooks or {}) <= 1 for p in model.parameters())


@pytest.mark.parametrize("kind", ["projected", "coefficients"])
def test_a_deep_copy_trains_its_own_copy_of_the_model(kind) -> None:
    s = _setup(kind, lr=0.05, wide=False, inner=torch.optim.Adam)
    twin = copy.deepcopy(s.opt)
    model = twin.model if kind == "coefficients" else twin.projector.model
    assert model is not s.model and twin.param_groups is twin.optimizer.param_groups
    before = _flat(s.model)
    x, y = _data(1)
    twin.zero_grad()
    _loss(model, x, (y + 1) % 3).backward()
    twin.step()
    assert torch.equal(_flat(s.model), before) and not torch.equal(_flat(model), before)
    assert s.domain.contains(model)


# ---------------------------------------------------------------------------------- bad arguments
def test_bad_arguments_are_refused_by_name() -> None:
    model = _model()
    box = le.Box.around(model, 0.01)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for make, match in [
        (lambda: le.ProjectedOptimizer("sgd", model, box), "'optimizer' must be a torch optimizer"),
        (lambda: le.ProjectedOptimizer(sgd, "model", box), "'model' must be a torch.nn.Module"),
        (lambda: le.ProjectedOptimizer(sgd, model, box, seed=1.5), "'seed' must be an int"),
        (lambda: le.ProjectedOptimizer(sgd, model, box, strategy="bogus"), "'strategy' must be one of"),
        (lambda: le.ProjectedOptimizer(sgd, model, {"a": 1}), "expected a Box, an LID or a list of Boxes"),
        (lambda: le.attach_projection(object(), model, box), "'optimizer' must be a torch optimizer"),
        (lambda: le.attach_projection(sgd, nn.Linear(2, 2), box), "missing parameters"),
        (lambda: le.attach_projection(sgd, model, box, strategy="best_loss"), "needs loss_fn"),
        (lambda: le.attach_projection(sgd, model, box, seed="0"), "'seed' must be an int"),
        (lambda: le.CoefficientOptimizer(model, _segment(model), optimizer=le.ProjectedOptimizer),
         "'optimizer' must be a plain torch optimizer class"),
    ]:
        with pytest.raises(le.LidError, match=match):
            make()
    assert sgd._optimizer_step_post_hooks == {}  # a refused attach leaves the optimizer as it was
