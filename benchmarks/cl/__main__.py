"""Continual-learning benchmarks (METHOD.md §3, §5): ``python -m benchmarks.cl``.

    python -m benchmarks.cl run --plan reduced        # `make bench-cl`: 3 seeds, ~25 min on 2 cores
    python -m benchmarks.cl run --plan full           # the committed results (≥ 10 seeds)
    python -m benchmarks.cl report                    # benchmarks/results/cl.md + plots from the runs
    python -m benchmarks.cl blobs                     # the blobs toy and its decision-region plot
    python -m benchmarks.cl compare A B               # do two result folders agree unit by unit?
    python -m benchmarks.cl.probes --seeds 0,1        # why Domain-/Task-IL miss: frozen-feature probes
    python -m benchmarks.cl run --plan custom --data npz:my.npz --scenarios class,task --methods sgd,lid

A new benchmark needs data, not code: an ``.npz`` with ``x_train``, ``y_train``, ``x_test``,
``y_test`` and ``tasks`` (one row of class ids per task); see benchmarks/cl/protocol.py.

Every unit (experiment × scenario × method × seed) writes one JSON file under
``benchmarks/results/cl_runs``; finished units are skipped, so an interrupted run resumes where it
stopped. Units run in parallel worker processes (``--jobs``), one torch thread each; ``--only
lid-large,agem`` narrows a plan to some rows, and two runners may share one results folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .plan import RESULTS, RUNS, run
from .protocol import SCENARIOS
from .runner import METHODS

def _listed(text: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"{flag}: {bad or 'nothing'} not in {list(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the units of a plan (resumable)")
    p_run.add_argument("--plan", default="reduced", choices=("reduced", "full", "custom", "smoke"))
    p_run.add_argument("--data", default="", help="custom plan: npz:<path>, blobs or split_mnist")
    p_run.add_argument("--scenarios", default="class,domain,task", help="custom plan: comma-separated")
    p_run.add_argument("--methods", default="sgd,ewc,lwf,icn,lid", help="custom plan: comma-separated")
    p_run.add_argument("--seeds", default="0,1,2", help="custom plan: comma-separated seeds")
    p_run.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    p_run.add_argument("--runs", type=Path, default=RUNS, help="where unit results are written")
    p_run.add_argument("--only", default="", help="run only the units with these labels, e.g. lid-large,agem")
    p_rep = sub.add_parser("report", help="write cl.md and plots from the unit results")
    p_rep.add_argument("--runs", type=Path, default=RUNS)
    p_rep.add_argument("--out", type=Path, default=RESULTS)
    p_blobs = sub.add_parser("blobs", help="the blobs toy (METHOD.md §5.0) with its decision-region plot")
    p_blobs.add_argument("--out", type=Path, default=RESULTS)
    p_blobs.add_argument("--seed", type=int, default=0)
    p_cmp = sub.add_parser("compare", help="compare two result folders unit by unit (exit 0: all shared identical)")
    p_cmp.add_argument("runs", type=Path)
    p_cmp.add_argument("against", type=Path, nargs="?", default=RUNS)
    args = parser.parse_args(argv)
    if args.command == "run":
        options = {}
        if args.plan == "custom":
            options = {"data": args.data, "scenarios": _listed(args.scenarios, SCENARIOS, "--scenarios"),
                       "methods": _listed(args.methods, tuple(METHODS), "--methods"),
                       "seeds": [int(s) for s in args.seeds.split(",") if s]}
        only = tuple(t.strip() for t in args.only.split(",") if t.strip())
        return run(args.plan, args.jobs, args.runs, only=only, **options)
    if args.command == "report":
        from .report import write_report

        print(write_report(args.runs, args.out))
        return 0
    if args.command == "compare":
        from .report import compare_runs

        lines, identical = compare_runs(args.runs, args.against)
        print("\n".join(lines))
        return 0 if identical else 1
    from .blobs import run_blobs

    print(run_blobs(args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
