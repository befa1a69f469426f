"""Model factories for the tests, also by import path (``ModelSpec("tests.helpers.models:mlp", ...)``).

A stable import path for the registry and gate tests; the architecture itself is the digits
example's (one implementation of the MLP in the repository).
"""

from __future__ import annotations

from examples.digits.model import mlp

__all__ = ["mlp"]
