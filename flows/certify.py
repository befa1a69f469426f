"""Certification flow: re-check an updated model against every earlier certificate, then certify
the next LID nested inside the current one, biased by the lookahead buffer.

It has its own deployment on the ``gpu`` work pool (the device is chosen automatically: CUDA when
present). The retrain flow calls it with ``run_deployment`` when a Prefect server is configured and
as an in-process subflow on the embedded default. Inputs and outputs travel through
``candidate_dir`` (a directory on the shared lidgate home): ``weights.safetensors`` + ``spec.json``
in, ``lid/`` + ``certify.json`` out, so nothing depends on Prefect's result storage.
"""

from __future__ import annotations

import json
from pathlib import Path

import flows  # noqa: F401  (environment defaults before prefect is imported)
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

CERTIFY_RESULT = "certify.json"


def load_candidate(candidate_dir: str | Path):
    """Rebuild the candidate model from ``spec.json`` + ``weights.safetensors`` (no pickles)."""
    from safetensors.torch import load_file

    from components.factory import ModelSpec

    candidate_dir = Path(candidate_dir)
    spec = ModelSpec.load(candidate_dir / "spec.json")
    model = spec.build()
    model.load_state_dict(load_file(str(candidate_dir / "weights.safetensors")), strict=True)
    return spec, model.eval()


def save_candidate(model, spec, candidate_dir: str | Path) -> Path:
    from safetensors.torch import save_file

    candidate_dir = Path(candidate_dir)
    candidate_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
              str(candidate_dir / "weights.safetensors"))
    spec.save(candidate_dir / "spec.json")
    return candidate_dir


@task(cache_policy=NO_CACHE, persist_result=False)
def reverify_earlier(registry, model, lineage: list[str]) -> list[dict]:
    """Re-verify the updated model against the certificate of every earlier version in its lineage."""
    from components.lineage import verify_lineage

    return [r.to_dict() for r in verify_lineage(registry, model, lineage)]


@task(cache_policy=NO_CACHE, persist_result=False)
def lookahead_mask(model, lookahead_dir: str | None, biasing: str, frozen_fraction: float, seed: int):
    """Frozen-coordinate mask from the lookahead buffer (None when there is no buffer or no biasing)."""
    from lid_engine.importance import fisher_importance, importance_mask, si_importance

    if biasing == "none" or not lookahead_dir or not Path(lookahead_dir).exists():
        return None
    from components.buffer import LookaheadBuffer

    buffer = LookaheadBuffer.open(lookahead_dir)
    if len(buffer) == 0:
        return None
    x, y = buffer.data()
    scores = (fisher_importance if biasing == "fisher" else si_importance)(model, x, y, seed=seed)
    return importance_mask(scores, frozen_fraction, "lookahead")


@flow(name="certify", log_prints=True)
def certify_flow(
    candidate_dir: str,
    task_ref: str,
    tau: float | None = None,
    tau_delta: float = 0.12,
    biasing: str = "fisher",
    frozen_fraction: float = 0.8,
    lookahead_dir: str | None = None,
    iterations: int = 200,
    checkpoints: int = 10,
    batch_size: int = 500,
    max_eval: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    model_name: str | None = None,
    bound: str = "ibp",
) -> dict:
    """Certify ``candidate_dir``'s model; writes ``lid/`` and ``certify.json`` there and returns the summary.

    ``bound``: ``"ibp"`` (the paper's) or ``"linear"`` (tighter on convolutions; the search then
    bounds the 3 most dangerous classes per example, the certificates all of them)."""
    import torch

    import lid_engine as le
    from flows.data import load_task
    from flows.settings import get_settings, open_registry
    from lid_engine.training import accuracy

    log = get_run_logger()
    if biasing not in ("fisher", "si", "none"):
        raise ValueError(f"certify_flow: 'biasing' must be 'fisher', 'si' or 'none', got {biasing!r}")
    if bound not in ("ibp", "linear"):
        raise ValueError(f"certify_flow: 'bound' must be 'ibp' or 'linear', got {bound!r}")
    settings = get_settings(model_name)
    registry = open_registry(settings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec, model = load_candidate(candidate_dir)
    data = load_task(task_ref, max_eval=max_eval, seed=seed)
    summary: dict = {"task": data.name, "task_ref": task_ref, "device": device, "bound": bound, "lid": False,
                     "error": None}

    champion_version = registry.champion()
    champion = registry.load(version=champion_version) if champion_version else None
    lineage = (list(champion.lineage) + [champion.version]) if champion else []
    if champion is not None:
        registry.release(champion)  # its LID stays in memory; the downloaded files can go
    summary["lineage"] = lineage
    summary["reverify"] = reverify_earlier(registry, model, lineage)
    if not all(r["ok"] for r in summary["reverify"]):
        summary["error"] = "the updated model fails an earlier certificate; no new LID is computed"
        log.warning(summary["error"])
        return _write(candidate_dir, summary)

    acc = accuracy(model, *data.search)
    tau = float(tau) if tau is not None else le.tau_from_accuracy(acc, tau_delta)
    summary.update({"search_accuracy": acc, "tau": tau})
    within = champion.lid if champion is not None else None
    if within is not None and within.member_index(model) is None:
        summary["error"] = "the updated model lies outside the champion's LID; no nested LID exists"
        return _write(candidate_dir, summary)
    mask = lookahead_mask(model, lookahead_dir, biasing, frozen_fraction, seed)
    summary["biasing"] = biasing if mask is not None else "none"
    try:
        lid = le.compute_lid(
            model.to(device), tasks={data.name: (*data.search, tau)}, cert={data.name: data.cert},
            within=within, mask=mask, iterations=iterations, checkpoints=checkpoints, batch_size=batch_size,
            confidence=confidence, seed=seed, device=device, progress=True,
            **({"method": "linear", "competitors": 3} if bound == "linear" else {}),
        )
    except le.LidSearchError as exc:
        summary["error"] = str(exc)
        log.warning("LID search failed: %s", exc)
        return _write(candidate_dir, summary)
    lid.save(Path(candidate_dir) / "lid", overwrite=True)
    summary.update({
        "lid": True,
        "members": len(lid),
        "width_sum": lid.width_sum()[-1],
        "certified_accuracy": lid.certified_accuracy(),
        "lower_bound": lid.lower_bound(),
    })
    log.info("LID: %d members, certified %.4f ≥ τ %.4f", len(lid), summary["certified_accuracy"], tau)
    return _write(candidate_dir, summary)


def _write(candidate_dir: str | Path, summary: dict) -> dict:
    path = Path(candidate_dir) / CERTIFY_RESULT
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(path)
    return summary


def read_result(candidate_dir: str | Path) -> dict:
    path = Path(candidate_dir) / CERTIFY_RESULT
    if not path.is_file():
        raise RuntimeError(f"certification produced no result file at {path}")
    return json.loads(path.read_text())
