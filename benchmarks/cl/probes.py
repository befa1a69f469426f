"""Why Domain-IL and Task-IL miss their targets: probes on the task-1 model (cl_notes.md).

    python -m benchmarks.cl.probes --seeds 0,1                   # a few minutes per seed on one core
    python -m benchmarks.cl.probes --seeds 0-9 --probe segment   # the zonotope LID only, ~70 s per seed

With the convolutions frozen at the model trained on task 1:

* ``head only``: each later task trained alone by the head (Task-IL: its own rows), unconstrained —
  the accuracy the task-1 features allow; ``whole``: the whole network trained instead.
* Domain-IL ``joint head``: one head trained on tasks 1 and 2 together; ``box`` is the certified
  accuracy on task 1 of the axis-aligned box spanned by θ₁ and that head (IBP and linear bound),
  ``segment`` the share of task-1 certification examples right at both ends of the straight path
  to it (the margins are linear in the head along it, so right at both ends is right all along).
* Domain-IL ``segment LID``: that segment as a certified domain (``le.Zonotope``), certified on
  task 1's held-out examples, then task 2 trained inside it with projection (``segment_lid``).

Diagnostics only: nothing here is a certificate, and nothing is written to disk.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import lid_engine as le

from .runner import build_model, load_sequence
from .segment_method import head_names, last_linear
from .training import Recipe, accuracy, set_task, train_task


def task1_model(scenario: str, seed: int):
    """The sequence and its model after task 1, trained as every method trains it."""
    seq = load_sequence("split_mnist", scenario, seed, None)
    torch.manual_seed(seed)
    model = build_model(seq)
    set_task(model, 0)
    train_task(model, *seq.tasks[0].train, Recipe(), seed=seed * 1000)
    return seq, model


def train_copy(model: nn.Module, x, y, *, task: int, head_only: bool, seed: int) -> nn.Module:
    out = copy.deepcopy(model)
    set_task(out, task)
    params = last_linear(out).parameters() if head_only else out.parameters()
    train_task(out, x, y, Recipe(), seed=seed, optimizer=torch.optim.Adam(params, lr=Recipe().lr))
    return out


def later_tasks(scenario: str, seed: int) -> list[str]:
    seq, model = task1_model(scenario, seed)
    rows = []
    for task in seq.tasks[1:]:
        accs = [accuracy(train_copy(model, *task.train, task=task.index, head_only=h, seed=seed * 1000 + task.index),
                         *task.test, task=task.index) for h in (True, False)]
        rows.append(f"| {scenario} | {seed} | {task.index + 1} | {accs[0]:.3f} | {accs[1]:.3f} |")
    return rows


def joint_head(seed: int) -> str:
    seq, model = task1_model("domain", seed)
    t1, t2 = seq.tasks[0], seq.tasks[1]
    x, y = torch.cat([t1.train[0], t2.train[0]]), torch.cat([t1.train[1], t2.train[1]])
    joint = train_copy(model, x, y, task=0, head_only=True, seed=seed * 1000 + 1)
    ends = dict(model.named_parameters()), dict(joint.named_parameters())
    box = le.Box({n: torch.minimum(ends[0][n], ends[1][n]).detach() for n in ends[0]},
                 {n: torch.maximum(ends[0][n], ends[1][n]).detach() for n in ends[0]})
    cx, cy = t1.cert
    certs = [le.certified_accuracy(model, box, cx, cy, method=m) for m in ("ibp", "linear")]
    with torch.no_grad():
        right = [m.double()(cx.double()).argmax(1) == cy for m in (copy.deepcopy(model), copy.deepcopy(joint))]
    segment = float((right[0] & right[1]).double().mean())
    return (f"| {seed} | {accuracy(joint, *t1.test):.3f} | {accuracy(joint, *t2.test):.3f} | "
            f"{box.width_sum():.1f} | {certs[0]:.3f} / {certs[1]:.3f} | {segment:.3f} |")


def segment_lid(seed: int) -> str:
    """Domain-IL, two tasks, with a zonotope LID: the segment from θ₁ to the joint head.

    The head trained on task 1's search data and the lookahead buffer (task 2's training data)
    fixes the direction; the domain is ``le.Zonotope.segment`` (the convolutions fixed), certified
    on task 1's held-out examples with the linear bound, which is exact along a segment of the
    last layer. Task 2 is then trained with projection onto it, as the box LIDs are."""
    seq, model = task1_model("domain", seed)
    t1, t2 = seq.tasks[0], seq.tasks[1]
    x, y = torch.cat([t1.train[0], t2.train[0]]), torch.cat([t1.train[1], t2.train[1]])
    joint = train_copy(model, x, y, task=0, head_only=True, seed=seed * 1000 + 1)
    joint_params = dict(joint.named_parameters())
    zonotope = le.Zonotope.segment(model, {n: joint_params[n].detach() for n in head_names(model)})
    certified = le.certified_accuracy(model, zonotope, *t1.cert, method="linear")
    tau = le.tau_from_accuracy(accuracy(model, *t1.test), 0.12)
    updated = copy.deepcopy(model)
    opt = le.ProjectedOptimizer(torch.optim.Adam(updated.parameters(), lr=Recipe().lr), updated, zonotope)
    train_task(updated, *t2.train, Recipe(), seed=seed * 1000 + 2, optimizer=opt)
    assert zonotope.contains(updated)
    return (f"| {seed} | {certified:.3f} (τ {tau:.3f}) | {accuracy(updated, *t1.test):.3f} | "
            f"{accuracy(updated, *t2.test):.3f} | {float(zonotope.nearest_coefficients(updated)[0]):.3f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cl.probes", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds or ranges (0-9)")
    parser.add_argument("--probe", choices=("all", "heads", "joint", "segment"), default="all",
                        help="which tables to print (default: all)")
    args = parser.parse_args(argv)
    seeds = _parse_seeds(parser, args.seeds)
    torch.set_num_threads(1)
    if args.probe in ("all", "heads"):
        print("| scenario | seed | task | head only | whole |\n|---|---|---|---|---|")
        for scenario in ("domain", "task"):
            for seed in seeds:
                print("\n".join(later_tasks(scenario, seed)), flush=True)
    if args.probe in ("all", "joint"):
        print("\n| seed | joint head: task 1 | task 2 | box width sum | box certifies task 1 (IBP / linear) | segment |"
              "\n|---|---|---|---|---|---|")
        for seed in seeds:
            print(joint_head(seed), flush=True)
    if args.probe in ("all", "segment"):
        print("\n| seed | segment LID certifies task 1 | task 1 after task 2 | task 2 | ε reached |"
              "\n|---|---|---|---|---|")
        for seed in seeds:
            print(segment_lid(seed), flush=True)


def _parse_seeds(parser: argparse.ArgumentParser, text: str) -> list[int]:
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            first, _, last = part.partition("-")
            seeds += list(range(int(first), int(last) + 1)) if last else [int(first)]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers or ranges like 0-9, got {text!r}")
    if not seeds:
        parser.error("--seeds: give at least one seed")
    return seeds


if __name__ == "__main__":
    main()
