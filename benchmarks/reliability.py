"""Reliability: does the gate's promise survive crashes, concurrent retrains and bad files?

    python -m benchmarks.reliability faults [--runs 5]     SIGKILL at every step boundary (≈ 1 h on 2 cores)
    python -m benchmarks.reliability fuzz [--cases 12000]  mutated certificate/domain/signature/config files
    python -m benchmarks.reliability load [--retrains 8]   concurrent retrains on the PostgreSQL server stack
    python -m benchmarks.reliability report                benchmarks/results/reliability.md from the JSON

Each part writes ``benchmarks/results/reliability_<part>.json``; ``report`` renders all of them. The
promise checked everywhere: *the champion is a model whose certificates hold, and what consumers load
is that model* — the champion alias only ever points at a version whose promotion is recorded
(``lid.status = promoted``), which loads with every digest intact and whose certificates verify.

The pipeline runs as a user runs it: ``lidgate`` commands in subprocesses on the digits example
(8×8 digits, MLP 64-32-10, a short search), each in a fresh registry.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks._common import RESULTS, machine_header

REPO = Path(__file__).resolve().parents[1]
LIDGATE = [sys.executable, "-m", "flows.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
       "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
for _name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "LIDGATE_FAILPOINT", "LIDGATE_GUARDED_BY"):
    ENV.pop(_name, None)


# ------------------------------------------------------------------------------------ set-up
def write_setup(directory: Path, name: str = "rel", **registry: Any) -> tuple[Path, Path]:
    """The digits example's configuration with a short search (registry under ``directory``), and a
    second scanner's data for retrains: ``(config, new_data)``."""
    from examples.digits.data import load_digits_8x8

    config = yaml.safe_load((REPO / "examples" / "digits" / "lidgate.yaml").read_text())
    config.update(name=name, code=[str(REPO)], registry={"home": str(directory / "home"), **registry})
    config["training"] = {"kwargs": {"epochs": 20, "batch_size": 32, "lr": 0.003}}
    config["search"] = {"iterations": 30, "checkpoints": 3}
    path = directory / "lidgate.yaml"
    path.write_text(yaml.safe_dump(config))
    x, y = load_digits_8x8()
    rng = np.random.default_rng(1)
    scans = directory / "scanner2.npz"
    np.savez(scans, x=np.clip(0.6 * x + 0.25 + rng.normal(0, 0.03, x.shape), 0, 1).astype(np.float32), y=y)
    return path, scans


def lidgate(*args: str, failpoint: str | None = None, env: dict | None = None,
            timeout: float = 900) -> subprocess.CompletedProcess:
    run_env = {**ENV, **(env or {})}
    if failpoint:
        run_env["LIDGATE_FAILPOINT"] = failpoint
    # output through files, not pipes: a pipe stays open while any child that inherited it runs
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run([*LIDGATE, *args], cwd=REPO, env=run_env, stdout=out, stderr=err, text=True,
                              timeout=timeout)
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())


def registry_state(config: Path) -> dict[str, Any]:
    """The registry as a consumer would find it, judged without lidgate's gate code: the champion's
    status and intent tag, whether it loads with every digest intact, and whether its own certificates
    and those of its lineage verify; plus every version's status."""
    from components.config import load_config
    from components.factory import use_code_roots
    from components.lineage import check_version, verify_lineage
    from flows.settings import open_registry, settings_for

    cfg = load_config(config)
    use_code_roots(cfg.code)
    registry = open_registry(settings_for(cfg))
    champion = registry.champion()
    history = registry.history()
    state: dict[str, Any] = {"champion": champion, "statuses": {h.version: h.status for h in history},
                             "intents": sorted(h.version for h in history if h.tags.get("lid.gate_intent"))}
    if champion is None:
        state["sound"] = True  # no champion: nothing is served
        return state
    info = next(h for h in history if h.version == champion)
    state["champion_status"] = info.status
    problems = []
    if info.status != "promoted":
        problems.append(f"champion v{champion} has status {info.status!r}")
    try:
        loaded = registry.load(version=champion)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"champion does not load: {exc}")
    else:
        try:
            checks = [check_version(loaded, loaded.model, champion)]
            checks += verify_lineage(registry, loaded.model, [v for v in loaded.lineage if v != champion])
            problems += [f"v{c.version}: {c.failures}" for c in checks if not c.ok]
        finally:
            registry.release(loaded)
    state["problems"] = problems
    state["sound"] = not problems
    return state


def orphans(since: float) -> list[str]:
    """Processes of this user started after ``since`` that still run with no parent (ppid 1): an
    ephemeral Prefect server or guard left behind by a killed command."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "ppid", "create_time", "cmdline"]):
        if p.info["ppid"] == 1 and (p.info["create_time"] or 0) >= since and p.info["cmdline"] \
                and any("prefect" in c or "components.owner" in c for c in p.info["cmdline"]):
            found.append(f"{p.info['pid']}: {' '.join(p.info['cmdline'])[:80]}")
    return found


# ------------------------------------------------------------------------------------ faults
def one_fault(phase: str, point: str, work: Path) -> dict[str, Any]:
    """Bootstrap (and for ``phase='retrain'`` a first version), then the command killed at ``point``;
    look at the registry raw, run ``lidgate audit``, look again, then a follow-up run."""
    from components.failpoints import ENV as FAILPOINT_ENV  # noqa: F401 — documents the mechanism

    config, scans = write_setup(work)
    row: dict[str, Any] = {"phase": phase, "point": point}
    if phase == "retrain":
        first = lidgate("bootstrap", str(config))
        if first.returncode != 0:
            return {**row, "error": "set-up bootstrap failed: " + first.stderr[-500:]}
    args = ["bootstrap", str(config)] if phase == "bootstrap" else ["retrain", str(config), "--data", str(scans)]
    started = time.time()
    killed = lidgate(*args, failpoint=point)
    row["killed_rc"] = killed.returncode
    row["killed"] = killed.returncode == -signal.SIGKILL
    time.sleep(1.5)  # the guard stops the ephemeral Prefect server within a second
    row["orphans"] = orphans(started)
    raw = registry_state(config)
    row["raw"] = raw
    audit = lidgate("audit", str(config))
    row["audit_rc"] = audit.returncode
    after = registry_state(config)
    row["after_audit"] = after
    # the audit is right when it says ok exactly when the recovered registry is sound
    row["audit_right"] = (audit.returncode == 0) == after["sound"]
    follow = (["bootstrap", str(config)] if after["champion"] is None
              else ["retrain", str(config), "--data", str(scans)])
    again = lidgate(*follow)
    row["follow_up"] = follow[0]
    row["follow_up_rc"] = again.returncode
    if again.returncode != 0:
        row["follow_up_error"] = (again.stderr or again.stdout)[-800:]
    final = registry_state(config)
    row["final"] = final
    row["ok"] = (row["killed"] and raw["sound"] and after["sound"] and row["audit_right"] and final["sound"]
                 and again.returncode == 0 and not row["orphans"] and not after["intents"])
    return row


def faults(runs: int, points: list[str], phases: list[str], out: Path) -> None:
    from components.failpoints import POINTS

    from tqdm import tqdm

    points = points or list(POINTS)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = Counter((r["phase"], r["point"]) for r in rows)
    plan = [(ph, pt) for ph in phases for pt in points for _ in range(max(0, runs - done[(ph, pt)]))]
    start = time.time()
    for phase, point in tqdm(plan, desc="SIGKILL runs", unit="run"):
        with tempfile.TemporaryDirectory(prefix="lidgate-fault-") as tmp:
            try:
                row = one_fault(phase, point, Path(tmp))
            except Exception as exc:  # noqa: BLE001 — a harness failure is a result too
                row = {"phase": phase, "point": point, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        rows.append(row)
        out.write_text(json.dumps({"part": "faults", "machine": machine_header(), "rows": rows,
                                   "seconds": round(time.time() - start)}, indent=1, default=str))


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    f = sub.add_parser("faults")
    f.add_argument("--runs", type=int, default=5)
    f.add_argument("--points", nargs="*", default=[])
    f.add_argument("--phases", nargs="*", default=["bootstrap", "retrain"])
    f.add_argument("--out", type=Path, default=RESULTS / "reliability_faults.json")
    args = parser.parse_args(argv)
    if args.part == "faults":
        faults(args.runs, args.points, args.phases, args.out)


if __name__ == "__main__":
    main()
