"""components.training: the built-in loop and the contract a team's training function follows."""

from __future__ import annotations

import inspect
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lid_engine as le
from components.config import BUILTIN_TRAINING_KWARGS, parse_config
from components.data import DataSplits
from components.training import TrainingError, builtin_fit, resolve_training, run_training


def blobs(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two well-separated Gaussian blobs in 2-D."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=g) * 0.5 + (y[:, None].float() * 2 - 1) * 2.0
    return x, y


def task() -> DataSplits:
    (x, y), (xs, ys), (xc, yc) = blobs(200, 0), blobs(50, 1), blobs(50, 2)
    return DataSplits("blobs", (x, y), (xs, ys), (xc, yc), {"form": "test"}, (2,), (0, 1))


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))


def loss_on(m: nn.Module, data: DataSplits) -> float:
    with torch.no_grad():
        return F.cross_entropy(m(data.train[0]), data.train[1]).item()


def config(tmp_path: Path, training: dict | None = None):
    doc = {"version": 1, "name": "m", "model": {"factory": "team_models:make"}, "data": {"source": "a.csv"},
           "spec": {"tau": 0.5}, "code": ["code"], "training": training or {}}
    return parse_config(doc, base_dir=tmp_path)


# ------------------------------------------------------------------------------ builtin_fit
def test_builtin_loop_reduces_the_loss_on_a_separable_problem():
    data, m = task(), model()
    before = loss_on(m, data)
    out = builtin_fit(m, torch.optim.Adam(m.parameters(), lr=0.05), data, epochs=5, batch_size=32, progress=False)
    assert out is m and not m.training
    assert loss_on(m, data) < 0.5 * before
    assert le.accuracy(m, *data.certification) > 0.95


def test_builtin_loop_is_deterministic_for_a_seed():
    data = task()
    a, b, c = model(), model(), model()
    for m, seed in ((a, 3), (b, 3), (c, 4)):
        builtin_fit(m, torch.optim.SGD(m.parameters(), lr=0.1), data, epochs=1, batch_size=16, seed=seed,
                    progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_builtin_loop_through_a_projected_optimizer_stays_in_the_box():
    data, m = task(), model()
    box = le.Box.around(m, radius=0.01)
    opt = le.ProjectedOptimizer(torch.optim.Adam(m.parameters(), lr=0.05), m, box)
    before = loss_on(m, data)
    builtin_fit(m, opt, data, epochs=2, batch_size=32, progress=False)
    assert box.contains(m)
    assert loss_on(m, data) <= before


def test_builtin_loop_lr_and_argument_checks():
    data, m = task(), model()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    builtin_fit(m, opt, data, lr=0.01, progress=False)
    assert opt.param_groups[0]["lr"] == 0.01
    for kwargs, name in (({"epochs": 0}, "epochs"), ({"batch_size": True}, "batch_size"), ({"lr": -1.0}, "lr")):
        with pytest.raises(ValueError, match=f"'{name}'"):
            builtin_fit(m, opt, data, progress=False, **kwargs)


def test_builtin_loop_casts_float64_data_to_the_model_dtype():
    data = task()
    wide = DataSplits("t", (data.train[0].double(), data.train[1]), data.search, data.certification, {}, (2,), (0, 1))
    m = model()
    before = loss_on(m, data)
    builtin_fit(m, torch.optim.Adam(m.parameters(), lr=0.01), wide, progress=False)
    assert all(p.dtype == torch.float32 for p in m.parameters()) and loss_on(m, data) < before


def test_builtin_loop_keeps_batchnorm_statistics_when_asked():
    """A projected retrain keeps the champion's running statistics (its LID certifies them); a
    first training learns them."""
    data = task()
    for freeze in (True, False):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        stats = {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
        builtin_fit(m, torch.optim.Adam(m.parameters(), lr=0.01), data, progress=False, freeze_norm_stats=freeze)
        same = all(torch.equal(m.state_dict()[k], v) for k, v in stats.items())
        assert same is freeze and not m.training and loss_on(m, data) < 0.69


def test_the_configuration_knows_the_builtin_loops_arguments():
    params = inspect.signature(builtin_fit).parameters
    keywords = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    # seed comes from training.seed; freeze_norm_stats from the pipeline (a retrain keeps the champion's)
    assert keywords == set(BUILTIN_TRAINING_KWARGS) | {"seed", "freeze_norm_stats"}


# ------------------------------------------------------------------------------ team functions
@pytest.fixture
def code_dir(tmp_path, monkeypatch):
    """tmp_path/code for a team's modules; sys.path and sys.modules are restored afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    (tmp_path / "code").mkdir()
    yield tmp_path / "code"
    for name in set(sys.modules) - before:
        del sys.modules[name]


def team_module(folder: Path, body: str) -> str:
    name = f"team_train_{uuid.uuid4().hex[:8]}"
    (folder / f"{name}.py").write_text("import torch\nimport torch.nn.functional as F\n" + textwrap.dedent(body))
    return name


def test_null_function_resolves_to_the_builtin_loop(tmp_path):
    assert resolve_training(config(tmp_path)) is builtin_fit


def test_run_training_with_the_builtin_loop(tmp_path):
    data, m = task(), model()
    cfg = config(tmp_path, {"kwargs": {"epochs": 3, "batch_size": 32, "lr": 0.05, "progress": False}, "seed": 1})
    before = loss_on(m, data)
    assert run_training(cfg, m, torch.optim.Adam(m.parameters()), data) is m
    assert loss_on(m, data) < 0.5 * before


def test_a_team_function_is_called_with_its_kwargs_and_a_seeded_rng(tmp_path, code_dir):
    module = team_module(code_dir, """
        CALLS = []
        def fit(model, optimizer, data, *, epochs, scale=1.0):
            CALLS.append({"epochs": epochs, "scale": scale, "draw": torch.rand(1).item(), "task": data.task})
            x, y = data.train
            for _ in range(epochs):
                optimizer.zero_grad()
                (F.cross_entropy(model(x), y) * scale).backward()
                optimizer.step()
    """)
    cfg = config(tmp_path, {"function": f"{module}:fit", "kwargs": {"epochs": 20, "scale": 2.0}, "seed": 9})
    data = task()
    fit = resolve_training(cfg)
    assert fit.__name__ == "fit"
    m, m2 = model(), model()
    state = torch.random.get_rng_state()
    before = loss_on(m, data)
    assert run_training(cfg, m, torch.optim.Adam(m.parameters(), lr=0.05), data) is m
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is restored
    run_training(cfg, m2, torch.optim.Adam(m2.parameters(), lr=0.05), data)
    calls = sys.modules[module].CALLS
    assert [(c["epochs"], c["scale"], c["task"]) for c in calls] == [(20, 2.0, "blobs")] * 2
    assert calls[0]["draw"] == calls[1]["draw"]  # seeded with training.seed
    assert loss_on(m, data) < before


def test_a_team_function_through_a_projected_optimizer(tmp_path, code_dir):
    module = team_module(code_dir, """
        def fit(model, optimizer, data, steps=30):
            x, y = data.train
            for _ in range(steps):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
            return model
    """)
    data, m = task(), model()
    box = le.Box.around(m, radius=0.02)
    opt = le.ProjectedOptimizer(torch.optim.Adam(m.parameters(), lr=0.05), m, box)
    run_training(config(tmp_path, {"function": f"{module}:fit"}), m, opt, data)
    assert box.contains(m)


def test_schedulers_clipping_and_a_grad_scaler_work_through_the_wrapped_optimizer(tmp_path, code_dir):
    # What the module docstring promises a team's loop may do with the optimizer it is given.
    module = team_module(code_dir, """
        def fit(model, optimizer, data, steps=10):
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer.optimizer, step_size=1, gamma=0.5)
            scaler = torch.amp.GradScaler("cpu")
            x, y = data.train
            for _ in range(steps):
                optimizer.zero_grad()
                scaler.scale(F.cross_entropy(model(x), y)).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
    """)
    data, m = task(), model()
    box = le.Box.around(m, radius=0.05)
    opt = le.ProjectedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, box)
    before = loss_on(m, data)
    run_training(config(tmp_path, {"function": f"{module}:fit"}), m, opt, data)
    assert box.contains(m) and loss_on(m, data) < before
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 10)


def test_a_function_that_does_not_fit_the_kwargs_is_refused_before_training(tmp_path, code_dir):
    module = team_module(code_dir, "def fit(model, optimizer, data, epochs=1):\n    pass\n")
    cfg = config(tmp_path, {"function": f"{module}:fit", "kwargs": {"epochs": 1, "lrr": 0.1}})
    with pytest.raises(TrainingError, match=rf"training.function {module}:fit: cannot be called as fit\(model, "
                                            r"optimizer, data, \*\*training.kwargs\).*'lrr'"):
        resolve_training(cfg)


def test_an_unimportable_function_is_a_factory_error(tmp_path, code_dir):
    from components.factory import FactoryError

    with pytest.raises(FactoryError, match=r"training\.function"):
        resolve_training(config(tmp_path, {"function": "no_such_team_module:fit"}))


CONTRACT_BREAKS = {
    "raises": ("def fit(model, optimizer, data):\n    raise ValueError('diverged')\n",
               "raised ValueError: diverged"),
    "other module": ("def fit(model, optimizer, data):\n    optimizer.step()\n    return torch.nn.Linear(2, 2)\n",
                     "returned a Linear other than the model it was given"),
    "no step": ("def fit(model, optimizer, data):\n    return model\n",
                "returned without calling optimizer.step()"),
    "replaced parameter": ("def fit(model, optimizer, data):\n    optimizer.step()\n"
                           "    model[2] = torch.nn.Linear(8, 2)\n",
                           "replaced or removed parameter '2.weight'"),
    "non-finite": ("def fit(model, optimizer, data):\n    optimizer.step()\n"
                   "    with torch.no_grad():\n        model[0].bias.fill_(float('nan'))\n",
                   "non-finite values in parameter '0.bias'"),
}


@pytest.mark.parametrize("case", sorted(CONTRACT_BREAKS))
def test_contract_violations_are_training_errors(tmp_path, code_dir, case):
    body, fragment = CONTRACT_BREAKS[case]
    module = team_module(code_dir, body)
    m = model()
    opt = le.ProjectedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, le.Box.around(m, radius=1.0))
    with pytest.raises(TrainingError) as info:
        run_training(config(tmp_path, {"function": f"{module}:fit"}), m, opt, task())
    assert f"training.function {module}:fit" in str(info.value) and fragment in str(info.value)
    if case == "raises":
        assert isinstance(info.value.__cause__, ValueError)  # the team's traceback stays reachable


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_builtin_loop_trains_a_cuda_model_on_cpu_data_inside_its_box(tmp_path):
    data, m = task(), model().cuda()
    box = le.Box.around(m, radius=0.05)
    opt = le.ProjectedOptimizer(torch.optim.Adam(m.parameters(), lr=0.05), m, box)
    before = F.cross_entropy(m(data.train[0].cuda()), data.train[1].cuda()).item()
    cfg = config(tmp_path, {"kwargs": {"epochs": 2, "batch_size": 32, "progress": False}})
    run_training(cfg, m, opt, data)
    after = F.cross_entropy(m(data.train[0].cuda()), data.train[1].cuda()).item()
    assert box.contains(m) and after < before
