"""A team's own nightly Prefect flow with its own training loop, made safe by lidgate's tasks.

The team keeps everything that is theirs (the flow, the optimizer, the schedule, the loop) and calls
lidgate at the points that matter: load the champion and its LID, validate the new data, wrap the
optimizer so that every step is projected onto the LID, certify the result (earlier certificates
re-verified, a nested LID for the new data), and register it behind the promotion gate.

Run it after the first version exists (``lidgate bootstrap CONFIG``)::

    python -m examples.team_flow.flow examples/digits/lidgate.yaml new-scans.npz
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from prefect import flow

from flows import tasks as lg


def team_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
              epochs: int = 10, batch_size: int = 32) -> None:
    """The team's training loop: SGD with momentum, a step schedule, label smoothing, gradient clipping."""
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for s in range(0, len(x), batch_size):
            i = perm[s: s + batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x[i]), y[i], label_smoothing=0.05).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()  # lidgate projects the parameters back onto the champion's LID here
            schedule.step()
    model.eval()


@flow(name="team-nightly")
def team_nightly(config_path: str, new_data: list[str]) -> dict:
    """Retrain the champion on ``new_data`` with the team's own loop; promote only what lidgate certifies."""
    config = lg.load_configuration(config_path)
    champion = lg.load_champion(config)
    if champion is None:
        raise RuntimeError(f"no champion yet: run `lidgate bootstrap {config_path}` first")
    data = lg.load_data(config, new_data)
    validation = lg.validate_data(config, data)
    if not validation.passed:
        return {"status": "rejected", "failures": validation.failures}

    model = champion.fresh_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    optimizer = lg.projected_optimizer(model, champion, sgd, strategy="closest")
    team_loop(model, optimizer, *data.train)

    candidate = lg.Candidate(model=model, spec=champion.spec, source="trained", projection=True)
    certification = lg.certify_candidate(config, model, data, champion)
    outcome = lg.register_and_gate(config, candidate, certification, data, validation, champion,
                                   action="team-nightly")
    return outcome.to_dict()


if __name__ == "__main__":
    from flows.env import apply_defaults

    apply_defaults()
    result = team_nightly(sys.argv[1], sys.argv[2:])
    print(result["status"], f"v{result.get('version')}", [r["code"] for r in result.get("reasons", [])])
