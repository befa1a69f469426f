"""Projection of updates back into a domain: the step that makes any optimiser δ-safe.

For one box the Euclidean projection is a coordinate-wise clamp. An LID is a union of boxes that
all contain the nominal point; the projector stays in its current member while the parameters are
inside it, and otherwise picks a member by a strategy (METHOD.md §2.3) and clamps into it:

* ``closest`` — the member at the smallest Euclidean distance;
* ``sample_largest_closest`` — sample with probabilities softmax(size / distance);
* ``best_loss`` — clamp into each member and keep the one with the smallest loss (callback).

Members are kept flattened on the parameters' device, so a projection is a few vectorised ops and
the cost per optimiser step stays a small fraction of the step itself.

Three ways to train safely, all usable with torch's tooling (LR schedulers, gradient clipping,
``GradScaler``, step hooks, ``state_dict``): ``ProjectedOptimizer`` wraps a torch optimizer and is
one itself; ``attach_projection`` adds the projection to the user's own optimizer as a step
post-hook; ``CoefficientOptimizer`` trains a zonotope's coefficients instead of the parameters.
"""

from __future__ import annotations

import copy
import weakref
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


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInputError(f"projection: 'seed' must be an int (the sampling generator's seed), got {seed!r}")


def _projector(model: nn.Module, domain, strategy: str, **kwargs) -> Projector | ZonotopeProjector:
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"projection: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if "seed" in kwargs:
        _check_seed(kwargs["seed"])
    if isinstance(domain, Zonotope):  # one member: the strategy has nothing to choose, but is still checked
        _check_strategy(strategy, kwargs.get("loss_fn"))
        return ZonotopeProjector(model, domain)
    return Projector(model, domain, strategy, **kwargs)


def project_(model: nn.Module, domain, strategy: str = "closest", **kwargs) -> nn.Module:
    """Project the model's parameters into ``domain`` (Box, Zonotope, LID or list of Boxes) once, in place."""
    _projector(model, domain, strategy, **kwargs).project_()
    return model


def _load_projector_state(projector: Projector | ZonotopeProjector, state, where: str) -> None:
    """Check a projector's ``state_dict()`` whole, then load it (a bad one changes nothing)."""
    keys = {"current", "switches"} | ({"generator"} if isinstance(projector, Projector) else set())
    if not isinstance(state, Mapping) or set(state) != keys:
        raise InvalidInputError(f"{where}: 'projector' must be the dict a projector's state_dict() returns, "
                                f"with the keys {sorted(keys)}")
    current, switches = state["current"], state["switches"]
    if current is not None and (isinstance(current, bool) or not isinstance(current, int)
                                or not 0 <= current < projector.n_members):
        raise InvalidInputError(f"{where}: the saved member {current!r} is not one of this domain's "
                                f"{projector.n_members} members (a state of another domain?)")
    if isinstance(switches, bool) or not isinstance(switches, int) or switches < 0:
        raise InvalidInputError(f"{where}: 'switches' must be an int ≥ 0, got {switches!r}")
    if "generator" in keys:
        try:  # on a scratch generator first: a state of the wrong size must not half-load
            torch.Generator().set_state(state["generator"])
        except (TypeError, RuntimeError) as err:
            raise InvalidInputError(f"{where}: 'generator' is not a torch.Generator state: {err}") from None
    projector.load_state_dict(state)


def _load_inner_state(optimizer: torch.optim.Optimizer, state, where: str, what: str = "parameters") -> None:
    """``optimizer.load_state_dict``, refusing a state of another kind of optimizer.

    torch loads an SGD state into Adam, which then fails at its next step. Whether every group
    holds all of this optimizer's options is judged after loading, where torch has filled in the
    options a state saved by an older torch lacks; a refused state is rolled back."""
    if not isinstance(state, Mapping):
        raise InvalidInputError(f"{where}: 'optimizer' must be the dict {type(optimizer).__name__}.state_dict() "
                                f"returns, got {type(state).__name__}")
    previous = copy.deepcopy(optimizer.state_dict())
    try:
        optimizer.load_state_dict(state)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise InvalidInputError(f"{where}: 'optimizer' is not a state of {type(optimizer).__name__} over these "
                                f"{what}: {err}") from None
    missing = sorted({k for g in optimizer.param_groups for k in optimizer.defaults if k not in g})
    if missing:
        optimizer.load_state_dict(previous)
        raise InvalidInputError(f"{where}: 'optimizer' is not a state of {type(optimizer).__name__} over these "
                                f"{what}: its groups lack {missing}")


def _shared(name: str) -> property:
    """A ``torch.optim.Optimizer`` attribute that is the wrapped optimizer's own object.

    Reads and writes go to ``self.optimizer``, so what a scheduler, ``add_param_group`` or the
    wrapped optimizer's own ``load_state_dict`` (which replaces its lists) does is seen through
    both objects. Only while ``Optimizer.__init__`` runs, before there is a wrapped optimizer, the
    value is the wrapper's own (a throwaway: see ``_SharedOptimizer.__init__``)."""
    private = f"_before_sharing_{name}"

    def read(self):
        inner = self.__dict__.get("optimizer")
        return getattr(inner, name) if inner is not None else self.__dict__[private]

    def write(self, value) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is not None:
            setattr(inner, name, value)
        else:
            self.__dict__[private] = value

    return property(read, write)


class _SharedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` whose ``param_groups``, ``state`` and ``defaults`` are those of
    the torch optimizer it wraps (``self.optimizer``): schedulers, ``GradScaler``, gradient
    clipping over its parameters and step hooks treat it as the optimizer it is.

    Subclasses define ``_save()`` and ``_load(state)``; ``state_dict``/``load_state_dict`` run the
    state-dict hooks registered on this object around them, as torch's own do."""

    param_groups = _shared("param_groups")
    state = _shared("state")
    defaults = _shared("defaults")

    def __init__(self, inner: torch.optim.Optimizer):
        # Optimizer.__init__ sets up the hook registries and wraps step() so that step hooks run;
        # it needs one parameter group, an empty throwaway that is dropped right after.
        super().__init__([{"params": []}], {})
        for name in ("param_groups", "state", "defaults"):
            del self.__dict__[f"_before_sharing_{name}"]
        self.optimizer = inner

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = self._save()
        for hook in self._optimizer_state_dict_post_hooks.values():
            changed = hook(self, state)
            state = state if changed is None else changed
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            changed = hook(self, state_dict)
            state_dict = state_dict if changed is None else changed
        self._load(state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _save(self) -> dict:
        raise NotImplementedError

    def _load(self, state: dict) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict:
        # Optimizer.__getstate__ keeps defaults, state and param_groups only: this object is its
        # wrapped optimizer and projection, so copies and pickles keep everything but the hook
        # registries (dropped like torch drops them; __setstate__ recreates them empty).
        return {k: v for k, v in self.__dict__.items() if not (k.startswith("_optimizer_") and k.endswith("hooks"))}


class CoefficientOptimizer(_SharedOptimizer):
    """Train inside a ``Zonotope`` by optimising its coefficients: θ = c + Σ_k ε_k g_k + δ.

    Why: a zonotope with few generators is a thin domain. Projecting a parameter-space step onto
    it keeps only the step's component along the generators, and Adam's per-coordinate step has a
    small one, so projected Adam crawls along a segment and stops short of the task's optimum.
    Here the chain rule gives each coefficient's gradient, ``∂L/∂ε_k = ⟨g_k, ∇_θ L⟩`` (exact:
    θ is affine in ε), and a torch optimizer (Adam by default) steps in coefficient space; the
    residual offsets δ take the plain gradient. After every step the coefficients are clamped to
    their ranges and δ to the residual box, and the point is written into the model
    (``Zonotope.write_``), so the model never leaves the certified zonotope.

    ``CoefficientOptimizer(model, zonotope, lr=1e-3)`` is a ``torch.optim.Optimizer`` whose
    parameters are the coefficients and the offsets (one group, shared with the inner optimizer):
    an LR scheduler sets the coefficients' learning rate. It starts at the model's projection onto
    the zonotope.

    Gradients: at the end of every backward pass through the model the coefficients' and offsets'
    ``.grad`` are computed from the model's, so what works on an optimizer's gradients works here
    (``GradScaler`` unscales them and skips a step with inf/NaN; clipping
    ``opt.param_groups[0]["params"]`` clips them). Gradients of the model edited after the backward
    pass (``clip_grad_norm_(model.parameters())``, gradients set by hand) are honoured too: ``step``
    recomputes from them. Editing both sides before one step is refused as ambiguous.
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
        if issubclass(optimizer, _SharedOptimizer):
            raise InvalidInputError(f"{where}: 'optimizer' must be a plain torch optimizer class, "
                                    f"got {optimizer.__name__}")
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
        try:  # before anything is written: a bad keyword leaves the model as it was
            inner = optimizer([eps.requires_grad_(True), *offsets.values()], lr=lr, **optimizer_kwargs)
        except (TypeError, ValueError) as err:
            raise InvalidInputError(f"{where}: {optimizer.__name__} refused its arguments: {err}") from None
        super().__init__(inner)
        self.coefficients, self.offsets = eps, offsets
        self.model, self.zonotope, self.params = model, zonotope, params
        self.moving = [n for n in zonotope.names if n in zonotope.generators]
        self.graded = [n for n in params if n in zonotope.generators or n in offsets]
        self._converted: tuple | None = None  # what the last gradient conversion read and wrote
        self._hook_backward()
        self._write()

    # ----------------------------------------------------------------------------- gradients
    def _hook_backward(self) -> None:
        """Convert the gradients at the end of every backward pass that reaches a graded parameter.

        The hooks hold the optimizer weakly and are removed when it is collected, so optimizers
        made one after another on one model (one per task) do not pile up work on its backward."""
        this = weakref.ref(self)
        queued = [False]

        def convert_at_end() -> None:
            queued[0] = False
            opt = this()
            if opt is not None:
                opt._convert()

        def after_accumulation(_: Tensor) -> None:
            if not queued[0] and this() is not None:
                queued[0] = True
                torch.autograd.Variable._execution_engine.queue_callback(convert_at_end)

        handles = [self.params[n].register_post_accumulate_grad_hook(after_accumulation)
                   for n in self.graded if self.params[n].requires_grad]
        self._hooks, self._backward_queued = handles, queued
        weakref.finalize(self, _remove_hooks, handles)

    def _model_grads(self) -> list[Tensor | None]:
        return [self.params[n].grad for n in self.graded]

    def _own_grads(self) -> list[Tensor | None]:
        return [t.grad for t in (self.coefficients, *self.offsets.values())]

    @staticmethod
    def _record(grads: list[Tensor | None]) -> list:
        """Which gradient tensors these are, and their in-place version; held weakly, so a gradient
        the user drops is freed (and then reads as changed)."""
        return [None if g is None else (weakref.ref(g), g._version) for g in grads]

    @staticmethod
    def _same(recorded: list, now: list[Tensor | None]) -> bool:
        return len(recorded) == len(now) and all(
            (r is None and g is None) or (r is not None and g is not None and r[0]() is g and r[1] == g._version)
            for r, g in zip(recorded, now))

    def _convert(self) -> None:
        """The coefficients' and offsets' gradients from the model's: ``∂L/∂ε = G ∇θL``, ``∂L/∂δ = ∇θL``.

        Non-finite values are stored as they are (``GradScaler`` skips such a step; ``step``
        refuses it); raising here would abort the user's backward pass instead."""
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
        self.coefficients.grad = coeff_grad
        for n, d in self.offsets.items():
            # a copy: a float64 CPU gradient converts to itself, and unscaling δ's gradient in
            # place must not also change the model's
            d.grad = grads[n].clone() if n in grads else torch.zeros_like(d)
        self._converted = (self._record(self._model_grads()), self._record(self._own_grads()))

    def _step_gradients(self) -> None:
        """Make the coefficients' and offsets' ``.grad`` the ones this step uses (see the class docstring)."""
        if self._converted is not None and self._same(self._converted[0], self._model_grads()):
            return  # the model's gradients are those converted: keep ours, unscaled or clipped as they may be
        if self._converted is not None and not self._same(self._converted[1], self._own_grads()):
            raise InvalidInputError(
                "CoefficientOptimizer.step: both the model's gradients and the coefficients' gradients changed "
                "after the backward pass (e.g. GradScaler.unscale_(opt), then clip_grad_norm_(model.parameters())); "
                "change one side only: under a GradScaler clip the optimizer's own parameters, "
                "clip_grad_norm_(opt.param_groups[0]['params'], max_norm); nothing was written")
        self._convert()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self._converted = None
        self._backward_queued[0] = False  # a backward that raised never ran its queued conversion

    def add_param_group(self, param_group: dict) -> None:
        if "optimizer" not in self.__dict__:  # Optimizer.__init__'s throwaway group (_SharedOptimizer)
            super().add_param_group(param_group)
            return
        raise InvalidInputError("CoefficientOptimizer: its parameters are the zonotope's coefficients and offsets; "
                                "add_param_group cannot add others (train them with an optimizer of their own)")

    # ----------------------------------------------------------------------------- the step
    def step(self, closure: Callable[[], Tensor] | None = None):
        """One step in coefficient space, then the point is written into the model.

        Args:
            closure: Optional; re-evaluates the loss with gradients on (run before the step).

        Returns:
            The closure's loss, or None.

        Raises:
            InvalidInputError: a gradient or the stepped coefficients hold NaN or inf, or both the
                model's and the coefficients' gradients were edited; the model is left where it was.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_gradients()
        coeff_grad = self.coefficients.grad
        for name, g in [("the coefficients", coeff_grad), *((f"'{n}'", d.grad) for n, d in self.offsets.items())]:
            if g is not None and not bool(torch.isfinite(g).all()):
                raise InvalidInputError(f"CoefficientOptimizer: the gradient of {name} holds NaN or inf; nothing was written")
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

    # ----------------------------------------------------------------------------- persistence
    def _save(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "coefficients": self.coefficients.detach().clone(),
                "offsets": {n: d.detach().clone() for n, d in self.offsets.items()}}

    def _load(self, state: dict) -> None:
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
        _load_inner_state(self.optimizer, opt_state, where, "coefficients")  # checked before it loads
        with torch.no_grad():
            self.coefficients.copy_(eps)
            for n, d in self.offsets.items():
                d.copy_(offsets[n])
        self._converted = None
        self._write()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for transient in ("_hooks", "_converted", "_backward_queued"):  # tied to this object's model
            state.pop(transient, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._converted = None
        self._hook_backward()

    def __repr__(self) -> str:
        return (f"CoefficientOptimizer({self.optimizer.__class__.__name__}, {self.zonotope.n_generators} coefficients, "
                f"{len(self.offsets)} residual tensors)")


def _remove_hooks(handles: list) -> None:
    for handle in handles:
        handle.remove()


class ProjectedOptimizer(_SharedOptimizer):
    """Wrap any torch optimizer so that every ``step()`` is followed by a projection onto the LID
    (or onto a single ``Box`` or ``Zonotope``).

    ``ProjectedOptimizer(torch.optim.Adam(model.parameters(), 1e-3), model, lid)`` is a
    ``torch.optim.Optimizer`` that shares ``param_groups``, ``state`` and ``defaults`` with the
    wrapped one, so LR schedulers, ``GradScaler`` (a step it skips for inf gradients leaves the
    model where it was, inside), gradient clipping and step hooks work on it; step post-hooks run
    after the projection. The model is projected once at construction, so it is inside from the
    start. ``state_dict()`` holds the wrapped optimizer's state and the projector's (current
    member, sampling generator): a resume continues the same trajectory.

    Args:
        optimizer: The torch optimizer that takes the steps.
        model: The module whose parameters are kept inside ``lid``.
        lid: An ``LID``, a ``Box``, a ``Zonotope`` or a list of Boxes.
        strategy: How a member of a union is chosen: one of ``STRATEGIES``.
        loss_fn: ``loss_fn(model) -> loss``; needed by ``strategy="best_loss"``.
        seed: Seed of the generator ``sample_largest_closest`` draws from.

    Raises:
        InvalidInputError: a bad optimizer, model, strategy, loss_fn or seed.
        DomainMismatchError: the domain does not cover exactly the model's parameters.
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
        projector = _projector(model, lid, strategy, loss_fn=loss_fn, seed=seed)
        super().__init__(optimizer)
        self.projector = projector
        self.projector.project_()

    @property
    def current_member(self) -> int | None:
        """The index of the domain's member the parameters lie in (0 for a Box or a Zonotope)."""
        return self.projector.current

    def step(self, closure: Callable[[], Tensor] | None = None):
        """The wrapped optimizer's step, then the projection.

        Args:
            closure: Passed to the wrapped optimizer's ``step``.

        Returns:
            What the wrapped step returns (the closure's loss, or None).
        """
        loss = self.optimizer.step(closure)
        self.projector.project_()
        return loss

    def _save(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "projector": self.projector.state_dict()}

    def _load(self, state: dict) -> None:
        """Restore a ``state_dict()``; the projector's part is checked before anything is loaded."""
        where = "ProjectedOptimizer.load_state_dict"
        if not isinstance(state, Mapping) or set(state) != {"optimizer", "projector"}:
            raise InvalidInputError(f"{where}: expected the dict state_dict() returns (optimizer, projector)")
        scratch = copy.deepcopy(self.projector.state_dict())
        _load_projector_state(self.projector, state["projector"], where)  # checks, then loads
        try:
            _load_inner_state(self.optimizer, state["optimizer"], where)
        except InvalidInputError:
            self.projector.load_state_dict(scratch)  # all or nothing
            raise

    def __repr__(self) -> str:
        return f"ProjectedOptimizer({self.optimizer.__class__.__name__}, members={self.projector.n_members})"


class ProjectionHandle:
    """What ``attach_projection`` returns: removes the projection hook and exposes the projector.

    Usable as a context manager (the hook is removed on exit)."""

    def __init__(self, optimizer: torch.optim.Optimizer, projector: Projector | ZonotopeProjector):
        self.optimizer, self.projector = optimizer, projector
        self._handle = optimizer.register_step_post_hook(self._after_step)
        self.attached = True

    def _after_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.projector.project_()

    @property
    def current_member(self) -> int | None:
        """The index of the domain's member the parameters lie in (0 for a Box or a Zonotope)."""
        return self.projector.current

    def remove(self) -> None:
        """Stop projecting after the optimizer's steps (the model stays where it is)."""
        self._handle.remove()
        self.attached = False

    def state_dict(self) -> dict:
        """The projector's state (current member, switches, sampling generator): save it next to
        the optimizer's to resume the same trajectory."""
        return self.projector.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()`` of a handle on the same domain; checked before it is loaded.

        Raises:
            InvalidInputError: ``state`` is not such a state.
        """
        _load_projector_state(self.projector, state, "ProjectionHandle.load_state_dict")

    def __enter__(self) -> ProjectionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return f"ProjectionHandle({type(self.optimizer).__name__}, members={self.projector.n_members}, {state})"


def attach_projection(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    domain,
    strategy: str = "closest",
    loss_fn: Callable[[nn.Module], Tensor] | None = None,
    seed: int = 0,
) -> ProjectionHandle:
    """Make the user's own optimizer safe: project ``model`` into ``domain`` after each of its steps.

    For a team that keeps its optimizer object and training loop: one line, and every
    ``optimizer.step()`` (also through ``GradScaler.step``, which skips a step with inf gradients
    and so skips its projection) is followed by the projection ``ProjectedOptimizer`` does, through
    a step post-hook. The model is projected once now, so it is inside from the start. Post-hooks
    registered earlier on the optimizer run before the projection, later ones after it.

    Args:
        optimizer: The torch optimizer whose steps are followed by a projection.
        model: The module whose parameters are kept inside ``domain``.
        domain: An ``LID``, a ``Box``, a ``Zonotope`` or a list of Boxes.
        strategy: How a member of a union is chosen: one of ``STRATEGIES``.
        loss_fn: ``loss_fn(model) -> loss``; needed by ``strategy="best_loss"``.
        seed: Seed of the generator ``sample_largest_closest`` draws from.

    Returns:
        A ``ProjectionHandle``: ``remove()``, ``projector``, ``current_member``, ``state_dict()``.

    Raises:
        InvalidInputError: a bad optimizer, model, strategy, loss_fn or seed.
        DomainMismatchError: the domain does not cover exactly the model's parameters.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidInputError(f"attach_projection: 'optimizer' must be a torch optimizer, "
                                f"got {type(optimizer).__name__}")
    projector = _projector(model, domain, strategy, loss_fn=loss_fn, seed=seed)
    projector.project_()
    return ProjectionHandle(optimizer, projector)
