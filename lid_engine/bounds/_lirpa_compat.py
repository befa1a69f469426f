"""Import auto_LiRPA 0.3 on torch 2.13 / numpy 2 without letting it change the process.

auto_LiRPA 0.3 (the only release on PyPI) was written for torch < 1.13. Four small shims make it
import and trace on the versions lidgate pins (see ENVIRONMENT.md, section "auto_LiRPA"), and a
fifth lets CROWN run in float64:

1. ``numpy.lib.arraysetops`` no longer exists; ``operators/base.py`` imports ``isin`` from it.
2. ``torch.onnx.symbolic_helper._set_opset_version`` is gone; ``parse_graph`` imports it and calls
   it before optimising the traced graph, which reads the opset from the TorchScript exporter's
   ``GLOBALS``.
3. ``torch._C.Node`` is no longer subscriptable; ``parse_graph`` reads attributes as ``node[key]``.
4. ``nn.Module._named_members`` gained a ``remove_duplicate`` keyword that ``BoundedModule``'s
   override does not accept, so ``named_parameters()`` on a ``BoundedModule`` fails.
5. CROWN through a weight-perturbed Linear builds an identity matrix in the default dtype (float32),
   which breaks float64 models.

Importing auto_LiRPA also has process-wide side effects: ``logging.basicConfig`` (a stdout handler
on the root logger), ``warnings.simplefilter("once")``, and the TorchScript profiling executor and
profiling mode switched off. We snapshot all of these and restore them after the import, so that
using the CROWN backend never changes the caller's logging, warnings or TorchScript behaviour.
(It also creates an empty ``auto_LiRPA`` folder in the user's data directory; that is harmless.)

The import is lazy (only on the first call) and cached.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_lock = threading.Lock()
_module: types.ModuleType | None = None

_INSTALL_HINT = (
    "the auto_LiRPA bound backend (method 'crown') needs auto_LiRPA, which is not installed in this "
    "environment. "
    "Run `make venv` (it installs `auto-lirpa==0.3 --no-deps` after the main dependencies, "
    "because auto_LiRPA's metadata pins an old torch)."
)


def import_auto_lirpa() -> types.ModuleType:
    """Return the patched ``auto_LiRPA`` module (imported on first use, then cached).

    Raises ``ImportError`` with installation advice when auto_LiRPA is missing.
    """
    global _module
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            if importlib.util.find_spec("auto_LiRPA") is None:
                raise ImportError(_INSTALL_HINT)
            with _preserve_process_state(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                _module = _import_patched()
            _reissue(caught)
    return _module


_IMPORT_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _reissue(caught: list[warnings.WarningMessage]) -> None:
    """Re-emit, under the caller's filters, warnings from the import other than deprecation noise.

    auto_LiRPA 0.3 uses torch APIs that torch 2.13 deprecates (``torch.jit.script`` ...). Those
    warnings are about code we cannot change, so they are dropped; anything else is passed on.
    """
    for w in caught:
        if not issubclass(w.category, _IMPORT_NOISE):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# --------------------------------------------------------------------------- patches
def _import_patched() -> types.ModuleType:
    added_arraysetops = _shim_numpy_arraysetops()
    added_opset_setter = _shim_set_opset_version()
    _shim_node_getitem()
    try:
        auto_lirpa = importlib.import_module("auto_LiRPA")
    finally:
        # Both names were only needed while auto_LiRPA's modules bound them at import time; remove
        # them again so other libraries cannot mistake them for the real (removed) APIs.
        if added_arraysetops:
            sys.modules.pop("numpy.lib.arraysetops", None)
        if added_opset_setter:
            import torch.onnx.symbolic_helper as symbolic_helper

            symbolic_helper.__dict__.pop("_set_opset_version", None)
    _patch_named_members(auto_lirpa.BoundedModule)
    _patch_weight_backward_dtype()
    return auto_lirpa


def _shim_numpy_arraysetops() -> bool:
    """Patch 1: a stand-in ``numpy.lib.arraysetops`` exposing ``isin``. True if it was added."""
    import numpy

    if "numpy.lib.arraysetops" in sys.modules or importlib.util.find_spec("numpy.lib.arraysetops"):
        return False
    shim = types.ModuleType("numpy.lib.arraysetops")
    shim.isin = numpy.isin
    sys.modules["numpy.lib.arraysetops"] = shim
    return True


def _shim_set_opset_version() -> bool:
    """Patch 2: ``symbolic_helper._set_opset_version`` for the TorchScript exporter. True if added."""
    import torch.onnx.symbolic_helper as symbolic_helper

    if hasattr(symbolic_helper, "_set_opset_version"):
        return False
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    def _set_opset_version(opset_version: int) -> None:
        GLOBALS.export_onnx_opset_version = opset_version

    symbolic_helper._set_opset_version = _set_opset_version
    return True


def _shim_node_getitem() -> None:
    """Patch 3: ``node[key]`` reads a TorchScript node attribute (needed whenever a model is traced).

    This one stays installed: auto_LiRPA subscripts nodes each time it builds a ``BoundedModule``.
    It only adds a method that torch no longer defines, so no existing behaviour changes.
    """
    if hasattr(torch._C.Node, "__getitem__"):
        return
    from torch.onnx.symbolic_helper import _node_get

    def __getitem__(self, key):
        return _node_get(self, key)

    torch._C.Node.__getitem__ = __getitem__


def _patch_named_members(bounded_module_cls: type) -> None:
    """Patch 4: accept ``remove_duplicate`` and keep auto_LiRPA's translation to original names."""
    if getattr(bounded_module_cls, "_lidgate_named_members_patched", False):
        return

    def _named_members(self, get_members_fn, prefix="", recurse=True, remove_duplicate=True):
        for name, member in nn.Module._named_members(
            self, get_members_fn, prefix=prefix, recurse=recurse, remove_duplicate=remove_duplicate
        ):
            yield self.node_name_map.get(name, name), member

    bounded_module_cls._named_members = _named_members
    bounded_module_cls._lidgate_named_members_patched = True


def _patch_weight_backward_dtype() -> None:
    """Patch 5: CROWN through a weight-perturbed Linear in the parameters' dtype, not float32.

    When the backward pass starts at that Linear (every intermediate bound does), auto_LiRPA
    expands its symbolic identity ``eyeC`` with ``torch.eye(...)`` in the *default* dtype, so a
    float64 model fails ("expected scalar type Double but found Float"). We expand it ourselves in
    the weight's dtype first; the values are the same identity, so the bound is unchanged.
    """
    from auto_LiRPA.operators.linear import BoundLinear
    from auto_LiRPA.utils import eyeC

    original = BoundLinear.bound_backward_with_weight
    if getattr(original, "_lidgate_patched", False):
        return

    def dense(last_A, like: torch.Tensor):
        if not isinstance(last_A, eyeC):
            return last_A
        eye = torch.eye(last_A.shape[0], device=like.device, dtype=like.dtype)
        return eye.view(last_A.shape[0], 1, *last_A.shape[2:]).expand(last_A.shape)

    def bound_backward_with_weight(self, last_lA, last_uA, input_lb, input_ub, x, y):
        weight = input_lb[1]
        return original(self, dense(last_lA, weight), dense(last_uA, weight), input_lb, input_ub, x, y)

    bound_backward_with_weight._lidgate_patched = True
    BoundLinear.bound_backward_with_weight = bound_backward_with_weight


# --------------------------------------------------------------------------- process state
@contextmanager
def _preserve_process_state() -> Iterator[None]:
    """Undo auto_LiRPA's import-time changes to logging, warnings and TorchScript settings."""
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    filters_obj = warnings.filters
    filters = list(warnings.filters)
    # The setters return the previous value; set-and-restore is the only way to read them.
    profiling_executor = torch._C._jit_set_profiling_executor(True)
    torch._C._jit_set_profiling_executor(profiling_executor)
    profiling_mode = torch._C._jit_set_profiling_mode(True)
    torch._C._jit_set_profiling_mode(profiling_mode)
    try:
        yield
    finally:
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
        filters_obj[:] = filters
        warnings.filters = filters_obj
        warnings._filters_mutated()  # invalidate the "once"/"default" registries' cached filter state
        torch._C._jit_set_profiling_executor(profiling_executor)
        torch._C._jit_set_profiling_mode(profiling_mode)
