"""Run one continual-learning experiment unit (scenario × method × seed) and record what happened.

A unit's result is one JSON file: the accuracy matrix on the test splits (row t = after task t),
per-task certificates that hold for the final model, and two checks an auditor would ask for —
*soundness* (on its certification set the final model is at least as accurate as the certificate
says; a violation would be an engine bug) and *held out* (the final model's test accuracy reaches
each certificate's Clopper–Pearson lower bound).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from examples.digits.model import mlp
from examples.mnist.model import cnn
from lid_engine import TaskMask

from .lid_method import BUFFERS, Bias, LidPGD, parse_buffer
from .methods import AGEM, EWC, IntervalCN, LwF, Method, Settings
from .protocol import SHORT, ProtocolError, TaskSequence, blobs_tasks, npz_tasks, split_mnist
from .segment_method import SegmentLidPGD
from .training import accuracy, set_task

METHODS: dict[str, type[Method]] = {"sgd": Method, "ewc": EWC, "lwf": LwF, "icn": IntervalCN, "agem": AGEM,
                                    "lid": LidPGD}
BIASES = {
    "unbiased": None,
    "fisher_lookahead": Bias("fisher", "lookahead", 0.825),
    "si_lookahead": Bias("si", "lookahead", 0.825),
    # METHOD.md §3.2: retrospective masks freeze the scores *above* the q-quantile, so the paper's
    # prune_prop q = 0.95 freezes the 5% of coordinates most important to the finished task.
    "fisher_retrospective_top5": Bias("fisher", "retrospective", 0.05),
    "si_retrospective_top5": Bias("si", "retrospective", 0.05),
}
DATASETS = {"split_mnist": split_mnist, "blobs": blobs_tasks}


REPO = Path(__file__).resolve().parents[2]
# The sources that decide a unit's numbers; the plan, the report and the CLI do not.
NUMERIC_SOURCES = ("lid_engine/**/*.py", "examples/mnist/data.py", "examples/mnist/model.py",
                   "examples/digits/model.py", "benchmarks/cl/data.py", "benchmarks/cl/protocol.py",
                   "benchmarks/cl/training.py", "benchmarks/cl/methods.py", "benchmarks/cl/lid_method.py",
                   "benchmarks/cl/segment_method.py", "benchmarks/cl/runner.py")


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 (first 16 hex digits) over the sources that decide a unit's numbers, recorded in every unit so
    the report can tell results of different code apart and ``compare`` can say which reruns must match."""
    digest = hashlib.sha256()
    for path in sorted({p for pattern in NUMERIC_SOURCES for p in REPO.glob(pattern)}):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def load_sequence(dataset: str, scenario: str, seed: int, holdout: list[int] | None) -> TaskSequence:
    """``split_mnist``, ``blobs`` or ``npz:<path>`` (see ``protocol.npz_tasks``)."""
    if dataset.startswith("npz:"):
        return npz_tasks(dataset[4:], scenario, seed, holdout=holdout)
    if dataset not in DATASETS:
        raise ProtocolError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)} or npz:<path>")
    return DATASETS[dataset](scenario, seed, holdout=holdout)


@dataclass(frozen=True)
class Unit:
    """One run: ``experiment`` ∈ {main, biasing, buffers}; ``variant`` names a bias or a buffer size."""

    experiment: str
    scenario: str
    method: str
    seed: int
    variant: str = ""
    dataset: str = "split_mnist"
    n_tasks: int | None = None

    @property
    def label(self) -> str:
        return f"{self.method}-{self.variant}" if self.variant else self.method

    def path(self, root: Path) -> Path:
        return root / self.experiment / SHORT[self.scenario] / self.label / f"seed{self.seed}.json"


def build_model(seq: TaskSequence) -> nn.Module:
    """The paper's models, chosen by input shape: the 6,179-parameter CNN for 1×28×28 images, an
    MLP d-32-n for feature vectors (2-32-6 on blobs); Task-IL adds a TaskMask."""
    shape = tuple(seq.tasks[0].train[0].shape[1:])
    if shape == (1, 28, 28):
        layers = list(cnn(seq.n_outputs))
    elif len(shape) == 1:
        layers = list(mlp([shape[0], 32, seq.n_outputs]))
    else:
        raise ProtocolError(f"no reference model for inputs of shape {shape}: use 1×28×28 images or feature vectors")
    if seq.scenario == "task":
        layers.append(TaskMask(seq.n_outputs, seq.task_classes))
    return nn.Sequential(*layers)


def make_method(unit: Unit, seq: TaskSequence, settings: Settings) -> Method:
    variant, bound = split_bound(unit.variant)
    if unit.experiment == "biasing":
        # METHOD.md §2.1 table: the biasing runs use τ = 0.8, 300 iterations, primal lr 0.5/p
        return LidPGD(seq, settings, unit.seed, bias=BIASES[variant], tau=0.8, primal_lr=0.5, iterations=300, bound=bound)
    if unit.method == "lid" and variant == "segment":  # ours: zonotope LIDs oriented by the lookahead buffer
        return SegmentLidPGD(seq, settings, unit.seed, bound=bound)
    if unit.method == "lid" and variant in BIASES:  # a biased LID in the main protocol (τ rule kept)
        return LidPGD(seq, settings, unit.seed, bias=BIASES[variant], bound=bound)
    if unit.method == "lid" and variant:
        return LidPGD(seq, settings, unit.seed, buffer=variant, bound=bound)
    if unit.method == "lid":
        return LidPGD(seq, settings, unit.seed, bound=bound)
    if bound != "ibp":
        raise ValueError(f"variant {unit.variant!r}: only LID methods take a bound")
    return METHODS[unit.method](seq, settings, unit.seed)


def split_bound(variant: str) -> tuple[str, str]:
    """``"linear"`` → ("", "linear"); ``"large+linear"`` → ("large", "linear"); otherwise the IBP bound.

    ``+linear`` searches and certifies every LID with the linear margin bound (lid_engine.bounds.linear)
    instead of the paper's IBP."""
    if variant == "linear":
        return "", "linear"
    if variant.endswith("+linear"):
        return variant[: -len("+linear")], "linear"
    return variant, "ibp"


def holdout_sizes(unit: Unit) -> list[int] | None:
    if unit.experiment != "buffers":
        return None
    return BUFFERS["large" if unit.method == "agem" else parse_buffer(split_bound(unit.variant)[0]).size][0]


def run_unit(unit: Unit, settings: Settings) -> dict:
    """Train the task sequence with the unit's method and return the result record."""
    if unit.experiment == "buffers" and unit.scenario == "task":
        raise ValueError("buffers: Task-IL replay would mix task masks in one minibatch; run class or domain")
    start = time.perf_counter()
    seq = load_sequence(unit.dataset, unit.scenario, unit.seed, holdout_sizes(unit))
    if unit.n_tasks is not None:
        seq = replace(seq, tasks=seq.tasks[: unit.n_tasks], task_classes=seq.task_classes[: unit.n_tasks])
    torch.manual_seed(unit.seed)
    model = build_model(seq)
    method = make_method(unit, seq, settings)
    matrix: list[list[float]] = []
    for task in seq.tasks:
        last = task.index == len(seq.tasks) - 1
        set_task(model, task.index)
        method.learn(model, task)
        method.after_task(model, task, last)
        matrix.append([accuracy(model, *seq.tasks[j].test, task=j) for j in range(task.index + 1)])
        if unit.experiment == "biasing" and task.index == 0 and matrix[0][0] < 0.75:
            break  # the paper skips seeds whose task-1 model is below 0.75
    final = matrix[-1]
    record = {
        "unit": asdict(unit),
        "classes": [list(t.classes) for t in seq.tasks],
        "accuracy_matrix": matrix,
        "final_accuracy": final,
        "final_average": sum(final) / len(final),
        "complete": len(matrix) == len(seq.tasks),
        "seconds": time.perf_counter() - start,
        "settings": asdict(settings),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "code": code_fingerprint(),
    }
    if method.certified and record["complete"]:
        record.update(certificate_summary(method, model, seq, final))
    log = getattr(method, "log", None)
    if log:
        record["method_log"] = log
    return record


def certificate_summary(method: Method, model: nn.Module, seq: TaskSequence, final: list[float]) -> dict:
    certs = method.certificates(model)
    per_task, sound, held_out, missing = [], [], [], []
    for task in seq.tasks[:-1]:
        c = certs.get(task.name)
        if c is None:
            missing.append(task.name)
            per_task.append(None)
            continue
        c = dict(c)
        cert_acc = accuracy(model, *c.pop("data"), task=task.index)  # the set the certificate was computed on
        c.update(accuracy_on_cert_set=cert_acc, test_accuracy=final[task.index])
        c["sound"] = cert_acc >= c["certified"]
        c["holds_on_test"] = final[task.index] >= c["lower_bound"]
        sound.append(c["sound"])
        held_out.append(c["holds_on_test"])
        per_task.append(c)
    values = [c["certified"] if c else 0.0 for c in per_task] + [final[-1]]
    lowers = [c["lower_bound"] if c else 0.0 for c in per_task] + [final[-1]]
    return {
        "certificates": per_task,
        "certified_average": sum(values) / len(values),  # last task: its accuracy (METHOD.md §5.1)
        "certified_lower_average": sum(lowers) / len(lowers),
        "all_sound": all(sound) and not missing,
        "all_hold_on_test": all(held_out) and not missing,
        "missing_certificates": missing,
    }


def save(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
