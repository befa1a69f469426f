"""The ``lidgate`` command line.

Pipeline commands take the team's configuration file (``flows.cli.pipeline``): ``bootstrap``,
``retrain``, ``submit``, ``status``, ``audit``. Engine commands work on files alone
(``flows.cli.engine``): ``certify``, ``verify``, ``inspect``. Exit codes: 0 ok or promoted, 1 blocked
or a failed check, 2 bad input (``flows.cli.app``).

Configuration files, the factories and training functions they name, and ``--model`` references are
code: lidgate imports and runs them with the operator's rights. Use only files you trust.
"""

from __future__ import annotations

from flows.cli import engine, pipeline  # noqa: F401  (register the commands)
from flows.cli.app import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry convenience
    app()
