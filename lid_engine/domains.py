"""Parameter-space domains: orthotopes (``Box``) over a model's named parameters.

A box is stored canonically as (lower, upper) per ``model.named_parameters()`` name. Midpoint and
radius are derived on demand and never stored, so there is a single source of truth that an
auditor can fingerprint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import DomainMismatchError, InvalidDomainError

BOX_FORMAT = "lidgate.box/1"
_TENSORS_FILE = "domain.safetensors"
_META_FILE = "domain.json"


def _as_tensor_dict(arg: str, value: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not isinstance(value, Mapping):
        raise InvalidDomainError(f"Box: '{arg}' must be a mapping name -> tensor, got {type(value).__name__}")
    out = {}
    for name, t in value.items():
        if not isinstance(t, Tensor):
            raise InvalidDomainError(f"Box: {arg}['{name}'] must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise InvalidDomainError(f"Box: {arg}['{name}'] must be floating point, got {t.dtype}")
        out[name] = t
    return out


@runtime_checkable
class Domain(Protocol):
    """What the engine asks of a parameter-space domain; ``Box`` and ``lid_engine.Zonotope`` both
    provide it. Bounds propagate through ``bounding_box()`` (a zonotope's linear bound also uses its
    generators); projection, sampling and saving go through the domain itself."""

    def check_matches(self, model: nn.Module, where: str = "domain") -> None: ...
    def contains(self, model_or_params: nn.Module | Mapping[str, Tensor]) -> bool: ...
    def project_(self, model: nn.Module) -> nn.Module: ...
    def sample(self, generator: torch.Generator | None = None) -> dict[str, Tensor]: ...
    def vertex(self, generator: torch.Generator | None = None) -> dict[str, Tensor]: ...
    def bounding_box(self) -> Box: ...
    def save(self, directory: str | Path) -> Path: ...


class Box:
    """An orthotope ``{θ : lower ≤ θ ≤ upper}`` over named parameters.

    ``lower``/``upper`` map every ``model.named_parameters()`` name to a tensor of that
    parameter's shape. Tensors may require grad (the LID search optimises them directly).
    """

    kind = "box"

    def __init__(self, lower: Mapping[str, Tensor], upper: Mapping[str, Tensor], *, check: bool = True):
        self.lower = _as_tensor_dict("lower", lower)
        self.upper = _as_tensor_dict("upper", upper)
        if check:
            self.validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def around(
        cls,
        model: nn.Module,
        radius: float,
        *,
        relative: bool = False,
        names: Iterable[str] | None = None,
    ) -> Box:
        """Symmetric box around the model's current parameters.

        ``radius`` is absolute (every coordinate gets ``±radius``) or, with ``relative=True``,
        proportional to the magnitude of each weight (``±radius·|θ_i|``). ``names`` restricts the
        width to those parameters; all others get zero width.
        """
        if not isinstance(radius, (int, float)) or not math.isfinite(radius) or radius < 0:
            raise InvalidDomainError(f"Box.around: 'radius' must be a finite number ≥ 0, got {radius!r}")
        params = dict(model.named_parameters())
        if not params:
            raise DomainMismatchError(f"Box.around: model {type(model).__name__} has no parameters")
        widen = set(params) if names is None else {names} if isinstance(names, str) else set(names)
        unknown = widen - set(params)
        if unknown:
            raise DomainMismatchError(f"Box.around: 'names' lists unknown parameters {sorted(unknown)}")
        lower, upper = {}, {}
        for name, p in params.items():
            centre = p.detach().clone()
            if name in widen:
                r = radius * centre.abs() if relative else torch.full_like(centre, float(radius))
            else:
                r = torch.zeros_like(centre)
            lower[name], upper[name] = centre - r, centre + r
            # centre ± r may round inward; push outward so the centre is always inside.
            lower[name] = torch.minimum(lower[name], centre)
            upper[name] = torch.maximum(upper[name], centre)
        return cls(lower, upper)

    @classmethod
    def relative_around(cls, model: nn.Module, radius: float, **kwargs) -> Box:
        """Box with radius ``radius·|θ_i|`` per coordinate (zero-valued weights get zero width)."""
        return cls.around(model, radius, relative=True, **kwargs)

    @classmethod
    def point(cls, model: nn.Module) -> Box:
        """Zero-width box at the model's current parameters."""
        return cls.around(model, 0.0)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``InvalidDomainError`` unless names match, shapes match, bounds are finite and ordered."""
        if set(self.lower) != set(self.upper):
            only_lo, only_hi = sorted(set(self.lower) - set(self.upper)), sorted(set(self.upper) - set(self.lower))
            raise InvalidDomainError(
                f"Box: lower and upper name different parameters: only in lower {only_lo}, only in upper {only_hi}"
            )
        if not self.lower:
            raise InvalidDomainError("Box: no parameters")
        for name in self.lower:
            lo, hi = self.lower[name], self.upper[name]
            if lo.shape != hi.shape:
                raise InvalidDomainError(
                    f"Box: parameter '{name}': lower has shape {tuple(lo.shape)}, upper {tuple(hi.shape)}"
                )
            if lo.dtype != hi.dtype or lo.device != hi.device:
                raise InvalidDomainError(f"Box: parameter '{name}': lower/upper differ in dtype or device")
            with torch.no_grad():
                if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                    raise InvalidDomainError(f"Box: parameter '{name}' has NaN or infinite bounds")
                bad = lo > hi
                if bad.any():
                    idx = tuple(int(i) for i in bad.nonzero()[0])
                    raise InvalidDomainError(
                        f"Box: parameter '{name}' has lower > upper at index {idx} "
                        f"({float(lo[idx]):.6g} > {float(hi[idx]):.6g})"
                    )

    def check_matches(self, model: nn.Module, where: str = "domain") -> None:
        """Raise ``DomainMismatchError`` unless the box covers exactly the model's named parameters."""
        params = dict(model.named_parameters())
        missing = sorted(set(params) - set(self.lower))
        extra = sorted(set(self.lower) - set(params))
        if missing or extra:
            raise DomainMismatchError(
                f"{where}: the box does not match model {type(model).__name__}: "
                f"missing parameters {missing}, unknown parameters {extra}"
            )
        for name, p in params.items():
            if tuple(self.lower[name].shape) != tuple(p.shape):
                raise DomainMismatchError(
                    f"{where}: parameter '{name}' has shape {tuple(p.shape)} in the model but "
                    f"{tuple(self.lower[name].shape)} in the box"
                )

    # ------------------------------------------------------------------ derived quantities
    @property
    def names(self) -> list[str]:
        return list(self.lower)

    def midpoint(self, name: str) -> Tensor:
        return (self.lower[name] + self.upper[name]) / 2

    def radius(self, name: str) -> Tensor:
        return (self.upper[name] - self.lower[name]) / 2

    def width(self, name: str) -> Tensor:
        return self.upper[name] - self.lower[name]

    def numel(self) -> int:
        return sum(t.numel() for t in self.lower.values())

    def width_sum(self) -> float:
        """Sum of all coordinate widths (the paper's L1 size, α = 0)."""
        with torch.no_grad():
            return float(sum(self.width(n).double().sum() for n in self.names))

    def mean_width(self) -> float:
        return self.width_sum() / self.numel()

    def log_volume(self, eps: float = 0.0) -> float:
        """Σ log(width_i + eps); ``-inf`` when some width is zero and ``eps == 0``."""
        with torch.no_grad():
            return float(sum(torch.log(self.width(n).double() + eps).sum() for n in self.names))

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.lower.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.lower.values())).device

    # ------------------------------------------------------------------ set operations
    def contains(self, model_or_params: nn.Module | Mapping[str, Tensor], atol: float = 0.0) -> bool:
        """True iff every parameter lies in [lower − atol, upper + atol]."""
        params = self._params_of(model_or_params, "contains")
        with torch.no_grad():
            for name, lo in self.lower.items():
                p, lo, hi = _common(params[name], lo, self.upper[name])
                if not bool(((p >= lo - atol) & (p <= hi + atol)).all()):
                    return False
        return True

    def distance2(self, model_or_params: nn.Module | Mapping[str, Tensor]) -> float:
        """Squared Euclidean distance from the parameters to the box (0 inside)."""
        params = self._params_of(model_or_params, "distance2")
        with torch.no_grad():
            total = 0.0
            for name, lo in self.lower.items():
                p, lo, hi = _common(params[name], lo, self.upper[name])
                gap = (lo - p).clamp(min=0) + (p - hi).clamp(min=0)
                total += float(gap.double().pow(2).sum())
        return total

    def project_(self, model: nn.Module) -> nn.Module:
        """Clamp the model's parameters into the box in place (Euclidean projection) and return it."""
        self.check_matches(model, "Box.project_")
        with torch.no_grad():
            for name, p in model.named_parameters():
                lo, hi = self.lower[name].detach(), self.upper[name].detach()
                lo_c, hi_c = lo.to(p.device, p.dtype), hi.to(p.device, p.dtype)
                if p.dtype != lo.dtype:
                    # Round inward: a nearest-rounded bound may lie outside the box, and a parameter
                    # clamped onto it would then not be contained.
                    lo_w, hi_w = lo.to(p.device), hi.to(p.device)
                    lo_c = torch.where(_wider(lo_c, lo_w) < lo_w, torch.nextafter(lo_c, torch.full_like(lo_c, math.inf)), lo_c)
                    hi_c = torch.where(_wider(hi_c, hi_w) > hi_w, torch.nextafter(hi_c, torch.full_like(hi_c, -math.inf)), hi_c)
                    if bool((lo_c > hi_c).any()):
                        idx = tuple(int(i) for i in (lo_c > hi_c).nonzero()[0])
                        raise InvalidDomainError(
                            f"Box.project_: parameter '{name}' at index {idx}: no {p.dtype} value lies in the "
                            f"box (it is narrower than one {p.dtype} ulp there)"
                        )
                torch.clamp_(p, min=lo_c, max=hi_c)
        return model

    def intersection(self, other: Box) -> Box:
        """Element-wise intersection; raises ``InvalidDomainError`` when it is empty."""
        if set(self.names) != set(other.names):
            raise DomainMismatchError("Box.intersection: the boxes name different parameters")
        for n in self.names:
            if self.lower[n].shape != other.lower[n].shape:
                raise DomainMismatchError(
                    f"Box.intersection: parameter '{n}' has shape {tuple(self.lower[n].shape)} in one box "
                    f"and {tuple(other.lower[n].shape)} in the other"
                )
        lower, upper = {}, {}
        for n in self.names:
            a_lo, b_lo = _common(self.lower[n], other.lower[n])
            a_hi, b_hi = _common(self.upper[n], other.upper[n])
            lower[n], upper[n] = torch.maximum(a_lo, b_lo), torch.minimum(a_hi, b_hi)
        for n in self.names:
            if bool((lower[n] > upper[n]).any()):
                raise InvalidDomainError(f"Box.intersection: empty intersection in parameter '{n}'")
        return Box(lower, upper)

    def is_subset(self, other: Box, atol: float = 0.0) -> bool:
        """True iff this box lies inside ``other``."""
        if set(self.names) != set(other.names):
            return False
        if any(self.lower[n].shape != other.lower[n].shape for n in self.names):
            return False
        with torch.no_grad():
            for n in self.names:
                a_lo, b_lo = _common(self.lower[n], other.lower[n])
                a_hi, b_hi = _common(self.upper[n], other.upper[n])
                if not (bool((a_lo >= b_lo - atol).all()) and bool((a_hi <= b_hi + atol).all())):
                    return False
            return True

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Box:
        """Copy onto ``device``/``dtype``. Casting to a lower precision rounds outward (stays sound)."""
        lower, upper = {}, {}
        for n in self.names:
            lo = self.lower[n].detach().to(device=device, copy=True)
            hi = self.upper[n].detach().to(device=device, copy=True)
            if dtype is not None and dtype != lo.dtype:
                lo_c, hi_c = lo.to(dtype), hi.to(dtype)
                # Round outward: a narrowing cast may move a bound inside the original box.
                lo_c = torch.where(lo_c.to(lo.dtype) > lo, torch.nextafter(lo_c, torch.full_like(lo_c, -math.inf)), lo_c)
                hi_c = torch.where(hi_c.to(hi.dtype) < hi, torch.nextafter(hi_c, torch.full_like(hi_c, math.inf)), hi_c)
                if not bool(torch.isfinite(lo_c).all() and torch.isfinite(hi_c).all()):
                    raise InvalidDomainError(
                        f"Box.to: bounds of '{n}' exceed the range of {dtype} (largest magnitude "
                        f"{float(torch.maximum(lo.abs().max(), hi.abs().max())):.3g}); keep the box in {lo.dtype}"
                    )
                lo, hi = lo_c, hi_c
            lower[n], upper[n] = lo, hi
        return Box(lower, upper)

    def bounding_box(self) -> Box:
        """The box itself (the ``Domain`` protocol: a zonotope returns its enclosing box)."""
        return self

    def detach(self) -> Box:
        return Box({n: t.detach().clone() for n, t in self.lower.items()},
                   {n: t.detach().clone() for n, t in self.upper.items()}, check=False)

    def sample(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A parameter vector drawn uniformly from the box (clamped so rounding cannot leave it)."""
        out = {}
        for n in self.names:
            lo, hi = self.lower[n].detach(), self.upper[n].detach()
            u = torch.rand(lo.shape, generator=generator, dtype=lo.dtype, device="cpu").to(lo.device)
            out[n] = torch.minimum(torch.maximum(lo + (hi - lo) * u, lo), hi)
        return out

    def vertex(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A random vertex of the box: each coordinate at its lower or its upper bound."""
        out = {}
        for n in self.names:
            lo, hi = self.lower[n].detach(), self.upper[n].detach()
            pick = torch.rand(lo.shape, generator=generator, device="cpu").to(lo.device) < 0.5
            out[n] = torch.where(pick, hi, lo)
        return out

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, Tensor]:
        """Flat tensor dict as stored on disk (``lower/NAME``, ``upper/NAME``)."""
        flat = {}
        for n in self.names:
            flat[f"lower/{n}"] = self.lower[n].detach().cpu().contiguous()
            flat[f"upper/{n}"] = self.upper[n].detach().cpu().contiguous()
        return flat

    def save(self, directory: str | Path) -> Path:
        """Write ``domain.safetensors`` + ``domain.json`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(directory / _TENSORS_FILE))
        meta = {
            "format": BOX_FORMAT,
            "kind": self.kind,
            "names": self.names,
            "shapes": {n: list(self.lower[n].shape) for n in self.names},
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        (directory / _META_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Box:
        meta, flat, meta_path, tensor_path = read_domain_files(directory, BOX_FORMAT, "Box.load")
        names = meta.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InvalidDomainError(f"Box.load: '{meta_path}' has no list of parameter 'names'")
        lower, upper = {}, {}
        for n in names:
            try:
                lower[n], upper[n] = flat[f"lower/{n}"], flat[f"upper/{n}"]
            except KeyError as exc:
                raise InvalidDomainError(f"Box.load: tensor {exc.args[0]!r} missing from '{tensor_path}'") from None
        if set(flat) != {f"{s}/{n}" for n in names for s in ("lower", "upper")}:
            raise InvalidDomainError(f"Box.load: '{tensor_path}' holds tensors not named in '{meta_path}'")
        for n, shape in meta.get("shapes", {}).items():
            if n in lower and list(lower[n].shape) != list(shape):
                raise InvalidDomainError(
                    f"Box.load: parameter '{n}' has shape {tuple(lower[n].shape)} in '{tensor_path}' but "
                    f"{tuple(shape)} in '{meta_path}'"
                )
        return cls(lower, upper)

    # ------------------------------------------------------------------ helpers
    def _params_of(self, model_or_params, where: str) -> dict[str, Tensor]:
        if isinstance(model_or_params, nn.Module):
            self.check_matches(model_or_params, f"Box.{where}")
            return dict(model_or_params.named_parameters())
        params = dict(model_or_params)
        missing = sorted(set(self.lower) - set(params))
        if missing:
            raise DomainMismatchError(f"Box.{where}: parameters {missing} are missing")
        for name, lo in self.lower.items():
            p = params[name]
            if not isinstance(p, Tensor):
                raise DomainMismatchError(f"Box.{where}: parameter '{name}' must be a torch.Tensor, got {type(p).__name__}")
            if p.shape != lo.shape:
                raise DomainMismatchError(
                    f"Box.{where}: parameter '{name}' has shape {tuple(p.shape)}, the box {tuple(lo.shape)}"
                )
        return params

    def __repr__(self) -> str:
        return f"Box({len(self.names)} tensors, {self.numel()} coordinates, width_sum={self.width_sum():.4g})"


def read_domain_files(directory: str | Path, fmt: str, where: str) -> tuple[dict, dict[str, Tensor], Path, Path]:
    """(meta, tensors, meta path, tensor path) of a saved domain, its format checked: the part every
    domain's ``load`` shares."""
    directory = Path(directory)
    meta_path, tensor_path = directory / _META_FILE, directory / _TENSORS_FILE
    if not meta_path.is_file() or not tensor_path.is_file():
        raise InvalidDomainError(f"{where}: '{directory}' lacks {_META_FILE} or {_TENSORS_FILE}")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidDomainError(f"{where}: '{meta_path}' is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise InvalidDomainError(f"{where}: '{meta_path}' has format {got!r}, expected {fmt!r}")
    try:
        flat = load_file(str(tensor_path))
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise InvalidDomainError(f"{where}: '{tensor_path}' is not a readable safetensors file ({exc})") from None
    return meta, flat, meta_path, tensor_path


def _common(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors on the first one's device, in their widest dtype (so no comparison is rounded)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(tensors[0].device, dtype) for t in tensors)


def _wider(narrow: Tensor, wide: Tensor) -> Tensor:
    """``narrow`` cast (exactly) to ``wide``'s dtype for comparison."""
    return narrow.to(torch.promote_types(narrow.dtype, wide.dtype))


def load_parameters_(model: nn.Module, params: Mapping[str, Tensor]) -> nn.Module:
    """Copy a name → tensor mapping into the model's parameters in place."""
    named = dict(model.named_parameters())
    missing = sorted(set(named) - set(params))
    if missing:
        raise DomainMismatchError(f"load_parameters_: parameters {missing} of model {type(model).__name__} are missing")
    for name, p in named.items():
        if tuple(params[name].shape) != tuple(p.shape):
            raise DomainMismatchError(
                f"load_parameters_: parameter '{name}' has shape {tuple(p.shape)} in the model but "
                f"{tuple(params[name].shape)} in the mapping"
            )
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name].to(p.device, p.dtype))
    return model
