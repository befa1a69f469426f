"""`make demo`: lidgate as one team would use it, on the embedded defaults (nothing to start by hand).

The team's configuration is ``examples/mnist/lidgate.yaml`` (the paper's MNIST CNN, all ten digits);
MLflow runs on SQLite and Prefect in ephemeral mode under ``./lidgate-home``. The story:

1. **v1**: the CNN is trained on a golden set of digits and certified there: every model in its LID
   keeps accuracy ≥ τ on the golden digits. It becomes the champion.
2. **New data arrives with a shift**: the same digits from a scanner with a grey background and faint
   strokes ("washed out"). v1 reads few of them. Early scans also go into the lookahead buffer.
3. **Projected retrain** on the washed-out digits: every optimizer step is projected onto v1's LID, so
   v2 reads the new scans clearly better *and* stays certified ≥ τ on the golden set; it gets its own
   LID for the new task, nested in v1's. The gate promotes it.
4. **Unprojected retrain** (``--no-projection``): it learns the new scans too, but forgets the golden
   digits; it lies outside the champion's LID and the earlier certificates fail. The gate blocks it and
   the champion stays v2.
5. **Audit**: every version re-verified; an HTML report with what each version gets right.

Every step runs the same flows as ``lidgate bootstrap/retrain`` with the same configuration file.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from flows.env import apply_defaults
from flows.settings import Settings

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "mnist" / "lidgate.yaml"
SUMMARY = "demo-summary.json"
NEW_DATA = "incoming/washed-out.npz"


def demo_state(settings: Settings) -> list[Path]:
    """What the demo writes under the lidgate home: the embedded registry and its artifacts, the
    ephemeral Prefect home, the pipeline's folders and the summary. ``--fresh`` removes these and
    nothing else: the home may also hold a user's other work (``make bench-cl``'s output, for one)."""
    home = settings.home
    return [home / "mlflow.db", home / "mlartifacts", home / "prefect", settings.staging, home / "lookahead",
            home / "audit", settings.onnx_dir, settings.cache_dir, home / "runs", home / "incoming", home / SUMMARY]


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
    apply_defaults()
    from rich.console import Console
    from rich.table import Table

    from flows.settings import settings_for
    from flows.tasks import load_configuration

    console = Console(width=max(Console().width, 120))
    config = load_configuration(CONFIG)
    settings = settings_for(config)
    if "--fresh" in argv:
        reset_demo_state(settings)
        settings.home.mkdir(parents=True, exist_ok=True)
        (settings.home / "prefect").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    console.rule("[bold]lidgate demo: a model update that is provably safe, and one that is not")
    console.print(f"configuration: {CONFIG}\nhome: {settings.home}\nMLflow: {settings.tracking_uri}\n"
                  "Prefect: ephemeral (flows run in this process)")

    from examples.mnist.data import write_washed_out
    from flows.audit import audit_flow
    from flows.cli.pipeline import clip_text, grouped_reasons
    from flows.retrain import bootstrap_flow, retrain_flow
    from flows.settings import open_registry

    runs: list[tuple[str, dict]] = []

    if open_registry(settings).champion() is None:
        _step(console, 1, "v1: train the CNN on the golden digits, certify its LID, register it (champion)")
        runs.append(("v1: golden digits", bootstrap_flow(config=str(CONFIG))))
        _say(console, runs[-1][1])
    else:
        console.print("a champion exists already; skipping the bootstrap (use --fresh to start over)")

    _step(console, 2, "new data arrives: washed-out scans of the same digits (grey background, faint strokes)")
    new_data, early = write_washed_out(settings.home / NEW_DATA, n=6000, seed=1, early=512)
    _fill_lookahead(settings, *early)
    console.print(f"  {new_data} (6,000 scans; 512 earlier ones wait in the lookahead buffer)")

    _step(console, 3, "retrain on the new scans, every optimizer step projected onto the champion's LID")
    runs.append(("v2: projected retrain", retrain_flow(config=str(CONFIG), data=[str(new_data)], task="washed-out")))
    _say(console, runs[-1][1])

    _step(console, 4, "a rogue retrain on the same scans WITHOUT projection")
    runs.append(("v3: unprojected retrain", retrain_flow(config=str(CONFIG), data=[str(new_data)],
                                                          task="washed-out", projection=False)))
    _say(console, runs[-1][1])

    _step(console, 5, "audit: re-verify every version, write the HTML report")
    audit = audit_flow(config=str(CONFIG))
    accuracy = _heldout(audit["summary"])

    table = Table(title=f"lidgate demo: model {settings.model_name!r}")
    for col in ("run", "golden digits", "washed-out scans", "golden certificate", "gate", "champion"):
        table.add_column(col)
    for name, r in runs:
        acc = accuracy.get(str(r.get("version")), {})
        table.add_row(name, _pct(acc.get("golden")), _pct(acc.get("washed-out")), _golden_certificate(r),
                      "[green]promoted[/green]" if r["promoted"] else "[red]blocked[/red]", f"v{r.get('champion_after')}")
    console.print(table)
    console.print("golden digits / washed-out scans: plain accuracy of each version on the task's held-out data;\n"
                  "golden certificate: every model in v1's LID keeps certified accuracy ≥ τ on the golden digits.")
    for name, r in runs:
        for code, details in grouped_reasons(r["reasons"]).items():
            more = f" (and {len(details) - 1} more like it)" if len(details) > 1 else ""
            console.print(f"[red]{name} blocked[/red] — {code}: {clip_text(details[0], 220)}{more}")
    console.print(f"audit report: {audit['report']} (every promoted version re-verified: {audit['ok']})")
    console.print(f"done in {time.perf_counter() - start:.0f} s")
    (settings.home / SUMMARY).write_text(json.dumps({"runs": runs, "audit": audit, "accuracy": accuracy},
                                                    indent=2, default=str))
    promoted = [r.get("promoted") for _, r in runs]
    ok = promoted[-2] and not promoted[-1] and audit["ok"] and runs[-1][1].get("champion_after") == runs[-2][1].get("version")
    return 0 if ok else 1


def _step(console, n: int, text: str) -> None:
    console.print(f"\n[bold]{n}.[/bold] {text}")


def _say(console, outcome: dict) -> None:
    cert = outcome.get("certification") or {}
    verdict = "[green]promoted[/green]" if outcome["promoted"] else "[red]blocked[/red]"
    line = f"  → v{outcome['version']} {verdict} in {outcome.get('seconds', 0):.0f} s"
    if cert.get("lid"):
        line += "; certified " + ", ".join(f"{t} {v:.4f} ≥ τ {cert.get('taus', {}).get(t, cert['tau']):.4f}"
                                              for t, v in cert["certified"].items())
    for check in cert.get("lineage", []):
        line += f"; v{check['version']}'s certificate " + ("holds" if check["ok"] else "FAILS")
    if outcome["reasons"]:
        line += "; reasons: " + ", ".join(sorted({r["code"] for r in outcome["reasons"]}))
    console.print(line)


def _fill_lookahead(settings: Settings, x, y) -> None:
    """Early washed-out scans (not the ones the retrain uses) wait in the lookahead buffer: the next
    LID is biased to leave room where they need it."""
    from components.buffer import LookaheadBuffer

    buffer = LookaheadBuffer(settings.lookahead_dir, feature_shape=(1, 28, 28), classes=list(range(10)), capacity=1024)
    buffer.clear()
    buffer.add(x, y, source="demo: early washed-out scans")


def _heldout(summary_path: str) -> dict[str, dict[str, float]]:
    summary = json.loads(Path(summary_path).read_text())
    return {v["version"]: v.get("accuracy", {}) for v in summary["versions"]}


def _pct(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _golden_certificate(outcome: dict) -> str:
    cert = outcome.get("certification") or {}
    if outcome.get("action") == "bootstrap" and cert.get("lid"):
        return f"{cert['certified']['golden']:.4f} ≥ τ {cert['tau']:.4f}"
    checks = cert.get("lineage", [])
    if not checks:
        return "—"
    return "holds (inside v1's LID)" if checks[0]["ok"] else "[red]fails: outside v1's LID[/red]"


if __name__ == "__main__":
    raise SystemExit(main())
