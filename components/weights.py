"""Loading a team's weights file into a model: safetensors only, strictly (never a pickle).

The CLI's ``--weights``, the configuration's ``model.weights`` and ``lidgate submit`` all go through
``load_weights``, so a file that does not fit the model is refused with the same message everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = ["WeightsError", "load_weights"]


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the model (names the field and the tensor)."""


def load_weights(model: nn.Module, path: str | Path, *, field: str = "--weights") -> nn.Module:
    """Load a safetensors state dict into ``model`` strictly: the same keys, shapes and dtypes.

    Args:
        model: the module to load into (in place).
        path: the ``.safetensors`` file.
        field: the argument or configuration field the path came from; starts every error.

    Returns:
        ``model``, in eval mode.

    Raises:
        WeightsError: missing file, not a safetensors file, missing or unexpected keys, a tensor of
            another shape or dtype.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{field}: file '{path}' does not exist")
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 — safetensors raises its own error types for corrupt files
        raise WeightsError(f"{field}: '{path}' is not a readable safetensors file ({exc})") from None
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(f"{field}: '{path}' does not fit the model: missing keys {missing}, unexpected keys "
                           f"{unexpected}")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(f"{field}: '{key}' has shape {tuple(state[key].shape)} in '{path}', the model expects "
                               f"{tuple(tensor.shape)}")
        if state[key].dtype != tensor.dtype:
            raise WeightsError(f"{field}: '{key}' has dtype {state[key].dtype} in '{path}', the model has {tensor.dtype}")
    model.load_state_dict(state, strict=True)
    return model.eval()
