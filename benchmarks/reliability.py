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
def commit() -> str:
    """The commit measured (with ``+changes`` when the tree differs from it)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    return head.strip() + ("+changes" if dirty else "")


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
        proc = subprocess.Popen([*LIDGATE, *args], cwd=REPO, env=run_env, stdout=out, stderr=err, text=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            proc.kill()
        out.seek(0), err.seek(0)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read())
        done.pid = proc.pid  # whose ephemeral Prefect server to look for after a kill
        return done


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


def orphans(pid: int) -> list[str]:
    """The ephemeral Prefect server (uvicorn ``prefect.server.api.server``) of the command ``pid`` if it
    still runs: every process the command started carries its mark (``components.owner.GUARD_ENV``)."""
    import psutil

    from components.owner import GUARD_ENV

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            mark = p.environ().get(GUARD_ENV, "")
        except (psutil.Error, OSError):
            continue
        if f'"pid": {pid},' in mark and any("create_app" in c for c in p.info["cmdline"] or []):
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
    killed = lidgate(*args, failpoint=point)
    row["killed_rc"] = killed.returncode
    row["killed"] = killed.returncode == -signal.SIGKILL
    time.sleep(1.5)  # the guard stops the ephemeral Prefect server within a second
    row["orphans"] = orphans(killed.pid)
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
        out.write_text(json.dumps({"part": "faults", "machine": machine_header(), "commit": commit(), "rows": rows,
                                   "seconds": round(time.time() - start)}, indent=1, default=str))


# ------------------------------------------------------------------------------------ fuzz
def fuzz_model():
    """The model the fuzzed LID certifies (``--model benchmarks.reliability:fuzz_model``)."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


FUZZ_TARGETS = ("lid.json", "members/000/domain.json", "members/000/domain.safetensors", "nominal.safetensors",
                "cert_data.npz", "certificate.dsse.json", "lidgate.yaml")


def _fuzz_fixture(work: Path) -> dict[str, Path]:
    """A signed LID of ``fuzz_model`` (2 members), its weights and key, and a valid configuration."""
    import torch
    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from flows.cli import app

    model = fuzz_model().eval()
    save_file(model.state_dict(), str(work / "w.safetensors"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    np.savez(work / "data.npz", x=x.numpy(), y=y.numpy())
    runner = CliRunner()
    for args in (["keygen", "--private", str(work / "k.pem"), "--public", str(work / "k.pub")],
                 ["certify", "--model", "benchmarks.reliability:fuzz_model", "--weights", str(work / "w.safetensors"),
                  "--data", str(work / "data.npz"), "--out", str(work / "lid"), "--tau", "0.6", "--iterations", "20",
                  "--checkpoints", "2", "--sign-key", str(work / "k.pem")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    config, _ = write_setup(work)
    shutil.copy(config, work / "lid" / "lidgate.yaml")  # kept beside the LID only to be fuzzed
    return {"lid": work / "lid", "weights": work / "w.safetensors", "key": work / "k.pub"}


def _same_content(name: str, before: bytes, after: bytes) -> bool:
    """Whether a mutated file still says exactly what the original says (then accepting it is right):
    equal JSON, equal arrays, equal tensors and header metadata."""
    import io

    if before == after:
        return True
    try:
        if name.endswith(".json"):
            return json.loads(before) == json.loads(after)
        if name.endswith(".npz"):
            with np.load(io.BytesIO(before)) as a, np.load(io.BytesIO(after)) as b:
                return sorted(a.files) == sorted(b.files) and all(
                    a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a.files)
        if name.endswith(".safetensors"):
            from safetensors.torch import load as st_load

            ta, tb = st_load(before), st_load(after)
            header = lambda raw: json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]).get("__metadata__")  # noqa: E731
            return ta.keys() == tb.keys() and all(
                ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and bool((ta[k] == tb[k]).all())
                for k in ta) and header(before) == header(after)
    except Exception:  # noqa: BLE001 — unreadable: not the same content
        return False
    return False


def _mutations():
    """A hypothesis strategy: a function bytes -> bytes (byte flips, cuts, insertions, duplications, and for
    JSON a changed, removed or added field)."""
    from hypothesis import strategies as st

    junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                                 st.integers(), max_size=2))

    def flip(pos, val):
        return lambda b: b[:pos % max(len(b), 1)] + bytes([val]) + b[pos % max(len(b), 1) + 1:] if b else bytes([val])

    def cut(pos, n):
        return lambda b: b[:pos % max(len(b), 1)] + b[pos % max(len(b), 1) + n:]

    def insert(pos, extra):
        return lambda b: b[:pos % max(len(b), 1)] + extra + b[pos % max(len(b), 1):]

    def truncate(pos):
        return lambda b: b[:pos % max(len(b), 1)]

    def dup(pos, n):
        return lambda b: b[:pos % max(len(b), 1) + n] + b[pos % max(len(b), 1):]

    def json_edit(choice, value, op):
        def edit(b):
            try:
                doc = json.loads(b)
            except ValueError:
                return b[::-1]
            paths = []

            def walk(node, path):
                if isinstance(node, dict):
                    for k, v in node.items():
                        paths.append(path + [k])
                        walk(v, path + [k])
                elif isinstance(node, list):
                    for i, v in enumerate(node):
                        paths.append(path + [i])
                        walk(v, path + [i])
            walk(doc, [])
            if not paths:
                return json.dumps(value).encode()
            path = paths[choice % len(paths)]
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            if op == "delete":
                del parent[path[-1]]
            elif op == "add" and isinstance(parent, dict):
                parent[f"{path[-1]}_x"] = value
            else:
                parent[path[-1]] = value
            return json.dumps(doc).encode()
        return edit

    pos, n = st.integers(0, 2**20), st.integers(1, 64)
    return st.one_of(
        st.builds(flip, pos, st.integers(0, 255)), st.builds(cut, pos, n),
        st.builds(insert, pos, st.binary(min_size=1, max_size=32)), st.builds(truncate, pos), st.builds(dup, pos, n),
        st.builds(json_edit, st.integers(0, 10**6), junk, st.sampled_from(["set", "delete", "add"])),
    )


def fuzz(cases: int, out: Path) -> None:
    """Mutate one file of a signed LID (or its configuration) per case, then run what reads it:
    ``lidgate verify --public-key`` for the LID's files, ``load_config`` under the CLI's error mapping
    for the configuration. A case fails when the command crashes (an uncaught exception or a
    traceback), accepts a file whose content changed, or answers with an exit code outside its class."""
    import contextlib
    import io
    import traceback

    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from tqdm import tqdm
    from typer.testing import CliRunner

    import typer

    from flows.cli import app
    from flows.cli.app import cli_errors

    work = Path(tempfile.mkdtemp(prefix="lidgate-fuzz-"))
    fx = _fuzz_fixture(work)
    originals = {name: (fx["lid"] / name).read_bytes() for name in FUZZ_TARGETS}
    runner = CliRunner()
    verify = ["verify", str(fx["lid"]), "--model", "benchmarks.reliability:fuzz_model", "--weights",
              str(fx["weights"]), "--public-key", str(fx["key"])]
    assert runner.invoke(app, verify).exit_code == 0, "the unmodified LID must verify"
    rows: list[dict] = []
    bar = tqdm(total=cases, desc="fuzz cases", unit="case")

    def config_code(path: Path) -> tuple[int, str]:
        from components.config import ConfigError, load_config

        try:
            with contextlib.redirect_stderr(io.StringIO()), cli_errors():
                try:
                    load_config(path)
                except ConfigError:
                    raise
                except Exception as exc:  # noqa: BLE001 — an error that does not name the file and field
                    return -1, f"{type(exc).__name__}: {exc}"[:200]
            return 0, ""
        except (SystemExit, typer.Exit) as exc:
            return int(getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0), ""

    @settings(max_examples=cases, database=None, deadline=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(name=st.sampled_from(FUZZ_TARGETS), mutate=_mutations())
    def case(name, mutate):
        path = fx["lid"] / name
        before = originals[name]
        after = mutate(before)
        path.write_bytes(after)
        try:
            same = _same_content(name, before, after)
            if name == "lidgate.yaml":
                code, detail = config_code(path)
                crashed = code == -1
                expected = {0, 2}
            else:
                result = runner.invoke(app, verify)
                crashed = (result.exception is not None and not isinstance(result.exception, SystemExit)) \
                    or "Traceback" in result.output
                code = result.exit_code
                detail = (result.stderr or "").strip()[:200] if code else ""
                expected = {0, 3} if same else {3}  # bytes are signed: an equivalent rewrite may be refused
                if name not in ("certificate.dsse.json", "cert_data.npz"):  # the files inspect reads too
                    shown = runner.invoke(app, ["inspect", str(fx["lid"])])
                    crashed = crashed or (shown.exception is not None and not isinstance(shown.exception, SystemExit))
                    if shown.exit_code != code and not (same and shown.exit_code == 0):  # inspect checks no signature
                        detail = f"inspect exits {shown.exit_code}, verify {code}: " + (shown.stderr or "")[:200]
                        code = -2  # inspect and verify disagree
            accepted = code == 0 and not same and name != "lidgate.yaml"
            if accepted:
                detail = "accepted: " + after.decode("utf-8", "replace")[-300:]
            rows.append({"file": name, "same": same, "code": code, "crashed": crashed, "accepted_modified": accepted,
                         "ok": not crashed and code in expected, "detail": detail if code not in expected or accepted else ""})
        except Exception:  # noqa: BLE001 — a harness error is recorded as a failed case, never hidden
            rows.append({"file": name, "same": None, "code": None, "crashed": True, "accepted_modified": False,
                         "ok": False, "detail": "harness: " + traceback.format_exc()[-600:]})
        finally:
            path.write_bytes(before)
        bar.update(1)

    start = time.time()
    case()
    bar.close()
    shutil.rmtree(work, ignore_errors=True)
    out.write_text(json.dumps({"part": "fuzz", "machine": machine_header(), "commit": commit(),
                               "seconds": round(time.time() - start),
                               **_fuzz_summary(rows)}, indent=1, default=str))


def _fuzz_summary(rows: list[dict]) -> dict:
    """The cases counted by (file, exit code, content unchanged, crashed, modified accepted, ok), and every
    failed case in full."""
    keys = ("file", "code", "same", "crashed", "accepted_modified", "ok")
    counts = Counter(tuple(r[k] for k in keys) for r in rows)
    return {"cases": len(rows), "counts": [dict(zip(keys, k), n=n) for k, n in sorted(counts.items(), key=str)],
            "failed": [r for r in rows if not r["ok"]]}


# ------------------------------------------------------------------------------------ load
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _concurrent(n: int, config: Path, scans: Path, env: dict) -> list[dict]:
    """``n`` ``lidgate retrain`` commands started together; their exit codes, outcomes and errors."""
    procs = []
    for i in range(n):
        out = tempfile.TemporaryFile("w+")
        err = tempfile.TemporaryFile("w+")
        procs.append((subprocess.Popen([*LIDGATE, "retrain", str(config), "--data", str(scans), "--json"], cwd=REPO,
                                       env={**ENV, **env}, stdout=out, stderr=err, text=True), out, err))
    runs = []
    for proc, out, err in procs:
        rc = proc.wait(timeout=3600)
        out.seek(0), err.seek(0)
        text, errors = out.read(), err.read()
        try:
            outcome = json.loads(text[text.index("{"):])
        except ValueError:
            outcome = {}
        runs.append({"rc": rc, "version": outcome.get("version"), "promoted": outcome.get("promoted"),
                     "codes": [r.get("code") for r in outcome.get("reasons", [])],
                     "database_locked": "database is locked" in (text + errors),
                     "error": errors.strip().splitlines()[-1][:300] if rc not in (0, 1) and errors.strip() else ""})
    return runs


def _judge(config: Path, runs: list[dict], env: dict) -> dict[str, Any]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        state = registry_state(config)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    reported = sorted(str(r["version"]) for r in runs if r["version"] is not None)
    versions = sorted(state["statuses"])
    return {"state": state, "reported_versions": reported,
            "lost_versions": sorted(set(reported) - set(versions)),
            "unreported_versions": sorted(set(versions) - set(reported) - {"1"}),
            "pending": sorted(v for v, s in state["statuses"].items() if s == "pending"),
            "promoted_runs": sum(bool(r["promoted"]) for r in runs),
            "database_locked": sum(r["database_locked"] for r in runs)}


def load(retrains: int, sqlite_retrains: int, out: Path) -> None:
    """``retrains`` concurrent retrains against the server stack (PostgreSQL MLflow, Prefect server, cpu
    and gpu workers: ``deployment/local_stack.sh``), then ``sqlite_retrains`` at once on the SQLite
    default; the registry judged after each."""
    result: dict[str, Any] = {"part": "load", "machine": machine_header(), "commit": commit()}
    with tempfile.TemporaryDirectory(prefix="lidgate-load-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # the postgres account must reach the cluster directory
        ports = {"PG_PORT": _free_port(), "MLFLOW_PORT": _free_port(), "PREFECT_PORT": _free_port()}
        config, scans = write_setup(work, tracking_uri=f"http://127.0.0.1:{ports['MLFLOW_PORT']}")
        stack_env = {**ENV, "LIDGATE_HOME": str(work / "home"), "LIDGATE_CONFIG": str(config),
                     **{k: str(v) for k, v in ports.items()}}
        script = REPO / "deployment" / "local_stack.sh"
        started = subprocess.run([str(script), "start"], env=stack_env, capture_output=True, text=True, timeout=600)
        try:
            if started.returncode != 0:
                raise RuntimeError("local_stack.sh start failed: " + (started.stderr or started.stdout)[-1000:])
            env = {"PREFECT_API_URL": f"http://127.0.0.1:{ports['PREFECT_PORT']}/api",
                   "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['MLFLOW_PORT']}", "LIDGATE_HOME": str(work / "home")}
            first = lidgate("bootstrap", str(config), env=env)
            if first.returncode != 0:
                raise RuntimeError("bootstrap on the stack failed: " + (first.stderr or first.stdout)[-1000:])
            t0 = time.time()
            runs = _concurrent(retrains, config, scans, env)
            result["server"] = {"retrains": retrains, "seconds": round(time.time() - t0), "runs": runs,
                                **_judge(config, runs, env)}
        finally:
            subprocess.run([str(script), "stop"], env=stack_env, capture_output=True, text=True, timeout=300)
        # the SQLite default: one machine, one writer
        local = work / "sqlite"
        local.mkdir()
        config, scans = write_setup(local)
        first = lidgate("bootstrap", str(config))
        if first.returncode == 0:
            t0 = time.time()
            runs = _concurrent(sqlite_retrains, config, scans, {})
            result["sqlite"] = {"retrains": sqlite_retrains, "seconds": round(time.time() - t0), "runs": runs,
                                **_judge(config, runs, {})}
        else:
            result["sqlite"] = {"error": (first.stderr or first.stdout)[-1000:]}
    out.write_text(json.dumps(result, indent=1, default=str))


# ------------------------------------------------------------------------------------ report
def _load_part(name: str) -> dict | None:
    path = RESULTS / f"reliability_{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _yes(n: int, total: int) -> str:
    return f"{n}/{total}" + ("" if n == total else " ✗")


def report() -> Path:
    """Render ``benchmarks/results/reliability.md`` from the parts' JSON files."""
    lines = ["# Reliability: crashes, concurrent retrains, bad files", "",
             "The promise under test: *the champion is a model whose certificates hold, and what consumers load "
             "is that model*. Produced by `benchmarks/reliability.py` (the commands are given per part); the "
             "raw results are the `reliability_*.json` files beside this one.", ""]
    faults_ = _load_part("faults")
    if faults_:
        rows = faults_["rows"]
        for r in rows:  # an orphan is the killed command's ephemeral server (older rows listed any process)
            r["orphans"] = [o for o in r.get("orphans", []) if "uvicorn" in o or "create_app" in o]
            r["ok"] = bool(r.get("killed") and r.get("raw", {}).get("sound") and r.get("audit_right")
                           and r.get("after_audit", {}).get("sound") and r.get("final", {}).get("sound")
                           and r.get("follow_up_rc") == 0 and not r["orphans"]
                           and not r.get("after_audit", {}).get("intents"))
        lines += ["## Faults: SIGKILL at every step boundary", "",
                  "`python -m benchmarks.reliability faults --runs 5` — each run in a fresh registry: `lidgate "
                  "bootstrap` (retrain phase: a first version, then `lidgate retrain --data scanner2.npz`) killed "
                  "with SIGKILL at the named boundary (`LIDGATE_FAILPOINT`, `components/failpoints.py`; the flow "
                  "runs in the command's process, which is the worker in the local default). Then the registry is "
                  "judged raw (before anything recovers), `lidgate audit` runs, the registry is judged again, and a "
                  "follow-up `lidgate bootstrap`/`retrain` must promote. (Not measured: killing a separate Prefect "
                  "worker of the server stack while it certifies; there the flow process waits for the certify "
                  "run, which Prefect marks crashed.) *Sound* = no champion, or a champion with "
                  "`lid.status = promoted` that loads with every digest intact and whose own and lineage "
                  "certificates verify (checked without the gate's code). *Audit right* = the audit exits 0 exactly "
                  "when the recovered registry is sound. *Prefect servers left running* = the killed command's ephemeral "
                  "Prefect server (uvicorn) still running 1.5 s after the kill.", "",
                  *[f"  {m}" for m in faults_["machine"]], f"  - commit measured: {faults_.get('commit', '?')}", "",
                  "| phase | killed at | runs | SIGKILL | sound right after the kill | audit right | sound after "
                  "audit | intents left | follow-up promoted | Prefect servers left running |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        keys = sorted({(r["phase"], r["point"]) for r in rows}, key=lambda k: (k[0] != "bootstrap",))
        from components.failpoints import POINTS

        keys.sort(key=lambda k: (k[0] != "bootstrap", POINTS.index(k[1]) if k[1] in POINTS else 99))
        for phase, point in keys:
            group = [r for r in rows if (r["phase"], r["point"]) == (phase, point)]
            n = len(group)
            ok = lambda f: sum(bool(f(r)) for r in group)  # noqa: E731
            lines.append(
                f"| {phase} | `{point}` | {n} | {_yes(ok(lambda r: r.get('killed')), n)} | "
                f"{_yes(ok(lambda r: r.get('raw', {}).get('sound')), n)} | {_yes(ok(lambda r: r.get('audit_right')), n)} "
                f"| {_yes(ok(lambda r: r.get('after_audit', {}).get('sound')), n)} | "
                f"{sum(len(r.get('after_audit', {}).get('intents', [])) for r in group)} | "
                f"{_yes(ok(lambda r: r.get('follow_up_rc') == 0), n)} | {sum(len(r.get('orphans', [])) for r in group)} |")
        failed = [r for r in rows if not r.get("ok")]
        lines += ["", f"**{len(rows) - len(failed)} of {len(rows)} runs kept every promise** "
                      f"({faults_.get('seconds', 0) // 60} min)."]
        for r in failed[:10]:
            lines.append(f"- ✗ {r['phase']} at `{r['point']}`: " + json.dumps(
                {k: r.get(k) for k in ("error", "killed_rc", "orphans", "audit_rc", "follow_up_error")}, default=str)[:400])
        kinds = Counter()
        for r in rows:
            before, after = r.get("raw", {}).get("statuses", {}), r.get("after_audit", {}).get("statuses", {})
            for v, st in after.items():
                if before.get(v) != st:
                    kinds[(r["point"], f"{before.get(v)} → {st}")] += 1
        if kinds:
            lines += ["", "What the audit's recovery changed (status before → after, over all runs):", ""]
            lines += [f"- `{p}`: {t} ×{n}" for (p, t), n in sorted(kinds.items())]
        lines.append("")
    fuzz_ = _load_part("fuzz")
    if fuzz_:
        rows = [{k: v for k, v in c.items() if k != "n"} for c in fuzz_["counts"] for _ in range(c["n"])]
        lines += ["## Bad files: hypothesis-mutated certificates, domains, signatures, data and configurations", "",
                  "`python -m benchmarks.reliability fuzz --cases 12000` — a signed LID (`lidgate certify "
                  "--sign-key`); per case one file is mutated (byte flips, cuts, insertions, duplications, "
                  "truncation, or a JSON field changed, removed or added), then `lidgate verify --public-key` and "
                  "`lidgate inspect` run on it (for the configuration: `load_config` under the CLI's error "
                  "mapping). A case fails when the command crashes (an uncaught exception or a traceback), accepts "
                  "a file whose content changed, `inspect` and `verify` disagree, or the exit code is outside its "
                  "class (3 for a changed LID file, 2 for an unusable configuration).", "",
                  *[f"  {m}" for m in fuzz_["machine"]], f"  - commit measured: {fuzz_.get('commit', '?')}", "",
                  "| file | cases | exit 0 (content unchanged) | exit 2 | exit 3 | crashes | modified file accepted | "
                  "other | failed |", "|---|---|---|---|---|---|---|---|---|"]
        for name in FUZZ_TARGETS:
            group = [r for r in rows if r["file"] == name]
            codes = Counter(r["code"] for r in group)
            other = sum(v for k, v in codes.items() if k not in (0, 2, 3))
            lines.append(f"| `{name}` | {len(group)} | {codes.get(0, 0)} | {codes.get(2, 0)} | {codes.get(3, 0)} | "
                         f"{sum(r['crashed'] for r in group)} | {sum(r['accepted_modified'] for r in group)} | {other} | "
                         f"{sum(not r['ok'] for r in group)} |")
        failed = fuzz_["failed"]
        lines += ["", f"**{len(rows) - len(failed)} of {len(rows)} cases handled right** "
                      f"({fuzz_.get('seconds', 0) // 60} min); a configuration that still parses after a mutation "
                      "(exit 0) is a valid configuration, not an accepted tampering."]
        lines += [f"- ✗ `{r['file']}` exit {r['code']}: {r['detail'][:300]}" for r in failed[:10]]
        lines.append("")
    load_ = _load_part("load")
    if load_:
        lines += ["## Load: concurrent retrains", "",
                  "`python -m benchmarks.reliability load --retrains 8 --sqlite-retrains 4` — after a bootstrap, "
                  "N `lidgate retrain` commands start at the same moment on the same champion. By design one of "
                  "them can be promoted: the others were certified against a champion that has since been "
                  "replaced and are blocked `stale_champion` (retrain them on the new champion). *Lost versions*: "
                  "a version a command reported that the registry does not hold; *sound*: as above, including the "
                  "champion's lineage. SQLite allows one writer at a time; MLflow's SQLite store retries "
                  "writes, and at this concurrency no command saw 'database is locked'. For several machines "
                  "or many models at once, use the PostgreSQL server stack (`deployment/local_stack.sh`).", "",
                  *[f"  {m}" for m in load_["machine"]], f"  - commit measured: {load_.get('commit', '?')}", "",
                  "| store | retrains | wall time | exit codes | promoted | blocked as | lost versions | pending left | "
                  "champion | sound | 'database is locked' |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, label in (("server", "PostgreSQL MLflow server + Prefect server + workers"), ("sqlite", "SQLite default")):
            part = load_.get(key)
            if not part or "runs" not in part:
                lines.append(f"| {label} | – | – | {(part or {}).get('error', 'not run')[:200]} | | | | | | | |")
                continue
            runs = part["runs"]
            codes = Counter(r["rc"] for r in runs)
            blocked = Counter(c for r in runs for c in r["codes"])
            st = part["state"]
            lines.append(f"| {label} | {part['retrains']} | {part['seconds']} s | {dict(sorted(codes.items()))} | "
                         f"{part['promoted_runs']} | {dict(blocked) or '–'} | {part['lost_versions'] or 'none'} | "
                         f"{part['pending'] or 'none'} | v{st['champion']} | {'yes' if st['sound'] else 'NO'} | "
                         f"{part['database_locked']} |")
            errors = [r["error"] for r in runs if r["error"]]
            lines += [f"  - {label}: `{e}`" for e in errors[:5]]
        lines.append("")
    lines += ["## Exit codes (every command)", "",
              "| code | class |", "|---|---|",
              "| 0 | ok: certified, verified, promoted, fetched; the registry is sound |",
              "| 1 | the answer is no: blocked by the gate, refused by fetch, outside the LID or below τ, certification "
              "impossible, an audit that found a problem, a watch that acted |",
              "| 2 | bad input: a missing or malformed file, configuration field, key file or factory string, shapes "
              "that do not fit, an unreachable server |",
              "| 3 | integrity: saved or registered files are not what was certified (a digest, a fingerprint, a "
              "malformed certificate, a missing, unknown or broken signature) |", ""]
    path = RESULTS / "reliability.md"
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    f = sub.add_parser("faults")
    f.add_argument("--runs", type=int, default=5)
    f.add_argument("--points", nargs="*", default=[])
    f.add_argument("--phases", nargs="*", default=["bootstrap", "retrain"])
    f.add_argument("--out", type=Path, default=RESULTS / "reliability_faults.json")
    z = sub.add_parser("fuzz")
    z.add_argument("--cases", type=int, default=12000)
    z.add_argument("--out", type=Path, default=RESULTS / "reliability_fuzz.json")
    ld = sub.add_parser("load")
    ld.add_argument("--retrains", type=int, default=8)
    ld.add_argument("--sqlite-retrains", type=int, default=4)
    ld.add_argument("--out", type=Path, default=RESULTS / "reliability_load.json")
    sub.add_parser("report")
    args = parser.parse_args(argv)
    if args.part == "report":
        print(report())
    elif args.part == "load":
        load(args.retrains, args.sqlite_retrains, args.out)
    elif args.part == "faults":
        faults(args.runs, args.points, args.phases, args.out)
    elif args.part == "fuzz":
        fuzz(args.cases, args.out)


if __name__ == "__main__":
    main()
