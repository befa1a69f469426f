"""Training a candidate: lidgate's built-in loop and the contract a team's training function follows.

A team that keeps its own training loop names it in the configuration (``training.function:
"team_train:fit"``). lidgate calls it as::

    fit(model: nn.Module, optimizer, data: DataSplits, **training.kwargs) -> nn.Module | None

The contract:

* ``model`` is the model to update, already inside the champion's LID. Train it **in place** and
  return it (or ``None``). Do not replace its parameters (``model.fc = nn.Linear(...)``, assigning
  ``.data`` to a new tensor): lidgate certifies and registers the module object it passed in.
* ``optimizer`` has **already been wrapped** by lidgate (``lid_engine.ProjectedOptimizer``): every
  ``optimizer.step()`` is followed by a projection of the parameters back onto the LID. That is
  what makes the update safe, so every parameter change must go through ``optimizer.step()``:
  do not build another optimizer over ``model.parameters()``, do not step the wrapped optimizer
  underneath it (``optimizer.optimizer``) and do not write parameters by hand. Anything done after
  the last ``step()`` is not projected, so whoever calls ``run_training`` must still check the
  trained model against the LID (``lid.contains``) before certifying it.
  (The wrapper behaves like a ``torch.optim.Optimizer`` — ``zero_grad``, ``step(closure)``,
  ``param_groups``, ``state``, ``state_dict`` — but today is not an instance of one.)
* Otherwise the loop is the team's: any loss, batching, augmentation, number of epochs, gradient
  clipping (``torch.nn.utils.clip_grad_norm_`` before ``step()``), mixed precision (autocast and a
  ``GradScaler``, whose ``scaler.step(optimizer)`` calls ``optimizer.step()``), gradient
  accumulation, early stopping on ``data.search``. Learning-rate schedulers: the wrapper passes
  ``param_groups`` through, so a scheduler that only rewrites ``param_groups[i]["lr"]`` works; one
  that insists on a ``torch.optim.Optimizer`` instance can be attached to ``optimizer.optimizer``
  (it only changes learning rates; steps still go through the wrapper).
* ``data`` is the task's ``DataSplits``; train on ``data.train``. ``data.certification`` is the
  held-out set the certificate's population claim rests on: never train or tune on it.
* ``**kwargs`` are ``training.kwargs`` from the configuration (JSON values). The global torch RNG
  is seeded with ``training.seed`` before the call (and restored after), so a function that draws
  from it is reproducible.
* Leave the model in eval mode if it has dropout or batch norm layers (certification evaluates the
  model as returned); the built-in loop does. In a retrain, keep BatchNorm layers in eval mode while
  training (``module.eval()`` after ``model.train()``): the champion's LID certifies its parameters at
  the champion's running statistics, so lidgate puts the champion's statistics back after training
  (the built-in loop never changes them), and statistics learnt on the way would be lost.

``run_training`` calls a function under this contract and checks what can be checked cheaply
(the same module back, parameters not replaced, finite, the optimizer stepped at least once).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from components.config import LidgateConfig
from components.data import DataSplits

__all__ = ["TrainingError", "TrainingFunction", "builtin_fit", "resolve_training", "run_training"]


class TrainingError(RuntimeError):
    """A training function could not be called, raised, or broke the training contract."""


class TrainingFunction(Protocol):
    """``fit(model, optimizer, data, **kwargs) -> nn.Module | None`` (see the module docstring)."""

    def __call__(self, model: nn.Module, optimizer: Any, data: DataSplits, **kwargs: Any) -> nn.Module | None: ...


def builtin_fit(
    model: nn.Module,
    optimizer: Any,
    data: DataSplits,
    *,
    epochs: int = 1,
    batch_size: int = 64,
    lr: float | None = None,
    seed: int = 0,
    progress: bool = True,
    freeze_norm_stats: bool = False,
) -> nn.Module:
    """lidgate's built-in loop: minibatch cross-entropy over ``data.train``.

    Batches are drawn by a seeded permutation per epoch, moved to the model's device and cast to
    its floating dtype; a tqdm bar shows the steps.

    Args:
        model: the classifier to train in place (logits out).
        optimizer: the (projected) optimizer over the model's parameters.
        data: the task; only ``data.train`` is used.
        epochs: passes over ``data.train`` (≥ 1).
        batch_size: examples per step (≥ 1).
        lr: when given, sets the learning rate of every parameter group first (the optimizer was
            built by lidgate; this is how a configuration chooses its learning rate).
        seed: seed of the batch order.
        progress: show a progress bar.
        freeze_norm_stats: keep BatchNorm layers in eval mode (their running statistics fixed), as a
            projected retrain needs: the champion's LID certifies its parameters at the champion's
            statistics.

    Returns:
        ``model``, trained, in eval mode.

    Raises:
        ValueError: ``epochs``, ``batch_size`` or ``lr`` out of range.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"builtin_fit: 'epochs' must be an integer ≥ 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"builtin_fit: 'batch_size' must be an integer ≥ 1, got {batch_size!r}")
    if lr is not None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            raise ValueError(f"builtin_fit: 'lr' must be a finite number > 0, got {lr!r}")
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
    x, y = data.train
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = reference.device if reference is not None else x.device
    dtype = reference.dtype if reference is not None else x.dtype
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(x) / batch_size)
    from tqdm.auto import tqdm  # lazy: only the built-in loop draws a bar

    model.train()
    if freeze_norm_stats:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    with tqdm(total=steps, desc="training", unit="step", leave=False, disable=not progress) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                idx = order[start: start + batch_size]
                xb = x[idx].to(device=device, dtype=dtype)
                yb = y[idx].to(device)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return model.eval()


def resolve_training(config: LidgateConfig) -> TrainingFunction:
    """The training function a configuration names (``builtin_fit`` when ``training.function`` is null).

    A team's function is imported from the configuration's ``code`` directories and its signature
    is checked against ``fit(model, optimizer, data, **training.kwargs)`` before any training.

    Args:
        config: the validated configuration.

    Returns:
        The callable.

    Raises:
        components.factory.FactoryError: the reference cannot be imported or is not callable.
        TrainingError: the function does not accept ``(model, optimizer, data, **training.kwargs)``.
    """
    ref = config.training.function
    if ref is None:
        return builtin_fit
    from components.factory import resolve  # imported here: the built-in path needs no importer

    fn = resolve(ref, field="training.function", roots=config.code)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn  # builtins and C functions: nothing to check ahead of the call
    try:
        signature.bind(None, None, None, **config.training.kwargs)
    except TypeError as exc:
        raise TrainingError(f"training.function {ref}: cannot be called as fit(model, optimizer, data, "
                            f"**training.kwargs) with training.kwargs {sorted(config.training.kwargs)}: "
                            f"{exc}") from None
    return fn


def run_training(config: LidgateConfig, model: nn.Module, optimizer: Any, data: DataSplits, *,
                 freeze_norm_stats: bool = False) -> nn.Module:
    """Train ``model`` with the configured function under the training contract.

    Seeds the global torch RNG with ``training.seed`` (restoring it afterwards), calls the function
    with ``training.kwargs`` (the built-in loop also gets ``seed``), then checks the contract.

    Args:
        config: the validated configuration.
        model: the model to train in place (inside the champion's LID).
        optimizer: the projected optimizer lidgate built over ``model``'s parameters.
        data: the task's splits.
        freeze_norm_stats: the built-in loop keeps BatchNorm statistics fixed (a projected retrain).

    Returns:
        ``model``, trained.

    Raises:
        components.factory.FactoryError: the function cannot be imported.
        TrainingError: the function raised (chained), returned another module, replaced a
            parameter, never stepped the optimizer, or left a non-finite parameter.
    """
    fit = resolve_training(config)
    name = config.training.function or "lidgate's built-in loop"
    kwargs: dict[str, Any] = dict(config.training.kwargs)
    if fit is builtin_fit:
        kwargs["seed"] = config.training.seed
        kwargs["freeze_norm_stats"] = freeze_norm_stats
    before = dict(model.named_parameters())
    steps = _StepCounter(optimizer)
    try:
        with torch.random.fork_rng(devices=_cuda_devices()):
            torch.manual_seed(config.training.seed)
            result = fit(model, optimizer, data, **kwargs)
    except Exception as exc:  # noqa: BLE001 — the team's code failed: say whose and why
        raise TrainingError(f"training.function {name} raised {type(exc).__name__}: {exc}") from exc
    finally:
        steps.remove()
    _check_contract(name, model, result, before, steps.count)
    return model


def _check_contract(name: str, model: nn.Module, result: Any, before: Mapping[str, nn.Parameter],
                    steps: int | None) -> None:
    if result is not None and result is not model:
        raise TrainingError(f"training.function {name} returned a {type(result).__name__} other than the model it "
                            "was given; expected it to train the given model in place and return it (or None)")
    after = dict(model.named_parameters())
    for pname, p in before.items():
        if after.get(pname) is not p:
            raise TrainingError(f"training.function {name} replaced or removed parameter {pname!r}; expected it to "
                                "change parameters only through optimizer.step() (which keeps them in the LID)")
    added = sorted(set(after) - set(before))
    if added:
        raise TrainingError(f"training.function {name} added parameter(s) {added}; the LID covers only the "
                            "parameters the model had")
    if steps == 0:
        raise TrainingError(f"training.function {name} returned without calling optimizer.step(); expected it to "
                            "train through the optimizer it was given (its steps are projected onto the LID)")
    for pname, p in after.items():
        if not bool(torch.isfinite(p).all()):
            raise TrainingError(f"training.function {name} left non-finite values in parameter {pname!r}")


class _StepCounter:
    """Counts ``step()`` calls of the torch optimizer at the bottom of a (possibly wrapped) optimizer.

    ``ProjectedOptimizer`` is not itself a ``torch.optim.Optimizer``; its steps reach the wrapped one,
    whose step hooks see them. ``count`` is None when no torch optimizer is found.
    """

    def __init__(self, optimizer: Any):
        inner = optimizer
        while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
            inner = inner.optimizer
        self.count: int | None = None
        self._handle = None
        if isinstance(inner, torch.optim.Optimizer):
            self.count = 0
            self._handle = inner.register_step_post_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        assert self.count is not None
        self.count += 1

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []

