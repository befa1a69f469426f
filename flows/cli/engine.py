"""Engine commands: certify a model, verify a saved LID, inspect one (no registry, no Prefect).

Heavy imports (torch, lid_engine) happen inside the commands so that ``lidgate --help`` is quick.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from flows.cli.app import EXIT_INTEGRITY, EXIT_NO, BadInput, Tampered, app
from flows.cli.app import cli_errors as _cli_errors, console as _console

CERT_DATA_FILE = "cert_data.npz"


# ----------------------------------------------------------------------------------- loaders
def _load_factory(spec: str):
    """``package.module:factory`` (or ``path/to/file.py:factory``) → the model the factory returns.

    Modules are imported from the current directory too (as ``python -m`` would).
    """
    from components.factory import FactoryError, build_model

    try:
        return build_model(spec, field="--model", roots=[os.getcwd()])
    except FactoryError as exc:
        raise BadInput(str(exc)) from None


def _load_weights(model, path: Path):
    """Load a safetensors state dict strictly: same keys, shapes and dtypes as the model's."""
    from components.weights import WeightsError, load_weights

    try:
        return load_weights(model, path, field="--weights")
    except WeightsError as exc:
        raise BadInput(str(exc)) from None


def _load_npz(path: Path, option: str):
    """``x`` (float) and ``y`` (integer class indices) from an npz file, as torch tensors (checked by the
    same reader the pipeline uses: no pickles, finite features, integer labels)."""
    import torch

    from components.data import DataError, read_npz

    if not path.is_file():
        raise BadInput(f"{option}: file '{path}' does not exist")
    try:
        x, y = read_npz(path.read_bytes(), f"{option} '{path}'")
    except DataError as exc:
        raise BadInput(str(exc)) from None
    if len(x) == 0:
        raise BadInput(f"{option}: 'x' in '{path}' must be a non-empty batch (N, ...), got shape {x.shape}")
    return torch.from_numpy(x), torch.from_numpy(y)


def _npz_features(path: Path, option: str) -> dict | None:
    """The ``features`` record of an npz file (how its features were computed, e.g. a frozen encoder's
    sha256), or None when it has none."""
    from components.data import DataError, read_npz_features

    try:
        return read_npz_features(path.read_bytes(), f"{option} '{path}'")
    except DataError as exc:
        raise BadInput(str(exc)) from None


def _features_problem(recorded: dict, given: dict | None) -> str | None:
    """Why data whose features are described by ``given`` are not the data the LID was certified on."""
    from components.data import describe_features, features_mismatch

    differ = features_mismatch(recorded, given)
    if differ is None:
        return None
    return (f"the certificates hold for features computed by {describe_features(recorded)}; this data was computed "
            f"by {describe_features(given)} (the records differ in {differ}) — a certificate over one feature "
            "extractor's outputs says nothing about another's")


def _check_fits(model, x, y, option: str) -> int:
    """Run the model on two examples: the shapes must fit and the labels must index its outputs."""
    import torch

    from components.data import DataError, check_model_outputs

    p = next(model.parameters(), None)
    if p is None:
        raise BadInput("--model: the model has no parameters")
    try:
        with torch.no_grad():
            out = model(x[:2].to(p.device, p.dtype))
    except Exception as exc:  # noqa: BLE001
        raise BadInput(f"{option}: the model cannot take 'x' of shape {tuple(x.shape)} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if out.dim() == 2:
        try:
            check_model_outputs(model, x, option)
        except DataError as exc:
            raise BadInput(str(exc)) from None
    if out.dim() != 2:
        raise BadInput(f"--model: the model must output logits of shape (N, classes), got {tuple(out.shape)}")
    n_out = out.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= n_out:
        raise BadInput(f"{option}: labels must lie in 0..{n_out - 1} (the model has {n_out} outputs), "
                       f"got {int(y.min())}..{int(y.max())}")
    return n_out


def _shared_rows(x, cx) -> int:
    """How many rows of ``cx`` (tensors, or a stream read chunk by chunk) occur (bit for bit) in ``x``."""
    from lid_engine import CertificationStream

    seen = {row.tobytes() for row in x.reshape(len(x), -1).numpy()}
    chunks = (c for c, _ in cx.chunks()) if isinstance(cx, CertificationStream) else [cx]
    return sum(row.tobytes() in seen for c in chunks for row in c.to(x.dtype).reshape(len(c), -1).numpy())


def _shape_option(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise BadInput(f"--shape must be positive integers separated by commas (e.g. 1,28,28), got {text!r}")
    return dims


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in (".parquet", ".pq")


def _parquet_stream(path: Path, option: str, label: str, memory_mb: int, shape=None):
    """A Parquet certification file as a stream: every column but ``label`` is a feature, rows are
    reshaped to ``shape`` (the search data's), at most ``memory_mb`` MiB of features in memory."""
    from components.config import DataSection
    from components.data import DataError
    from components.streaming import ParquetStream

    if not path.is_file():
        raise BadInput(f"{option}: file '{path}' does not exist")
    if memory_mb < 1:
        raise BadInput(f"--memory-mb must be a positive integer, got {memory_mb}")
    section = DataSection.model_construct(label=label, shape=list(shape) if shape is not None and len(shape) > 1 else None)
    try:
        return ParquetStream(path, section, memory_mb)
    except DataError as exc:
        raise BadInput(f"{option}: {exc}") from None


# ----------------------------------------------------------------------------------- certify
@app.command()
def certify(
    model: Annotated[str, typer.Option("--model", help="Model factory 'package.module:factory' (called with no arguments).")],
    weights: Annotated[Path, typer.Option("--weights", help="Trained weights (safetensors state dict).")],
    data: Annotated[Path, typer.Option("--data", help="npz with arrays x, y: data for the search.")],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the LID to (must be empty or absent).")],
    tau: Annotated[Optional[float], typer.Option("--tau", help="Required certified accuracy τ.")] = None,
    tau_from_accuracy: Annotated[Optional[float], typer.Option(
        "--tau-from-accuracy", metavar="DELTA", help="τ = max(acc − DELTA, acc/2), acc = nominal accuracy on the search data.")] = None,
    cert_data: Annotated[Optional[Path], typer.Option(
        "--cert-data", help="Held-out certification data: npz with x, y, or a Parquet file (feature columns and a "
        "--label column) read in chunks of at most --memory-mb, for sets larger than memory.")] = None,
    label: Annotated[str, typer.Option("--label", help="The label column of a Parquet --cert-data.")] = "label",
    memory_mb: Annotated[int, typer.Option(
        "--memory-mb", help="Parquet --cert-data: MiB of feature values held in memory at a time.")] = 512,
    cert_fraction: Annotated[Optional[float], typer.Option(
        "--cert-fraction", help="Without --cert-data: fraction of --data held out for certification (default 0.3).")] = None,
    iterations: Annotated[int, typer.Option("--iterations")] = 200,
    checkpoints: Annotated[int, typer.Option("--checkpoints")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 500,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    confidence: Annotated[float, typer.Option("--confidence")] = 0.95,
    balanced: Annotated[bool, typer.Option("--balanced", help="Certify balanced accuracy instead of accuracy.")] = False,
    bound: Annotated[str, typer.Option(
        "--bound", help="Sound bound for the search and the certificates: 'ibp' (the paper's) or 'linear' "
        "(tighter on convolutions; Linear/Conv2d/ReLU models).")] = "ibp",
    sign_key: Annotated[Optional[Path], typer.Option(
        "--sign-key", help="Ed25519 private key (`lidgate keygen`): also write the signed certificate "
        "(in-toto statement in a DSSE envelope) to OUT/certificate.dsse.json.")] = None,
) -> None:
    """Search and certify an LID around a trained model; write it to --out."""
    with _cli_errors():
        if sign_key is not None:
            from components.signing import load_private_key

            load_private_key(sign_key, "--sign-key")  # a key that does not load fails now, not after the search
        if bound not in ("ibp", "linear"):
            raise BadInput(f"--bound must be 'ibp' or 'linear', got {bound!r}")
        if (tau is None) == (tau_from_accuracy is None):
            raise BadInput("give exactly one of --tau and --tau-from-accuracy")
        if tau is not None and not 0.0 <= tau <= 1.0:
            raise BadInput(f"--tau must lie in [0, 1], got {tau}")
        if tau_from_accuracy is not None and not 0.0 <= tau_from_accuracy <= 1.0:
            raise BadInput(f"--tau-from-accuracy must lie in [0, 1], got {tau_from_accuracy}")
        if cert_data is not None and cert_fraction is not None:
            raise BadInput("give at most one of --cert-data and --cert-fraction")
        if cert_fraction is not None and not 0.0 < cert_fraction < 1.0:
            raise BadInput(f"--cert-fraction must lie strictly between 0 and 1, got {cert_fraction}")
        if not 0.0 < confidence < 1.0:
            raise BadInput(f"--confidence must lie strictly between 0 and 1, got {confidence}")
        if iterations < 1 or batch_size < 1 or not 1 <= checkpoints <= iterations:
            raise BadInput("need --iterations ≥ 1, --batch-size ≥ 1 and 1 ≤ --checkpoints ≤ --iterations")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise BadInput(f"--out: '{out}' exists and is not an empty directory")

        import numpy as np
        import torch

        net = _load_weights(_load_factory(model), weights)
        x, y = _load_npz(data, "--data")
        _check_fits(net, x, y, "--data")
        features = _npz_features(data, "--data")
        if cert_data is not None:
            if _is_parquet(cert_data):  # read in chunks: cx is a stream holding the labels too
                cx, cy = _parquet_stream(cert_data, "--cert-data", label, memory_mb, tuple(x.shape[1:])), None
                _check_fits(net, *cx.head(2), "--cert-data")
                if features is not None:
                    raise BadInput("--data records how its features were computed ('features'); a Parquet "
                                   "--cert-data cannot record it: give the certification data as an npz from the "
                                   "same extractor")
                shape = tuple(cx.feature_shape)
            else:
                cx, cy = _load_npz(cert_data, "--cert-data")
                _check_fits(net, cx, cy, "--cert-data")
                if _npz_features(cert_data, "--cert-data") != features:
                    raise BadInput("--cert-data: its 'features' record (how the features were computed) differs from "
                                   "--data's; expected search and certification data from one feature extractor")
                shape = tuple(cx.shape[1:])
            if shape != tuple(x.shape[1:]):
                raise BadInput(f"--cert-data: examples of shape {shape}, --data has {tuple(x.shape[1:])}")
            shared = _shared_rows(x, cx)
            if shared:
                raise BadInput(
                    f"--cert-data: {shared} of its {len(cx)} examples also occur in --data; the population bound "
                    "needs certification data the search never saw (remove the duplicates)"
                )
            split = False
        else:
            fraction = 0.3 if cert_fraction is None else cert_fraction
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
            n_cert = max(1, int(round(len(x) * fraction)))
            if n_cert >= len(x):
                raise BadInput(f"--data: {len(x)} examples are too few to hold out a certification fraction of {fraction}")
            cert_idx, search_idx = perm[:n_cert], perm[n_cert:]
            cx, cy = x[cert_idx].contiguous(), y[cert_idx].contiguous()
            x, y = x[search_idx].contiguous(), y[search_idx].contiguous()
            split = True

        from lid_engine.search import compute_lid

        if tau_from_accuracy is not None:
            from lid_engine.search import tau_from_accuracy as rule

            from lid_engine import accuracy

            acc = accuracy(net, x, y, balanced=balanced)
            tau = rule(acc, tau_from_accuracy)
            typer.echo(f"nominal {'balanced ' if balanced else ''}accuracy on the search data {acc:.4f} → τ = {tau:.4f}", err=True)

        lid = compute_lid(
            net, x, y, tau=tau, iterations=iterations, checkpoints=checkpoints, batch_size=batch_size, seed=seed,
            cert={"task": cx if cy is None else (cx, cy)}, confidence=confidence,
            spec_kind="balanced_accuracy" if balanced else "accuracy", method=bound,
        )
        if features is not None:
            lid.search_config["features"] = features  # verify refuses data from another encoder by name
        lid.save(out)
        if split:
            extra = {"features": np.array(json.dumps(features, sort_keys=True))} if features is not None else {}
            np.savez(out / CERT_DATA_FILE, x=cx.numpy(), y=cy.numpy(), **extra)
        _print_lid(lid, out)
        if sign_key is not None:
            from components.signing import SIGNATURE_FILE, sign_lid

            task = next(iter(lid.tasks))
            signed = sign_lid(out, out / SIGNATURE_FILE, sign_key, net, lid, {task: cx if cy is None else (cx, cy)})
            typer.echo(f"signed certificate written to {signed}")
        if split:
            typer.echo(f"held-out certification data written to {out / CERT_DATA_FILE} (needed by `lidgate verify`)")


# ----------------------------------------------------------------------------------- verify
@app.command()
def verify(
    directory: Annotated[Path, typer.Argument(help="A saved LID directory.")],
    model: Annotated[str, typer.Option("--model", help="Model factory 'package.module:factory'.")],
    weights: Annotated[Path, typer.Option("--weights", help="Weights of the model to check (safetensors).")],
    data: Annotated[Optional[list[str]], typer.Option(
        "--data", help=f"Certification data npz (x, y), or Parquet (read in chunks, see --label, --memory-mb); "
        f"TASK=PATH for several tasks. Default: DIR/{CERT_DATA_FILE}.")] = None,
    allow_update: Annotated[bool, typer.Option(
        "--allow-update", help="Accept any model inside the LID (a δ-safe update) instead of the nominal one.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    public_key: Annotated[Optional[list[Path]], typer.Option(
        "--public-key", help="Trusted Ed25519 public key (repeatable): the LID's DIR/certificate.dsse.json must be "
        "signed by one of them over this LID, its nominal model and the certification data.")] = None,
    label: Annotated[str, typer.Option("--label", help="The label column of Parquet --data.")] = "label",
    memory_mb: Annotated[int, typer.Option(
        "--memory-mb", help="Parquet --data: MiB of feature values held in memory at a time.")] = 512,
    shape: Annotated[Optional[str], typer.Option(
        "--shape", help="Parquet --data: the shape of one example, e.g. 1,28,28 (default: one row of features).")] = None,
) -> None:
    """Recompute every certificate of a saved LID and check the model against it (and, with
    --public-key, its signature)."""
    with _cli_errors():
        if not directory.is_dir():
            raise BadInput(f"'{directory}' is not a directory")
        net = _load_weights(_load_factory(model), weights)
        items = list(data or [])
        saved = not items  # the directory's own certification data: part of what is verified
        if saved:
            default = directory / CERT_DATA_FILE
            if not default.is_file():
                raise BadInput(f"--data is required (no {CERT_DATA_FILE} in '{directory}')")
            items = [str(default)]
        kwargs = {}
        dims = _shape_option(shape)

        def load(path: Path, option: str):
            if _is_parquet(path):
                stream = _parquet_stream(path, option, label, memory_mb, dims)
                _check_fits(net, *stream.head(2), option)
                return stream
            pair = _load_npz(path, option)
            _check_fits(net, *pair, option)
            return pair

        if len(items) == 1 and "=" not in items[0]:
            try:
                loaded = load(Path(items[0]), "--data")
            except BadInput as exc:
                if saved:
                    raise Tampered(f"the saved certification data is damaged: {exc}") from None
                raise
            if isinstance(loaded, tuple):
                kwargs.update(x=loaded[0], y=loaded[1])
            else:
                kwargs.update(x=loaded)
        else:
            mapping = {}
            for item in items:
                task, sep, path = item.partition("=")
                if not sep or not task or not path:
                    raise BadInput(f"--data: with several files use TASK=PATH, got {item!r}")
                if task in mapping:
                    raise BadInput(f"--data: task {task!r} given twice")
                mapping[task] = load(Path(path), f"--data {task}")
            kwargs["data"] = mapping

        from lid_engine.lid import LID
        from lid_engine.verify import verify as run_verify

        from components.data import features_record
        from components.signing import load_public_keys

        keys = load_public_keys(public_key or [], "--public-key")
        report = run_verify(directory, net, allow_update=allow_update, **kwargs)
        try:
            recorded = features_record(LID.load(directory).search_config)
        except Exception:  # noqa: BLE001 — a LID that does not load has failed verify's own checks already
            recorded = None
        if recorded is not None:
            for item in items:
                task, sep, path = item.partition("=")
                path = path if sep else item
                given = None if _is_parquet(Path(path)) else _npz_features(Path(path), "--data")
                problem = _features_problem(recorded, given)
                report.add(f"features of '{Path(path).name}'", problem is None,
                           problem or "computed as the certified data were (same feature extractor)")
        if keys:
            problem = _signature_problem(directory, keys)
            report.add("signature", problem is None, problem or "signed by a trusted key over this LID, its nominal "
                       "model and the certification data")
        below = _below_tau(directory, report) if report.ok else []
        if as_json:
            import json

            typer.echo(json.dumps({**report.to_dict(), "meets_tau": report.ok and not below, "below_tau": below},
                                  indent=2))
        else:
            _print_report(report)
            if below:
                _console().print("[bold red]BELOW τ[/bold red]: the certificates are genuine, but " + "; ".join(below))
        tampered = report.tampered or (saved and any(c.name.startswith("data '") for c in report.failures))
        if not report.ok or below:
            raise typer.Exit(EXIT_INTEGRITY if tampered else EXIT_NO)


def _signature_problem(directory: Path, keys: list) -> str | None:
    """Why ``directory``'s signature cannot be trusted with ``keys``, or None. The statement must name
    this ``lid.json``, its nominal model and the certification data its certificates record (the data
    given to verify is checked against the same record separately)."""
    import json

    from components.signing import SIGNATURE_FILE, SignatureError, signed_mismatch, subject_digests, verify_envelope
    from lid_engine.files import file_sha256

    path = directory / SIGNATURE_FILE
    try:
        if not path.is_file():
            raise SignatureError(f"the certificate is not signed (no {SIGNATURE_FILE} in '{directory}')")
        signed = subject_digests(verify_envelope(json.loads(path.read_text(encoding="utf-8")), keys))
        manifest = json.loads((directory / "lid.json").read_text(encoding="utf-8"))
        first = manifest["members"][0]["certificates"]
        expected = {"model": manifest["model_sha256"], "lid/lid.json": file_sha256(directory / "lid.json"),
                    **{f"cert_data/{t}": first[t]["data_sha256"] for t in manifest["tasks"]}}
    except SignatureError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 — anything unexpected is a failed check, never a pass
        return f"the signature could not be checked: {type(exc).__name__}: {exc}"
    return signed_mismatch(signed, expected)


def _below_tau(directory: Path, report) -> list[str]:
    """Genuine certificates can still promise less than τ (a LID kept with keep='all'): say where.
    The model's own member counts when it was located (--allow-update), otherwise the best member."""
    from lid_engine.lid import LID

    lid = LID.load(directory)
    members = [report.member] if report.member is not None else range(len(lid))
    problems = []
    for t, spec in lid.tasks.items():
        best = max(lid.certificate(i, t).certified_accuracy for i in members)
        if best < spec.tau:
            where = f"member {report.member}" if report.member is not None else "every member"
            problems.append(f"task '{t}': {where} certifies at most {best:.4f} < τ {spec.tau}")
    return problems


def _print_report(report) -> None:
    from rich.table import Table

    table = Table(title=f"lidgate verify {report.directory}")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for c in report.checks:
        table.add_row(c.name, "[green]ok[/green]" if c.ok else "[bold red]FAIL[/bold red]", c.detail)
    console = _console()
    console.print(table)
    if report.ok:
        console.print(f"[bold green]VERIFIED[/bold green]: all {len(report.checks)} checks passed"
                      + (f"; the model lies in member {report.member}" if report.member is not None else ""))
    else:
        console.print(f"[bold red]VERIFICATION FAILED[/bold red]: {len(report.failures)} of {len(report.checks)} checks "
                      f"failed: {', '.join(c.name for c in report.failures)}")


# ----------------------------------------------------------------------------------- inspect
@app.command()
def inspect(directory: Annotated[Path, typer.Argument(help="A saved LID directory.")]) -> None:
    """Show a saved LID: widths per layer, the certificate of every checkpoint, the guarantee in words."""
    with _cli_errors():
        if not directory.is_dir():
            raise BadInput(f"'{directory}' is not a directory")
        from lid_engine.lid import LID

        lid = LID.load(directory)
        _print_lid(lid, directory, widths=True)
        typer.echo("inspect checks the files' integrity only; `lidgate verify` recomputes the bounds.")


def _print_lid(lid, directory: Path, widths: bool = False) -> None:
    from rich.table import Table

    console = _console()
    config = lid.search_config if isinstance(lid.search_config, dict) else {}
    iters, kept = config.get("checkpoint_iterations"), config.get("member_indices", list(range(len(lid))))
    if widths:
        wt = Table(title="widths per parameter tensor")
        for col in ("member", "parameter", "numel", "sum", "mean", "max"):
            wt.add_column(col, justify="right" if col not in ("parameter",) else "left")
        for i, row in enumerate(lid.widths()):
            for name, s in row.items():
                wt.add_row(str(i), name, str(s["numel"]), f"{s['sum']:.6g}", f"{s['mean']:.6g}", f"{s['max']:.6g}")
        console.print(wt)
    ct = Table(title=f"LID {directory}: {len(lid)} member(s)")
    for col in ("member", "iter", "width sum", "task", "τ", "cert", "n", "metric", "LB", "≥τ"):
        ct.add_column(col, justify="right", no_wrap=True)
    sums = lid.width_sum()
    for i, certs in enumerate(lid.certificates):
        try:
            it = str(iters[kept[i]])
        except (TypeError, IndexError, KeyError):
            it = "-"
        for t, c in certs.items():
            ct.add_row(str(i), it, f"{sums[i]:.4g}", t, f"{c.tau:g}", str(c.certified), str(c.n),
                       f"{c.certified_accuracy:.4f}", f"{c.lower_bound:.4f}", "yes" if c.meets_tau else "[red]no[/red]")
    console.print(ct)
    console.print("cert = examples certified for every parameter vector in the member; metric = the sound "
                  "certified (balanced) accuracy on the certification set; LB = the population lower bound.")
    for t in lid.tasks:
        console.print(lid.statement(t))
    from components.constraints import joint_statement

    joint = joint_statement(lid)
    if joint:
        console.print(joint)
    from components.data import describe_features, features_record

    features = features_record(lid.search_config)
    if features is not None:
        console.print(f"The certification data's features were computed by {describe_features(features)}: the certificates "
                      "hold for the model on those features (`lidgate verify` refuses data from another extractor).")
