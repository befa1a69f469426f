"""The ``lidgate`` Typer application and how every command turns errors into exit codes.

Exit codes, one per failure class (docs/operations.md lists them too):

- 0: ok — certified, verified, promoted, the registry is sound;
- 1: the answer is no — a candidate blocked by the gate, a model outside its LID or below τ, a
  certificate that does not hold when recomputed, certification impossible, an audit or watch that
  found (and fixed) something;
- 2: bad input — a missing or malformed file, a bad configuration field, key file or factory string,
  shapes that do not fit the model, an unreachable server;
- 3: integrity — saved or registered files are not what was certified: a digest or fingerprint that
  does not match, a malformed certificate, a signature that is missing, unknown or does not verify.

Always a one-line message on stderr, never a traceback.
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


class Tampered(Exception):
    """Exit 3 with this message."""


EXIT_OK, EXIT_NO, EXIT_BAD_INPUT, EXIT_INTEGRITY = 0, 1, 2, 3


# Errors whose message already names the file, field or argument at fault (exit 2 with the message).
_BAD_INPUT = ("components.config.ConfigError", "components.data.DataError", "components.factory.FactoryError",
              "components.training.TrainingError", "flows.retrain.PipelineError", "flows.tasks.ChampionError",
              "flows.certify.CandidateError", "components.registry.RegistryError",
              "components.weights.WeightsError", "components.signing.KeyFileError")
# Errors that mean the answer is no (exit 1).
_FAILED = ("lid_engine.search.LidSearchError",)
# Errors that mean saved or registered files are not what was certified (exit 3).
_INTEGRITY = ("lid_engine.errors.CertificateError", "components.registry.RegistryIntegrityError",
              "components.signing.SignatureError")


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
        die(str(exc), EXIT_NO)
    except Tampered as exc:
        die(f"integrity check failed: {exc}", EXIT_INTEGRITY)
    except Exception as exc:  # noqa: BLE001 — mapped to a clear message and an exit code
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        if _is(exc, _FAILED):
            die(f"certification failed: {first}", EXIT_NO)
        if _is(exc, _INTEGRITY) and not _is(exc, ("components.signing.KeyFileError",)):
            die(f"integrity check failed: {first}", EXIT_INTEGRITY)
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
