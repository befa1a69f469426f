"""The ``lidgate`` Typer application and how every command turns errors into exit codes.

Exit codes: 0 ok or promoted; 1 blocked, verification failed, certification impossible, or an
integrity check failed; 2 bad input (a missing or malformed file, a bad configuration field or factory
string, shapes that do not fit the model) — always a one-line message on stderr, never a traceback.
"""

from __future__ import annotations

import contextlib

import typer

app = typer.Typer(
    name="lidgate",
    help="Provably safe model updates: certify locally invariant domains (LIDs), register them in MLflow and "
         "gate promotions on them.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class BadInput(Exception):
    """Exit 2 with this message."""


class Failed(Exception):
    """Exit 1 with this message."""


# Errors whose message already names the file, field or argument at fault (exit 2 with the message).
_BAD_INPUT = ("components.config.ConfigError", "components.data.DataError", "components.factory.FactoryError",
              "components.training.TrainingError", "flows.retrain.PipelineError", "flows.tasks.ChampionError",
              "flows.certify.CandidateError", "components.registry.RegistryError",
              "components.weights.WeightsError", "components.signing.SignatureError")
# Errors that mean a check failed (exit 1).
_FAILED = ("lid_engine.errors.CertificateError", "lid_engine.search.LidSearchError",
           "components.registry.RegistryIntegrityError")


def _is(exc: BaseException, names: tuple[str, ...]) -> bool:
    """isinstance against classes named by path, without importing modules the command never loaded."""
    import sys

    for name in names:
        module, _, cls = name.rpartition(".")
        mod = sys.modules.get(module)
        if mod is not None and isinstance(exc, getattr(mod, cls, ())):
            return True
    return False


@contextlib.contextmanager
def cli_errors():
    """Turn every error into a one-line message and an exit code (no tracebacks at the boundary)."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except BadInput as exc:
        die(str(exc), 2)
    except Failed as exc:
        die(str(exc), 1)
    except Exception as exc:  # noqa: BLE001 — mapped to a clear message and an exit code
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        if _is(exc, _FAILED):
            prefix = "certification failed" if type(exc).__name__ == "LidSearchError" else "integrity check failed"
            die(f"{prefix}: {first}", 1)
        if _is(exc, _BAD_INPUT) or _is(exc, ("lid_engine.errors.LidError",)):
            die(text.replace("\n", " ") if _is(exc, _BAD_INPUT) else first, 2)
        if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)):
            die(f"{type(exc).__name__}: {first}", 2)
        die(f"{type(exc).__name__}: {first}", 2)


def die(message: str, code: int):
    typer.echo(f"lidgate: error: {message}", err=True)
    raise typer.Exit(code)


def console():
    from rich.console import Console

    return Console(width=max(Console().width, 120))
