"""lid_engine — locally invariant domains: sound parameter-space bounds, LID search, certificates.

The maths layer of lidgate. Depends only on torch, numpy, scipy and safetensors, so it can be
used as a library on its own.
"""

from __future__ import annotations

from .adapters import LoRALinear, add_lora, lora_mask, width_mask
from .bounds import bound_logits, bound_margins
from .domains import Box, Domain, load_parameters_
from .errors import (
    DomainMismatchError,
    InvalidDomainError,
    InvalidInputError,
    LidError,
    UnsoundBoundError,
    UnsupportedLayerError,
)
from .certificate import (
    Certificate,
    Counts,
    certify_box,
    clopper_pearson_lower,
    count_certified,
    data_fingerprint,
    fingerprint_data,
    fingerprint_model,
    fingerprint_stream,
)
from .importance import fisher_importance, importance_mask, si_importance
from .layers import TaskMask
from .lid import LID
from .projection import CoefficientOptimizer, ProjectedOptimizer, ProjectionHandle, Projector, attach_projection, project_
from .search import LidSearchError, SearchConfig, compute_lid, tau_from_accuracy
from .stream import CertificationStream, SafetensorsStream, TensorStream, shard_ranges
from .spec import Spec, certified_accuracy, certified_examples, certified_mask, worst_case_logits
from .metrics import accuracy
from .zonotope import Zonotope

from .verify import verify  # noqa: E402
from . import testing  # noqa: E402 — le.testing.check_soundness, for custom bound handlers

__version__ = "0.1.0"

__all__ = [
    "LoRALinear",
    "add_lora",
    "lora_mask",
    "width_mask",
    "LID",
    "Certificate",
    "CertificationStream",
    "Counts",
    "SafetensorsStream",
    "TensorStream",
    "certify_box",
    "data_fingerprint",
    "count_certified",
    "fingerprint_stream",
    "shard_ranges",
    "LidSearchError",
    "CoefficientOptimizer",
    "ProjectedOptimizer",
    "ProjectionHandle",
    "attach_projection",
    "Projector",
    "SearchConfig",
    "clopper_pearson_lower",
    "compute_lid",
    "fingerprint_data",
    "fingerprint_model",
    "project_",
    "tau_from_accuracy",
    "verify",
    "Box",
    "Domain",
    "DomainMismatchError",
    "InvalidDomainError",
    "InvalidInputError",
    "LidError",
    "Spec",
    "TaskMask",
    "UnsoundBoundError",
    "UnsupportedLayerError",
    "bound_logits",
    "bound_margins",
    "accuracy",
    "certified_accuracy",
    "certified_examples",
    "certified_mask",
    "fisher_importance",
    "importance_mask",
    "si_importance",
    "load_parameters_",
    "worst_case_logits",
    "Zonotope",
]
