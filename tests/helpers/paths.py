"""The repository root, for tests that read its files or run code from it (whatever the working directory)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

__all__ = ["REPO"]
