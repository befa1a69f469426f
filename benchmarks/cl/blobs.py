"""The blobs toy (METHOD.md §5.0): plain training forgets task 1, PGD inside an LID keeps it.

Six Gaussian blobs on a circle, three Task-IL tasks ({0,1}, {2,3}, {4,5}), MLP 2-32-6. The figure
shows task 1's decision regions after each task: top row plain sequential training, bottom row
training projected into the LIDs (τ = 0.9).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .lid_method import LidPGD
from .methods import Method, Settings
from .protocol import blobs_tasks
from .runner import build_model
from .training import Recipe, accuracy, set_task

TAU = 0.9


def _sequence(method_cls, seq, settings, seed, grid):
    torch.manual_seed(seed)
    model = build_model(seq)
    method = method_cls(seq, settings, seed, tau=TAU) if method_cls is LidPGD else method_cls(seq, settings, seed)
    regions, accs = [], []
    for task in seq.tasks:
        set_task(model, task.index)
        method.learn(model, task)
        method.after_task(model, task, task.index == len(seq.tasks) - 1)
        set_task(model, 0)
        with torch.no_grad():
            regions.append(model(grid).argmax(1).reshape(-1).numpy())
        accs.append([accuracy(model, *seq.tasks[j].test, task=j) for j in range(task.index + 1)])
    return model, method, regions, accs


def run_blobs(out: Path, seed: int = 0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq = blobs_tasks("task", seed)
    # METHOD.md §2.1 table: the blobs LID runs 300 iterations at primal lr 0.5/p
    settings = Settings(recipe=Recipe(epochs=20, batch_size=32), iterations=300, primal_lr=0.5)
    xs = np.linspace(-15, 15, 200, dtype=np.float32)
    gx, gy = np.meshgrid(xs, xs)
    grid = torch.from_numpy(np.stack([gx.ravel(), gy.ravel()], 1))
    _, _, sgd_regions, sgd_acc = _sequence(Method, seq, settings, seed, grid)
    model, lid_method, lid_regions, lid_acc = _sequence(LidPGD, seq, settings, seed, grid)
    cert = lid_method.certificates(model)["t1"]

    fig, axes = plt.subplots(2, 3, figsize=(11, 7.2), sharex=True, sharey=True)
    x1, y1 = seq.tasks[0].test
    for row, (name, regions, accs) in enumerate((("plain training", sgd_regions, sgd_acc),
                                                  ("PGD w/ LID", lid_regions, lid_acc))):
        for col in range(3):
            ax = axes[row, col]
            ax.contourf(gx, gy, regions[col].reshape(gx.shape), levels=[-0.5, 0.5, 1.5], colors=["#cfe3f5", "#f7d9c4"])
            for later in seq.tasks[1:]:
                ax.scatter(later.test[0][:, 0], later.test[0][:, 1], s=4, alpha=0.35, color="0.6")
            ax.scatter(x1[:, 0], x1[:, 1], s=5, c=np.where(y1.numpy() == 0, "C0", "C1"))
            ax.set_title(f"{name}: after task {col + 1}\ntask-1 accuracy {accs[col][0]:.3f}", fontsize=9)
    fig.suptitle("Blobs toy, Task-IL: task-1 decision regions (blue = class 0, orange = class 1); grey = later tasks")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "cl_blobs.png", dpi=110)
    plt.close(fig)
    summary = {"seed": seed, "tau": TAU, "sgd": sgd_acc[-1], "lid": lid_acc[-1], "certificate": cert["certified"],
               "lower_bound": cert["lower_bound"], "width_sum": cert["width_sum"]}
    (out / "cl_blobs.json").write_text(json.dumps(summary, indent=1))
    return out / "cl_blobs.png"
