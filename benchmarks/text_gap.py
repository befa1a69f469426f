"""Where the text benchmark's task-2 gap comes from (issue 21, target (c), second attempt).

    python -m benchmarks.text_gap run linear 0,1,2,3,4     # one head, some seeds → results/text_gap_<head>.json
    python -m benchmarks.text_gap report                    # results/text_gap.md from both JSON files

Target (c) asks that task-2 balanced accuracy of the LID methods be at least the plain fine-tune's
minus 0.05 (``benchmarks.text``). Per head, seed and target (the same splits, heads and τ at Δ = 0.05
as ``benchmarks.text``), this measures:

* ``seg_look{f}``: the segment LID method (``benchmarks.text.segment_finetune``) with the segment's far
  end θ_L trained on task 1's search split plus a lookahead sample of ``f`` of the target's training
  data (0.05 is the benchmark's buffer; 0.25 and 1.0 give the orientation more of task 2);
* ``segw_look{f}``: the same, with the weight of task 1 in θ_L's training chosen among 1, 2, 4, 8 on
  the search and lookahead data only (the one whose segment, cut to keep task 1, ends at the best
  lookahead balanced accuracy);
* ``oracle``: every parameter trained from the task-1 head on task 1's search split (weight w) plus
  the target's whole training split, w ∈ {0, ¼, ½, 1, 2, 4}; the best task-2 test accuracy among the
  w whose task-1 *test* accuracy stays ≥ τ — a model chosen with hindsight, and no certificate.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import lid_engine as le
from benchmarks import text as bt
from benchmarks._common import RESULTS, log
from benchmarks.cl.segment_method import train_head
from benchmarks.cl.training import train_task
from lid_engine.search import search_target

FRACTIONS = (0.05, 0.25, 1.0)
T1_WEIGHTS = (1.0, 2.0, 4.0, 8.0)
ORACLE_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
DELTA = 0.05


def mix(g: bt.GoldenSplits, xy2, seed: int, w: float):
    """Task 1's search split (class-balanced, w × the size of the other part) plus ``xy2`` (class-balanced)."""
    xs, ys = bt.class_balanced(*g.search, seed + 2)
    x2, y2 = bt.class_balanced(*xy2, seed + 3)
    rep = np.resize(np.random.default_rng(seed + 4).permutation(len(xs)), int(round(w * len(x2))))
    return torch.cat([xs[rep], x2]), torch.cat([ys[rep], y2])


def segment(base, end, g, t, task2, tau, search_bal, s, seed) -> dict:
    info = {"end_t1_test": bt.bal(end, g.test), "end_t2": bt.bal(end, t["test"])}
    r = bt.segment_finetune(base, end, info, task2, s, seed, g, t, tau, search_bal)
    return {k: r[k] for k in ("t1_bal", "t2_bal", "certified", "segment_u", "tau", "end_t1_test", "end_t2")}


def run(head: str, seeds: list[int]) -> None:
    from examples.text import data as td

    torch.set_num_threads(1)
    s = bt.BenchSettings()
    golden = td.golden(groups=True)
    targets = {n: td.target(n) for n in s.targets}
    path = RESULTS / f"text_gap_{head}.json"
    out = json.loads(path.read_text()) if path.exists() else {"git": bt.git_state(), "runs": []}
    done = {(r["seed"], r["target"]) for r in out["runs"]}
    for seed in seeds:
        g = bt.golden_splits(golden, s, seed)
        base = bt.task1_head(head, seed, s, g, golden["x"].shape[1])
        search_bal = bt.bal(base, g.search)
        tau = le.tau_from_accuracy(search_bal, DELTA)
        for name in s.targets:
            if (seed, name) in done:
                continue
            t0 = time.time()
            t = bt.target_splits(targets[name], s, seed)
            task2 = bt.Task(1, (0, 1), bt.class_balanced(*t["train"], seed + 1), (t["test"][0][:0], t["test"][1][:0]),
                            t["test"])
            rec = {"head": head, "seed": seed, "target": name, "tau": tau}
            for frac in FRACTIONS:
                look = t["lookahead"]
                if frac > 0.05:
                    n = int(frac * len(t["train"][0]))
                    idx = torch.randperm(len(t["train"][0]), generator=torch.Generator().manual_seed(seed + 7))[:n]
                    look = (torch.cat([look[0], t["train"][0][idx]]), torch.cat([look[1], t["train"][1][idx]]))
                end, _ = bt.segment_end(base, g, dict(t, lookahead=look), s, seed)
                rec[f"seg_look{frac}"] = segment(base, end, g, t, task2, tau, search_bal, s, seed)
                best = None
                for w in T1_WEIGHTS:  # chosen on the search split and the lookahead sample only
                    e = train_head(base, *mix(g, look, seed, w), s.recipe(s.t2_epochs), seed=seed * 1000 + 2)
                    full = le.Zonotope.segment(base, {k: p.detach() for k, p in e.named_parameters()
                                                      if k in bt.head_names(base)})
                    a, b = bt.right_intervals(base, full, *g.search)
                    u = bt.balanced_prefix(a, b, g.search[1], search_target(tau, search_bal, le.SearchConfig().tau_margin))
                    m = copy.deepcopy(base)
                    le.load_parameters_(m, full.point(torch.tensor([u], dtype=torch.float64)))
                    score = bt.bal(m, look)
                    if best is None or score > best[0]:
                        best = (score, w, e)
                rec[f"segw_look{frac}"] = segment(base, best[2], g, t, task2, tau, search_bal, s, seed) | {"w": best[1]}
            rec["oracle"] = []
            for w in ORACLE_WEIGHTS:
                m = copy.deepcopy(base)
                train_task(m, *mix(g, t["train"], seed, w), s.recipe(s.t2_epochs), seed=seed * 1000 + 3,
                           optimizer=torch.optim.Adam(m.parameters(), lr=s.lr))
                rec["oracle"].append({"w": w, "t1": bt.bal(m, g.test), "t2": bt.bal(m, t["test"])})
            out["runs"].append(rec)
            path.write_text(json.dumps(out, indent=1))
            log(f"{head} seed {seed} {name}: done in {time.time() - t0:.0f} s")


def report() -> Path:
    doc = json.loads((RESULTS / "text.json").read_text())
    lines = ["# Text benchmark, target (c): where the task-2 gap comes from", "",
             "Generated by `python -m benchmarks.text_gap report` from `text_gap_linear.json` and `text_gap_mlp.json` "
             "(module docstring: `benchmarks/text_gap.py`). Same heads, seeds 0–4, targets, splits and τ (Δ = 0.05) as "
             "`text.md`; plain fine-tune and box-LID numbers are `text.json`'s. T1/T2: balanced accuracy on the golden / "
             "target test split; *cert ≥ τ*: the share of runs whose task-1 certificate reaches τ (below it, the pipeline "
             "fails closed); *u*: the share of the segment θ₁ → θ_L kept after cutting it to keep task 1.", ""]
    for head in ("linear", "mlp"):
        path = RESULTS / f"text_gap_{head}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        rows = data["runs"]
        m = lambda r, k: doc["units"][f"{head}/seed{r['seed']}"]["targets"][r["target"]]["methods"][k]  # noqa: E731
        plain = np.mean([m(r, "plain")["t2_bal"] for r in rows])
        box = np.mean([m(r, "lid@0.05")["t2_bal"] for r in rows])
        thr = plain - bt.T2_SLACK
        lines += [f"## {head} head ({len(rows)} runs; code at {data['git'].get('commit', '?')[:10]})", "",
                  f"Plain fine-tune T2 {plain:.3f} → threshold {thr:.3f}; box LID (projection) T2 {box:.3f} "
                  f"({box - thr:+.3f}).", "",
                  "| method | T1 | T2 | T2 − threshold | cert ≥ τ | u |", "|---|---|---|---|---|---|"]
        for frac in FRACTIONS:
            for pre, label in (("seg", "segment LID"), ("segw", "segment LID, task-1 weight chosen")):
                k = f"{pre}_look{frac}"
                t2 = np.mean([r[k]["t2_bal"] for r in rows])
                lines.append(f"| {label}, lookahead {frac:.0%} of task-2 train | {np.mean([r[k]['t1_bal'] for r in rows]):.3f} "
                             f"| {t2:.3f} | {t2 - thr:+.3f} | {np.mean([r[k]['certified'] >= r[k]['tau'] for r in rows]):.0%} "
                             f"| {np.mean([r[k]['segment_u'] for r in rows]):.2f} |")
        feasible = [max(o["t2"] for o in r["oracle"] if o["t1"] >= r["tau"]) for r in rows
                    if any(o["t1"] >= r["tau"] for o in r["oracle"])]
        lines += ["", f"Oracle (all parameters trained on task 1's search split and all of task 2, best w with hindsight): "
                  f"a model keeping task-1 test balanced accuracy ≥ τ exists in **{len(feasible)}/{len(rows)}** runs; "
                  f"there its T2 averages {np.mean(feasible):.3f}.", "",
                  "| w (task-1 weight) | T1 | T2 | runs with T1 ≥ τ |", "|---|---|---|---|"]
        for w in ORACLE_WEIGHTS:
            o = [(x, r["tau"]) for r in rows for x in r["oracle"] if x["w"] == w]
            lines.append(f"| {w:g} | {np.mean([x['t1'] for x, _ in o]):.3f} | {np.mean([x['t2'] for x, _ in o]):.3f} "
                         f"| {np.mean([x['t1'] >= tau for x, tau in o]):.0%} |")
        lines.append("")
    lines += ["## Reading", "",
              "- **The orientation's data is not what the MLP lacks.** Its segment moves the last layer only, and more "
              "of task 2 in θ_L's training hardly moves its T2: the gap stays 0.06–0.08.",
              "- **For the linear head, task-2 data in the orientation closes most of the gap, but only by spending the "
              "certificate.** With 25 % or all of task 2's training data and the task-1 weight chosen, T2 comes within "
              "0.007 of the threshold or passes it, while the share of runs whose certificate reaches τ falls to 15 % and "
              "0 %: the segment then ends where task 1 is at the edge of τ, which a 730-snippet certification split "
              "cannot certify (the pipeline would refuse to promote).",
              "- **Even with hindsight the constraint binds.** Training every parameter on all of task 2 plus task 1's "
              "search split keeps task-1 test balanced accuracy ≥ τ in only about half the runs, for any task-1 weight: "
              "at Δ = 0.05 below a 0.745 task-1 head, this encoder's embeddings leave little room to serve both "
              "tasks. (The paper's encoders start from 0.86–0.94 task-1 balanced accuracy.)",
              "- So target (c) stays missed: by 0.030 (linear) and 0.077 (MLP) with the segment LID at the benchmark's "
              "5 % buffer, by 0.089 and 0.091 with the box LIDs that lidgate's pipeline registers. Closing it would "
              "need a looser τ (at Δ = 0.10 the linear segment misses by about 0.009, `text.md`) or a stronger encoder, "
              "not a different search.", ""]
    out = RESULTS / "text_gap.md"
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(sys.argv[2], [int(v) for v in sys.argv[3].split(",")])
    elif sys.argv[1:2] == ["report"]:
        print(report())
    else:
        raise SystemExit(__doc__)
