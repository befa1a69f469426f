"""lid_engine — locally invariant domains: sound parameter-space bounds, LID search, certificates.

The maths layer of lidgate. Depends only on torch, numpy, scipy and safetensors, so it can be
used as a library on its own.
"""

from __future__ import annotations

from .bounds import bound_logits
from .domains import Box, load_parameters_
from .errors import (
    DomainMismatchError,
    InvalidDomainError,
    InvalidInputError,
    LidError,
    UnsoundBoundError,
    UnsupportedLayerError,
)
from .layers import TaskMask
from .spec import Spec, certified_accuracy, certified_examples, certified_mask, worst_case_logits

__version__ = "0.1.0"

__all__ = [
    "Box",
    "DomainMismatchError",
    "InvalidDomainError",
    "InvalidInputError",
    "LidError",
    "Spec",
    "TaskMask",
    "UnsoundBoundError",
    "UnsupportedLayerError",
    "bound_logits",
    "certified_accuracy",
    "certified_examples",
    "certified_mask",
    "load_parameters_",
    "worst_case_logits",
]
