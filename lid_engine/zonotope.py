"""Zonotope domains: a centre moved along a few shared directions, plus a small residual box.

    Z = { c + Σ_k ε_k g_k + δ  :  ε_k ∈ [lo_k, hi_k],  |δ| ≤ r }

Why: a box contains every corner, and a corner mixes coordinates that only work together. The
update Domain-IL needs (benchmarks/results/cl_notes.md) is a *diagonal* move of the shared head:
the box spanned by it certifies nothing, while the segment ``θ + ε·(θ' − θ)``, ε ∈ [0, 1], keeps
every example that is right at both ends (the margins are linear along it). A zonotope holds such
directions exactly; the coefficients ε are shared by every parameter tensor, so the parameters
move together.

The generators ``g_k`` are stored per parameter name as (K, *shape) tensors; a parameter without
generators moves only within its residual box. The LID always contains ``c`` when every
coefficient range contains 0 (``Zonotope.segment`` builds such a domain around a model).

**Rounding.** ``project_`` computes ``c + Σ ε_k g_k`` and writes the result in the parameters'
dtype, so a projected point lies in Z only up to that rounding. Every bound therefore covers the
residual widened by ``ρ = (2⁻²³ + (K + 3)·2⁻⁵²)·M + 2⁻¹⁴⁸`` per coordinate (``certified_residual``),
``M = |c| + Σ_k max(|lo_k|, |hi_k|)·|g_k| + r``: more than the float64 computation and the final cast
to float32 or float64 can move a coordinate (Higham's γ bound, one unit roundoff of float32 and
two subnormals of float32).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from . import numerics as rounding
from .domains import _META_FILE, _TENSORS_FILE, Box, read_domain_files
from .errors import DomainMismatchError, InvalidDomainError, InvalidInputError

ZONOTOPE_FORMAT = "lidgate.zonotope/1"
MAX_GENERATORS = 1024  # keeps ρ's (K + 3)·2⁻⁵² term far below float32's unit roundoff
PROJECTION_TOLERANCE = 1e-14  # projected-gradient norm (objective scaled to O(1)) at which the solver stops
PROJECTION_ITERATIONS = 1000
_PARAM_DTYPES = (torch.float32, torch.float64)


class Zonotope:
    """``{c + Σ_k ε_k g_k + δ : ε_k ∈ [lo_k, hi_k], |δ| ≤ r}`` over a model's named parameters.

    ``centre`` and ``residual`` name every parameter (``residual`` may be omitted: zero);
    ``generators`` maps some of them to (K, *shape) tensors; ``coeff_lower``/``coeff_upper`` are
    the K coefficient ranges. Everything is kept in float64: the bounds are computed from it.
    """

    kind = "zonotope"

    def __init__(
        self,
        centre: Mapping[str, Tensor],
        generators: Mapping[str, Tensor],
        coeff_lower: Tensor,
        coeff_upper: Tensor,
        residual: Mapping[str, Tensor] | None = None,
    ):
        self.centre = _float64_dict("centre", centre)
        self.generators = _float64_dict("generators", generators)
        self.coeff_lower = _coefficients("coeff_lower", coeff_lower)
        self.coeff_upper = _coefficients("coeff_upper", coeff_upper)
        self.residual = (_float64_dict("residual", residual) if residual is not None
                         else {n: torch.zeros_like(c) for n, c in self.centre.items()})
        self.validate()
        self._warm: Tensor | None = None  # the last projection's coefficients: the next solve starts there

    # ------------------------------------------------------------------ construction
    @classmethod
    def segment(cls, model: nn.Module, target: Mapping[str, Tensor], *, residual: float = 0.0) -> Zonotope:
        """The segment from the model's parameters to ``target`` (ε ∈ [0, 1], one generator),
        plus a residual box of half-width ``residual`` on every coordinate.

        ``target`` names the parameters that move; the others stay at the model's values. The
        model's own parameters are in the domain exactly (ε = 0, δ = 0)."""
        params = _model_params(model, "Zonotope.segment")
        if not isinstance(residual, (int, float)) or not math.isfinite(residual) or residual < 0:
            raise InvalidDomainError(f"Zonotope.segment: 'residual' must be a finite number ≥ 0, got {residual!r}")
        if not isinstance(target, Mapping) or not target:
            raise InvalidDomainError("Zonotope.segment: 'target' must be a non-empty mapping name -> tensor")
        unknown = sorted(set(target) - set(params))
        if unknown:
            raise DomainMismatchError(f"Zonotope.segment: 'target' names unknown parameters {unknown}")
        generators = {}
        for name, t in target.items():
            if not isinstance(t, Tensor) or tuple(t.shape) != tuple(params[name].shape):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise DomainMismatchError(
                    f"Zonotope.segment: target['{name}'] must be a tensor of shape {tuple(params[name].shape)}, got {got}")
            generators[name] = (t.detach().double().cpu() - params[name])[None]
        residuals = {n: torch.full_like(p, float(residual)) for n, p in params.items()}
        one = torch.ones(1, dtype=torch.float64)
        return cls(params, generators, torch.zeros_like(one), one, residuals)

    @classmethod
    def from_box(cls, box: Box) -> Zonotope:
        """The box as a zonotope without generators (centre = midpoint, residual = radius rounded up)."""
        centre, residual = {}, {}
        for n in box.names:
            lo, hi = box.lower[n].detach().double().cpu(), box.upper[n].detach().double().cpu()
            centre[n], residual[n] = rounding.midpoint_radius(lo, hi)
        return cls(centre, {}, torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), residual)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``InvalidDomainError`` unless names, shapes and ranges are consistent and finite."""
        if not self.centre:
            raise InvalidDomainError("Zonotope: 'centre' names no parameters")
        k = len(self.coeff_lower)
        if len(self.coeff_upper) != k:
            raise InvalidDomainError(
                f"Zonotope: coeff_lower has {k} entries, coeff_upper {len(self.coeff_upper)}")
        if k > MAX_GENERATORS:
            raise InvalidDomainError(f"Zonotope: at most {MAX_GENERATORS} generators, got {k}")
        if bool((self.coeff_lower > self.coeff_upper).any()):
            i = int((self.coeff_lower > self.coeff_upper).nonzero()[0])
            raise InvalidDomainError(
                f"Zonotope: coefficient {i} has lower > upper ({float(self.coeff_lower[i]):.6g} > "
                f"{float(self.coeff_upper[i]):.6g})")
        for arg, names in (("generators", self.generators), ("residual", self.residual)):
            unknown = sorted(set(names) - set(self.centre))
            if unknown:
                raise InvalidDomainError(f"Zonotope: '{arg}' names parameters not in 'centre': {unknown}")
        missing = sorted(set(self.centre) - set(self.residual))
        if missing:
            raise InvalidDomainError(f"Zonotope: 'residual' lacks parameters {missing}")
        for n, c in self.centre.items():
            if tuple(self.residual[n].shape) != tuple(c.shape):
                raise InvalidDomainError(
                    f"Zonotope: residual['{n}'] has shape {tuple(self.residual[n].shape)}, centre {tuple(c.shape)}")
            if bool((self.residual[n] < 0).any()):
                raise InvalidDomainError(f"Zonotope: residual['{n}'] has negative entries")
            g = self.generators.get(n)
            if g is not None and tuple(g.shape) != (k, *c.shape):
                raise InvalidDomainError(
                    f"Zonotope: generators['{n}'] must have shape {(k, *tuple(c.shape))} (K generators × the "
                    f"parameter's shape), got {tuple(g.shape)}")

    def check_matches(self, model: nn.Module, where: str = "domain") -> None:
        """Raise ``DomainMismatchError`` unless the zonotope covers exactly the model's parameters."""
        if not isinstance(model, nn.Module):
            raise DomainMismatchError(f"{where}: 'model' must be a torch.nn.Module, got {type(model).__name__}")
        params = dict(model.named_parameters())
        missing, extra = sorted(set(params) - set(self.centre)), sorted(set(self.centre) - set(params))
        if missing or extra:
            raise DomainMismatchError(
                f"{where}: the zonotope does not match model {type(model).__name__}: missing parameters "
                f"{missing}, unknown parameters {extra}")
        for n, p in params.items():
            if tuple(self.centre[n].shape) != tuple(p.shape):
                raise DomainMismatchError(
                    f"{where}: parameter '{n}' has shape {tuple(p.shape)} in the model but "
                    f"{tuple(self.centre[n].shape)} in the zonotope")

    # ------------------------------------------------------------------ derived quantities
    @property
    def names(self) -> list[str]:
        return list(self.centre)

    @property
    def n_generators(self) -> int:
        return len(self.coeff_lower)

    def contains_centre(self) -> bool:
        return bool(((self.coeff_lower <= 0) & (self.coeff_upper >= 0)).all())

    def _reach(self, name: str, residual: Tensor) -> Tensor:
        """Σ_k max(|lo_k|, |hi_k|)·|g_k| + residual (float64, rounded up): how far ``name`` can move."""
        out = residual
        g = self.generators.get(name)
        if g is not None and len(g):
            scale = torch.maximum(self.coeff_lower.abs(), self.coeff_upper.abs()).reshape(-1, *[1] * (g.dim() - 1))
            out = (g.abs() * scale).sum(0) + residual
            out = rounding.round_up(out * (1 + rounding.gamma(len(g) + 2, torch.float64)))
        return out

    def certified_residual(self, name: str) -> Tensor:
        """The residual half-width every bound covers: ``r + ρ`` (module docstring), rounded up."""
        m = self.centre[name].abs() + self._reach(name, self.residual[name])
        rho = m * ((2.0**-23 + (self.n_generators + 3) * 2.0**-52) * 1.01) + 2.0**-148
        return rounding.round_up(self.residual[name] + rounding.round_up(rho))

    def reach(self, name: str) -> Tensor:
        """Half-width of the box centred at ``c`` that holds the certified zonotope (rounded up)."""
        return self._reach(name, self.certified_residual(name))

    def bounding_box(self) -> Box:
        """The smallest box around the centre's offsets that holds every certified point, float64,
        rounded outward: what IBP (and the linear bound's intermediate intervals) propagate."""
        lower, upper = {}, {}
        for n, c in self.centre.items():
            r = self.certified_residual(n)
            g = self.generators.get(n)
            lo_off, hi_off = -r, r
            mag = c.abs() + r
            if g is not None and len(g):
                shape = (-1, *[1] * (g.dim() - 1))
                a, b = g * self.coeff_lower.reshape(shape), g * self.coeff_upper.reshape(shape)
                lo_off = torch.minimum(a, b).sum(0) - r
                hi_off = torch.maximum(a, b).sum(0) + r
                mag = c.abs() + self._reach(n, r)
            slack = rounding.round_up(mag * (rounding.gamma(self.n_generators + 3, torch.float64) * 1.01)) + 2.0**-1070
            lower[n] = rounding.round_down(rounding.round_down(c + lo_off) - slack)
            upper[n] = rounding.round_up(rounding.round_up(c + hi_off) + slack)
        return Box(lower, upper)

    # ------------------------------------------------------------------ points of the domain
    def point(self, coefficients: Tensor, offsets: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``c + Σ_k ε_k g_k + δ`` (float64) for given coefficients and residual offsets (|δ| ≤ r)."""
        eps = self._checked_coefficients(coefficients, "Zonotope.point")
        if bool(((eps < self.coeff_lower) | (eps > self.coeff_upper)).any()):
            raise InvalidDomainError("Zonotope.point: a coefficient lies outside its range")
        offsets = self._checked_offsets(offsets, "Zonotope.point")
        out = {}
        for n in self.centre:
            p = self._moved(n, eps)
            if n in offsets:
                if not bool((offsets[n].abs() <= self.residual[n]).all()):
                    raise InvalidDomainError(f"Zonotope.point: offsets['{n}'] exceed the residual")
                p = p + offsets[n]
            out[n] = p
        return out

    def _moved(self, name: str, eps: Tensor) -> Tensor:
        """``c + Σ_k ε_k g_k`` for one parameter (float64): the point before the residual offset."""
        g = self.generators.get(name)
        return self.centre[name] + ((g * eps.reshape(-1, *[1] * (g.dim() - 1))).sum(0) if g is not None else 0.0)

    def sample(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A point drawn with uniform coefficients and uniform residual offsets."""
        u = torch.rand(self.n_generators, generator=generator, dtype=torch.float64)
        eps = self.coeff_lower + (self.coeff_upper - self.coeff_lower) * u
        eps = torch.minimum(torch.maximum(eps, self.coeff_lower), self.coeff_upper)
        offsets = {n: (2 * torch.rand(r.shape, generator=generator, dtype=torch.float64) - 1) * r
                   for n, r in self.residual.items()}
        return self.point(eps, offsets)

    def vertex(self, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """A random vertex: every coefficient at an end of its range, every offset at ±r."""
        pick = torch.rand(self.n_generators, generator=generator) < 0.5
        eps = torch.where(pick, self.coeff_upper, self.coeff_lower)
        offsets = {n: torch.where(torch.rand(r.shape, generator=generator) < 0.5, r, -r)
                   for n, r in self.residual.items()}
        return self.point(eps, offsets)

    # ------------------------------------------------------------------ projection
    def nearest_coefficients(self, model_or_params: nn.Module | Mapping[str, Tensor]) -> Tensor:
        """The coefficients of the Euclidean projection of the parameters onto Z.

        With the residual box eliminated, the squared distance is
        ``f(ε) = Σ_i max(|d_i − (Gε)_i| − r_i, 0)²`` with ``d = θ − c``: convex, piecewise quadratic,
        with a continuous gradient. It is minimised over the coefficient box by L-BFGS-B, each
        generator rescaled to unit norm (so generators of very different lengths do not stall the
        solver), warm-started at the previous solution."""
        from scipy.optimize import minimize  # here: importing scipy.optimize edits the global warning filters
        params = self._params_of(model_or_params, "nearest_coefficients")
        for n, p in params.items():
            if not bool(torch.isfinite(p.detach()).all()):
                raise InvalidInputError(f"Zonotope.nearest_coefficients: parameter '{n}' holds NaN or inf")
        k = self.n_generators
        names = [n for n in self.names if n in self.generators]
        start = self._warm if self._warm is not None else torch.zeros(k, dtype=torch.float64)
        eps = torch.minimum(torch.maximum(start, self.coeff_lower), self.coeff_upper)
        if k == 0 or not names:  # no generator moves any coordinate: every ε is as near as any other
            return eps
        G = torch.cat([self.generators[n].reshape(k, -1) for n in names], 1)
        d = torch.cat([(params[n].detach().double().cpu() - self.centre[n]).reshape(-1) for n in names])
        r = torch.cat([self.residual[n].reshape(-1) for n in names])
        norms = G.norm(dim=1)
        scale = torch.where(norms > 0, norms, torch.ones_like(norms))
        Gs = (G / scale[:, None]).numpy()
        d_np, r_np = d.numpy(), r.numpy()
        weight = 1.0 / (1.0 + float(d.abs().max()) ** 2)  # keeps the objective O(1) for the tolerances

        def objective(eta: np.ndarray) -> tuple[float, np.ndarray]:
            s = d_np - eta @ Gs
            excess = np.sign(s) * np.maximum(np.abs(s) - r_np, 0.0)
            return weight * float(excess @ excess), -2.0 * weight * (Gs @ excess)

        bounds = list(zip((self.coeff_lower * scale).tolist(), (self.coeff_upper * scale).tolist()))
        result = minimize(objective, (eps * scale).numpy(), jac=True, method="L-BFGS-B", bounds=bounds,
                          options={"maxiter": PROJECTION_ITERATIONS, "ftol": 0.0, "gtol": PROJECTION_TOLERANCE})
        eps = torch.as_tensor(result.x, dtype=torch.float64) / scale
        eps = torch.minimum(torch.maximum(eps, self.coeff_lower), self.coeff_upper)
        if not bool(torch.isfinite(eps).all()):  # e.g. generator norms overflow float64: no answer, not a guess
            raise InvalidDomainError("Zonotope.nearest_coefficients: the projection is not finite (generators too "
                                     "large for float64?); no point can be judged inside")
        self._warm = eps
        return eps.clone()  # the caller's copy: editing it must not move the next warm start

    def project_(self, model: nn.Module) -> nn.Module:
        """Move the model's parameters to (a solver-accurate) nearest point of Z, in place.

        The result always lies in the certified zonotope: the coefficients are clamped to their
        ranges and the residual step is a clamp; only the final rounding is left, which
        ``certified_residual`` covers."""
        params = self._writable_params(model, "Zonotope.project_")
        eps = self.nearest_coefficients(params)
        targets = {}
        for n, p in params.items():
            moved, r = self._moved(n, eps), self.residual[n]
            targets[n] = torch.minimum(torch.maximum(p.detach().double().cpu(), moved - r), moved + r)
        self._write(params, targets, "Zonotope.project_")
        return model

    def write_(self, model: nn.Module, coefficients: Tensor, offsets: Mapping[str, Tensor] | None = None) -> nn.Module:
        """Write the point ``c + Σ_k ε_k g_k + δ`` into the model's parameters, in place.

        Coefficients are clamped to their ranges and offsets to the residual box (missing: 0), so
        the written point is in the certified zonotope whatever the caller's arithmetic did."""
        params = self._writable_params(model, "Zonotope.write_")
        eps = self._checked_coefficients(coefficients, "Zonotope.write_")
        eps = torch.minimum(torch.maximum(eps, self.coeff_lower), self.coeff_upper)
        offsets = self._checked_offsets(offsets, "Zonotope.write_")
        targets = {}
        for n in params:
            r = self.residual[n]
            d = torch.minimum(torch.maximum(offsets[n], -r), r) if n in offsets else torch.zeros_like(r)
            targets[n] = self._moved(n, eps) + d
        self._write(params, targets, "Zonotope.write_")
        return model

    def _checked_coefficients(self, coefficients: Tensor, where: str) -> Tensor:
        """The coefficients as a float64 CPU copy, one finite value per generator."""
        eps = _coefficients("coefficients", coefficients)
        if len(eps) != self.n_generators:
            raise InvalidDomainError(f"{where}: expected {self.n_generators} coefficients, got {len(eps)}")
        return eps

    def _checked_offsets(self, offsets: Mapping[str, Tensor] | None, where: str) -> dict[str, Tensor]:
        """Residual offsets (a point's δ) as float64 CPU copies, each a finite tensor of its parameter's shape."""
        if offsets is None:
            return {}
        if not isinstance(offsets, Mapping):
            raise InvalidDomainError(f"{where}: 'offsets' must be a mapping name -> tensor, got {type(offsets).__name__}")
        unknown = sorted(set(offsets) - set(self.centre))
        if unknown:
            raise DomainMismatchError(f"{where}: 'offsets' names parameters not in the zonotope: {unknown}")
        out = {}
        for n, d in offsets.items():
            shape = tuple(self.centre[n].shape)
            if not isinstance(d, Tensor) or not d.is_floating_point() or tuple(d.shape) != shape:
                got = f"{d.dtype} of shape {tuple(d.shape)}" if isinstance(d, Tensor) else type(d).__name__
                raise InvalidDomainError(f"{where}: offsets['{n}'] must be a floating-point tensor of shape {shape}, got {got}")
            d = d.detach().to("cpu", torch.float64, copy=True)
            if not bool(torch.isfinite(d).all()):
                raise InvalidDomainError(f"{where}: offsets['{n}'] holds NaN or inf")
            out[n] = d
        return out

    @staticmethod
    def _write(params: dict[str, Tensor], targets: dict[str, Tensor], where: str) -> None:
        """Cast float64 targets to each parameter's dtype and copy them in; nothing is written
        unless every parameter can hold its value."""
        cast = {}
        for n, p in params.items():
            cast[n] = targets[n].to(p.dtype)
            if not bool(torch.isfinite(cast[n]).all()):
                raise DomainMismatchError(f"{where}: the zonotope's points for '{n}' exceed the range of "
                                          f"{p.dtype}; nothing was written")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(cast[n].to(p.device))

    def _writable_params(self, model: nn.Module, where: str) -> dict[str, Tensor]:
        """The model's parameters, refusing dtypes a point cannot be written in and NaN/inf."""
        self.check_matches(model, where)
        params = dict(model.named_parameters())
        for n, p in params.items():
            if p.dtype not in _PARAM_DTYPES:
                raise DomainMismatchError(
                    f"{where}: parameter '{n}' is {p.dtype}; projection writes float32 or float64 only")
            if not bool(torch.isfinite(p.detach()).all()):  # a diverged step: no nearest point to go to
                raise InvalidInputError(f"{where}: parameter '{n}' holds NaN or inf (a diverged "
                                        "update?); nothing was written")
        return params

    def distance2(self, model_or_params: nn.Module | Mapping[str, Tensor]) -> float:
        """Squared Euclidean distance to the (solver-accurate) projection; 0 inside, inf for
        parameters holding NaN or inf."""
        params = self._finite_params(model_or_params, "distance2")
        if params is None:
            return math.inf
        eps = self.nearest_coefficients(params)
        total = 0.0
        for n in self.names:
            moved = self._moved(n, eps)
            gap = ((params[n].detach().double().cpu() - moved).abs() - self.residual[n]).clamp(min=0)
            total += float(gap.pow(2).sum())
        return total

    def contains(self, model_or_params: nn.Module | Mapping[str, Tensor]) -> bool:
        """Whether the parameters lie in the certified zonotope, judged at the projection's
        coefficients (a point the solver cannot reach within rounding reads as outside; NaN or inf
        never lies inside)."""
        params = self._finite_params(model_or_params, "contains")
        if params is None:
            return False
        eps = self.nearest_coefficients(params)
        for n in self.names:
            moved = self._moved(n, eps)
            if bool(((params[n].detach().double().cpu() - moved).abs() > self.certified_residual(n)).any()):
                return False
        return True

    # ------------------------------------------------------------------ persistence
    def tensors(self) -> dict[str, Tensor]:
        """Flat tensor dict as stored on disk (copies); a certificate's ``domain_sha256`` fingerprints it."""
        flat = {f"centre/{n}": t.clone() for n, t in self.centre.items()}
        flat.update({f"residual/{n}": t.clone() for n, t in self.residual.items()})
        flat.update({f"generators/{n}": t.clone() for n, t in self.generators.items()})
        flat["coeff_lower"], flat["coeff_upper"] = self.coeff_lower.clone(), self.coeff_upper.clone()
        return flat

    def save(self, directory: str | Path) -> Path:
        """Write ``domain.safetensors`` + ``domain.json`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.tensors(), str(directory / _TENSORS_FILE))
        meta = {"format": ZONOTOPE_FORMAT, "kind": self.kind, "names": self.names,
                "generator_names": list(self.generators), "n_generators": self.n_generators}
        (directory / _META_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Zonotope:
        meta, flat, meta_path, tensor_path = read_domain_files(directory, ZONOTOPE_FORMAT, "Zonotope.load")
        names, gnames = meta.get("names"), meta.get("generator_names")
        if not all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in (names, gnames)):
            raise InvalidDomainError(f"Zonotope.load: '{meta_path}' lacks the lists 'names' and 'generator_names'")
        wanted = ({f"centre/{n}" for n in names} | {f"residual/{n}" for n in names}
                  | {f"generators/{n}" for n in gnames} | {"coeff_lower", "coeff_upper"})
        if set(flat) != wanted:
            raise InvalidDomainError(
                f"Zonotope.load: '{tensor_path}' holds {sorted(set(flat) ^ wanted)[:5]} against what '{meta_path}' names")
        return cls({n: flat[f"centre/{n}"] for n in names}, {n: flat[f"generators/{n}"] for n in gnames},
                   flat["coeff_lower"], flat["coeff_upper"], {n: flat[f"residual/{n}"] for n in names})

    # ------------------------------------------------------------------ helpers
    def _params_of(self, model_or_params, where: str) -> dict[str, Tensor]:
        if isinstance(model_or_params, nn.Module):
            self.check_matches(model_or_params, f"Zonotope.{where}")
            return dict(model_or_params.named_parameters())
        params = dict(model_or_params)
        for n, c in self.centre.items():
            p = params.get(n)
            if not isinstance(p, Tensor) or tuple(p.shape) != tuple(c.shape):
                got = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise DomainMismatchError(f"Zonotope.{where}: parameter '{n}' must be a tensor of shape "
                                          f"{tuple(c.shape)}, got {got}")
        return params

    def _finite_params(self, model_or_params, where: str) -> dict[str, Tensor] | None:
        """The parameters, or None when one holds NaN or inf (such a point lies in no domain)."""
        params = self._params_of(model_or_params, where)
        for p in params.values():
            if not bool(torch.isfinite(p.detach()).all()):
                return None
        return params

    def __repr__(self) -> str:
        return f"Zonotope({len(self.centre)} tensors, {self.n_generators} generators)"


def _model_params(model: nn.Module, where: str) -> dict[str, Tensor]:
    if not isinstance(model, nn.Module):
        raise DomainMismatchError(f"{where}: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    params = {n: p.detach().to("cpu", torch.float64, copy=True) for n, p in model.named_parameters()}
    if not params:
        raise DomainMismatchError(f"{where}: model {type(model).__name__} has no parameters")
    return params


def _float64_dict(arg: str, value: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Copies in float64 on the CPU: the exact values the bounds and the projection start from."""
    if not isinstance(value, Mapping):
        raise InvalidDomainError(f"Zonotope: '{arg}' must be a mapping name -> tensor, got {type(value).__name__}")
    out = {}
    for name, t in value.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise InvalidDomainError(f"Zonotope: {arg}['{name}'] must be a floating-point tensor, got {got}")
        if t.dtype not in _PARAM_DTYPES:
            raise InvalidDomainError(f"Zonotope: {arg}['{name}'] is {t.dtype}; use float32 or float64 (exact in float64)")
        t = t.detach().to("cpu", torch.float64, copy=True)  # never the caller's tensor: training must not move Z
        if not bool(torch.isfinite(t).all()):
            raise InvalidDomainError(f"Zonotope: {arg}['{name}'] holds NaN or inf")
        out[name] = t
    return out


def _coefficients(arg: str, value: Tensor) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 1 or not value.is_floating_point():
        got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise InvalidDomainError(f"Zonotope: '{arg}' must be a 1-D floating-point tensor (one entry per generator), got {got}")
    value = value.detach().to("cpu", torch.float64, copy=True)
    if not bool(torch.isfinite(value).all()):
        raise InvalidDomainError(f"Zonotope: '{arg}' holds NaN or inf")
    return value


__all__ = ["Zonotope", "ZONOTOPE_FORMAT", "MAX_GENERATORS"]
