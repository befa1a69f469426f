"""Projection of updates back into a domain: the step that makes any optimiser δ-safe.

For one box the Euclidean projection is a coordinate-wise clamp. An LID is a union of boxes that
all contain the nominal point; the projector stays in its current member while the parameters are
inside it, and otherwise picks a member by a strategy (METHOD.md §2.3) and clamps into it:

* ``closest`` — the member at the smallest Euclidean distance;
* ``sample_largest_closest`` — sample with probabilities softmax(size / distance);
* ``best_loss`` — clamp into each member and keep the one with the smallest loss (callback).

Members are kept flattened on the parameters' device, so a projection is a few vectorised ops and
the cost per optimiser step stays a small fraction of the step itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .domains import Box
from .errors import DomainMismatchError, InvalidInputError
from .zonotope import Zonotope

STRATEGIES = ("closest", "sample_largest_closest", "best_loss")


def _members_of(domain) -> list[Box]:
    if isinstance(domain, Box):
        return [domain]
    members = getattr(domain, "members", None)
    if members is None:
        if isinstance(domain, Sequence) and domain and all(isinstance(b, Box) for b in domain):
            return list(domain)
        raise InvalidInputError(f"projection: expected a Box, an LID or a list of Boxes, got {type(domain).__name__}")
    return list(members)


class Projector:
    """Projects a model's parameters onto a union of boxes, remembering the current member."""

    def __init__(
        self,
        model: nn.Module,
        domain,
        strategy: str = "closest",
        loss_fn: Callable[[nn.Module], Tensor] | None = None,
        seed: int = 0,
        inside_tol: float = 0.0,
    ):
        _check_strategy(strategy, loss_fn)
        members = _members_of(domain)
        for i, box in enumerate(members):
            box.check_matches(model, f"projection (member {i})")
        self.model = model
        self.params = [p for _, p in model.named_parameters()]
        self.names = [n for n, _ in model.named_parameters()]
        ref = self.params[0]
        # (m, p) matrices of member bounds, rounded inward to the parameters' dtype so a clamped
        # value is always inside the (possibly higher-precision) box.
        lows, highs = [], []
        for box in members:
            inner = box if box.dtype == ref.dtype else _inward(box, ref.dtype)
            lows.append(torch.cat([inner.lower[n].detach().reshape(-1) for n in self.names]))
            highs.append(torch.cat([inner.upper[n].detach().reshape(-1) for n in self.names]))
        self.lower = torch.stack(lows).to(ref.device)
        self.upper = torch.stack(highs).to(ref.device)
        self.sizes = (self.upper - self.lower).sum(1)
        self.strategy, self.loss_fn, self.inside_tol = strategy, loss_fn, inside_tol
        self.generator = torch.Generator().manual_seed(seed)
        self.current: int | None = None
        self.switches = 0

    # ----------------------------------------------------------------------------- primitives
    @property
    def n_members(self) -> int:
        return len(self.lower)

    def _flat(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def _write(self, flat: Tensor) -> None:
        with torch.no_grad():
            offset = 0
            for p in self.params:
                k = p.numel()
                p.copy_(flat[offset : offset + k].view_as(p))
                offset += k

    def distances2(self, flat: Tensor | None = None) -> Tensor:
        """Squared distance from the parameters to every member (0 inside)."""
        flat = self._flat() if flat is None else flat
        gap = (self.lower - flat).clamp(min=0) + (flat - self.upper).clamp(min=0)
        return gap.pow(2).sum(1)

    # ----------------------------------------------------------------------------- projection
    @torch.no_grad()
    def project_(self) -> int:
        """Project in place; returns the index of the member the parameters now lie in."""
        flat = self._flat()
        if self.current is not None:
            lo, hi = self.lower[self.current], self.upper[self.current]
            outside = (flat < lo - self.inside_tol) | (flat > hi + self.inside_tol)
            if not bool(outside.any()):
                return self.current
            if len(self.lower) == 1:  # one member: the clamp is the projection
                self._write(torch.minimum(torch.maximum(flat, lo), hi))
                return self.current
        d2 = self.distances2(flat)
        inside = (d2 <= self.inside_tol).nonzero()
        if len(inside):
            chosen = int(inside[0])
        else:
            chosen = self._choose(flat, d2)
        if chosen != self.current:
            self.switches += 1
        self.current = chosen
        self._write(torch.minimum(torch.maximum(flat, self.lower[chosen]), self.upper[chosen]))
        return chosen

    def _choose(self, flat: Tensor, d2: Tensor) -> int:
        if self.strategy == "closest" or len(d2) == 1:
            return int(d2.argmin())
        if self.strategy == "sample_largest_closest":
            score = self.sizes / d2.clamp(min=1e-12)
            probs = torch.softmax(score.double() - score.double().max(), 0).cpu()
            return int(torch.multinomial(probs, 1, generator=self.generator))
        losses = []
        for i in range(len(d2)):  # best_loss: try each member
            self._write(torch.minimum(torch.maximum(flat, self.lower[i]), self.upper[i]))
            with torch.no_grad():
                losses.append(float(self.loss_fn(self.model)))
        return int(torch.tensor(losses).argmin())

    def state_dict(self) -> dict:
        return {"current": self.current, "switches": self.switches, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.current, self.switches = state["current"], state["switches"]
        self.generator.set_state(state["generator"])


def _inward(box: Box, dtype: torch.dtype) -> Box:
    lower, upper = {}, {}
    for n in box.names:
        lo, hi = box.lower[n].detach(), box.upper[n].detach()
        lo_c, hi_c = lo.to(dtype), hi.to(dtype)
        lo_c = torch.where(lo_c.to(lo.dtype) < lo, torch.nextafter(lo_c, torch.full_like(lo_c, torch.inf)), lo_c)
        hi_c = torch.where(hi_c.to(hi.dtype) > hi, torch.nextafter(hi_c, torch.full_like(hi_c, -torch.inf)), hi_c)
        if bool((lo_c > hi_c).any()):
            raise DomainMismatchError(f"projection: parameter '{n}' has an interval with no {dtype} value inside")
        lower[n], upper[n] = lo_c, hi_c
    return Box(lower, upper, check=False)


class ZonotopeProjector:
    """The Projector interface for one ``Zonotope``: every call solves the projection QP
    (``Zonotope.project_``), warm-started at the previous solution."""

    def __init__(self, model: nn.Module, zonotope: Zonotope):
        zonotope.check_matches(model, "projection")
        self.model, self.zonotope = model, zonotope
        self.current: int | None = None
        self.switches = 0
        self.n_members = 1

    @torch.no_grad()
    def project_(self) -> int:
        self.zonotope.project_(self.model)
        self.current = 0
        return 0

    def state_dict(self) -> dict:
        return {"current": self.current, "switches": self.switches}

    def load_state_dict(self, state: dict) -> None:
        self.current, self.switches = state["current"], state["switches"]


def _check_strategy(strategy: str, loss_fn) -> None:
    if strategy not in STRATEGIES:
        raise InvalidInputError(f"projection: 'strategy' must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "best_loss" and loss_fn is None:
        raise InvalidInputError("projection: strategy='best_loss' needs loss_fn=callable(model) -> loss")
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidInputError(f"projection: 'loss_fn' must be callable(model) -> loss, got {type(loss_fn).__name__}")


def _projector(model: nn.Module, domain, strategy: str, **kwargs) -> Projector | ZonotopeProjector:
    if isinstance(domain, Zonotope):  # one member: the strategy has nothing to choose, but is still checked
        _check_strategy(strategy, kwargs.get("loss_fn"))
        return ZonotopeProjector(model, domain)
    return Projector(model, domain, strategy, **kwargs)


def project_(model: nn.Module, domain, strategy: str = "closest", **kwargs) -> nn.Module:
    """Project the model's parameters into ``domain`` (Box, Zonotope, LID or list of Boxes) once, in place."""
    _projector(model, domain, strategy, **kwargs).project_()
    return model


class _WrapsOptimizer:
    """Reads of the wrapped torch optimizer's ``param_groups`` and ``state`` (what loggers and
    learning-rate code look at) pass through."""

    optimizer: torch.optim.Optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state


class CoefficientOptimizer(_WrapsOptimizer):
    """Train inside a ``Zonotope`` by optimising its coefficients: θ = c + Σ_k ε_k g_k + δ.

    Why: a zonotope with few generators is a thin domain. Projecting a parameter-space step onto
    it keeps only the step's component along the generators, and Adam's per-coordinate step has a
    small one, so projected Adam crawls along a segment and stops short of the task's optimum.
    Here the chain rule gives each coefficient's gradient, ``∂L/∂ε_k = ⟨g_k, ∇_θ L⟩`` (exact:
    θ is affine in ε), and a torch optimizer (Adam by default) steps in coefficient space; the
    residual offsets δ take the plain gradient. After every step the coefficients are clamped to
    their ranges and δ to the residual box, and the point is written into the model
    (``Zonotope.write_``), so the model never leaves the certified zonotope.

    ``CoefficientOptimizer(model, zonotope, lr=1e-3)``; used like a torch optimizer
    (``zero_grad``, ``step``, ``param_groups``, ``state_dict``). It starts at the model's
    projection onto the zonotope.
    """

    def __init__(self, model: nn.Module, zonotope: Zonotope, lr: float = 1e-3,
                 optimizer: type[torch.optim.Optimizer] = torch.optim.Adam, **optimizer_kwargs):
        where = "CoefficientOptimizer"
        if not isinstance(zonotope, Zonotope):
            raise InvalidInputError(f"{where}: 'zonotope' must be a Zonotope, got {type(zonotope).__name__}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
            raise InvalidInputError(f"{where}: 'lr' must be a finite number > 0, got {lr!r}")
        if not (isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer)):
            raise InvalidInputError(f"{where}: 'optimizer' must be a torch optimizer class, got {optimizer!r}")
        if issubclass(optimizer, torch.optim.LBFGS):
            raise InvalidInputError(f"{where}: 'optimizer' must take one gradient per step; LBFGS re-evaluates a closure")
        params = zonotope._writable_params(model, where)
        loose = [n for n, r in zonotope.residual.items() if bool((r > 0).any())]  # δ is trained for these
        frozen = [n for n, p in params.items() if not p.requires_grad and (n in zonotope.generators or n in loose)]
        if frozen:  # they would move with ε while their share of ∂L/∂ε is missing
            raise DomainMismatchError(f"{where}: parameters {frozen} move with the zonotope but do not require grad")
        eps = zonotope.nearest_coefficients(params)
        offsets = {}
        for n in loose:
            r, d = zonotope.residual[n], params[n].detach().double().cpu() - zonotope._moved(n, eps)
            offsets[n] = torch.minimum(torch.maximum(d, -r), r).requires_grad_(True)
        self.coefficients = eps.requires_grad_(True)
        self.offsets = offsets
        try:  # before anything is written: a bad keyword leaves the model as it was
            self.optimizer = optimizer([self.coefficients, *offsets.values()], lr=lr, **optimizer_kwargs)
        except (TypeError, ValueError) as err:
            raise InvalidInputError(f"{where}: {optimizer.__name__} refused its arguments: {err}") from None
        self.model, self.zonotope, self.params = model, zonotope, params
        self.moving = [n for n in zonotope.names if n in zonotope.generators]
        self.graded = [n for n in params if n in zonotope.generators or n in offsets]
        self._write()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = {}
        for n in self.graded:  # only these feed ε or δ: the other gradients are never read
            g = self.params[n].grad
            if g is not None:
                grads[n] = (g.to_dense() if g.is_sparse else g).detach().double().cpu()
        k = self.zonotope.n_generators
        coeff_grad = torch.zeros(k, dtype=torch.float64)
        for n in self.moving:
            if n in grads:
                coeff_grad += self.zonotope.generators[n].reshape(k, -1) @ grads[n].reshape(-1)
        for name, g in [("the coefficients", coeff_grad), *((f"'{n}'", grads.get(n)) for n in self.offsets)]:
            if g is not None and not bool(torch.isfinite(g).all()):
                raise InvalidInputError(f"CoefficientOptimizer: the gradient of {name} holds NaN or inf; nothing was written")
        self.coefficients.grad = coeff_grad
        for n, d in self.offsets.items():
            d.grad = grads.get(n, torch.zeros_like(d))
        before = [t.detach().clone() for t in (self.coefficients, *self.offsets.values())]
        self.optimizer.step()
        with torch.no_grad():
            values = (self.coefficients, *self.offsets.values())
            if not all(bool(torch.isfinite(t).all()) for t in values):  # an overflowing step: undo it
                for t, old in zip(values, before):
                    t.copy_(old)
                raise InvalidInputError("CoefficientOptimizer: the step gave NaN or inf coefficients (learning rate "
                                        "too large?); the model was left where it was")
        self._write()
        return loss

    def _write(self) -> None:
        """Clamp the coefficients and offsets into their ranges and write the point into the model."""
        z = self.zonotope
        with torch.no_grad():
            self.coefficients.copy_(torch.minimum(torch.maximum(self.coefficients, z.coeff_lower), z.coeff_upper))
            for n, d in self.offsets.items():
                d.copy_(torch.minimum(torch.maximum(d, -z.residual[n]), z.residual[n]))
        z.write_(self.model, self.coefficients.detach(), {n: d.detach() for n, d in self.offsets.items()})

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "coefficients": self.coefficients.detach().clone(),
                "offsets": {n: d.detach().clone() for n, d in self.offsets.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()`` of an optimizer like this one; checked whole before anything is loaded."""
        where = "CoefficientOptimizer.load_state_dict"
        if not isinstance(state, Mapping) or set(state) != {"optimizer", "coefficients", "offsets"}:
            raise InvalidInputError(f"{where}: expected the dict state_dict() returns (optimizer, coefficients, offsets)")
        eps, offsets, opt_state = state["coefficients"], state["offsets"], state["optimizer"]
        if (not isinstance(eps, Tensor) or tuple(eps.shape) != tuple(self.coefficients.shape)
                or not bool(torch.isfinite(eps).all())):
            raise InvalidInputError(f"{where}: 'coefficients' must be {self.zonotope.n_generators} finite values")
        if not isinstance(offsets, Mapping) or set(offsets) != set(self.offsets):
            raise InvalidInputError(f"{where}: 'offsets' must name exactly {sorted(self.offsets)}")
        offsets = self.zonotope._checked_offsets(offsets, where)
        groups = opt_state.get("param_groups") if isinstance(opt_state, Mapping) else None
        if (not groups or len(groups) != len(self.optimizer.param_groups)
                or any(set(g) != set(h) for g, h in zip(groups, self.optimizer.param_groups))):
            raise InvalidInputError(f"{where}: 'optimizer' is not a state of {type(self.optimizer).__name__} "
                                    "over these coefficients")
        self.optimizer.load_state_dict(opt_state)
        with torch.no_grad():
            self.coefficients.copy_(eps)
            for n, d in self.offsets.items():
                d.copy_(offsets[n])
        self._write()

    def __repr__(self) -> str:
        return (f"CoefficientOptimizer({self.optimizer.__class__.__name__}, {self.zonotope.n_generators} coefficients, "
                f"{len(self.offsets)} residual tensors)")


class ProjectedOptimizer(_WrapsOptimizer):
    """Wrap any torch optimizer so that every ``step()`` is followed by a projection onto the LID
    (or onto a single ``Box`` or ``Zonotope``).

    ``ProjectedOptimizer(torch.optim.Adam(model.parameters(), 1e-3), model, lid)``; behaves like
    the wrapped optimizer (``zero_grad``, ``param_groups``, ``state_dict``/``load_state_dict``).
    The model is projected once at construction, so it is inside the LID from the start.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        lid,
        strategy: str = "closest",
        loss_fn: Callable[[nn.Module], Tensor] | None = None,
        seed: int = 0,
    ):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise InvalidInputError(f"ProjectedOptimizer: 'optimizer' must be a torch optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.projector = _projector(model, lid, strategy, loss_fn=loss_fn, seed=seed)
        self.projector.project_()

    @property
    def current_member(self) -> int | None:
        return self.projector.current

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Tensor] | None = None):
        loss = self.optimizer.step(closure)
        self.projector.project_()
        return loss

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "projector": self.projector.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.projector.load_state_dict(state["projector"])

    def __repr__(self) -> str:
        return f"ProjectedOptimizer({self.optimizer.__class__.__name__}, members={self.projector.n_members})"
