"""The error contract of ``bound_logits`` / ``certified_accuracy`` (DESIGN.md soundness rules 3–4).

A user who passes something the engine cannot handle gets a ``lid_engine.LidError`` subclass
whose message says what is wrong and where (the module's path, the parameter's name, the
example's index) — never a bare torch ``RuntimeError`` from deep inside a kernel, and never a
silently wrong bound.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import lid_engine as le
from lid_engine import (
    Box,
    DomainMismatchError,
    InvalidInputError,
    LidError,
    TaskMask,
    UnsupportedLayerError,
    bound_logits,
    certified_accuracy,
)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0, 1, 2])


def raises_lid(exc_type: type[LidError], fn, match: str | None = None) -> LidError:
    """``fn()`` raises ``exc_type`` (a LidError, not a torch RuntimeError) matching ``match``."""
    with pytest.raises(exc_type, match=match) as info:
        fn()
    assert isinstance(info.value, LidError)
    assert not isinstance(info.value, RuntimeError)
    return info.value


# ------------------------------------------------------------------------------ unsupported layers
class Block(nn.Module):
    """A container with its own forward (traced: the sum of two branches)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 5)

    def forward(self, x):
        return self.a(x) + self.b(x)


class Residual(nn.Sequential):
    """Looks like a Sequential, but its forward is not the plain composition."""

    def forward(self, x):
        return x + super().forward(x)


class Scale(nn.Module):
    """A custom leaf with a parameter, used through a traced product."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.s


class Exp(nn.Module):
    """A function the engine has no bound for."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return torch.exp(self.a(x))


UNSUPPORTED = {  # model, input shape, what the message must name (path or op), the type or function
    "lstm-nested": (lambda: nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.LSTM(4, 3))), (4,), "1.0", "LSTM"),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)), (1, 6), "0", "Conv1d"),
    "gru-in-custom-forward": (lambda: nn.Sequential(nn.Linear(4, 5), nn.GRUCell(5, 3)), (4,), "1", "GRUCell"),
    "function": (lambda: Exp(), (4,), "exp", "torch.exp"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_module_is_named_by_path_and_supported_layers_listed(case):
    make, in_shape, path, cls = UNSUPPORTED[case]
    torch.manual_seed(0)
    model = make().eval()
    box = Box.around(model, 0.01)
    x = torch.randn(3, *in_shape)
    for call in (lambda: bound_logits(model, box, x),
                 lambda: bound_logits(model, box, x, mode="search"),
                 lambda: certified_accuracy(model, box, x, torch.zeros(3, dtype=torch.long))):
        err = raises_lid(UnsupportedLayerError, call)
        msg = str(err)
        assert f"'{path}'" in msg and cls in msg, msg
        assert "Supported:" in msg and "Linear" in msg and "Conv2d" in msg and "ReLU" in msg, msg
        assert "LayerNorm" in msg and "operator.add" in msg, msg  # the graph engine's ops are listed too


ONCE_UNSUPPORTED = {  # refused by the chain engine before models were traced; bounded soundly now
    "tanh": (lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Tanh(), nn.Linear(5, 3)), (4,)),
    "custom-container": (lambda: nn.Sequential(nn.Linear(4, 5), Block(), nn.Linear(5, 3)), (4,)),
    "sequential-subclass": (lambda: nn.Sequential(nn.Linear(4, 5), Residual(nn.Linear(5, 5), nn.ReLU()), nn.Linear(5, 3)),
                            (4,)),
    "custom-leaf": (lambda: nn.Sequential(nn.Linear(4, 3), Scale()), (4,)),
    "gelu-deep": (lambda: nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.GELU())), nn.Linear(4, 3)),
                  (4,)),
    "top-level-custom": (lambda: nn.Sequential(Block(), nn.Linear(5, 3)), (5,)),
}


@pytest.mark.parametrize("case", list(ONCE_UNSUPPORTED))
def test_models_beyond_sequential_chains_are_traced_and_bounded_soundly(case):
    from lid_engine.testing import check_soundness

    make, in_shape = ONCE_UNSUPPORTED[case]
    torch.manual_seed(0)
    model = make().eval()
    report = check_soundness(model, Box.around(model, 0.01), torch.randn(8, *in_shape), samples=200)
    assert report.violations == 0 and report.nominal_enclosed, report


def test_module_used_twice_is_bounded_at_every_use():
    # nn.Sequential's named_children() lists a shared module once; the forward pass runs it twice
    torch.manual_seed(0)
    lin, relu = nn.Linear(4, 4), nn.ReLU()
    model = nn.Sequential(lin, relu, lin, relu, nn.Linear(4, 3))
    lo, hi = bound_logits(model, Box.point(model), X)
    out = model(X)
    assert bool((lo <= out).all() and (out <= hi).all())
    assert float((hi - lo).max()) < 1e-4


def test_tied_weights_and_forward_hooks_are_refused():
    a, b = nn.Linear(4, 4), nn.Linear(4, 3)
    tied = nn.Sequential(a, nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), b)
    tied[2].weight = a.weight
    msg = str(raises_lid(UnsupportedLayerError, lambda: bound_logits(tied, Box.point(tied), X)))
    assert "'2'" in msg and "0.weight" in msg
    hooked = mlp()
    hooked[2].register_forward_hook(lambda m, i, o: 2 * o)
    msg = str(raises_lid(UnsupportedLayerError, lambda: bound_logits(hooked, Box.point(hooked), X)))
    assert "'2'" in msg and "hook" in msg


# ------------------------------------------------------------------------------------ train mode
@pytest.mark.parametrize("kind", ["batchnorm", "dropout"])
def test_training_mode_layers_ask_for_eval(kind):
    torch.manual_seed(0)
    layer = nn.BatchNorm1d(5) if kind == "batchnorm" else nn.Dropout(0.5)
    model = nn.Sequential(nn.Linear(4, 5), layer, nn.ReLU(), nn.Linear(5, 3))
    box = Box.around(model, 0.01)
    model.train()
    for mode in ("certify", "search"):
        msg = str(raises_lid(UnsupportedLayerError, lambda: bound_logits(model, box, X, mode=mode)))
        assert "'1'" in msg and "eval()" in msg, msg
    model.eval()  # the advice in the message works
    lo, hi = bound_logits(model, box, X)
    assert bool((lo <= hi).all())


# ------------------------------------------------------------------------------ domain mismatch
def test_domain_that_does_not_fit_the_model_names_the_parameter():
    model = mlp()
    box = Box.around(model, 0.01)
    lo, hi = dict(box.lower), dict(box.upper)

    missing = Box({k: v for k, v in lo.items() if k != "2.weight"}, {k: v for k, v in hi.items() if k != "2.weight"})
    msg = str(raises_lid(DomainMismatchError, lambda: bound_logits(model, missing, X)))
    assert "2.weight" in msg and "missing" in msg

    extra = Box({**lo, "3.bias": torch.zeros(3)}, {**hi, "3.bias": torch.zeros(3)})
    msg = str(raises_lid(DomainMismatchError, lambda: bound_logits(model, extra, X)))
    assert "3.bias" in msg

    shaped = Box({**lo, "0.bias": torch.zeros(6)}, {**hi, "0.bias": torch.zeros(6)})
    msg = str(raises_lid(DomainMismatchError, lambda: certified_accuracy(model, shaped, X, Y)))
    assert "'0.bias'" in msg and "(5,)" in msg and "(6,)" in msg

    raises_lid(DomainMismatchError, lambda: bound_logits(model, {"0.weight": (1, 2)}, X), match="Box")
    other = Box.around(nn.Sequential(nn.Linear(4, 3)), 0.01)
    raises_lid(DomainMismatchError, lambda: bound_logits(model, other, X), match="2.weight")


# ------------------------------------------------------------------------------------- bad x
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_input_names_the_example(value):
    model, box = mlp(), Box.around(mlp(), 0.01)
    x = X.clone()
    x[3, 2] = value
    x[5, 0] = value
    msg = str(raises_lid(InvalidInputError, lambda: bound_logits(model, box, x)))
    assert "example 3" in msg and ("NaN" in msg or "inf" in msg)
    raises_lid(InvalidInputError, lambda: certified_accuracy(model, box, x, Y), match="example 3")
    raises_lid(InvalidInputError, lambda: bound_logits(model, box, x, mode="search"), match="example 3")


@pytest.mark.parametrize(
    "x,match",
    [
        (X.tolist(), "torch.Tensor.*list"),
        (X.numpy(), "torch.Tensor.*ndarray"),
        (torch.empty(0, 4), "non-empty"),
        (torch.randn(4), r"shape \(4,\)"),
        (torch.tensor(1.0), r"shape \(\)"),
    ],
    ids=["list", "numpy", "empty", "rank-1", "scalar"],
)
def test_malformed_x(x, match):
    model = mlp()
    raises_lid(InvalidInputError, lambda: bound_logits(model, Box.around(model, 0.01), x), match=match)


@pytest.mark.parametrize("shape", [(6, 7), (6, 1, 4)], ids=["features", "rank-3"])
def test_input_that_does_not_fit_the_first_layer(shape):
    model = mlp()
    msg = str(raises_lid(LidError, lambda: bound_logits(model, Box.around(model, 0.01), torch.randn(*shape))))
    assert "'0'" in msg and "Linear" in msg


def conv_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()


def test_conv_model_given_flat_input():
    model = conv_model()
    msg = str(raises_lid(LidError, lambda: bound_logits(model, Box.around(model, 0.01), torch.randn(5, 36))))
    assert "'0'" in msg and "Conv2d" in msg


def test_conv_model_given_wrong_channel_count():
    model = conv_model()
    raises_lid(LidError, lambda: bound_logits(model, Box.around(model, 0.01), torch.randn(5, 2, 6, 6)))


# ------------------------------------------------------------------------------------ labels
@pytest.mark.parametrize(
    "y,match",
    [
        (torch.tensor([0, 1, 2, 3, 1, 2]), r"0\.\.2.*3 outputs"),
        (torch.tensor([0, 1, -1, 0, 1, 2]), r"0\.\.2"),
        (torch.tensor([0, 1, 2, 0, 1]), r"shape \(6,\)"),
        (torch.zeros(6, 1, dtype=torch.long), r"shape \(6,\)"),
        (torch.tensor([0.0, 1.5, 2.0, 0.0, 1.0, 2.0]), "non-integer"),
        ([0, 1, 2, 0, 1, 2], "torch.Tensor"),
    ],
    ids=["too-large", "negative", "short", "2-d", "fractional", "list"],
)
def test_bad_labels(y, match):
    model = mlp()
    raises_lid(InvalidInputError, lambda: certified_accuracy(model, Box.around(model, 0.01), X, y), match=match)
    raises_lid(InvalidInputError, lambda: le.certified_examples(model, Box.around(model, 0.01), X, y), match=match)


def test_float_labels_holding_integers_are_accepted():
    model = mlp()
    box = Box.point(model)
    assert certified_accuracy(model, box, X, Y.float()) == certified_accuracy(model, box, X, Y)


# ----------------------------------------------------------------------- method / mode / dtype
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "zonotope-ish"}, r"'method' must be one of .*'ibp'"),
        ({"mode": "fast"}, r"'mode' must be one of .*'certify'"),
        ({"dtype": torch.float16}, r"'dtype'.*float32 or torch.float64.*float16"),
        ({"dtype": torch.bfloat16}, r"'dtype'.*bfloat16"),
        ({"dtype": torch.int32}, r"'dtype'"),
        ({"dtype": "float32"}, r"'dtype'"),
        ({"method": "crown"}, r"mode='certify'.*mode='search'"),
        ({"method": "crown+ibp"}, r"mode='certify'"),
    ],
    ids=["method", "mode", "float16", "bfloat16", "int32", "dtype-string", "crown-certify", "crown+ibp-certify"],
)
def test_bad_method_mode_dtype(kwargs, match):
    model = mlp()
    box = Box.around(model, 0.01)
    raises_lid(LidError, lambda: bound_logits(model, box, X, **kwargs), match=match)
    if "mode" not in kwargs:
        raises_lid(LidError, lambda: certified_accuracy(model, box, X, Y, **kwargs), match=match)


def test_float16_input_is_bounded_in_float32():
    model = mlp()
    lo, hi = bound_logits(model, Box.around(model, 0.01), X.half())
    assert lo.dtype == torch.float32 and bool((lo <= hi).all())


@pytest.mark.parametrize("batch_size", [0, -3, 1.5, True])
def test_bad_batch_size_for_certified_accuracy(batch_size):
    model = mlp()
    raises_lid(InvalidInputError, lambda: certified_accuracy(model, Box.around(model, 0.01), X, Y, batch_size=batch_size),
               match="batch_size")


def test_bad_batch_size_for_bound_logits():
    model = mlp()
    raises_lid(LidError, lambda: bound_logits(model, Box.around(model, 0.01), X, batch_size=0))


def test_spec_validation():
    with pytest.raises(InvalidInputError, match="'kind'"):
        le.Spec(kind="f1")
    with pytest.raises(InvalidInputError, match="'tau'"):
        le.Spec(tau=1.5)
    with pytest.raises(InvalidInputError, match="'temperature'"):
        le.Spec(temperature=0.0)


# ------------------------------------------------------------------------------------ TaskMask
def test_task_mask_validation():
    with pytest.raises(InvalidInputError, match=r"task 1 lists class 5, outside 0\.\.3"):
        TaskMask(4, [[0, 1], [2, 5]])
    with pytest.raises(InvalidInputError, match="class -1"):
        TaskMask(4, [[-1]])
    with pytest.raises(InvalidInputError, match="n_classes"):
        TaskMask(0, [])
    tm = TaskMask(4, [[0, 1], [2, 3]])
    for bad in (2, -1):
        with pytest.raises(InvalidInputError, match=rf"task {bad} outside 0\.\.1"):
            tm.set_task(bad)
    with pytest.raises(InvalidInputError, match="integer or None"):
        tm.set_task(0.5)
    assert tm.set_task(np.int64(1)).task == 1
    assert tm.set_task(None).task is None


def test_task_mask_of_the_wrong_width_is_reported_not_broadcast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), TaskMask(5, [[0, 1], [2, 3, 4]]).set_task(0)).eval()
    raises_lid(InvalidInputError, lambda: bound_logits(model, Box.around(model, 0.01), X), match="5 classes.*3 logits")


def test_task_mask_bounds_agree_with_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), TaskMask(4, [[0, 1], [2, 3]]).set_task(1)).eval()
    lo, hi = bound_logits(model, Box.point(model), X)
    out = model(X)
    assert bool((lo <= out).all() and (out <= hi).all())
    assert bool((lo[:, :2] == -1e4).all())


# ------------------------------------------------------------------------------ the whole contract
def test_every_error_class_is_a_lid_error_and_no_runtime_error():
    for cls in (DomainMismatchError, le.InvalidDomainError, InvalidInputError, UnsupportedLayerError):
        assert issubclass(cls, LidError) and issubclass(cls, ValueError) and not issubclass(cls, RuntimeError)
    # UnsoundBoundError is the one exception: it signals a bug in the engine, not in the input
    assert issubclass(le.UnsoundBoundError, RuntimeError)


def test_spec_kind_per_task_must_name_every_task_once():
    """Several constraints with different metrics: a mapping that misses or adds a task is refused by name."""
    tasks = {"all": (X, Y, 0.1), "all.recall.0": (X[Y == 0], Y[Y == 0], 0.1)}
    cert = {"all": (X, Y), "all.recall.0": (X[Y == 0], Y[Y == 0])}
    raises_lid(InvalidInputError, lambda: le.compute_lid(mlp(), tasks=tasks, cert=cert, iterations=2, checkpoints=1,
                                                         progress=False, spec_kind={"all": "balanced_accuracy"}),
               match=r"'spec_kind' names tasks \['all'\], the tasks are \['all', 'all.recall.0'\]")
    raises_lid(InvalidInputError, lambda: le.compute_lid(mlp(), tasks=tasks, cert=cert, iterations=2, checkpoints=1,
                                                         progress=False, spec_kind=["accuracy"]),
               match=r"'spec_kind' must be a metric name or a mapping")
    lid = le.compute_lid(mlp(), tasks=tasks, cert=cert, iterations=2, checkpoints=1, progress=False, keep="all",
                         spec_kind={"all": "balanced_accuracy", "all.recall.0": "accuracy"})
    assert {t: s.kind for t, s in lid.tasks.items()} == {"all": "balanced_accuracy", "all.recall.0": "accuracy"}
