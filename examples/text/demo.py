"""`make demo-text`: a classification head on a frozen sentence encoder, updated safely — as a team runs it.

Everything here goes through lidgate's command line with ``examples/text/lidgate.yaml``; nothing in
lidgate knows about text. The story (the paper's foundation-model scenario, METHOD.md §5.2):

1. **v1** — a head on all-MiniLM-L6-v2 embeddings learns task 1, Rotten Tomatoes snippets (negative
   vs non-negative), and is certified there under a specification with several constraints:
   balanced accuracy ≥ τ, recall of the negative class ≥ τ₀, and every snippet-length group's
   accuracy ≥ τ_g. It becomes the champion.
2. **Projected fine-tune** on a new target (tweets about airlines): every optimizer step is projected
   onto v1's LID, so the head adapts while every constraint of task 1 stays certified. Promoted.
3. **Plain fine-tune** on the same tweets (``--no-projection``): it leaves the champion's LID (the
   "alignment drift" the certificate exists to stop) and the gate blocks it.
4. **Audit**: every version re-verified; the HTML report shows each constraint per version.

Embeddings are computed once and cached (``$LIDGATE_EMBED_CACHE``, default
``lidgate-home/embeddings``); the registry of this demo lives in ``lidgate-home/text-demo``
and is started afresh on each run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = Path(__file__).resolve().parent / "lidgate.yaml"
TARGET = "airlines"


def _lidgate(*args: str, env: dict[str, str], as_json: bool = True) -> dict:
    """Run one ``lidgate`` command and return its JSON result (``as_json``) or its exit code (its
    progress goes to the terminal)."""
    exe = Path(sys.executable).with_name("lidgate")
    cmd = [str(exe) if exe.exists() else "lidgate", *args] + (["--json"] if as_json else [])
    print(f"\n$ lidgate {' '.join(args)}", flush=True)
    if not as_json:
        return {"ok": subprocess.run(cmd, env=env, check=False).returncode == 0}
    done = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        print(done.stdout)
        raise SystemExit(f"lidgate {args[0]} exited {done.returncode} without a JSON result") from None
    return out


def main() -> int:
    start = time.perf_counter()
    home = Path(os.environ.get("LIDGATE_TEXT_HOME", REPO / "lidgate-home" / "text-demo"))
    cache = os.environ.get("LIDGATE_EMBED_CACHE", str(REPO / "lidgate-home" / "embeddings"))
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    env = {**os.environ, "LIDGATE_HOME": str(home), "LIDGATE_EMBED_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    os.environ.update({"LIDGATE_EMBED_CACHE": cache, "HF_HUB_OFFLINE": "1"})
    sys.path.insert(0, str(REPO))
    from examples.text.data import write_target

    print(f"lidgate text demo — configuration {CONFIG.relative_to(REPO)}, home {home}, embedding cache {cache}")
    print(f"\n1. the new target's tweets, embedded once (cached): {TARGET}")
    data = write_target(TARGET, home / "incoming" / f"{TARGET}.npz")

    runs = [("v1: head on task 1 (Rotten Tomatoes)", _lidgate("bootstrap", str(CONFIG), env=env))]
    runs.append((f"v2: projected fine-tune on {TARGET}",
                 _lidgate("retrain", str(CONFIG), "--data", str(data), "--task", TARGET, env=env)))
    runs.append((f"v3: plain fine-tune on {TARGET}",
                 _lidgate("retrain", str(CONFIG), "--data", str(data), "--task", TARGET, "--no-projection", env=env)))
    audit = _lidgate("audit", str(CONFIG), env=env, as_json=False)

    print("\nresult")
    for name, r in runs:
        cert = r.get("certification") or {}
        line = f"  {name}: v{r.get('version')} {r.get('status')}"
        if cert.get("lid"):
            line += "; certified " + ", ".join(
                f"{cert.get('constraints', {}).get(t, t)} {v:.3f} ≥ {cert.get('taus', {}).get(t, cert.get('tau')):.3f}"
                for t, v in cert["certified"].items())
        reasons = sorted({x["code"] for x in r.get("reasons", [])})
        if reasons:
            line += f"; blocked: {', '.join(reasons)}"
        print(line)
    print(f"  audit: every promoted version re-verified: {audit['ok']}; report {home / 'audit'}")
    print(f"done in {time.perf_counter() - start:.0f} s")
    statuses = [r.get("status") for _, r in runs]
    return 0 if statuses == ["promoted", "promoted", "blocked"] and audit.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
