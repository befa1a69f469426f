"""The continual-learning protocol, independent of any dataset (METHOD.md §5.1).

A benchmark is a labelled training set, a labelled test set and a *task split*: the list of class
groups that arrive one after the other. Nothing else is dataset specific, so a new benchmark needs
data, not code::

    tasks = build_tasks(x_train, y_train, x_test, y_test, [(0, 1), (2, 3)], "class", seed=0)

Scenarios (van de Ven & Tolias' three settings):

* ``"class"`` (Class-IL): one head over every class, labels are the original class ids;
* ``"domain"`` (Domain-IL): one head with as many outputs as a task has classes; an example's label
  is the position of its class within its task (Split-MNIST pairs (even, odd), so even/odd);
* ``"task"`` (Task-IL): one head over every class behind a ``TaskMask``; the active task is known,
  so only that task's classes compete.

Per task the training examples are split, disjointly and reproducibly per seed, into the examples
the model trains on, a certification set (never trained on, never searched on: the held-out data a
certificate is computed on) and an optional replay-buffer holdout. The LID search draws its
minibatches from the training examples. The test split is used only to report accuracy and to
check that certificates hold on data nobody has seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .data import split_tasks

SCENARIOS = ("class", "domain", "task")
SHORT = {"class": "CIL", "domain": "DIL", "task": "TIL"}


class ProtocolError(ValueError):
    """The data or the task split cannot define a continual-learning benchmark."""


@dataclass
class Task:
    """One task of a sequence: its classes and its four disjoint example sets (tensors)."""

    index: int
    classes: tuple[int, ...]
    train: tuple[Tensor, Tensor]
    cert: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    holdout: tuple[Tensor, Tensor] = field(default=None)  # replay buffer store (may be empty)

    @property
    def name(self) -> str:
        return f"t{self.index + 1}"


@dataclass
class TaskSequence:
    """The tasks of one benchmark run and how their labels and heads are laid out."""

    scenario: str
    tasks: list[Task]
    n_outputs: int
    task_classes: list[tuple[int, ...]]  # in model-output space (what TaskMask needs)

    def __len__(self) -> int:
        return len(self.tasks)


def _relabel(y: np.ndarray, classes: Sequence[int], scenario: str) -> np.ndarray:
    if scenario == "domain":
        lookup = {c: i for i, c in enumerate(classes)}
        return np.array([lookup[int(v)] for v in y], dtype=np.int64)
    return y.astype(np.int64)


def build_tasks(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    task_classes: Sequence[Sequence[int]],
    scenario: str,
    *,
    seed: int,
    n_cert: int = 400,
    holdout: Sequence[int] | None = None,
) -> TaskSequence:
    """Split ``(x, y)`` arrays into a task sequence for ``scenario`` (see the module docstring).

    ``n_cert`` examples per task are held out for certification; ``holdout[t]`` more for the
    replay buffer of task t (0 when omitted).
    """
    if scenario not in SCENARIOS:
        raise ProtocolError(f"build_tasks: 'scenario' must be one of {SCENARIOS}, got {scenario!r}")
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ProtocolError("build_tasks: x and y of a split must have the same length")
    groups = [tuple(int(c) for c in g) for g in task_classes]
    if not groups or any(not g for g in groups):
        raise ProtocolError("build_tasks: 'task_classes' must be a non-empty list of non-empty class groups")
    flat = [c for g in groups for c in g]
    if len(set(flat)) != len(flat):
        raise ProtocolError(f"build_tasks: a class appears in two tasks: {groups}")
    if scenario == "domain" and len({len(g) for g in groups}) != 1:
        raise ProtocolError("build_tasks: Domain-IL needs tasks with the same number of classes")
    holdout = list(holdout) if holdout is not None else [0] * len(groups)
    if len(holdout) != len(groups) or any(h < 0 for h in holdout):
        raise ProtocolError(f"build_tasks: 'holdout' must give one count ≥ 0 per task, got {holdout}")

    try:
        train_split, test_split = split_tasks(y_train, groups), split_tasks(y_test, groups)
    except ValueError as exc:
        raise ProtocolError(f"build_tasks: {exc}") from None
    rng = np.random.default_rng(seed)
    tasks = []
    for t, classes in enumerate(groups):
        idx, test_idx = train_split[t], test_split[t]
        if len(idx) <= n_cert + holdout[t]:
            raise ProtocolError(
                f"build_tasks: task {t + 1} (classes {classes}) has {len(idx)} training and {len(test_idx)} test "
                f"examples; it needs more than n_cert + holdout = {n_cert + holdout[t]} training examples"
            )
        idx = rng.permutation(idx)
        parts = np.split(idx, [n_cert, n_cert + holdout[t]])

        def take(x, y, i):
            return torch.from_numpy(np.ascontiguousarray(x[i])), torch.from_numpy(_relabel(y[i], classes, scenario))

        tasks.append(Task(
            index=t, classes=classes,
            cert=take(x_train, y_train, np.sort(parts[0])),
            holdout=take(x_train, y_train, np.sort(parts[1])),
            train=take(x_train, y_train, np.sort(parts[2])),
            test=take(x_test, y_test, test_idx),
        ))
    if scenario == "domain":
        n_out = len(groups[0])
        head_classes = [tuple(range(n_out))] * len(groups)
    else:
        n_out = int(max(flat)) + 1
        head_classes = groups
    return TaskSequence(scenario, tasks, n_out, head_classes)


def split_mnist(scenario: str, seed: int, *, n_cert: int = 400, holdout: Sequence[int] | None = None) -> TaskSequence:
    """Split-MNIST, 5 tasks of one even and one odd digit drawn per seed (the paper's pairing)."""
    from examples.mnist.data import load_mnist

    from .data import split_mnist_tasks

    x_tr, y_tr = load_mnist("train+valid", copy=False)
    x_te, y_te = load_mnist("test", copy=False)
    return build_tasks(x_tr, y_tr, x_te, y_te, split_mnist_tasks(seed), scenario, seed=seed, n_cert=n_cert,
                       holdout=holdout)


def npz_tasks(path: str, scenario: str, seed: int, *, n_cert: int = 400, holdout: Sequence[int] | None = None) -> TaskSequence:
    """Any benchmark from one ``.npz`` file: ``x_train``, ``y_train``, ``x_test``, ``y_test`` (numeric
    arrays, integer labels) and ``tasks`` (integer array, one row of class ids per task); optionally
    ``n_cert`` (a scalar: certification examples held out per task, default 400)."""
    with np.load(path, allow_pickle=False) as f:
        missing = {"x_train", "y_train", "x_test", "y_test", "tasks"} - set(f.files)
        if missing:
            raise ProtocolError(f"npz_tasks: {path} lacks the arrays {sorted(missing)}")
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test", "tasks")}
        if "n_cert" in f.files:
            n_cert = int(f["n_cert"])
    if arrays["tasks"].ndim != 2 or not np.issubdtype(arrays["tasks"].dtype, np.integer):
        raise ProtocolError(f"npz_tasks: 'tasks' must be a 2-D integer array (one row of classes per task), "
                            f"got shape {arrays['tasks'].shape} dtype {arrays['tasks'].dtype}")
    x_tr, x_te = (arrays[k].astype(np.float32) for k in ("x_train", "x_test"))
    return build_tasks(x_tr, arrays["y_train"], x_te, arrays["y_test"], arrays["tasks"].tolist(), scenario, seed=seed,
                       n_cert=n_cert, holdout=holdout)


def blobs_tasks(scenario: str, seed: int, *, n_cert: int = 100, holdout: Sequence[int] | None = None) -> TaskSequence:
    """The blobs toy (METHOD.md §5.0): 6 blobs, tasks {0,1}, {2,3}, {4,5}; 70/15/15 train/cert/test."""
    from .data import blobs

    x, y = blobs(2000, seed=seed)
    n_test = int(0.15 * len(x))
    return build_tasks(x[n_test:], y[n_test:], x[:n_test], y[:n_test], [(0, 1), (2, 3), (4, 5)], scenario,
                       seed=seed, n_cert=n_cert, holdout=holdout)
