"""What a team's own model and data bring that the examples do not, through the ``lidgate`` CLI:
BatchNorm layers, float64 Parquet files, renamed or reordered columns, labels the model cannot
output, a reproducible first version, and a working directory that is not the team's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.team import lidgate, team_dir, write_config

pytestmark = pytest.mark.slow

BN_MODEL = '''
from torch import nn


def bn_mlp(n_features: int, hidden: int = 24, n_classes: int = 3):
    return nn.Sequential(nn.Linear(n_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, n_classes))
'''


def three_classes(n: int, seed: int, drift: float = 0.0, dtype=np.float32):
    """Three Gaussian classes in 8 features, as a DataFrame with an ``outcome`` column."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 8)) + np.eye(3, 8)[y] * 2.5 + drift
    frame = pd.DataFrame(x.astype(dtype), columns=[f"x{i}" for i in range(8)])
    frame["outcome"] = y
    return frame


@pytest.fixture(scope="module")
def bn_team(tmp_path_factory) -> tuple[Path, Path]:
    """A team whose MLP has a BatchNorm layer, bootstrapped on CSV (float32 features)."""
    team = team_dir(tmp_path_factory.mktemp("bn"))
    models = team / "team_code" / "models.py"
    models.write_text(models.read_text() + BN_MODEL)
    (team / "data").mkdir()
    three_classes(1500, 0).to_csv(team / "data" / "history.csv", index=False)
    config = write_config(team, "bn_mlp", {"n_features": 8}, {
        "task": "history", "source": "data/history.csv", "label": "outcome",
        "split": {"train": 0.6, "search": 0.2, "certification": 0.2, "seed": 1}})
    boot = lidgate("bootstrap", str(config), "--json", cwd=team)
    assert boot.returncode == 0, boot.stderr[-3000:] + boot.stdout[-3000:]
    return config, team


@pytest.mark.timeout(900)
def test_a_batchnorm_model_retrains_on_float64_parquet_and_is_promoted(bn_team):
    config, team = bn_team
    new = team / "data" / "drifted64.parquet"
    three_classes(1500, 5, drift=0.3, dtype=np.float64).to_parquet(new, index=False)

    update = lidgate("retrain", str(config), "--data", str(new), "--json", cwd=team)
    assert update.returncode == 0, update.stderr[-3000:] + update.stdout[-3000:]
    outcome = json.loads(update.stdout)
    # the running statistics are the champion's (frozen while training), so its certificate still holds
    assert outcome["promoted"] and outcome["certification"]["lineage"][0]["ok"]
    assert outcome["candidate"]["projection"] is True


@pytest.mark.timeout(600)
def test_new_data_with_renamed_or_reordered_columns_is_refused_naming_them(bn_team):
    config, team = bn_team
    frame = three_classes(600, 6)
    renamed = team / "data" / "renamed.csv"
    frame.rename(columns={"x3": "x3_v2"}).to_csv(renamed, index=False)
    before = json.loads(lidgate("status", str(config), "--json", cwd=team).stdout)["versions"]
    reordered = team / "data" / "reordered.csv"
    frame[["x1", "x0", *[f"x{i}" for i in range(2, 8)], "outcome"]].to_csv(reordered, index=False)

    result = lidgate("retrain", str(config), "--data", str(renamed), cwd=team)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "feature columns differ" in result.stderr and "x3_v2" in result.stderr and "'x3'" in result.stderr
    result = lidgate("retrain", str(config), "--data", str(reordered), cwd=team)
    assert result.returncode == 2 and "another order" in result.stderr
    assert json.loads(lidgate("status", str(config), "--json", cwd=team).stdout)["versions"] == before


@pytest.mark.timeout(600)
def test_labels_the_model_cannot_output_are_refused_before_training(tmp_path):
    team = team_dir(tmp_path)
    (team / "data").mkdir()
    three_classes(600, 0).to_csv(team / "data" / "history.csv", index=False)
    config = write_config(team, "tabular_mlp", {"n_features": 8, "n_classes": 2}, {
        "source": "data/history.csv", "label": "outcome"})
    result = lidgate("bootstrap", str(config), cwd=team)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "labels go from 0 to 2" in result.stderr and "2 outputs" in result.stderr
    status = lidgate("status", str(config), "--json", cwd=team)
    assert status.returncode == 0 and json.loads(status.stdout)["versions"] == []


@pytest.mark.timeout(900)
def test_the_first_version_is_reproducible_and_state_stays_out_of_the_working_directory(tmp_path):
    """Two bootstraps of the same configuration in two places give the same weights; neither writes
    anything in the directory the command was run from."""
    shas = []
    for name in ("a", "b"):
        team = team_dir(tmp_path / name)
        (team / "data").mkdir()
        three_classes(900, 0).to_csv(team / "data" / "history.csv", index=False)
        config = write_config(team, "tabular_mlp", {"n_features": 8, "n_classes": 3}, {
            "source": "data/history.csv", "label": "outcome"},
            training={"function": "team_code.training:fit", "kwargs": {"epochs": 30, "batch_size": 32}})
        elsewhere = tmp_path / name / "cwd"
        elsewhere.mkdir()
        boot = lidgate("bootstrap", str(config), "--json", cwd=elsewhere)
        assert boot.returncode == 0, boot.stderr[-3000:] + boot.stdout[-3000:]
        assert sorted(p.name for p in elsewhere.iterdir()) == ["prefect"]  # only the test's PREFECT_HOME
        assert (team / "state" / "mlflow.db").is_file()
        status = json.loads(lidgate("status", str(config), "--json", cwd=elsewhere).stdout)
        shas.append(status["versions"][0]["model_sha256"])
    assert shas[0] and shas[0] == shas[1]
