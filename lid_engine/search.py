"""LID search: the largest box around θ whose certified metric stays above τ (METHOD.md §2.1).

The box [θ^L, θ^U] starts at zero width and grows by a primal–dual augmented-Lagrangian scheme
(cooper's ``AlternatingDualPrimalOptimizer``: dual step first, then one Adam step on the bounds):

    maximise  J = (α Σ log(w_i + 1e-6) + (1 − α) Σ w_i) / p     (w = θ^U − θ^L)
    s.t.      soft_certified_metric_t(box) ≥ target_t  for every task t

with a penalty coefficient that grows ×1.01 while a constraint is violated beyond a tolerance
(capped), and one step-size multiplier m (primal lr ∝ m, dual lr ∝ 1/m) that grows while all
constraints hold and shrinks while one is violated. After every step the box is projected back
onto {θ^L ≤ θ ≤ θ^U, widths ≤ max_width, masked coordinates at zero width, inside ``within``}.

The paper's scheme was tuned on MNIST. Three additions make it work on models and data it was
never tuned on (``SearchConfig.paper()`` switches all three off, for reproductions):

* **Scaled steps** (``scaling="sensitivity"``). Adam moves every coordinate by about its learning
  rate whatever the size of its gradient, so a fixed step in parameter units is far too large for
  a first-layer weight that sees inputs of size 1000 and far too small for one that sees 10⁻³. Each
  parameter tensor's step is therefore measured in units of its *sensitivity*: the radius per
  coordinate at which the tensor alone would use up its share of the model's typical margin (the
  derivative of the IBP logit radius at zero width, one autograd pass at θ). The soft surrogate is
  computed on logits divided by that margin, so its temperature means the same on every model.
* **Feasibility restoration** (``restore``). Once the bounds are loose the surrogate saturates:
  the softmax of hopelessly wrong worst-case logits has no gradient, so a violated constraint stops
  pushing back while the width objective keeps growing the box. When the box is clearly infeasible
  on its minibatch (hard violation above the tolerance), the step is followed by pulling the box
  part of the way back towards the last box that met its target, where the surrogate has gradients.
* **Finalisation** (``finalize``). Each checkpoint is measured on the whole search set; one that
  misses its target (τ + margin) is shrunk towards θ by the largest scale s ∈ [0, 1] that meets it
  (bisection: the scaled boxes are nested and IBP is monotone under inclusion). Every checkpoint
  therefore meets τ on the search data, and a looser τ leaves a larger box.

Snapshots ("checkpoints") of the trajectory become the LID's members; each is certified in
float64 on held-out certification data the search never saw, with a union bound over all
snapshots, and only snapshots meeting every τ on that data are kept.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import cooper
import torch
from torch import Tensor, nn

from .bounds import linear, linear_graph
from .bounds.ibp import check_supported
from .domains import Box
from .errors import InvalidDomainError, InvalidInputError, LidError
from .prefix import split_frozen
from .spec import Spec, certified_accuracy, check_labels
from .stream import CertificationStream, rebatch

TaskData = tuple[Tensor, Tensor]


class LidSearchError(LidError):
    """The search produced no domain that meets the specification on the certification data."""


def tau_from_accuracy(accuracy: float, delta: float, tau_max: float = 1.0) -> float:
    """The paper's threshold rule τ = min(max(acc − Δ, acc / 2), τ_max)."""
    return min(max(accuracy - delta, accuracy / 2), tau_max)


SCALINGS = ("sensitivity", "absolute")
FINALIZE_TARGETS = ("tau", "target")


@dataclass
class SearchConfig:
    """Hyper-parameters of the search.

    The defaults work without tuning on models and data of any scale (see the module docstring);
    ``SearchConfig.paper()`` gives the paper's MNIST configuration for reproductions.
    """

    iterations: int = 200
    batch_size: int = 500
    checkpoints: int = 10
    alpha: float = 0.0  # 1 = log-volume, 0 = mean width (the paper's configs all use 0)
    # "sensitivity": each tensor's step is primal_lr × its sensitivity scale (module docstring) and the
    # surrogate sees logits in units of the typical margin; "absolute": the paper's rule, primal_lr / p
    # in parameter units for every coordinate and raw logits.
    scaling: str = "sensitivity"
    primal_lr: float | None = None  # None: 0.05 with scaling="sensitivity", 0.33 (divided by p) with "absolute"
    dual_lr: float = 0.01
    penalty_init: float = 1.0
    penalty_growth: float = 1.01
    penalty_max: float = 1000.0
    violation_tolerance: float = 0.05
    lr_factor: float = 1.1
    lr_multiplier_range: tuple[float, float] = (1 / 20, 20.0)
    max_width: float = 10.0
    # Of the surrogate softmax(temperature · worst-case logits). With scaling="sensitivity" the logits are in
    # units of the typical margin, where 5 keeps a band of examples around the decision boundary in the
    # gradient; the paper uses 10 on raw logits.
    temperature: float = 5.0
    # The surrogate is enforced stochastically on minibatches, so the paper's certificates land
    # slightly below τ. Aiming the search at τ + margin lets large checkpoints meet τ on the
    # held-out data; 0 reproduces the paper's behaviour. The margin never takes more than half of
    # the slack θ itself has (metric at θ − τ), so a task the model barely meets (τ = acc / 2 on a
    # task it has not learnt) stays feasible at width 0 instead of collapsing the box.
    tau_margin: float = 0.05
    # Pull a clearly infeasible box (hard violation on its minibatch above violation_tolerance) back
    # by this fraction of the way towards the last box that met its target.
    restore: bool = True
    restore_factor: float = 0.5
    # Shrink each checkpoint towards θ until it meets finalize_target on the whole search set:
    # "target" (τ + the margin the search aimed at, so held-out certificates more often reach τ)
    # or "tau" (τ itself).
    finalize: bool = True
    finalize_target: str = "target"
    finalize_steps: int = 10  # bisection steps: the scale is found to within 2^-10
    seed: int = 0
    # "ibp" (the paper's bound) or "linear" (bounds/linear.py: tighter on shared convolution weights,
    # so the same τ certifies wider boxes there; ~4× the cost of an IBP iteration with one competing
    # class, ~18× with nine). The search and the certificates use the same bound.
    method: str = "ibp"
    # With method="linear": bound only the k classes IBP finds most dangerous per example during the
    # search (certificates always bound every class). None = all.
    competitors: int | None = None
    # With a mask that fixes a leading part of the model (a partial domain over the last block and the head,
    # say), run that part once per search example instead of on every pass (lid_engine/prefix.py). The
    # certificates always bound the whole model.
    prefix_cache: bool = True
    history: list[dict] = field(default_factory=list, repr=False)

    @classmethod
    def paper(cls, **overrides) -> dict:
        """Keyword arguments for the paper's MNIST configuration (METHOD.md §2.1): steps of 0.33/p in
        parameter units, raw logits, no restoration, no finalisation, no τ margin. For reproductions:
        ``compute_lid(model, x, y, tau, **SearchConfig.paper(primal_lr=0.5))``."""
        settings = {"scaling": "absolute", "primal_lr": 0.33, "temperature": 10.0, "restore": False, "finalize": False,
                    "tau_margin": 0.0}
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidInputError(f"SearchConfig.paper: unknown settings {sorted(unknown)}")
        return {**settings, **overrides}

    @property
    def effective_primal_lr(self) -> float:
        if self.primal_lr is not None:
            return float(self.primal_lr)
        return 0.05 if self.scaling == "sensitivity" else 0.33

    def validate(self) -> None:
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        rng = self.lr_multiplier_range
        checks = {
            "iterations": integer(self.iterations) and self.iterations >= 1,
            "batch_size": integer(self.batch_size) and self.batch_size >= 1,
            "checkpoints": integer(self.checkpoints) and integer(self.iterations) and 1 <= self.checkpoints <= self.iterations,
            "alpha": number(self.alpha) and 0.0 <= self.alpha <= 1.0,
            "scaling": self.scaling in SCALINGS,
            "primal_lr": self.primal_lr is None or (number(self.primal_lr) and self.primal_lr > 0),
            "dual_lr": number(self.dual_lr) and self.dual_lr > 0,
            "penalty_init": number(self.penalty_init) and self.penalty_init > 0,
            "penalty_max": number(self.penalty_max) and self.penalty_max > 0,
            "violation_tolerance": number(self.violation_tolerance) and self.violation_tolerance >= 0,
            "lr_factor": number(self.lr_factor) and self.lr_factor >= 1.0,
            "lr_multiplier_range": (isinstance(rng, (tuple, list)) and len(rng) == 2 and all(number(v) for v in rng)
                                    and 0 < rng[0] <= 1 <= rng[1]),
            "max_width": number(self.max_width) and self.max_width > 0,
            "temperature": number(self.temperature) and self.temperature > 0,
            "penalty_growth": number(self.penalty_growth) and self.penalty_growth >= 1.0,
            "tau_margin": number(self.tau_margin) and 0.0 <= self.tau_margin < 1.0,
            "restore": isinstance(self.restore, bool),
            "restore_factor": number(self.restore_factor) and 0.0 <= self.restore_factor < 1.0,
            "finalize": isinstance(self.finalize, bool),
            "finalize_target": self.finalize_target in FINALIZE_TARGETS,
            "finalize_steps": integer(self.finalize_steps) and 1 <= self.finalize_steps <= 60,
            "seed": integer(self.seed),
            "method": self.method in ("ibp", "linear"),
            "competitors": self.competitors is None or (integer(self.competitors) and self.competitors >= 1),
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidInputError(f"compute_lid: invalid '{name}' = {getattr(self, name)!r}")


def _search_config(config: Mapping) -> SearchConfig:
    """``SearchConfig(**config)`` with an error that lists the valid settings instead of a TypeError."""
    known = {f.name for f in dataclasses.fields(SearchConfig)} - {"history"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InvalidInputError(f"compute_lid: unknown keyword(s) {unknown}; search settings are {sorted(known)}")
    cfg = SearchConfig(**config)
    cfg.validate()
    return cfg


class _BoxCMP(cooper.ConstrainedMinimizationProblem):
    """One inequality constraint per task: τ_t − soft_metric_t(box) ≤ 0."""

    def __init__(self, names: list[str], penalty_init: float, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.task_names = names
        self.constraint = cooper.Constraint(
            constraint_type=cooper.ConstraintType.INEQUALITY,
            formulation_type=cooper.formulations.AugmentedLagrangian,
            multiplier=cooper.multipliers.DenseMultiplier(num_constraints=len(names), device=device, dtype=dtype),
            penalty_coefficient=cooper.penalty_coefficients.DensePenaltyCoefficient(
                init=torch.full((len(names),), float(penalty_init), device=device, dtype=dtype)
            ),
        )

    def compute_cmp_state(self, objective, soft_violation, hard_violation) -> cooper.CMPState:  # noqa: D102
        state = cooper.ConstraintState(violation=soft_violation, strict_violation=hard_violation)
        return cooper.CMPState(loss=-objective, observed_constraints={self.constraint: state})


def _check_task(name: str, x: Tensor, y: Tensor, model: nn.Module, where: str) -> tuple[Tensor, Tensor]:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InvalidInputError(f"compute_lid: {where} '{name}': x and y must be torch tensors")
    if len(x) != len(y) or len(x) == 0:
        raise InvalidInputError(f"compute_lid: {where} '{name}': x has {len(x)} rows but y has {len(y)} (need ≥ 1, equal)")
    if not bool(torch.isfinite(x).all()):
        raise InvalidInputError(f"compute_lid: {where} '{name}': x holds NaN or inf")
    with torch.no_grad():
        n_out = model(x[:1].to(next(model.parameters()).device, next(model.parameters()).dtype)).shape[-1]
    return x, check_labels(y, n_out, len(x), f"compute_lid ({where} '{name}')")


def _split(x: Tensor, y: Tensor, fraction: float, seed: int) -> tuple[TaskData, TaskData]:
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError(f"compute_lid: 'cert_fraction' must lie in (0, 1), got {fraction}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_cert = max(1, int(round(len(x) * fraction)))
    if n_cert >= len(x):
        raise InvalidInputError(f"compute_lid: {len(x)} examples are too few to hold out a certification set")
    cert, search = perm[:n_cert], perm[n_cert:]
    return (x[search], y[search]), (x[cert], y[cert])


def compute_lid(
    model: nn.Module,
    x: Tensor | None = None,
    y: Tensor | None = None,
    tau: float | None = None,
    *,
    tasks: Mapping[str, tuple[Tensor, Tensor, float]] | None = None,
    cert: Mapping[str, TaskData] | None = None,
    cert_x: Tensor | None = None,
    cert_y: Tensor | None = None,
    cert_fraction: float = 0.3,
    spec_kind: str | Mapping[str, str] = "accuracy",
    mask: Mapping[str, Tensor] | None = None,
    free: Mapping[str, Tensor] | None = None,
    within: Box | None = None,
    confidence: float = 0.95,
    device: torch.device | str | None = None,
    progress: bool = True,
    keep: str = "meeting_tau",
    counter=None,
    cert_batch_size: int | None = 2048,
    **config,
):
    """Search a locally invariant domain around the model's current parameters.

    One task: ``compute_lid(model, x, y, tau=0.85)``; several at once: ``tasks={"t1": (x1, y1,
    τ1), ...}`` (one constraint and multiplier each). ``spec_kind``: the metric of every task ("accuracy" or
    "balanced_accuracy"), or a mapping task name → metric (several constraints of one specification,
    such as an overall balanced accuracy and the accuracy on one class or group). Certification data: ``cert_x``/``cert_y``
    (one task), ``cert={"t1": (x, y), ...}``, or else a ``cert_fraction`` of the data is held out
    (the search never sees it); a task's certification data may be a ``CertificationStream`` (read in
    chunks, never held in memory), and ``counter`` counts its certified examples (``certify_box``'s,
    e.g. sharded over a cluster), in bound passes of ``cert_batch_size`` rows. ``mask``: name → bool tensor, True where a coordinate must keep
    zero width. ``free``: name → bool tensor, True where a coordinate starts at the width cap
    (θ ± max_width) — for coordinates the specification ignores, such as the Task-IL head rows of
    classes not seen yet (METHOD.md §3.4), which later tasks must be free to train; the certificate
    still covers the whole box. ``within``: an outer Box the LID must stay inside (nested LIDs). ``keep``:
    ``"meeting_tau"`` keeps only checkpoints whose certificate reaches τ on every task (raising
    ``LidSearchError`` if none does), ``"all"`` keeps every checkpoint. Other keywords are
    ``SearchConfig`` fields (iterations, batch_size, checkpoints, alpha, primal_lr, dual_lr, seed…).
    Returns an ``LID``.
    """
    from .lid import LID  # local import: lid.py imports the certificate machinery

    cfg = _search_config(config)
    if keep not in ("meeting_tau", "all"):
        raise InvalidInputError(f"compute_lid: 'keep' must be 'meeting_tau' or 'all', got {keep!r}")
    layers = check_supported(model)
    if cfg.method == "linear":
        layers = linear.walk(model, layers)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("compute_lid: device='cuda' requested but CUDA is not available")
    model = model.to(dev).eval()

    search_tasks, cert_tasks, taus = _collect_tasks(model, x, y, tau, tasks, cert, cert_x, cert_y, cert_fraction, cfg.seed)
    specs = {t: Spec(kind, taus[t], cfg.temperature) for t, kind in _spec_kinds(spec_kind, taus).items()}
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    dtype = next(iter(theta.values())).dtype
    p_total = sum(t.numel() for t in theta.values())
    frozen = _check_mask(mask, theta)
    start_free = _check_mask(free, theta, "free")
    for n in start_free.keys() & frozen.keys():
        if bool((start_free[n] & frozen[n]).any()):
            raise InvalidInputError(f"compute_lid: '{n}' has coordinates that are both frozen (mask) and free")
    outer = _check_within(within, theta, dev)

    full_model, full_theta, cut = model, theta, (split_frozen(model, layers, frozen) if cfg.prefix_cache and frozen else None)
    if cut is not None:  # the search runs on the suffix over the prefix's outputs, computed once
        model, layers = cut.suffix, check_supported(cut.suffix)
        if cfg.method == "linear":
            layers = linear.walk(model, layers)
        search_tasks = {t: (cut.features(xs), ys) for t, (xs, ys) in search_tasks.items()}
        theta, frozen, start_free = ({s: d[n] for s, n in cut.names.items() if n in d} for d in (theta, frozen, start_free))
        if outer is not None:
            outer = Box({s: outer.lower[n] for s, n in cut.names.items()},
                        {s: outer.upper[n] for s, n in cut.names.items()}, check=False)

    nominal = _nominal(model, search_tasks, specs)
    if keep == "meeting_tau":  # no domain certifies more than the model at its centre gets right
        _check_reachable(nominal, specs, "search data")
        _check_reachable(_nominal(full_model, cert_tasks, specs), specs, "held-out certification data")
    targets = {t: search_target(specs[t].tau, nominal[t].metric, cfg.tau_margin) for t in specs}
    steps, logit_scale = _step_sizes(model, search_tasks, theta, nominal, layers, cfg, p_total, frozen)

    lower = {n: t.clone() for n, t in theta.items()}
    upper = {n: t.clone() for n, t in theta.items()}
    for n, m in start_free.items():
        lower[n] = torch.where(m, lower[n] - cfg.max_width, lower[n])
        upper[n] = torch.where(m, upper[n] + cfg.max_width, upper[n])
    _project_box_(lower, upper, theta, cfg.max_width, frozen, outer)
    lower = {n: t.requires_grad_(True) for n, t in lower.items()}
    upper = {n: t.requires_grad_(True) for n, t in upper.items()}
    if frozen:
        for n, m in frozen.items():  # frozen coordinates never receive a gradient
            lower[n].register_hook(lambda g, m=m: g.masked_fill(m, 0.0))
            upper[n].register_hook(lambda g, m=m: g.masked_fill(m, 0.0))
    for t in list(lower.values()) + list(upper.values()):
        # a bound whose derivative overflows somewhere (a saturated softmax, a LayerNorm at zero variance)
        # gives no direction there: no step, rather than NaN in Adam's moments for the rest of the search
        t.register_hook(lambda g: torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0))

    names = list(search_tasks)
    cmp = _BoxCMP(names, cfg.penalty_init, dev, dtype)
    if len(set(steps.values())) == 1:  # one step for every tensor (scaling="absolute"): the paper's single group
        groups = [{"params": list(lower.values()) + list(upper.values()), "lr": steps[next(iter(steps))],
                   "base_lr": steps[next(iter(steps))]}]
    else:
        groups = [{"params": [lower[n], upper[n]], "lr": steps[n], "base_lr": steps[n]} for n in theta]
    primal_opt = torch.optim.Adam(groups, lr=min(steps.values()))
    dual_opt = torch.optim.SGD(cmp.dual_parameters(), lr=cfg.dual_lr, maximize=True)
    optimizer = cooper.optim.AlternatingDualPrimalOptimizer(
        cmp=cmp, primal_optimizers=primal_opt, dual_optimizers=dual_opt
    )
    penalty_updater = cooper.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(
        growth_factor=cfg.penalty_growth, violation_tolerance=cfg.violation_tolerance, has_restart=False
    )

    gen = torch.Generator().manual_seed(cfg.seed)
    every = max(1, cfg.iterations // cfg.checkpoints)
    snapshots: list[tuple[int, Box]] = []
    multiplier = 1.0
    targets_t = torch.tensor([targets[t] for t in names], dtype=dtype, device=dev)
    feasible = _copy_bounds(lower, upper)  # the last box that met every target on its minibatch
    nonfinite_steps = 0
    bar = _progress(cfg.iterations, progress)
    for it in range(1, cfg.iterations + 1):
        box = Box(lower, upper, check=False)
        before = _copy_bounds(lower, upper) if cfg.restore else None

        def state_kwargs() -> dict:
            soft, hard = [], []
            for t in names:
                xb, yb = _minibatch(search_tasks[t], cfg.batch_size, gen, dev)
                lo, hi, lin = _search_bounds(model, box, xb, yb, layers, cfg)
                soft.append(specs[t].soft(lo / logit_scale, hi / logit_scale, yb,
                                          None if lin is None else lin / logit_scale))
                hard.append(specs[t].hard(lo.detach(), hi.detach(), yb, None if lin is None else lin.detach()))
            soft_t, hard_t = torch.stack(soft), torch.stack(hard)
            return {
                "objective": _objective(lower, upper, cfg.alpha, p_total),
                "soft_violation": targets_t - soft_t,
                "hard_violation": targets_t - hard_t,
            }

        rollout = optimizer.roll(compute_cmp_state_kwargs=state_kwargs())
        penalty_updater.step(rollout.cmp_state.observed_constraints)
        coeff = cmp.constraint.penalty_coefficient
        coeff.value = coeff.value.clamp(max=cfg.penalty_max)

        hard_violation = rollout.cmp_state.observed_constraints[cmp.constraint].strict_violation.detach()
        multiplier = _next_multiplier(multiplier, hard_violation, cfg)
        for group in primal_opt.param_groups:
            group["lr"] = group["base_lr"] * multiplier
        for group in dual_opt.param_groups:
            group["lr"] = cfg.dual_lr / multiplier

        _project_box_(lower, upper, theta, cfg.max_width, frozen, outer)
        if not all(bool(torch.isfinite(lower[n]).all() and torch.isfinite(upper[n]).all()) for n in lower):
            # a bound's derivative overflowed somewhere in the model: undo the step (back to the last box
            # that met every target) rather than carry NaN into the domain
            with torch.no_grad():
                for n in lower:
                    lower[n].copy_(feasible[0][n])
                    upper[n].copy_(feasible[1][n])
            nonfinite_steps += 1
        worst = float(hard_violation.max())
        restored = False
        if cfg.restore:
            if worst > cfg.violation_tolerance:  # saturated surrogate: pull back where it has gradients
                _pull_back_(lower, upper, feasible, cfg.restore_factor)
                restored = True
            elif worst <= 0.0:
                feasible = before
        if it % every == 0 or it == cfg.iterations:
            if not snapshots or snapshots[-1][0] != it:
                snapshots.append((it, Box(lower, upper, check=True).detach()))
        record = {
            "iteration": it,
            "width_sum": float(sum((upper[n] - lower[n]).detach().sum() for n in lower)),
            "hard_violation": hard_violation.cpu().tolist(),
            "multiplier": multiplier,
            "lambda": cmp.constraint.multiplier.weight.detach().cpu().tolist(),
            "penalty": coeff.value.detach().cpu().tolist(),
            "restored": restored,
            "nonfinite_steps": nonfinite_steps,
        }
        cfg.history.append(record)
        _advance(bar, record)
    _close(bar)

    scales = None
    if cfg.finalize:
        goal = targets if cfg.finalize_target == "target" else {t: specs[t].tau for t in specs}
        checks = [(search_tasks[t], specs[t], goal[t]) for t in specs]
        bar = _progress(len(snapshots), progress, "LID finalise", "checkpoint")
        finalized = []
        for _, b in snapshots:
            finalized.append(_finalize(model, b, theta, start_free, checks, layers, cfg))
            _advance(bar, None)
        _close(bar)
        snapshots = [(it, b) for (it, _), (b, _) in zip(snapshots, finalized)]
        scales = [s for _, s in finalized]
    extra = {"search_targets": targets, "logit_scale": logit_scale, "finalize_scales": scales,
             "nominal_search_metric": {t: nominal[t].metric for t in specs},
             "prefix_cache": None if cut is None else cut.record()}
    if cut is not None:  # back to the whole model: the prefix's parameters at zero width
        model = full_model
        snapshots = [(it, _whole(b, full_theta, cut.names)) for it, b in snapshots]
    return _certify_snapshots(model, snapshots, cert_tasks, specs, confidence, cfg, keep, LID, extra, progress, counter,
                              cert_batch_size)


# ------------------------------------------------------------------------------------- helpers
def _whole(box: Box, theta: Mapping[str, Tensor], names: Mapping[str, str]) -> Box:
    """A box over the suffix's parameters as a box over the whole model: everything else at θ."""
    lower = {n: t.clone() for n, t in theta.items()}
    upper = {n: t.clone() for n, t in theta.items()}
    for s, n in names.items():
        lower[n], upper[n] = box.lower[s], box.upper[s]
    return Box(lower, upper, check=True)


def _spec_kinds(spec_kind, taus: Mapping[str, float]) -> dict[str, str]:
    """The metric of each task: one name for all, or a mapping naming exactly the tasks."""
    if isinstance(spec_kind, str):
        return {t: spec_kind for t in taus}
    if not isinstance(spec_kind, Mapping):
        raise InvalidInputError(f"compute_lid: 'spec_kind' must be a metric name or a mapping task -> metric, "
                                f"got {type(spec_kind).__name__}")
    if set(spec_kind) != set(taus):
        raise InvalidInputError(f"compute_lid: 'spec_kind' names tasks {sorted(map(str, spec_kind))}, the tasks are "
                                f"{sorted(taus)}; expected one metric per task")
    return {t: spec_kind[t] for t in taus}


def _collect_tasks(model, x, y, tau, tasks, cert, cert_x, cert_y, cert_fraction, seed):
    if tasks is None:
        if x is None or y is None or tau is None:
            raise InvalidInputError("compute_lid: give x, y and tau (one task) or tasks={name: (x, y, tau)}")
        tasks = {"task": (x, y, tau)}
        if cert is None and cert_x is not None:
            if cert_y is None:
                raise InvalidInputError("compute_lid: 'cert_x' given without 'cert_y'")
            cert = {"task": (cert_x, cert_y)}
    elif x is not None or y is not None or tau is not None:
        raise InvalidInputError("compute_lid: give either x, y, tau or tasks=..., not both")
    if not tasks:
        raise InvalidInputError("compute_lid: 'tasks' is empty")
    search_tasks, cert_tasks, taus = {}, {}, {}
    for name, value in tasks.items():
        if len(value) != 3:
            raise InvalidInputError(f"compute_lid: tasks['{name}'] must be (x, y, tau)")
        tx, ty, ttau = value
        if not isinstance(ttau, (int, float)) or not 0.0 <= float(ttau) <= 1.0:
            raise InvalidInputError(f"compute_lid: tau of task '{name}' must lie in [0, 1], got {ttau!r}")
        tx, ty = _check_task(name, tx, ty, model, "search data")
        if cert is not None:
            if name not in cert:
                raise InvalidInputError(f"compute_lid: no certification data for task '{name}'")
            if isinstance(cert[name], CertificationStream):  # read in chunks when certifying; labels checked on its head
                _check_task(name, *cert[name].head(1), model, "certification data")
                search_tasks[name], cert_tasks[name] = (tx, ty), cert[name]
            else:
                search_tasks[name], cert_tasks[name] = (tx, ty), _check_task(name, *cert[name], model, "certification data")
        else:
            search_tasks[name], cert_tasks[name] = _split(tx, ty, cert_fraction, seed)
        taus[name] = float(ttau)
    return search_tasks, cert_tasks, taus


def _check_mask(mask, theta, arg: str = "mask") -> dict[str, Tensor]:
    if mask is None:
        return {}
    if not isinstance(mask, Mapping):
        raise InvalidInputError(f"compute_lid: '{arg}' must map parameter names to bool tensors")
    frozen = {}
    for name, m in mask.items():
        if name not in theta:
            raise InvalidInputError(f"compute_lid: {arg} names unknown parameter '{name}'")
        if not isinstance(m, Tensor) or m.dtype != torch.bool or m.shape != theta[name].shape:
            raise InvalidInputError(
                f"compute_lid: {arg}['{name}'] must be a bool tensor of shape {tuple(theta[name].shape)}"
            )
        frozen[name] = m.to(theta[name].device)
    return frozen


def _check_within(within, theta, dev) -> Box | None:
    if within is None:
        return None
    if not isinstance(within, Box):
        index = within.member_index(theta) if hasattr(within, "member_index") else None
        if index is None:
            raise InvalidDomainError(
                "compute_lid: 'within' must be a Box, or an LID with a member containing the model's parameters"
            )
        within = within.members[index]  # the member the model occupies (METHOD.md §3.4)
    if set(within.names) != set(theta):
        raise InvalidDomainError("compute_lid: 'within' does not name the model's parameters")
    outer = within.to(dev, next(iter(theta.values())).dtype)
    if not outer.contains(theta):
        raise InvalidDomainError(
            "compute_lid: the model's parameters lie outside 'within'; project the model into it first"
        )
    return outer


def _minibatch(data: TaskData, batch_size: int, gen: torch.Generator, dev) -> TaskData:
    x, y = data
    if len(x) <= batch_size:
        return x.to(dev), y.to(dev)
    idx = torch.randperm(len(x), generator=gen)[:batch_size]
    return x[idx].to(dev), y[idx].to(dev)


def search_target(tau: float, nominal: float, margin: float) -> float:
    """What the search aims at: τ plus the margin, but never more than half of θ's own slack."""
    return min(tau + min(margin, max(nominal - tau, 0.0) / 2), 1.0)


@dataclass(frozen=True)
class _Nominal:
    """θ's own hard metric on a task and the median margin of the examples it gets right."""

    metric: float
    margin: float


@torch.no_grad()
def _nominal(model, tasks: Mapping[str, TaskData], specs: Mapping[str, Spec], chunk: int = 4096) -> dict[str, _Nominal]:
    """Per task, θ's own metric and typical margin (plain forward passes: this sizes the search,
    it certifies nothing)."""
    param = next(model.parameters())
    out = {}
    for t, data in tasks.items():
        pieces = data.chunks() if isinstance(data, CertificationStream) else rebatch([data], chunk)
        logits, ys = [], []
        for x, y in pieces:
            logits.append(model(x.to(param.device, param.dtype)).detach()), ys.append(y)
        logits, y = torch.cat(logits), torch.cat(ys).to(param.device)
        metric = float(specs[t].hard(logits, logits, y))
        true = logits.gather(1, y[:, None]).squeeze(1)
        others = logits.scatter(1, y[:, None], -torch.inf).max(dim=1).values
        margin = (true - others).double()
        right = margin[margin > 0]
        typical = float(right.median()) if len(right) else float(margin.abs().median())
        out[t] = _Nominal(metric, typical if math.isfinite(typical) and typical > 0 else 1.0)
    return out


def _check_reachable(nominal: Mapping[str, _Nominal], specs: Mapping[str, Spec], where: str) -> None:
    """No domain around θ certifies more than θ itself gets right: refuse an unreachable τ up front."""
    for t, spec in specs.items():
        if nominal[t].metric < spec.tau:
            metric = spec.kind.replace("_", " ")
            raise LidSearchError(
                f"compute_lid: τ = {spec.tau:g} cannot be reached for task '{t}', because the model itself has "
                f"{metric} {nominal[t].metric:.4f} on its {where} and no domain around it certifies more than that."
            )


def _step_sizes(model, tasks: Mapping[str, TaskData], theta: Mapping[str, Tensor], nominal: Mapping[str, _Nominal],
                layers, cfg: SearchConfig, p_total: int, frozen: Mapping[str, Tensor]) -> tuple[dict[str, float], float]:
    """Per parameter tensor, Adam's base learning rate on its bounds, and the logit scale of the surrogate.

    ``scaling="absolute"``: the paper's ``primal_lr / p`` for every tensor and raw logits. ``"sensitivity"``:
    G_T = ∂(mean logit radius)/∂r summed over tensor T's coordinates at (nearly) zero width (first order: the
    radius every logit gets when each coordinate of T has radius 1), M = the smallest typical margin over
    the tasks, K = the tensors that move the bounds at all (a tensor the mask fixes entirely does not). A radius of σ_T = M / (K·G_T) on all of T uses
    1/K of the margin, so σ_T is the natural unit of T's steps: lr_T = primal_lr · σ_T (at most
    max_width). A tensor the logits do not depend on at first order steps by max_width · primal_lr.
    """
    lr = cfg.effective_primal_lr
    if cfg.scaling == "absolute":
        return {n: lr / p_total for n in theta}, 1.0
    scale = min(n.margin for n in nominal.values())
    # The derivative is taken at a radius of 10⁻⁴ of each tensor's typical size, not at exactly zero: at zero
    # width the bound of a non-monotone op (GELU, LayerNorm's products) is a max of two equal values, where
    # autograd splits the gradient and the two halves cancel, so a layer behind one would look insensitive.
    radius = {}
    for n, t in theta.items():
        rho = 1e-4 * float(t.detach().abs().mean()) if t.numel() else 0.0
        r = torch.full_like(t, rho if rho > 0 else 1e-4)
        if n in frozen:
            r = r.masked_fill(frozen[n], 0.0)
        radius[n] = r.requires_grad_(True)
    box = Box({n: theta[n] - radius[n] for n in theta}, {n: theta[n] + radius[n] for n in theta}, check=False)
    total = 0.0
    for x, _ in tasks.values():
        xb = x[:512].to(next(iter(theta.values())).device)
        lo, hi = _ibp_search(model, box, xb, layers)
        total = total + ((hi - lo) / 2).mean()
    grads = torch.autograd.grad(total / len(tasks), list(radius.values()), allow_unused=True)
    sensitivity = {n: (0.0 if g is None else float(g.detach().double().sum())) for n, g in zip(radius, grads)}
    live = [n for n, s in sensitivity.items() if s > 0 and math.isfinite(s) and not (n in frozen and bool(frozen[n].all()))]
    steps = {}
    for n, s in sensitivity.items():
        unit = scale / (len(live) * s) if n in live else cfg.max_width
        steps[n] = lr * min(unit, cfg.max_width)
    return steps, scale


def _ibp_search(model, box: Box, x: Tensor, layers) -> tuple[Tensor, Tensor]:
    from . import numerics as rounding
    from .bounds import ibp

    with rounding.native_kernels():
        return ibp.propagate(model, box, x.to(box.dtype), certify=False, layers=layers)


def _copy_bounds(lower: Mapping[str, Tensor], upper: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return ({n: t.detach().clone() for n, t in lower.items()}, {n: t.detach().clone() for n, t in upper.items()})


@torch.no_grad()
def _pull_back_(lower, upper, feasible, keep: float) -> None:
    """Move the box to ``feasible + keep · (box − feasible)``: both contain θ and respect the caps, the
    masks and ``within``, and so does every point between them."""
    f_lower, f_upper = feasible
    for n in lower:
        lower[n].copy_(f_lower[n] + keep * (lower[n] - f_lower[n]))
        upper[n].copy_(f_upper[n] + keep * (upper[n] - f_upper[n]))


@torch.no_grad()
def _finalize(model, box: Box, theta, free, checks, layers, cfg: SearchConfig) -> tuple[Box, float]:
    """``box`` shrunk towards θ by the largest scale s ∈ [0, 1] at which every check ``((x, y), spec, goal)``
    holds on its whole data set; free coordinates keep their width. Returns (box, s).

    The scale is bisected with the cheap search-mode bound (to within 2^-finalize_steps). Search mode
    leaves out the rounding terms of certify mode, which can only cost examples whose margin is at
    rounding level; so where the search-mode metric clears a goal by fewer than two examples, the scale
    is confirmed with the sound certify-mode metric in float64 that certificates use (and bisected
    below it if rounding costs an example), so "meets τ on the search data" holds in the certificate's
    sense."""

    def scaled(s: float) -> Box:
        if s == 1.0:
            return box
        lower, upper = {}, {}
        for n, c in theta.items():
            lo, hi = c - s * (c - box.lower[n]), c + s * (box.upper[n] - c)
            if n in free:
                lo, hi = torch.where(free[n], box.lower[n], lo), torch.where(free[n], box.upper[n], hi)
            lower[n], upper[n] = torch.minimum(lo, c), torch.maximum(hi, c)
        return Box(lower, upper, check=False)

    def slack(s: float) -> float:
        """The smallest (search-mode metric − goal) · n over the checks: examples to spare."""
        candidate = scaled(s)
        return min((_search_metric(model, candidate, x, y, spec, layers, cfg) - goal) * len(x)
                   for (x, y), spec, goal in checks)

    def sound(s: float) -> bool:
        candidate = scaled(s)
        return all(certified_accuracy(model, candidate, x, y, method=cfg.method, dtype=torch.float64,
                                      balanced=spec.kind == "balanced_accuracy") >= goal
                   for (x, y), spec, goal in checks)

    def bisect(good: float, bad: float, meets) -> float:
        for _ in range(cfg.finalize_steps):
            mid = (good + bad) / 2
            good, bad = (mid, bad) if meets(mid) else (good, mid)
        return good

    spare = slack(1.0)
    s = 1.0 if spare >= 0 else bisect(0.0, 1.0, lambda v: slack(v) >= 0)
    if s > 0.0 and (s < 1.0 or spare < 2) and not sound(s):
        s = bisect(0.0, s, sound)
    return scaled(s), s


def _search_metric(model, box: Box, x: Tensor, y: Tensor, spec: Spec, layers, cfg: SearchConfig) -> float:
    """The search-mode hard metric of ``box`` on a whole data set, in minibatches."""
    dev = box.device
    los, his, lins = [], [], []
    for s in range(0, len(x), cfg.batch_size):
        lo, hi, lin = _search_bounds(model, box, x[s : s + cfg.batch_size].to(dev), y[s : s + cfg.batch_size].to(dev),
                                     layers, cfg)
        los.append(lo), his.append(hi), lins.append(lin)
    lin = None if lins[0] is None else torch.cat(lins)
    return float(spec.hard(torch.cat(los), torch.cat(his), y.to(dev), lin))


def _search_bounds(model, box, x, y, layers, cfg: SearchConfig):
    """Differentiable (lo, hi, linear margins or None) of one minibatch (no input checks: done once)."""
    if cfg.method == "linear":
        from . import numerics as rounding

        with rounding.native_kernels():
            return linear_graph.margins(model, box, x.to(box.dtype), y, certify=False, layers=layers,
                                         competitors=cfg.competitors)
    return (*_ibp_search(model, box, x, layers), None)


def _objective(lower, upper, alpha: float, p_total: int) -> Tensor:
    total = 0.0
    for n in lower:
        w = upper[n] - lower[n]
        if alpha > 0:
            total = total + alpha * torch.log(w + 1e-6).sum()
        if alpha < 1:
            total = total + (1 - alpha) * w.sum()
    return total / p_total


def _next_multiplier(m: float, hard_violation: Tensor, cfg: SearchConfig) -> float:
    """Grow the step while feasible, shrink it while a constraint is clearly violated."""
    if float(hard_violation.max()) > cfg.violation_tolerance:
        m /= cfg.lr_factor
    elif float(hard_violation.min()) < 0:
        m *= cfg.lr_factor
    lo, hi = cfg.lr_multiplier_range
    return min(max(m, lo), hi)


@torch.no_grad()
def _project_box_(lower, upper, theta, max_width, frozen, outer: Box | None) -> None:
    for n, c in theta.items():
        lower[n].copy_(torch.minimum(torch.maximum(lower[n], c - max_width), c))
        upper[n].copy_(torch.maximum(torch.minimum(upper[n], c + max_width), c))
        if outer is not None:
            lower[n].copy_(torch.maximum(lower[n], outer.lower[n]))
            upper[n].copy_(torch.minimum(upper[n], outer.upper[n]))
        if n in frozen:
            lower[n].copy_(torch.where(frozen[n], c, lower[n]))
            upper[n].copy_(torch.where(frozen[n], c, upper[n]))


def _certify_snapshots(model, snapshots, cert_tasks, specs, confidence, cfg, keep, lid_cls, extra: Mapping,
                       progress: bool = False, counter=None, batch_size: int | None = 2048):
    members = [box for _, box in snapshots]
    config = {k: v for k, v in asdict(cfg).items() if k != "history"}
    config["primal_lr"] = cfg.effective_primal_lr
    config["checkpoint_iterations"] = [it for it, _ in snapshots]
    config.update(extra)
    config["keep"] = keep
    lid = lid_cls.certify(model, members, cert_tasks, specs, confidence=confidence, search_config=config,
                          method=cfg.method, progress=progress, counter=counter, batch_size=batch_size)
    lid.history = cfg.history
    if keep == "all":
        return lid
    good = [
        i for i, certs in enumerate(lid.certificates)
        if all(certs[t].certified_accuracy >= specs[t].tau for t in specs)
    ]
    if not good:
        best = max(range(len(lid)), key=lambda i: min(c.certified_accuracy - specs[t].tau
                                                       for t, c in lid.certificates[i].items()))
        short = ", ".join(f"task '{t}' {c.certified_accuracy:.4f} < τ = {specs[t].tau:g} on {c.n} held-out examples"
                          for t, c in lid.certificates[best].items() if c.certified_accuracy < specs[t].tau)
        why = ("every checkpoint met τ on the search data, so the domain's shape does not carry over to new examples "
               "(give the search more data, lower τ or raise tau_margin)" if cfg.finalize else
               "(lower τ, raise tau_margin, or pass keep='all' to keep certificates below τ)")
        raise LidSearchError(f"compute_lid: no checkpoint reaches τ on the held-out certification data (best: {short}); "
                             f"{why}.")
    if progress and len(good) < len(lid):
        dropped = [i for i in range(len(lid)) if i not in good]
        print(f"[lidgate] kept {len(good)} of {len(lid)} members; dropped member(s) "
              f"{', '.join(str(i + 1) for i in dropped)}: below τ on some task (they still count in the union bound)",
              file=sys.stderr)
    return lid.subset(good)


def _progress(total: int, enabled: bool, desc: str = "LID search", unit: str = "it"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


def _advance(bar, record: dict | None) -> None:
    if bar is None:
        return
    if record is not None:
        viol = record["hard_violation"]
        bar.set_postfix(width_sum=f"{record['width_sum']:.4g}", worst_violation=f"{max(viol):+.3f}", refresh=False)
    bar.update(1)


def _close(bar) -> None:
    if bar is not None:
        bar.close()


__all__ = ["LidSearchError", "SearchConfig", "compute_lid", "tau_from_accuracy"]
