"""A team that keeps its own Prefect flow and training loop (examples/team_flow/flow.py) calls lidgate's
tasks from it: the update is projected, certified, registered and promoted through the gate."""

from __future__ import annotations

import pytest

from tests.helpers.pipeline import new_scans, registry_of, write_config

pytestmark = pytest.mark.slow


def test_a_teams_own_flow_with_its_own_loop_is_gated_by_lidgate(tmp_path, harness, monkeypatch):
    from examples.team_flow.flow import team_nightly
    from flows.retrain import bootstrap_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = write_config(tmp_path)
    assert bootstrap_flow(config=str(config))["promoted"]

    result = team_nightly(str(config), [str(new_scans(tmp_path))])
    assert result["promoted"], result["reasons"]
    assert result["action"] == "team-nightly" and result["certification"]["lineage"][0]["ok"]
    registry = registry_of(config)
    assert registry.champion() == "2"
    v1, v2 = registry.load(version="1"), registry.load(version="2")
    assert v1.lid.contains(v2.model), "the team's loop stepped through lidgate's projected optimizer"
    assert v2.lineage == ["1"] and v2.tags["pipeline.task"] == "scanner2"
    registry.release(v1), registry.release(v2)

    # the import of lidgate's tasks changed nothing in the team's process environment
    import subprocess
    import sys

    probe = ("import os; before = dict(os.environ); import flows.tasks, flows.retrain, flows.cli; "
             "import logging; print(dict(os.environ) == before)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "True", out.stderr[-2000:]
