"""Shared helpers of the pipeline tests (the flows end to end, a team's own flow): the digits example's
configuration with a short search, new data in its format, and the registry a configuration names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from tests.helpers.paths import REPO

__all__ = ["assert_same_lid", "new_scans", "registry_of", "write_config"]

TIMING = ("created_at",)


def without_timing(obj):
    """A ``lid.json`` document without its creation times (and the digests that cover them)."""
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if k not in TIMING and k != "digest"}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def assert_same_lid(a: Path, b: Path) -> None:
    """Two saved LIDs are the same files, byte for byte, apart from their creation times."""
    import json

    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for f in files:
        if f == "lid.json":
            assert without_timing(json.loads((a / f).read_text())) == without_timing(json.loads((b / f).read_text()))
        else:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f


def write_config(directory: Path, example: str = "lidgate.yaml", **search) -> Path:
    """The digits example's configuration (``example``: which file of examples/digits) with a short search,
    its registry under ``directory``."""
    config = yaml.safe_load((REPO / "examples" / "digits" / example).read_text())
    config.update(name="e2e", code=[str(REPO)], registry={"home": str(directory / "home")})
    config["training"] = {"kwargs": {"epochs": 20, "batch_size": 32, "lr": 0.003}}
    config["search"] = {"iterations": 30, "checkpoints": 3, **search}
    path = directory / "lidgate.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def new_scans(directory: Path, name: str = "scanner2", scale: float = 0.6, offset: float = 0.25) -> Path:
    """New data in the configuration's format: the digits from a second scanner (fainter, greyer)."""
    from examples.digits.data import load_digits_8x8

    x, y = load_digits_8x8()
    rng = np.random.default_rng(1)
    x2 = (scale * x + offset + rng.normal(0, 0.03, x.shape)).astype(np.float32)
    if scale <= 1.0:
        x2 = np.clip(x2, 0.0, 1.0)
    path = directory / f"{name}.npz"
    np.savez(path, x=x2, y=y)
    return path


def registry_of(config: Path):
    """The registry the configuration at ``config`` names, opened as the flows open it."""
    from flows.settings import open_registry, settings_for
    from flows.tasks import load_configuration

    return open_registry(settings_for(load_configuration(config)))
