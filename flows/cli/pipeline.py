"""Pipeline commands: they take the team's configuration file and run lidgate's Prefect flows.

    lidgate bootstrap CONFIG [--weights FILE]         first version: train (or take weights), certify, promote
    lidgate retrain CONFIG [--data FILE ...]          champion + new data, projected; certify, register, gate
    lidgate submit CONFIG --weights FILE [--data ...] a candidate trained elsewhere; certify, register, gate
    lidgate status CONFIG [--json]                    versions, statuses, reasons, champion
    lidgate audit [CONFIG] [--model NAME]             re-verify every version, HTML report
    lidgate watch CONFIG [--interval S] [--once]      put a champion alias moved outside the gate back
    lidgate fetch models:/NAME@champion --out DIR     hand out a version after checking every byte
    lidgate keygen --private FILE --public FILE       key pair for signed certificates

Exit codes (flows.cli.app): 0 promoted (or ok), 1 blocked or refused, 2 bad input, 3 integrity (tampered
or badly signed). Set ``LIDGATE_DEBUG=1`` to see the traceback of an unexpected error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from flows.cli.app import BadInput, Failed, app, cli_errors, console

ConfigArg = Annotated[Path, typer.Argument(help="The team's configuration file (YAML, TOML or JSON).",
                                           show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
DataOpt = Annotated[Optional[list[Path]], typer.Option(
    "--data", help="New data file (Parquet, CSV or .npz in the configuration's format); repeat for several. "
                   "Default: the configuration's data.")]
TaskOpt = Annotated[Optional[str], typer.Option("--task", help="Name of the new data's task (default: the first "
                                                               "--data file's name).")]


def _prepare(config_path: Path):
    """Read the configuration (exit 2 on any problem) and set the environment defaults of an entry point
    before Prefect or MLflow read it."""
    from components.config import load_config
    from components.factory import use_code_roots
    from flows.env import apply_defaults

    if not config_path.is_file():
        raise BadInput(f"configuration file '{config_path}' does not exist")
    config = load_config(config_path)
    use_code_roots(config.code)  # versions are rebuilt from the team's factories
    apply_defaults(config.registry.home)
    if not os.environ.get("PREFECT_API_URL"):
        from components.owner import guard_children

        guard_children()  # the ephemeral Prefect server ends with this command, even when it is killed
    if not os.environ.get("LIDGATE_DEBUG"):
        # The CLI reports errors itself, in one line; Prefect would also log their tracebacks. Its logging
        # configuration is (re)loaded when the first flow runs, from these variables.
        for name in ("PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL", "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL"):
            os.environ.setdefault(name, "CRITICAL")
    _check_server(config, config_path)
    return config


def _check_server(config, config_path: Path, timeout_s: float = 10.0) -> None:
    """An MLflow server that does not answer is reported in seconds (MLflow's own client retries for
    minutes before it gives up)."""
    import urllib.error
    import urllib.request

    from flows.settings import settings_for

    uri = settings_for(config).tracking_uri
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):  # noqa: S310 — the configured URI
            pass
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an older server without /health): the client reports the rest
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise BadInput(f"configuration {config_path}: registry.tracking_uri (or $MLFLOW_TRACKING_URI): the MLflow "
                       f"server at {uri} does not answer within {timeout_s:.0f} s ({reason}); start it or fix the "
                       "URI") from None


def _check_inputs(config, config_path: Path, data: list[Path] | None = None, weights: Path | None = None) -> None:
    """The mistakes that need no model or data to find, before Prefect starts (seconds, not a minute):
    missing files, and references to code that does not import."""
    from components.factory import resolve

    for path in data or []:
        if not path.is_file():
            raise BadInput(f"--data: file '{path}' does not exist")
    if weights is not None and not weights.is_file():
        raise BadInput(f"--weights: file '{weights}' does not exist")
    for name in ("train", "search", "certification", "source"):
        path = getattr(config.data, name)
        if path is not None and not Path(path).is_file():
            raise BadInput(f"configuration {config_path}: data.{name}: file '{path}' does not exist")
    if config.model.weights is not None and not Path(config.model.weights).is_file():
        raise BadInput(f"configuration {config_path}: model.weights: file '{config.model.weights}' does not exist")
    for ref, field in ((config.model.factory, "model.factory"), (config.training.function, "training.function"),
                       (config.data.loader.function if config.data.loader else None, "data.loader.function")):
        if ref is not None:
            resolve(ref, field=f"configuration {config_path}: {field}", roots=config.code)


def _run(flow_name: str, as_json: bool, **params: Any) -> None:
    """Run one of flows.retrain's flows in-process and report its outcome; exit 1 unless promoted."""
    from flows import retrain

    flow = {"bootstrap": retrain.bootstrap_flow, "retrain": retrain.retrain_flow,
            "submit": retrain.submit_flow}[flow_name]
    outcome = flow(**params)
    if as_json:
        typer.echo(json.dumps(outcome, indent=2, default=str))
    else:
        _print_outcome(outcome)
    if not outcome["promoted"]:
        raise typer.Exit(1)


@app.command()
def bootstrap(
    config: ConfigArg,
    weights: Annotated[Optional[Path], typer.Option(
        "--weights", help="Take these weights (safetensors) for the first version instead of training.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the first version (or take --weights), certify its LID, register it, make it the champion."""
    with cli_errors():
        _check_inputs(_prepare(config), config, weights=weights)
        _run("bootstrap", as_json, config=str(config), weights=str(weights) if weights else None)


@app.command()
def retrain(
    config: ConfigArg,
    data: DataOpt = None,
    task: TaskOpt = None,
    no_projection: Annotated[bool, typer.Option(
        "--no-projection", help="Train WITHOUT projecting onto the champion's LID (to see the gate block an "
                                "unsafe update).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Retrain the champion on new data, every step projected onto its LID; certify, register, gate."""
    with cli_errors():
        _check_inputs(_prepare(config), config, data=data)
        _run("retrain", as_json, config=str(config), data=[str(p) for p in data or []], task=task,
             projection=not no_projection)


@app.command()
def submit(
    config: ConfigArg,
    weights: Annotated[Path, typer.Option("--weights", help="The candidate's weights (safetensors), trained "
                                                            "elsewhere.", show_default=False)],
    data: DataOpt = None,
    task: TaskOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Certify a candidate trained elsewhere against the champion's LID; register it, run the gate."""
    with cli_errors():
        _check_inputs(_prepare(config), config, data=data, weights=weights)
        _run("submit", as_json, config=str(config), weights=str(weights), data=[str(p) for p in data or []],
             task=task)


@app.command()
def status(config: ConfigArg, as_json: JsonOpt = False) -> None:
    """Every registered version: status, task, certificate, source, the gate's reasons, the champion."""
    with cli_errors():
        settings_config = _prepare(config)
        from flows.settings import open_registry, settings_for

        settings = settings_for(settings_config)
        registry = open_registry(settings)
        rows = version_rows(registry)
        champion = registry.champion()
        if as_json:
            typer.echo(json.dumps({"model": settings.model_name, "tracking_uri": settings.tracking_uri,
                                   "champion": champion, "versions": rows}, indent=2))
            return
        _print_status(settings.model_name, champion, rows)


@app.command()
def keygen(
    private: Annotated[Path, typer.Option("--private", help="Where to write the private key (PEM, mode 0600): "
                                                            "on the certify worker only.", show_default=False)],
    public: Annotated[Path, typer.Option("--public", help="Where to write the public key (PEM): list it in "
                                                          "signing.public_keys.", show_default=False)],
) -> None:
    """Make an Ed25519 key pair for signed certificates (signing.private_key / signing.public_keys)."""
    with cli_errors():
        from components.signing import SignatureError, generate_keys

        try:
            kid = generate_keys(private, public)
        except SignatureError as exc:
            raise BadInput(str(exc)) from None
        typer.echo(f"key id {kid}\nprivate: {private} (keep it on the certify worker)\npublic: {public}")


@app.command()
def watch(
    config: ConfigArg,
    interval: Annotated[float, typer.Option("--interval", min=1.0, help="Seconds between two looks at the "
                                                                         "registry.")] = 30.0,
    once: Annotated[bool, typer.Option("--once", help="Look once and exit: 0 when all was in order, 1 when "
                                                      "something had to be put right (for cron).")] = False,
    listen: Annotated[Optional[str], typer.Option(
        "--listen", metavar="HOST:PORT", help="Also receive MLflow webhooks here (alias set or removed: look at "
        "once). Needs an MLflow server and the shared secret in $LIDGATE_WEBHOOK_SECRET.")] = None,
    webhook_url: Annotated[Optional[str], typer.Option(
        "--webhook-url", help="The URL the MLflow server calls (default: http://HOST:PORT/); the webhook "
        "'lidgate-watch-NAME' is created or updated to it.")] = None,
) -> None:
    """Watch the champion alias: one set outside the gate is moved back to the last promoted version
    and the incident is recorded on the version; half-done promotions and dead runs are settled.
    Polls every --interval seconds; with --listen, an MLflow webhook also wakes it at once."""
    with cli_errors():
        import time

        from components.gate import recover
        from flows.settings import open_registry, settings_for

        registry = open_registry(settings_for(_prepare(config)))
        receiver = _webhook_receiver(registry, listen, webhook_url) if listen and not once else None
        console().print(f"watching {registry.model_name!r} at {registry.tracking_uri}"
                        + ("" if once else f" every {interval:g} s (Ctrl-C stops)")
                        + (f"; webhooks on port {receiver.port}" if receiver else ""))

        def pause() -> None:
            if receiver is None:
                time.sleep(interval)
            elif receiver.wait(interval):
                console().print("webhook: the champion alias changed; looking now")

        while True:
            try:
                done = recover(registry, move_alias=True)
            except Exception as exc:  # noqa: BLE001 — a watch outlives a registry hiccup; --once reports it
                if once:
                    raise
                console().print(f"[red]could not look at the registry[/red]: {type(exc).__name__}: {exc}")
                pause()
                continue
            for record in done:
                console().print(f"[yellow]{record['at']} {_subject(record)} {record['kind']}[/yellow]: "
                                f"{record['detail']}")
            if once:
                if done:
                    raise Failed(f"{len(done)} thing(s) put right; see above and the versions' tags")
                console().print(f"all in order: champion {registry.champion() or '(none)'}")
                return
            pause()


def _webhook_receiver(registry, listen: str, url: str | None):
    """Start the webhook receiver on ``listen`` and register it with the MLflow server."""
    from components.webhook import WebhookReceiver, register_webhook

    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadInput(f"--listen: expected HOST:PORT (e.g. 127.0.0.1:8765), got {listen!r}")
    secret = os.environ.get("LIDGATE_WEBHOOK_SECRET", "")
    if len(secret) < 16:
        raise BadInput("--listen: set $LIDGATE_WEBHOOK_SECRET to the shared webhook secret (at least 16 characters)")
    if not registry.tracking_uri.startswith(("http://", "https://")):
        raise BadInput(f"--listen: webhooks are sent by an MLflow server; the registry is {registry.tracking_uri}")
    try:
        receiver = WebhookReceiver(host, int(port), secret, registry.model_name)
    except OSError as exc:
        raise BadInput(f"--listen: cannot listen on {listen}: {exc}") from None
    try:
        register_webhook(registry.client, f"lidgate-watch-{registry.model_name}",
                         url or f"http://{host}:{receiver.port}/", secret)
    except Exception as exc:  # noqa: BLE001 — the server's reason, in one line
        receiver.close()
        raise BadInput(f"--listen: the MLflow server at {registry.tracking_uri} refused the webhook: "
                       f"{str(exc).splitlines()[0]} (a local http receiver needs the server started with "
                       "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true MLFLOW_WEBHOOK_ALLOWED_SCHEMES=https,http)") from None
    return receiver


@app.command()
def audit(
    config: Annotated[Optional[Path], typer.Argument(help="The team's configuration file.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="A registered model name instead of a "
                                                                 "configuration (its factory must be importable).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Report directory (default: HOME/audit/NAME).")] = None,
) -> None:
    """Re-verify every registered version's certificates; write the HTML report and a JSON summary.
    First finishes or undoes what crashes left half-done, and moves a champion alias set outside the
    gate back to the last promoted version (each recorded as an incident)."""
    with cli_errors():
        from flows.env import apply_defaults
        from flows.settings import open_registry, settings_for

        from flows.audit import configured_keys, write_audit

        keys = None
        if config is not None:
            loaded = _prepare(config)
            settings, keys = settings_for(loaded), configured_keys(loaded)
        else:
            apply_defaults()
            settings = settings_for(model_name=model)
        registry = open_registry(settings)
        if not registry.history():
            if config is None:  # a name given by hand: most likely a typo
                raise BadInput(f"no registered versions of model {settings.model_name!r} at {settings.tracking_uri}")
            from components.gate import recover

            for record in recover(registry):  # a crashed first run may have left a run RUNNING
                console().print(f"[yellow]recovered[/yellow] {_subject(record)} ({record['kind']}): {record['detail']}")
            typer.echo(f"no registered versions of model {settings.model_name!r} yet: nothing is served")
            return
        result = write_audit(settings, out, keys)
        for record in result["recovered"]:
            console().print(f"[yellow]recovered[/yellow] {_subject(record)} ({record['kind']}): {record['detail']}")
        _print_audit(settings.model_name, result["records"])
        typer.echo(f"report: {result['report']}\nsummary: {result['summary']}")
        if not result["ok"]:
            raise Failed("a promoted version failed re-verification")


@app.command()
def fetch(
    uri: Annotated[str, typer.Argument(help="models:/NAME@ALIAS (e.g. models:/digits@champion) or models:/NAME/VERSION.",
                                       show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Directory to write the checked version to (absent or empty).",
                                      show_default=False)],
    config: Annotated[Optional[Path], typer.Option("--config", help="The team's configuration: its registry and "
                                                   "signing.public_keys.")] = None,
    public_key: Annotated[Optional[list[Path]], typer.Option(
        "--public-key", help="Trusted Ed25519 public key (repeatable), besides the configuration's.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Hand out a registered version only after checking every byte a consumer loads: pinned digests (weights,
    certificate, domains, MLflow model, ONNX), promoted status, its certificates and its lineage's recomputed,
    and the signature when keys are given. Exit 0 written; 1 refused (not promoted, a certificate fails);
    3 tampered or badly signed."""
    with cli_errors():
        from flows.audit import configured_keys
        from flows.fetch import FetchRefused, fetch_version, parse_model_uri
        from flows.settings import open_registry, settings_for

        try:
            name, alias, version = parse_model_uri(uri)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        keys: list = []
        if config is not None:
            loaded = _prepare(config)
            if loaded.name != name:
                raise BadInput(f"{uri}: the configuration '{config}' registers model {loaded.name!r}, not {name!r}")
            settings = settings_for(loaded)
            keys += configured_keys(loaded) or []
        else:
            from flows.env import apply_defaults

            apply_defaults()
            settings = settings_for(model_name=name)
        if public_key:
            from components.signing import load_public_keys

            keys += load_public_keys(public_key, "--public-key")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise BadInput(f"--out: '{out}' exists and is not an empty directory")
        try:
            record = fetch_version(open_registry(settings), out, alias=alias, version=version, trusted_keys=keys or None)
        except FetchRefused as exc:
            raise Failed(f"refused: {exc}") from None
        if as_json:
            typer.echo(json.dumps(record, indent=2))
        else:
            typer.echo(f"version {record['version']} of {name!r} checked ({record['signature']}) and written to {out}")


# ------------------------------------------------------------------------------------ rendering
def _subject(record: dict) -> str:
    """What a recovery record is about: a version, or a registration run without one."""
    return f"v{record['version']}" if record.get("version") else f"run {str(record.get('run_id'))[:12]}"


def version_rows(registry) -> list[dict[str, Any]]:
    """One JSON-able row per registered version, read from its tags (no download)."""
    from components import tags as t

    champion = registry.champion()
    rows = []
    for info in registry.history():
        tg = info.tags
        task = tg.get(t.TAG_TASK) or ",".join(t.tasks(tg))
        certs = {name: {"certified": _float(tg.get(t.TAG_CERT_ACC + name)), "tau": _float(tg.get(t.TAG_TAU + name)),
                        "lower_bound": _float(tg.get(t.TAG_LOWER_BOUND + name))} for name in t.tasks(tg)
                 if tg.get(t.TAG_CERT_ACC + name) is not None}
        rows.append({"version": str(info.version), "status": t.status(tg), "champion": str(info.version) == champion,
                     "created": info.created, "task": task, "certificates": certs,
                     "source": tg.get(t.TAG_CANDIDATE_SOURCE), "projection": tg.get(t.TAG_PROJECTION),
                     "lineage": t.lineage(tg), "model_sha256": tg.get(t.TAG_MODEL_SHA),
                     "reasons": t.block_reasons(tg)})
    return rows


def grouped_reasons(reasons: list[dict]) -> dict[str, list[str]]:
    """The gate's reasons by code, in order (a failing LID is reported once per task and version)."""
    out: dict[str, list[str]] = {}
    for r in reasons:
        out.setdefault(r["code"], []).append(r["detail"])
    return out


def clip_text(text: str, limit: int) -> str:
    """``text`` cut at a word boundary before ``limit`` characters, with an ellipsis."""
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0]
    return cut.rstrip(",;:") + " …"


def _float(v: str | None) -> float | None:
    try:
        return None if v is None else float(v)
    except ValueError:
        return None


def _print_status(model_name: str, champion: str | None, rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title=f"{model_name}: champion {'v' + champion if champion else '(none)'}")
    for col in ("version", "status", "task", "certificate", "source", "lineage", "reasons"):
        table.add_column(col, overflow="fold")
    for r in rows:
        several = len(r["certificates"]) > 1  # a specification with constraints: say which is which
        certs = "; ".join((f"{name}: " if several else "")
                          + (f"{c['certified']:.4f} ≥ τ {c['tau']:.4f}" if c["certified"] is not None else "—")
                          for name, c in r["certificates"].items()) or "—"
        source = (r["source"] or "?") + (" (unprojected)" if r["projection"] == "false" and r["source"] == "trained"
                                         else "")
        reasons = "\n".join(f"{code}: {clip_text(details[0], 140)}" + (f" (+{len(details) - 1})" if len(details) > 1 else "")
                            for code, details in grouped_reasons(r["reasons"]).items())
        status = {"promoted": "[green]promoted[/green]", "blocked": "[red]blocked[/red]"}.get(r["status"], r["status"])
        table.add_row(("★ " if r["champion"] else "") + "v" + r["version"], status, r["task"], certs, source,
                      ",".join(r["lineage"]) or "—", reasons)
    console().print(table)


def _print_outcome(outcome: dict) -> None:
    from rich.table import Table

    cert = outcome.get("certification") or {}
    cand = outcome.get("candidate") or {}
    verdict = {"promoted": "[bold green]PROMOTED[/bold green]", "blocked": "[bold red]BLOCKED[/bold red]",
               "rejected": "[bold red]REJECTED[/bold red] (data validation failed, nothing registered)"}[outcome["status"]]
    table = Table(title=f"lidgate {outcome['action']}: "
                        + (f"v{outcome['version']} " if outcome.get("version") else "") + verdict, show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    table.add_row("task", str(outcome.get("task", "—")))
    if cand:
        first = outcome["action"] == "bootstrap"
        how = {"trained": "trained" + ("" if first else " with projection onto the champion's LID" if cand.get("projection")
                                       else " WITHOUT projection onto the champion's LID"),
               "submitted": "submitted (trained elsewhere)", "given": "given weights"}.get(cand.get("source"),
                                                                                          cand.get("source"))
        metric = str(cand.get("metric") or "accuracy").replace("_", " ")
        line = f"{how}; {metric} on the search split {cand.get('search_accuracy', float('nan')):.4f}"
        if cand.get("champion_search_accuracy") is not None:
            line += f" (the champion: {cand['champion_search_accuracy']:.4f})"
        table.add_row("candidate", line)
    if cert:
        if cert.get("lid"):
            for task, value in cert["certified"].items():
                tau = cert.get("taus", {}).get(task, cert["tau"])
                what = cert.get("constraints", {}).get(task, f"task '{task}'")
                table.add_row("certificate", f"{what}: certified {value:.4f} ≥ τ {tau:.4f} on held-out "
                                             f"data (population lower bound {cert['lower_bound'][task]:.4f}); "
                                             f"{cert['members']} domain(s), width sum {cert['width_sum']:.4g}")
        else:
            table.add_row("certificate", f"none: {cert.get('error')}")
        for note in cert.get("notes", []):
            table.add_row("not applied", note)
        for check in cert.get("lineage", []):
            table.add_row(f"certificate of v{check['version']}",
                          "[green]still holds[/green]" if check["ok"] else "[red]fails[/red]: " + "; ".join(check["failures"]))
    for code, details in grouped_reasons(outcome.get("reasons", [])).items():
        more = f" (and {len(details) - 1} more like it)" if len(details) > 1 else ""
        table.add_row(f"[red]{code}[/red]", details[0] + more)
    before, after = outcome.get("champion_before"), outcome.get("champion_after")
    table.add_row("champion", f"{'v' + before if before else '(none)'} → v{after}" if before != after else
                  (f"v{after} (unchanged)" if after else "(none)"))
    onnx = outcome.get("onnx")
    if onnx and "error" in onnx:
        table.add_row("[red]ONNX[/red]", f"export failed (the promotion stands): {onnx['error']}")
    elif onnx:
        table.add_row("ONNX", f"{onnx['path']} (max |Δ| vs torch {onnx['max_abs_diff']:.2g})")
    console().print(table)


def _print_audit(model_name: str, records: list) -> None:
    from rich.table import Table

    table = Table(title=f"audit of {model_name!r}")
    for col in ("version", "status", "champion", "verified", "certificates"):
        table.add_column(col, overflow="fold")
    for r in records:
        certs = ", ".join(f"{t.task}: " + (f"{t.certified_accuracy:.3f} ≥ {t.tau:.3f}" if t.certified_accuracy == t.certified_accuracy
                                             else "— (not covered)") for t in r.tasks) or "—"
        table.add_row(r.version, r.status, "★" if r.is_champion else "", "✓" if r.verified else "✗", certs)
    console().print(table)
