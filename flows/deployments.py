"""Prefect deployments: scheduled retraining and auditing on the ``cpu`` pool, certification on ``gpu``.

``python -m flows.deployments apply CONFIG`` creates the two process work pools (if missing) and applies
the deployments of the team's configuration file to the Prefect server in ``PREFECT_API_URL``; then start workers with
``prefect worker start --pool cpu`` and ``prefect worker start --pool gpu`` (on a CUDA machine).
The same deployments are declared in ``deployment/prefect.yaml`` for ``prefect deploy --all``.
Schedules need a real server: Prefect's ephemeral mode refuses them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


RETRAIN_CRON = "0 2 * * *"  # nightly
AUDIT_CRON = "0 6 * * *"  # every morning
WORK_POOLS = {"cpu": "training and auditing", "gpu": "LID certification (CUDA when present)"}


def repo_dir() -> Path:
    """Where workers find the code: ``$LIDGATE_REPO``, else the checkout this module lives in."""
    return Path(os.environ.get("LIDGATE_REPO") or Path(__file__).resolve().parents[1])


def build_deployments(config: str, retrain_cron: str = RETRAIN_CRON, audit_cron: str = AUDIT_CRON):
    """The three deployments of one team's configuration file (a path the workers can read).

    The retrain and audit deployments take the file as their parameter; the certify deployment is
    called by the retrain flow with a candidate folder whose ``candidate.json`` names the same file and
    its sha256, so the gpu worker certifies exactly what the cpu worker trained.
    """
    from flows.audit import audit_flow
    from flows.certify import certify_flow
    from flows.retrain import retrain_flow

    # Process workers run each flow in `working_dir`; without it they use a temporary directory
    # where the entrypoints (flows/*.py) do not exist.
    job = {"working_dir": str(repo_dir())}
    return [
        retrain_flow.to_deployment(name="retrain-nightly", work_pool_name="cpu", cron=retrain_cron,
                                   parameters={"config": config}, tags=["lidgate", "retrain"], job_variables=job,
                                   description="Retrain the champion with projection onto its LID, certify, gate."),
        certify_flow.to_deployment(name="certify-gpu", work_pool_name="gpu", tags=["lidgate", "certify"],
                                   job_variables=job,
                                   description="Re-verify earlier certificates and certify the next nested LID."),
        audit_flow.to_deployment(name="audit-daily", work_pool_name="cpu", cron=audit_cron, job_variables=job,
                                 parameters={"config": config}, tags=["lidgate", "audit"],
                                 description="Re-verify every registered certificate."),
    ]


def ensure_work_pools() -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        for name, description in WORK_POOLS.items():
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process", description=description))
            except ObjectAlreadyExists:
                pass


def apply_deployments(config: str, **kwargs) -> list[str]:
    """Create the work pools and apply every deployment of ``config``; returns the deployment ids."""
    ensure_work_pools()
    return [str(d.apply()) for d in build_deployments(str(Path(config).resolve()), **kwargs)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "apply" or not Path(argv[1]).is_file():
        print("usage: python -m flows.deployments apply CONFIG   (needs PREFECT_API_URL pointing at a Prefect server)")
        return 2
    from flows.env import apply_defaults

    apply_defaults()
    for deployment_id in apply_deployments(argv[1]):
        print(deployment_id)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
