"""Exceptions raised by lid_engine.

Every error names the argument or layer at fault and what was expected, so that a user never has
to read a traceback from inside torch to find out what went wrong.
"""

from __future__ import annotations


class LidError(ValueError):
    """Base class of lid_engine's input errors."""


class DomainMismatchError(LidError):
    """A domain does not fit the model (missing or extra parameter names, shapes, dtypes)."""


class InvalidDomainError(LidError):
    """A domain is malformed: non-finite bounds, lower > upper, inconsistent storage."""


class InvalidInputError(LidError):
    """Inputs or labels are malformed: NaN/inf, wrong rank, labels outside the logits."""


class UnsupportedLayerError(LidError):
    """A module the bound engine cannot propagate through."""


class UnsoundBoundError(RuntimeError):
    """A bound came out with lower > upper. Never repaired silently: it signals a bug or overflow."""


class CertificateError(LidError):
    """A certificate or a saved LID is malformed, inconsistent or does not match its files.

    Raised when loading: a missing or unknown field, a wrong type, a fingerprint that does not match
    the tensors it describes (a tampered or corrupted file). The message names the member and file.
    """
