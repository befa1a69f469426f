"""components.export (ONNX export with certificate metadata) and components.audit (HTML/JSON report)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

import lid_engine
from benchmarks.cl.data import blobs
from components.audit import TaskAudit, VersionAudit, render_audit_report
from components.export import (
    CERTIFICATE_KEY,
    OnnxExportError,
    OnnxParityError,
    export_onnx,
    log_onnx_to_mlflow,
    read_onnx_metadata,
)
from examples.mnist.model import cnn
from lid_engine import Box
from tests.helpers.models import mlp

CERT_SHA = "0123456789abcdef" * 4


def _ort_session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _assert_parity(model, path, example, sizes=(1, 7, 64)):
    session = _ort_session(path)
    name = session.get_inputs()[0].name
    g = torch.Generator().manual_seed(1)
    for b in sizes:
        x = torch.randn((b, *example.shape[1:]), generator=g, dtype=example.dtype)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run(None, {name: x.numpy()})
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------ export
@pytest.mark.parametrize("which", ["cnn", "mlp"])
def test_export_parity_and_metadata(tmp_path, which):
    torch.manual_seed(0)
    if which == "cnn":
        model, example = cnn(), torch.rand(3, 1, 28, 28)
    else:
        model, example = mlp([2, 16, 16, 4]), torch.randn(5, 2)
    model.train()  # export must switch to eval and restore the mode
    meta = {"lidgate.version": "7", "lidgate.model_sha256": "f" * 64, "lidgate.tasks": "t1,t2"}
    out = tmp_path / "sub" / f"{which}.onnx"
    res = export_onnx(model, example, out, certificate_sha256=CERT_SHA, metadata=meta, check_batch_sizes=[1, 7, 64])
    assert model.training
    model.eval()
    assert res.path == out and out.is_file()
    assert res.max_abs_diff <= 1e-5
    assert sorted(res.batch_sizes) == sorted([example.shape[0], 1, 7, 64])
    assert res.opset >= 18
    import hashlib

    assert res.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    props = read_onnx_metadata(out)
    assert props[CERTIFICATE_KEY] == CERT_SHA
    for k, v in meta.items():
        assert props[k] == v
    assert props["lidgate.engine_version"] == lid_engine.__version__
    assert res.metadata == props
    _assert_parity(model, out, example)
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp files left


def test_export_is_quiet(tmp_path, capfd):
    export_onnx(mlp([3, 8, 2]), torch.randn(4, 3), tmp_path / "m.onnx", certificate_sha256=CERT_SHA)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return x * 2
        return x


class _Noisy(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)  # exports fine, but ONNX's random numbers differ from torch's


def test_unexportable_model_raises_and_leaves_nothing(tmp_path):
    out = tmp_path / "bad.onnx"
    with pytest.raises(OnnxExportError, match="could not export _DataDependent"):
        export_onnx(_DataDependent(), torch.randn(4, 3), out, certificate_sha256=CERT_SHA)
    assert list(tmp_path.iterdir()) == []


def test_parity_failure_raises_and_keeps_previous_file(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"previous export")
    with pytest.raises(OnnxParityError) as info:
        export_onnx(_Noisy(), torch.randn(4, 3), out, certificate_sha256=CERT_SHA)
    assert info.value.max_abs_diff > 1e-5
    assert "differ by up to" in str(info.value)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_export_rejects_bad_arguments(tmp_path):
    m, x = mlp([2, 4]), torch.randn(2, 2)
    with pytest.raises(ValueError, match="sha256"):
        export_onnx(m, x, tmp_path / "a.onnx", certificate_sha256="not-a-sha")
    with pytest.raises(ValueError, match="contradicts"):
        export_onnx(m, x, tmp_path / "a.onnx", certificate_sha256=CERT_SHA, metadata={CERTIFICATE_KEY: "e" * 64})
    with pytest.raises(TypeError):
        export_onnx(m, x, tmp_path / "a.onnx", certificate_sha256=CERT_SHA, metadata={"k": 3})
    assert list(tmp_path.iterdir()) == []


def test_log_onnx_to_mlflow(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = MlflowClient()
        exp = client.create_experiment("export", artifact_location=(tmp_path / "artifacts").as_uri())
        run = client.create_run(exp)
        res = export_onnx(mlp([2, 4]), torch.randn(3, 2), tmp_path / "m.onnx",
                          certificate_sha256=CERT_SHA)
        log_onnx_to_mlflow(res, run.info.run_id)
        assert [a.path for a in client.list_artifacts(run.info.run_id, "onnx")] == ["onnx/m.onnx"]
        local = client.download_artifacts(run.info.run_id, "onnx/m.onnx", str(tmp_path / "dl"))
        assert read_onnx_metadata(local)[CERTIFICATE_KEY] == CERT_SHA
        (tmp_path / "m.onnx").write_bytes(b"tampered")
        with pytest.raises(OnnxExportError, match="hashes to"):
            log_onnx_to_mlflow(res, run.info.run_id)
    finally:
        mlflow.set_tracking_uri(None)


# ------------------------------------------------------------------------------ audit
@pytest.fixture(scope="module")
def champion_lid():
    torch.manual_seed(0)
    x, y = blobs(n=600, n_classes=4, seed=0)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    model = mlp([2, 16, 4])
    opt = torch.optim.Adam(model.parameters(), 5e-2)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:400]), y[:400]).backward()
        opt.step()
    return lid_engine.LID.certify(
        model, [Box.around(model, r) for r in (1e-3, 1e-2)], {"t1": (x[400:], y[400:])},
        {"t1": lid_engine.Spec("accuracy", 0.5)},
    )


def _records(lid):
    c = lid.certificates[0]["t1"]
    champion = VersionAudit(
        version="3", status="promoted", is_champion=True, created="2025-01-03T00:00:00+00:00", verified=True,
        tasks=[TaskAudit("t1", c.tau, lid.certified_accuracy("t1"), lid.lower_bound("t1"), c.n, True, [])],
        block_reasons=[], lid=lid,
    )
    blocked = VersionAudit(
        version="4", status="blocked", is_champion=False, created="2025-01-04T00:00:00+00:00", verified=True,
        tasks=[TaskAudit("t1", 0.5, 0.41, 0.37, 200, True, [])],
        block_reasons=[{"code": "below_tau", "detail": "t1 certified accuracy 0.41 < τ 0.5"},
                       {"code": "outside_lid", "detail": "update left the champion's LID <b>badly</b>"}],
        lid=None,
    )
    evil = VersionAudit(
        version="<script>alert(1)</script>", status="pending", is_champion=False, created="", verified=False,
        tasks=[], block_reasons=[], lid=None,
    )
    return [champion, blocked, evil]


def test_audit_report(tmp_path, champion_lid):
    records = _records(champion_lid)
    html_path, json_path = render_audit_report(records, tmp_path / "audit", model_name="blobs<&>", save_plots=True)
    assert html_path.name == "report.html" and json_path.name == "summary.json"
    page = html_path.read_text(encoding="utf-8")

    # self-contained: no external resources, three embedded PNGs
    assert "<script" not in page.lower() and "<link" not in page.lower()
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == 3
    for data in imgs:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "blobs&lt;&amp;&gt;" in page and "&lt;b&gt;badly&lt;/b&gt;" in page
    assert lid_engine.__version__ in page

    rows = re.findall(r'<tr class="version-row" data-status="([^"]*)">(.*?)</tr>', page, flags=re.S)
    assert [s for s, _ in rows] == ["promoted", "blocked", "pending"]
    assert "★ champion" in rows[0][1] and "★" not in rows[1][1]
    assert "below_tau" in rows[1][1] and "outside_lid" in rows[1][1]
    assert "✗" in rows[2][1] and "✓" in rows[0][1]
    for stem in ("plot_accuracy", "plot_widths", "plot_checkpoints"):
        assert (tmp_path / "audit" / f"{stem}.png").is_file()

    summary = json.loads(json_path.read_text(encoding="utf-8"))
    assert summary["ok"] is True and summary["champion"] == "3" and summary["model_name"] == "blobs<&>"
    assert [v["version"] for v in summary["versions"]] == [r.version for r in records]
    assert [v["status"] for v in summary["versions"]] == ["promoted", "blocked", "pending"]
    assert summary["versions"][0]["lid"]["n_members"] == 2
    assert summary["versions"][1]["block_reasons"][0] == {"code": "below_tau", "detail": "t1 certified accuracy 0.41 < τ 0.5"}
    for r, v in zip(records, summary["versions"]):  # round trip (the LID itself is not serialised)
        back = VersionAudit.from_dict(v)
        assert back == VersionAudit(**{**r.__dict__, "lid": None})


def test_audit_ok_flag_and_edge_cases(tmp_path, champion_lid):
    records = _records(champion_lid)
    records[0].verified = False  # the champion no longer re-verifies
    records[0].tasks[0].failures = ["data_sha256 mismatch"]
    _, json_path = render_audit_report(records, tmp_path / "a", model_name="m")
    summary = json.loads(json_path.read_text())
    assert summary["ok"] is False and summary["problems"]
    assert "data_sha256 mismatch" in (tmp_path / "a" / "report.html").read_text()

    # no LID anywhere, no tasks, no versions: still renders
    no_lid = [VersionAudit("1", "blocked", False, "", True, [], [], None)]
    html_path, json_path = render_audit_report(no_lid, tmp_path / "b", model_name="m")
    assert json.loads(json_path.read_text())["ok"] is True
    assert "<img" not in html_path.read_text()
    html_path, json_path = render_audit_report([], tmp_path / "c", model_name="m")
    assert json.loads(json_path.read_text())["versions"] == []
    assert "no model versions" in html_path.read_text()


def _png_size(png: bytes) -> tuple[int, int]:
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


@pytest.fixture(scope="module")
def frozen_bias_lid(champion_lid):
    """One member whose biases have no width at all (as a frozen-coordinate mask leaves them)."""
    model = mlp([2, 16, 4])
    model.load_state_dict(champion_lid.state(), strict=False)
    params = dict(model.named_parameters())
    lower = {n: p.detach() - (0.0 if n.endswith("bias") else 1e-3) for n, p in params.items()}
    upper = {n: p.detach() + (0.0 if n.endswith("bias") else 1e-3) for n, p in params.items()}
    x, y = blobs(n=300, n_classes=4, seed=1)
    return lid_engine.LID.certify(model, [Box(lower=lower, upper=upper)],
                                  {"t1": (torch.from_numpy(x), torch.from_numpy(y))},
                                  {"t1": lid_engine.Spec("accuracy", 0.3)})


def test_zero_width_tensors_are_one_line_not_empty_panels(tmp_path, frozen_bias_lid):
    from components.audit.plots import plot_width_histograms

    widths = plot_width_histograms(frozen_bias_lid, 0)
    assert [n for n, _ in widths.zero] == ["0.bias", "2.bias"] and widths.zero[0][1] == 16
    assert _png_size(widths.png)[1] == 360  # one row of panels: the two weight tensors only
    record = VersionAudit("1", "promoted", True, "2025-01-01T00:00:00+00:00", True,
                          [TaskAudit("t1", 0.3, frozen_bias_lid.certified_accuracy("t1"), 0.2, 300, True)],
                          [], frozen_bias_lid)
    html_path, _ = render_audit_report([record], tmp_path, model_name="m", save_plots=True)
    page = html_path.read_text(encoding="utf-8")
    assert "all widths are 0" not in page
    [line] = re.findall(r'<p class="note zero-widths">(.*?)</p>', page)
    assert "<code>0.bias</code> (16)" in line and "<code>2.bias</code> (4)" in line
    assert _png_size((tmp_path / "plot_widths.png").read_bytes()) == _png_size(widths.png)


def test_every_width_zero_gives_no_histogram_figure(tmp_path, champion_lid):
    from components.audit.plots import plot_width_histograms

    model = mlp([2, 16, 4])
    model.load_state_dict(champion_lid.state(), strict=False)
    x, y = blobs(n=200, n_classes=4, seed=2)
    lid = lid_engine.LID.certify(model, [Box.around(model, 0.0)], {"t1": (torch.from_numpy(x), torch.from_numpy(y))},
                                 {"t1": lid_engine.Spec("accuracy", 0.3)})
    widths = plot_width_histograms(lid, 0)
    assert widths.png is None and len(widths.zero) == 4
    html_path, _ = render_audit_report([VersionAudit("1", "promoted", True, "", True, [], [], lid)], tmp_path,
                                       model_name="m")
    page = html_path.read_text(encoding="utf-8")
    figure = re.search(r'<figure id="plot_widths">(.*?)</figure>', page, flags=re.S).group(1)
    assert "<img" not in figure and "allows no change to any parameter" in figure and "zero-widths" in figure


def test_versions_table_is_bounded_however_many_tasks(tmp_path):
    """Tasks are lines inside a cell, not three columns each; the table sits in a container that
    bounds its width (scrolling inside it if a window is narrower still) and long reasons wrap."""
    tasks = [TaskAudit(f"task-{k} (LID of v{k})", 0.8, 0.9, 0.85, 1000, k % 2 == 0, ["x" * 300] if k % 2 else [])
             for k in range(12)]
    reasons = [{"code": f"code_{k}", "detail": "a-very-long-unbroken-detail-" * 20} for k in range(6)]
    records = [VersionAudit(str(v), "blocked", False, "2025-01-01T00:00:00.123+00:00", False, tasks, reasons, None)
               for v in range(1, 4)]
    html_path, _ = render_audit_report(records, tmp_path, model_name="m")
    page = html_path.read_text(encoding="utf-8")
    assert re.search(r'<div class="table-wrap"><table id="versions"', page)
    css = re.search(r"<style>(.*?)</style>", page, flags=re.S).group(1)
    assert re.search(r"\.table-wrap\{[^}]*max-width:100%[^}]*overflow-x:auto", css)
    assert re.search(r"td\.reasons\{[^}]*overflow-wrap:anywhere", css)
    head = re.search(r'<table id="versions".*?<thead>(.*?)</thead>', page, flags=re.S).group(1)
    assert head.count("<th") == 6  # independent of the number of tasks
    rows = re.findall(r'<tr class="version-row" data-status="blocked">(.*?)</tr>', page, flags=re.S)
    assert len(rows) == 3
    for row in rows:
        assert row.count('<span class="task">') == 12
        assert "<details><summary>" in row  # 6 reasons + 1 distinct failure: the rest folded away
        assert row.count("x" * 300) == 1  # one failure shared by 6 tasks is listed once
        assert "2025-01-01 00:00 UTC" in row
