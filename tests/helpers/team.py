"""A team's own code and configuration in a temporary directory (not in the repository), and the
``lidgate`` CLI run as a separate process from it, as a user or a scheduler would run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["TEAM_MODELS", "TEAM_TRAINING", "lidgate", "team_dir", "write_config"]

TEAM_MODELS = '''
import torch
import torch.nn.functional as F
from torch import nn


def tabular_mlp(n_features: int, hidden: int = 32, n_classes: int = 2):
    return nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def stroke_cnn(side: int = 12, n_classes: int = 4):
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * (side // 2) ** 2, n_classes))


class StrokeResNet(nn.Module):
    """Not a chain: a residual block, functional activations, LayerNorm and GELU in a custom forward."""

    def __init__(self, side: int = 12, n_classes: int = 4, channels: int = 6):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        features = channels * (side // 2) ** 2
        self.norm = nn.LayerNorm(features)
        self.fc = nn.Linear(features, 32)
        self.out = nn.Linear(32, n_classes)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.conv2(F.relu(self.conv1(h))))
        h = self.norm(torch.flatten(self.pool(h), 1))
        return self.out(F.gelu(self.fc(h)))


def stroke_resnet(side: int = 12, n_classes: int = 4):
    return StrokeResNet(side, n_classes)
'''

TEAM_TRAINING = '''
import torch
import torch.nn.functional as F


def fit(model, optimizer, data, *, epochs=5, batch_size=64):
    """The team's own loop: a cosine schedule and gradient clipping, stepping lidgate's optimizer."""
    x, y = data.train
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for s in range(0, len(x), batch_size):
            i = perm[s:s + batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            schedule.step()
    return model.eval()
'''


def lidgate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m flows.cli ARGS`` in ``cwd`` with a Prefect home there and no lidgate/MLflow/Prefect
    settings inherited from the test process."""
    env = {k: v for k, v in os.environ.items() if k not in ("LIDGATE_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    env["PREFECT_HOME"] = str(cwd / "prefect")
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def team_dir(tmp_path: Path) -> Path:
    """``tmp_path/team`` with the package ``team_code`` (models, training) in it."""
    team = tmp_path / "team"
    (team / "team_code").mkdir(parents=True)
    (team / "team_code" / "__init__.py").write_text("")
    (team / "team_code" / "models.py").write_text(TEAM_MODELS)
    (team / "team_code" / "training.py").write_text(TEAM_TRAINING)
    return team


def write_config(team: Path, model: str, kwargs: dict, data: dict, **sections) -> Path:
    """``team/lidgate.yaml`` for ``team_code.models:MODEL`` with a short search; ``sections`` replace
    whole sections of it."""
    import yaml

    config = {
        "version": 1, "name": "team-model", "code": ["."],
        "model": {"factory": f"team_code.models:{model}", "kwargs": kwargs},
        "data": data,
        "spec": {"metric": "accuracy", "tau_from_accuracy": 0.10},
        "training": {"function": "team_code.training:fit", "kwargs": {"epochs": 5, "batch_size": 64}},
        "search": {"iterations": 40, "checkpoints": 4, "biasing": "none"},
        "registry": {"home": "state"},
        **sections,
    }
    path = team / "lidgate.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
