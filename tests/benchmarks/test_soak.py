"""The soundness soak (benchmarks/soak.py) in its smallest mode: every matrix row runs, none violates,
and the matrix exercises every bound handler the engine registers — so the benchmark cannot rot."""

from __future__ import annotations

import json

from benchmarks import soak
from benchmarks.soak_matrix import ARCHITECTURES
from lid_engine.bounds import registry
from lid_engine.bounds.ibp import check_supported
from lid_engine.model_graph import ModelGraph, target_name


def test_quick_soak_runs_every_row_without_a_violation(tmp_path):
    assert soak.main(["--quick", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "soak.json").read_text())
    rows = soak.matrix()
    assert [r["label"] for r in doc["rows"]] == [r.label for r in rows]
    assert {r.architecture for r in rows} == {a.name for a in ARCHITECTURES}
    assert {(r.dtype, r.method, r.mode) for r in rows} == {
        (d, m, mode) for d in ("float32", "float64") for m in ("ibp", "linear") for mode in ("certify", "search")}
    assert all(r["samples"] == 2 for r in doc["rows"]) and doc["total_samples"] == 2 * len(rows)
    assert doc["violations"] == 0 and all(r["nominal_enclosed"] for r in doc["rows"])
    assert all(r["max_excess"] <= 0 for r in doc["rows"] if r["mode"] == "certify")
    assert "0 violations" in (tmp_path / "soak.md").read_text()


def test_samples_are_shared_over_the_rows():
    assert soak.shares(10, 4) == [3, 3, 2, 2]
    assert sum(soak.shares(soak.TOTAL, len(soak.matrix()))) == 1_000_000


def test_a_failed_row_is_reported():
    row = {"label": "x", "seed": 1, "violations": 3, "worst_excess": 0.5, "nominal_enclosed": True}
    assert soak.failed([row, {**row, "violations": 0}]) == [row]


def test_the_matrix_exercises_every_registered_handler():
    used = set()
    for arch in ARCHITECTURES:
        layers = check_supported(arch.instance()[0])
        if isinstance(layers, ModelGraph):
            for op in layers.ops:
                if op.kind == "module":
                    used.add(registry.MODULES.get(type(layers.modules[op.target])))
                elif op.kind in ("function", "method"):
                    used.add(registry.FUNCTIONS.get(op.target))
        else:
            used |= {registry.MODULES.get(type(m)) for _, m in layers}
    # the engine's own handlers (tests register custom ones for a while)
    missing = sorted({k.__name__ for k, h in registry.MODULES.items() if h not in used and _engine(h)}
                     | {target_name(k) if not isinstance(k, str) else f".{k}()"
                        for k, h in registry.FUNCTIONS.items() if h not in used and _engine(h)})
    assert not missing, f"no architecture in benchmarks/soak_matrix.py uses {missing}: add one that does"


def _engine(handler) -> bool:
    return getattr(handler, "__module__", "").startswith("lid_engine.")
