"""A team adopts lidgate: a brand-new configuration in a temporary directory, with the team's model
module and training function written there (not in the repository), driven through the ``lidgate``
CLI against a fresh registry: bootstrap → retrain on new data → a rogue candidate submitted → status.

Three teams: one with tabular data in CSV/Parquet files, one with images in ``.npz`` files, and one with
the same images and its own residual network (LayerNorm, GELU, a custom forward). Each CLI
call is a separate process, as a user (or a scheduler) would run it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.paths import REPO
from tests.helpers.team import lidgate, team_dir, write_config

pytestmark = pytest.mark.slow


def tabular_team(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two Gaussian classes in 12 standardised features as CSV; new data as Parquet with a drift."""
    import pandas as pd

    team = team_dir(tmp_path)
    rng = np.random.default_rng(0)

    def frame(n: int, drift: float) -> pd.DataFrame:
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 12)) + (y[:, None] * 2 - 1) * 0.9 + drift
        df = pd.DataFrame(x.astype(np.float32), columns=[f"f{i}" for i in range(12)])
        df["outcome"] = y
        return df

    (team / "data").mkdir()
    frame(3000, 0.0).to_csv(team / "data" / "history.csv", index=False)
    frame(3000, 0.6).to_parquet(team / "data" / "drifted.parquet", index=False)
    config = write_config(team, "tabular_mlp", {"n_features": 12}, {
        "task": "history", "source": "data/history.csv", "label": "outcome",
        "split": {"train": 0.6, "search": 0.2, "certification": 0.2, "seed": 3}})
    return config, team / "data" / "drifted.parquet", team


def image_team(tmp_path: Path, model: str = "stroke_cnn") -> tuple[Path, Path, Path]:
    """Synthetic 12×12 stroke images in .npz files (flat rows, reshaped by the configuration); new data
    from a noisier camera."""
    from benchmarks.search_robustness import images

    team = team_dir(tmp_path)
    case = images(n=2400, side=12, seed=0)
    x = np.concatenate([case.search[0].numpy(), case.cert[0].numpy()]).reshape(-1, 144)
    y = np.concatenate([case.search[1].numpy(), case.cert[1].numpy()])
    more = images(n=2400, side=12, seed=1)
    (team / "data").mkdir()
    np.savez(team / "data" / "strokes.npz", x=more.search[0].numpy().reshape(-1, 144), y=more.search[1].numpy())
    noisy = x + np.random.default_rng(2).normal(0, 0.25, x.shape).astype(np.float32)
    np.savez(team / "data" / "noisy-camera.npz", x=noisy.astype(np.float32), y=y)
    train = images(n=2400, side=12, seed=3)
    np.savez(team / "data" / "train.npz", x=train.search[0].numpy().reshape(-1, 144), y=train.search[1].numpy())
    np.savez(team / "data" / "cert.npz", x=train.cert[0].numpy().reshape(-1, 144), y=train.cert[1].numpy())
    config = write_config(team, model, {"side": 12}, {
        "task": "strokes", "train": "data/train.npz", "search": "data/strokes.npz",
        "certification": "data/cert.npz", "shape": [1, 12, 12]})
    return config, team / "data" / "noisy-camera.npz", team


def residual_team(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The image team with a residual network of its own (traced, not an nn.Sequential)."""
    return image_team(tmp_path, model="stroke_resnet")


def rogue_weights(team: Path, config: Path, new_data: Path) -> Path:
    """A candidate trained elsewhere, from scratch, on the new data only (no projection)."""
    import torch
    from safetensors.torch import save_file

    from components.config import load_config
    from components.data import load_update
    from components.factory import ModelSpec

    cfg = load_config(config)
    data = load_update(cfg, [new_data])
    torch.manual_seed(7)
    model = ModelSpec(cfg.model.factory, dict(cfg.model.kwargs)).build(cfg.code)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = data.train
    for _ in range(5):
        for s in range(0, len(x), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[s:s + 64]), y[s:s + 64]).backward()
            opt.step()
    path = team / "rogue.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("make_team", [tabular_team, image_team, residual_team], ids=["tabular", "images", "residual"])
def test_a_team_bootstraps_retrains_and_is_stopped_by_the_gate(tmp_path, make_team):
    config, new_data, team = make_team(tmp_path)

    boot = lidgate("bootstrap", str(config), "--json", cwd=team)
    assert boot.returncode == 0, boot.stderr[-3000:]
    first = json.loads(boot.stdout)
    assert first["status"] == "promoted" and first["version"] == "1"

    update = lidgate("retrain", str(config), "--data", str(new_data), "--json", cwd=team)
    assert update.returncode == 0, update.stderr[-3000:] + update.stdout[-3000:]
    second = json.loads(update.stdout)
    assert second["promoted"] and second["champion_after"] == "2"
    assert second["candidate"]["projection"] is True and second["certification"]["lineage"][0]["ok"]

    rogue = lidgate("submit", str(config), "--weights", str(rogue_weights(team, config, new_data)), cwd=team)
    assert rogue.returncode == 1, rogue.stderr[-3000:] + rogue.stdout[-3000:]
    assert "BLOCKED" in rogue.stdout

    status = lidgate("status", str(config), "--json", cwd=team)
    assert status.returncode == 0, status.stderr[-3000:]
    table = json.loads(status.stdout)
    assert table["champion"] == "2"
    by_version = {v["version"]: v for v in table["versions"]}
    assert {k: v["status"] for k, v in by_version.items()} == {"1": "promoted", "2": "promoted", "3": "blocked"}
    assert by_version["3"]["source"] == "submitted"
    codes = {r["code"] for r in by_version["3"]["reasons"]}
    assert {"outside_champion_lid", "earlier_certificate_failed"} <= codes
    assert by_version["2"]["task"] == new_data.stem and by_version["2"]["lineage"] == ["1"]
    # the team's state lives where its configuration says, not in the repository
    assert (team / "state" / "mlflow.db").is_file() and not (REPO / "state").exists()

    # someone points the alias at the blocked version by hand: the watch puts it back and says so
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{team / 'state' / 'mlflow.db'}").set_registered_model_alias(
        "team-model", "champion", "3")
    watched = lidgate("watch", str(config), "--once", cwd=team)
    assert watched.returncode == 1 and "alias_incident" in watched.stdout, watched.stdout + watched.stderr[-2000:]
    assert json.loads(lidgate("status", str(config), "--json", cwd=team).stdout)["champion"] == "2"
    again = lidgate("watch", str(config), "--once", cwd=team)
    assert again.returncode == 0 and "all in order: champion 2" in again.stdout


def test_bad_configuration_and_bad_arguments_exit_2_naming_the_field(tmp_path):
    team = team_dir(tmp_path)
    bad = team / "lidgate.yaml"
    bad.write_text("version: 1\nname: x\nmodel: {factory: team_code.models:tabular_mlp}\n"
                   "data: {source: data.csv, split: {train: 1.5}}\nspec: {tau: 0.9}\n")
    result = lidgate("bootstrap", str(bad), cwd=team)
    assert result.returncode == 2 and "data.split.train" in result.stderr and str(bad) in result.stderr
    assert "Traceback" not in result.stderr
    result = lidgate("status", str(team / "missing.yaml"), cwd=team)
    assert result.returncode == 2 and "does not exist" in result.stderr
    config, new_data, _ = tabular_team(tmp_path / "other")
    result = lidgate("retrain", str(config), "--data", str(team / "nope.csv"), cwd=config.parent)
    assert result.returncode == 2 and "--data" in result.stderr and "does not exist" in result.stderr
    result = lidgate("retrain", str(config), "--data", str(new_data), cwd=config.parent)
    assert result.returncode == 2 and "no champion yet" in result.stderr and "Traceback" not in result.stderr


def test_a_killed_bootstrap_leaves_no_server_behind_and_the_next_run_finishes_its_export(tmp_path):
    """SIGKILL right after the alias move (LIDGATE_FAILPOINT): the promotion was recorded before the
    move, so v1 is a sound champion; the command's ephemeral Prefect server ends with it; the next
    retrain exports the champion the killed run never exported, and removes its staging folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    config, new_data, team = tabular_team(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("LIDGATE_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env.update(PREFECT_HOME=str(team / "prefect"), LIDGATE_FAILPOINT="alias_moved")
    killed = subprocess.Popen([sys.executable, "-m", "flows.cli", "bootstrap", str(config)], cwd=team, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert killed.wait(timeout=900) == -signal.SIGKILL

    def left_behind() -> list[int]:
        found = []
        for proc in psutil.process_iter(["pid"]):
            try:
                mark = proc.environ().get("LIDGATE_GUARDED_BY", "")
            except (psutil.Error, OSError):
                continue
            if f'"pid": {killed.pid},' in mark:
                found.append(proc.pid)
        return found

    deadline = time.time() + 10
    while left_behind() and time.time() < deadline:
        time.sleep(0.5)
    assert left_behind() == []

    status = json.loads(lidgate("status", str(config), "--json", cwd=team).stdout)
    assert status["champion"] == "1" and status["versions"][0]["status"] == "promoted"
    assert list((team / "state" / "staging").iterdir())  # the killed run's candidate folder
    update = lidgate("retrain", str(config), "--data", str(new_data), "--json", cwd=team)
    assert update.returncode == 0, update.stderr[-3000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{team / 'state' / 'mlflow.db'}")
    assert client.get_model_version("team-model", "1").tags.get("pipeline.onnx_sha256")  # exported by recovery
    assert list((team / "state" / "staging").iterdir()) == []
