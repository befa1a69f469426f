"""The ``lidgate`` CLI: exit codes 0 (ok) / 1 (verification failed) / 2 (bad input), one-line
messages on stderr and never a traceback; ``inspect`` and ``verify`` on a saved LID; a full
``certify`` → ``verify`` → ``inspect`` round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from flows.cli import app
from lid_engine import Box, Spec
from lid_engine.lid import LID
from tests.helpers.cli_models import mlp

FACTORY = "tests.helpers.cli_models:mlp"
runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    model = mlp().eval()
    save_file(model.state_dict(), str(d / "w.safetensors"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 5, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    np.savez(d / "data.npz", x=x.numpy(), y=y.numpy())
    cx = torch.randn(150, 5, generator=g)  # held out: disjoint from the search data
    with torch.no_grad():
        cy = model(cx).argmax(1)
    np.savez(d / "cert.npz", x=cx.numpy(), y=cy.numpy())
    np.savez(d / "no_y.npz", x=x.numpy())
    np.savez(d / "bad_shape.npz", x=np.zeros((10, 7), np.float32), y=np.zeros(10, np.int64))
    np.savez(d / "bad_labels.npz", x=x[:10].numpy(), y=np.full(10, 9))
    (d / "not.npz").write_text("not a zip file")
    (d / "random.npz").write_bytes(np.random.default_rng(0).bytes(2000))
    np.savez(d / "huge.npz", x=np.full((10, 5), 3e38, np.float32), y=np.zeros(10, np.int64))
    state = model.state_dict()
    save_file({k: v for k, v in state.items() if k != "2.bias"}, str(d / "missing_key.safetensors"))
    save_file({**state, "extra": torch.zeros(1)}, str(d / "extra_key.safetensors"))
    save_file({**state, "2.bias": torch.zeros(4)}, str(d / "bad_shape.safetensors"))
    lid = LID.certify(model, [Box.around(model, r) for r in (0.001, 0.01)], {"task": (cx, cy)}, {"task": Spec("accuracy", 0.8)})
    lid.save(d / "lid")
    other = mlp()
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-6
    save_file(other.state_dict(), str(d / "other.safetensors"))
    return {p.name: p for p in d.iterdir()}


def run(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_bad_input(result, *fragments: str):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    assert err.startswith("lidgate: error:") and len(err.splitlines()) == 1, err
    for f in fragments:
        assert f in err, err


# ------------------------------------------------------------------------------- bad input → 2
def test_bad_factory_strings(files, tmp_path):
    common = ["--weights", files["w.safetensors"], "--data", files["data.npz"], "--out", tmp_path / "o", "--tau", "0.8"]
    assert_bad_input(run("certify", "--model", "no_colon", *common), "package.module:factory")
    assert_bad_input(run("certify", "--model", "no_such_module_xyz:f", *common), "cannot import module 'no_such_module_xyz'")
    assert_bad_input(run("certify", "--model", "tests.helpers.cli_models:nope", *common), "no attribute 'nope'")
    assert_bad_input(run("certify", "--model", "tests.helpers.cli_models:broken", *common), "the factory failed")
    assert_bad_input(run("certify", "--model", "tests.helpers.cli_models:not_a_model", *common), "expected a torch.nn.Module")


def test_missing_files(files, tmp_path):
    assert_bad_input(run("certify", "--model", FACTORY, "--weights", tmp_path / "nope.safetensors", "--data",
                         files["data.npz"], "--out", tmp_path / "o", "--tau", "0.8"), "--weights", "does not exist")
    assert_bad_input(run("certify", "--model", FACTORY, "--weights", files["w.safetensors"], "--data",
                         tmp_path / "nope.npz", "--out", tmp_path / "o", "--tau", "0.8"), "--data", "does not exist")
    assert_bad_input(run("verify", tmp_path / "no_dir", "--model", FACTORY, "--weights", files["w.safetensors"],
                         "--data", files["cert.npz"]), "is not a directory")
    assert_bad_input(run("inspect", tmp_path / "no_dir"), "is not a directory")


@pytest.mark.parametrize("weights,fragment", [
    ("missing_key.safetensors", "missing keys ['2.bias']"),
    ("extra_key.safetensors", "unexpected keys ['extra']"),
    ("bad_shape.safetensors", "'2.bias' has shape (4,)"),
    ("data.npz", "not a readable safetensors file"),
])
def test_bad_weights(files, tmp_path, weights, fragment):
    assert_bad_input(run("verify", files["lid"], "--model", FACTORY, "--weights", files[weights],
                         "--data", files["cert.npz"]), fragment)


@pytest.mark.parametrize("data,fragment", [
    ("no_y.npz", "no array 'y'"),
    ("not.npz", "not an .npz archive"),
    ("random.npz", "not an .npz archive"),  # not numpy's "pickled data" message
    ("huge.npz", "outputs on these features are NaN or infinite (largest |feature| 3e+38)"),
    ("bad_shape.npz", "cannot take 'x' of shape (10, 7)"),
    ("bad_labels.npz", "labels must lie in 0..2"),
])
def test_bad_data(files, tmp_path, data, fragment):
    assert_bad_input(run("verify", files["lid"], "--model", FACTORY, "--weights", files["w.safetensors"],
                         "--data", files[data]), fragment)
    assert_bad_input(run("certify", "--model", FACTORY, "--weights", files["w.safetensors"], "--data", files[data],
                         "--out", tmp_path / "o", "--tau", "0.8"), fragment)


def test_bad_options(files, tmp_path):
    base = ["certify", "--model", FACTORY, "--weights", files["w.safetensors"], "--data", files["data.npz"]]
    assert_bad_input(run(*base, "--out", tmp_path / "o"), "exactly one of --tau and --tau-from-accuracy")
    assert_bad_input(run(*base, "--out", tmp_path / "o", "--tau", "0.8", "--tau-from-accuracy", "0.1"), "exactly one")
    assert_bad_input(run(*base, "--out", tmp_path / "o", "--tau", "1.5"), "--tau must lie in [0, 1]")
    assert_bad_input(run(*base, "--out", tmp_path / "o", "--tau", "0.8", "--cert-fraction", "1.0"), "--cert-fraction")
    assert_bad_input(run(*base, "--out", tmp_path / "o", "--tau", "0.8", "--cert-data", files["cert.npz"],
                         "--cert-fraction", "0.2"), "at most one of --cert-data and --cert-fraction")
    assert_bad_input(run(*base, "--out", files["lid"], "--tau", "0.8"), "not an empty directory")
    assert_bad_input(run(*base, "--out", tmp_path / "o", "--tau", "0.8", "--cert-data", files["data.npz"]),
                     "400 of its 400 examples also occur in --data")
    assert_bad_input(run(*base, "--out", tmp_path / "o", "--tau", "0.8", "--bound", "zonotope"),
                     "--bound must be 'ibp' or 'linear'")


def test_linear_bound_crosses_a_layer_without_relaxation_with_ibp_and_records_it(files, tmp_path):
    from tests.helpers.cli_models import bn_mlp

    save_file(bn_mlp().state_dict(), str(tmp_path / "bn.safetensors"))
    result = run("certify", "--model", "tests.helpers.cli_models:bn_mlp", "--weights", tmp_path / "bn.safetensors",
                 "--data", files["data.npz"], "--out", tmp_path / "o", "--tau", "0.3", "--bound", "linear",
                 "--iterations", "5", "--checkpoints", "1")
    assert result.exit_code == 0, result.output
    cert = LID.load(tmp_path / "o").certificate(0)
    assert cert.bound_method == "linear" and cert.linear_fallbacks == ["1 (BatchNorm1d)"]
    assert "IBP intervals at 1 (BatchNorm1d)" in cert.statement()


# ------------------------------------------------------------------------------- inspect / verify
def test_inspect(files):
    result = run("inspect", files["lid"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "widths per parameter tensor" in out and "0.weight" in out
    assert "Clopper–Pearson" in out and "union of the 2" in out
    lid = LID.load(files["lid"])
    assert f"{lid.lower_bound():.4f}" in out


def test_verify_ok_and_json(files):
    args = ["verify", files["lid"], "--model", FACTORY, "--weights", files["w.safetensors"], "--data", files["cert.npz"]]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert "VERIFIED" in result.stdout
    result = run(*args, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["ok"] is True


def test_verify_fails_on_other_model_and_tampering(files, tmp_path):
    result = run("verify", files["lid"], "--model", FACTORY, "--weights", files["other.safetensors"], "--data", files["cert.npz"])
    assert result.exit_code == 1 and "model fingerprint" in result.stdout
    result = run("verify", files["lid"], "--model", FACTORY, "--weights", files["other.safetensors"],
                 "--data", files["cert.npz"], "--allow-update")
    assert result.exit_code == 0, result.output  # a 1e-6 change stays inside the LID
    d = Path(shutil.copytree(files["lid"], tmp_path / "t"))
    manifest = json.loads((d / "lid.json").read_text())
    manifest["members"][1]["certificates"]["task"]["certified"] += 1
    (d / "lid.json").write_text(json.dumps(manifest))
    result = run("verify", d, "--model", FACTORY, "--weights", files["w.safetensors"], "--data", files["cert.npz"])
    assert result.exit_code == 3 and "VERIFICATION FAILED" in result.stdout  # 3: the files were tampered with
    result = run("inspect", d)
    assert result.exit_code == 3 and "integrity check failed" in result.stderr and "digest" in result.stderr
    result = run("verify", files["lid"], "--model", FACTORY, "--weights", files["w.safetensors"], "--data", files["data.npz"])
    assert result.exit_code == 1 and "data 'task' fingerprint" in result.stdout


# ------------------------------------------------------------------------------- certify end to end
def certify_quick(files, out, *extra):
    """A short 'lidgate certify' run on the shared test data: τ 0.6, 20 iterations, 2 checkpoints."""
    return run("certify", "--model", FACTORY, "--weights", files["w.safetensors"], "--data", files["data.npz"],
               "--out", out, "--tau", "0.6", "--iterations", "20", "--checkpoints", "2", "--batch-size", "200", *extra)


def test_certify_verify_inspect(files, tmp_path):
    out = tmp_path / "lid"
    result = certify_quick(files, out, "--seed", "3")
    assert result.exit_code == 0, result.output
    assert (out / "lid.json").is_file() and (out / "cert_data.npz").is_file()
    lid = LID.load(out)
    assert lid.meets_spec() and lid.tasks["task"].tau == 0.6
    with np.load(out / "cert_data.npz") as f:
        assert len(f["y"]) == 120  # 30% of 400 held out, disjoint from the search data
        assert lid.certificates[0]["task"].n == 120
    result = run("verify", out, "--model", FACTORY, "--weights", files["w.safetensors"])  # default: DIR/cert_data.npz
    assert result.exit_code == 0, result.output
    result = run("inspect", out)
    assert result.exit_code == 0, result.output


def test_signed_certificate_is_checked_by_verify(files, tmp_path):
    """--sign-key writes OUT/certificate.dsse.json; verify --public-key accepts it only when a trusted key
    signed exactly this LID and its data: exit 3 (integrity) otherwise, 2 for an unreadable key file."""
    run("keygen", "--private", tmp_path / "k.pem", "--public", tmp_path / "k.pub")
    run("keygen", "--private", tmp_path / "o.pem", "--public", tmp_path / "o.pub")
    out = tmp_path / "lid"
    assert certify_quick(files, out, "--sign-key", tmp_path / "k.pem").exit_code == 0
    verify = ("verify", out, "--model", FACTORY, "--weights", files["w.safetensors"])
    assert run(*verify, "--public-key", tmp_path / "k.pub").exit_code == 0
    result = run(*verify, "--public-key", tmp_path / "o.pub")
    assert result.exit_code == 3 and "unknown key" in result.stdout
    other = tmp_path / "other-data.npz"
    with np.load(out / "cert_data.npz") as f:
        np.savez(other, x=f["x"][:-1], y=f["y"][:-1])
    result = run(*verify, "--public-key", tmp_path / "k.pub", "--data", other)
    assert result.exit_code == 1 and "data 'task' fingerprint" in result.stdout  # wrong data, genuine files
    (out / "certificate.dsse.json").unlink()
    result = run(*verify, "--public-key", tmp_path / "k.pub")
    assert result.exit_code == 3 and "not signed" in result.stdout
    assert_bad_input(run(*verify, "--public-key", tmp_path / "missing.pub"), "--public-key", "missing.pub")


def test_certify_with_cert_data_and_tau_rule(files, tmp_path):
    out = tmp_path / "lid"
    result = run("certify", "--model", FACTORY, "--weights", files["w.safetensors"], "--data", files["data.npz"],
                 "--cert-data", files["cert.npz"], "--out", out, "--tau-from-accuracy", "0.4", "--iterations", "10",
                 "--checkpoints", "5", "--balanced")
    assert result.exit_code == 0, result.output
    lid = LID.load(out)
    assert lid.tasks["task"].kind == "balanced_accuracy" and lid.tasks["task"].tau == pytest.approx(0.6)
    assert not (out / "cert_data.npz").exists()
    result = run("verify", out, "--model", FACTORY, "--weights", files["w.safetensors"], "--data", files["cert.npz"])
    assert result.exit_code == 0, result.output


def test_certify_with_the_linear_bound(files, tmp_path):
    out = tmp_path / "lid"
    result = certify_quick(files, out, "--bound", "linear")
    assert result.exit_code == 0, result.output
    lid = LID.load(out)
    assert lid.meets_spec() and lid.certificate(0).bound_method == "linear"
    result = run("verify", out, "--model", FACTORY, "--weights", files["w.safetensors"])
    assert result.exit_code == 0, result.output
    result = run("inspect", out)
    assert result.exit_code == 0 and "linear" in result.stdout, result.output


def test_verify_fails_when_genuine_certificates_promise_less_than_tau(files, tmp_path):
    model = mlp().eval()
    with np.load(files["cert.npz"]) as f:
        cx, cy = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
    boxes = [Box.around(model, r) for r in (0.001, 3.0)]  # the wide member cannot certify 0.8
    lid = LID.certify(model, boxes, {"task": (cx, cy)}, {"task": Spec("accuracy", 0.8)})
    assert lid.certificate(1).certified_accuracy < 0.8 <= lid.certificate(0).certified_accuracy
    lid.save(tmp_path / "mixed")
    args = ("--model", FACTORY, "--weights", files["w.safetensors"], "--data", files["cert.npz"])
    result = run("verify", tmp_path / "mixed", *args)  # the nominal model: the best member meets τ
    assert result.exit_code == 0, result.output

    only_wide = LID.certify(model, boxes[1:], {"task": (cx, cy)}, {"task": Spec("accuracy", 0.8)})
    only_wide.save(tmp_path / "wide")
    result = run("verify", tmp_path / "wide", *args)
    assert result.exit_code == 1 and "VERIFIED" in result.stdout and "BELOW τ" in result.stdout
    assert "task 'task': every member certifies at most 0.0000 < τ 0.8" in " ".join(result.stdout.split())
    result = run("verify", tmp_path / "wide", *args, "--json")
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["ok"] and not report["meets_tau"] and report["below_tau"]


def test_an_mlflow_server_that_does_not_answer_is_bad_input_in_seconds(tmp_path, monkeypatch):
    """MLflow's client would retry for minutes; the CLI asks the server's /health first."""
    import os

    import yaml

    from tests.helpers.paths import REPO

    monkeypatch.setattr(os, "environ", dict(os.environ))  # the entry point sets its defaults here
    os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"  # nothing listens on the discard port
    os.environ["LIDGATE_HOME"] = str(tmp_path / "home")
    config = yaml.safe_load((REPO / "examples" / "digits" / "lidgate.yaml").read_text())
    config["code"] = [str(REPO)]
    path = tmp_path / "lidgate.yaml"
    path.write_text(yaml.safe_dump(config))
    assert_bad_input(run("status", path), "registry.tracking_uri", "http://127.0.0.1:9 does not answer")


def test_verify_refuses_data_from_another_feature_extractor(files, tmp_path):
    """Embeddings carry a 'features' record (which encoder computed them); a LID certified on one
    encoder's embeddings does not verify on data that says it came from another, even with equal numbers."""
    with np.load(files["data.npz"]) as f:
        x, y = f["x"], f["y"]
    record = {"encoder": "enc-a", "encoder_sha256": "a" * 64, "recipe": "mean"}
    data = tmp_path / "embedded.npz"
    np.savez(data, x=x, y=y, features=np.array(json.dumps(record, sort_keys=True)))
    out = tmp_path / "lid"
    result = run("certify", "--model", FACTORY, "--weights", files["w.safetensors"], "--data", data, "--out", out,
                 "--tau", "0.6", "--iterations", "20", "--checkpoints", "2", "--batch-size", "200")
    assert result.exit_code == 0, result.output
    assert LID.load(out).search_config["features"] == record
    assert run("verify", out, "--model", FACTORY, "--weights", files["w.safetensors"]).exit_code == 0
    with np.load(out / "cert_data.npz") as f:
        cx, cy = f["x"], f["y"]
    other = tmp_path / "other-encoder.npz"
    np.savez(other, x=cx, y=cy, features=np.array(json.dumps({**record, "encoder_sha256": "b" * 64}, sort_keys=True)))
    result = run("verify", out, "--model", FACTORY, "--weights", files["w.safetensors"], "--data", other, "--json")
    assert result.exit_code == 1, result.output
    failed = {c["name"]: c["detail"] for c in json.loads(result.stdout)["checks"] if not c["ok"]}
    assert list(failed) == ["features of 'other-encoder.npz'"]
    assert "enc-a " + "a" * 64 in failed["features of 'other-encoder.npz'"] and "b" * 64 in failed[
        "features of 'other-encoder.npz'"]
    unrecorded = tmp_path / "unrecorded.npz"
    np.savez(unrecorded, x=cx, y=cy)
    result = run("verify", out, "--model", FACTORY, "--weights", files["w.safetensors"], "--data", unrecorded)
    assert result.exit_code == 1 and "an unrecorded feature extractor" in result.output


def test_certify_and_verify_a_parquet_set_larger_than_the_memory_budget(files, tmp_path):
    """--cert-data / --data as Parquet: read in chunks of at most --memory-mb; the certificate records the
    fingerprint the same rows give in memory, verify re-reads them chunk by chunk, a signature covers them."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lid_engine import fingerprint_data

    model = mlp().eval()
    g = torch.Generator().manual_seed(5)
    cx = torch.randn(60000, 5, generator=g)  # 1.2 MB of float32 features, more than --memory-mb 1
    with torch.no_grad():
        cy = model(cx).argmax(1)
    frame = pd.DataFrame({f"f{i}": cx[:, i].numpy() for i in range(5)} | {"digit": cy.numpy()})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "cert.parquet", row_group_size=4096)
    run("keygen", "--private", tmp_path / "k.pem", "--public", tmp_path / "k.pub")
    out = tmp_path / "lid"
    result = run("certify", "--model", FACTORY, "--weights", files["w.safetensors"], "--data", files["data.npz"],
                 "--cert-data", tmp_path / "cert.parquet", "--label", "digit", "--memory-mb", "1", "--out", out,
                 "--tau", "0.5", "--iterations", "10", "--checkpoints", "2", "--sign-key", tmp_path / "k.pem")
    assert result.exit_code == 0, result.output
    lid = LID.load(out)
    assert lid.certificates[0]["task"].n == 60000
    assert lid.certificates[0]["task"].data_sha256 == fingerprint_data(cx, cy)
    verify = ("verify", out, "--model", FACTORY, "--weights", files["w.safetensors"], "--data", tmp_path / "cert.parquet",
              "--label", "digit", "--memory-mb", "1", "--public-key", tmp_path / "k.pub")
    result = run(*verify)
    assert result.exit_code == 0, result.output
    pq.write_table(pa.Table.from_pandas(frame.iloc[:-1], preserve_index=False), tmp_path / "cert.parquet",
                   row_group_size=4096)
    result = run(*verify)
    assert result.exit_code == 1 and "data 'task' fingerprint" in result.stdout
    assert_bad_input(run(*verify[:-2], "--label", "nope"), "--data", "no label column 'nope'")
    assert_bad_input(run(*verify[:-2], "--shape", "2,x"), "--shape")
