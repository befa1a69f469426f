"""LID search: the largest box around θ whose certified metric stays above τ (METHOD.md §2.1).

The box [θ^L, θ^U] starts at zero width and grows by a primal–dual augmented-Lagrangian scheme
(cooper's ``AlternatingDualPrimalOptimizer``: dual step first, then one Adam step on the bounds):

    maximise  J = (α Σ log(w_i + 1e-6) + (1 − α) Σ w_i) / p     (w = θ^U − θ^L)
    s.t.      soft_certified_metric_t(box) ≥ τ_t  for every task t

with a penalty coefficient that grows ×1.01 while a constraint is violated beyond a tolerance
(capped), and one step-size multiplier m (primal lr ∝ m, dual lr ∝ 1/m) that grows while all
constraints hold and shrinks while one is violated. After every step the box is projected back
onto {θ^L ≤ θ ≤ θ^U, widths ≤ max_width, masked coordinates at zero width, inside ``within``}.

Snapshots ("checkpoints") of the trajectory become the LID's members; each is certified in
float64 on held-out certification data the search never saw, with a union bound over all
snapshots, and only snapshots meeting every τ on that data are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import cooper
import torch
from torch import Tensor, nn

from .bounds import linear
from .bounds.ibp import check_supported
from .domains import Box
from .errors import InvalidDomainError, InvalidInputError, LidError
from .spec import Spec, check_labels

TaskData = tuple[Tensor, Tensor]


class LidSearchError(LidError):
    """The search produced no domain that meets the specification on the certification data."""


def tau_from_accuracy(accuracy: float, delta: float, tau_max: float = 1.0) -> float:
    """The paper's threshold rule τ = min(max(acc − Δ, acc / 2), τ_max)."""
    return min(max(accuracy - delta, accuracy / 2), tau_max)


@dataclass
class SearchConfig:
    """Hyper-parameters of the search (defaults: the paper's MNIST configuration)."""

    iterations: int = 200
    batch_size: int = 500
    checkpoints: int = 10
    alpha: float = 0.0  # 1 = log-volume, 0 = mean width (the paper's configs all use 0)
    primal_lr: float = 0.33  # divided by the number of parameters p
    dual_lr: float = 0.01
    penalty_init: float = 1.0
    penalty_growth: float = 1.01
    penalty_max: float = 1000.0
    violation_tolerance: float = 0.05
    lr_factor: float = 1.1
    lr_multiplier_range: tuple[float, float] = (1 / 20, 20.0)
    max_width: float = 10.0
    temperature: float = 10.0
    # The surrogate is enforced stochastically on minibatches, so the paper's certificates land
    # slightly below τ. Aiming the search at τ + margin lets large checkpoints meet τ on the
    # held-out data; 0 reproduces the paper's behaviour. The margin never takes more than half of
    # the slack θ itself has (metric at θ − τ), so a task the model barely meets (τ = acc / 2 on a
    # task it has not learnt) stays feasible at width 0 instead of collapsing the box.
    tau_margin: float = 0.05
    seed: int = 0
    # "ibp" (the paper's bound) or "linear" (bounds/linear.py: tighter on shared convolution weights,
    # so the same τ certifies wider boxes there; ~4× the cost of an IBP iteration with one competing
    # class, ~18× with nine). The search and the certificates use the same bound.
    method: str = "ibp"
    # With method="linear": bound only the k classes IBP finds most dangerous per example during the
    # search (certificates always bound every class). None = all.
    competitors: int | None = None
    history: list[dict] = field(default_factory=list, repr=False)

    def validate(self) -> None:
        checks = {
            "iterations": self.iterations >= 1,
            "batch_size": self.batch_size >= 1,
            "checkpoints": 1 <= self.checkpoints <= self.iterations,
            "alpha": 0.0 <= self.alpha <= 1.0,
            "primal_lr": self.primal_lr > 0,
            "dual_lr": self.dual_lr > 0,
            "max_width": self.max_width > 0,
            "temperature": self.temperature > 0,
            "penalty_growth": self.penalty_growth >= 1.0,
            "tau_margin": 0.0 <= self.tau_margin < 1.0,
            "method": self.method in ("ibp", "linear"),
            "competitors": self.competitors is None or (isinstance(self.competitors, int)
                                                        and not isinstance(self.competitors, bool) and self.competitors >= 1),
        }
        for name, ok in checks.items():
            if not ok:
                raise InvalidInputError(f"compute_lid: invalid '{name}' = {getattr(self, name)!r}")


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
    spec_kind: str = "accuracy",
    mask: Mapping[str, Tensor] | None = None,
    free: Mapping[str, Tensor] | None = None,
    within: Box | None = None,
    confidence: float = 0.95,
    device: torch.device | str | None = None,
    progress: bool = True,
    keep: str = "meeting_tau",
    **config,
):
    """Search a locally invariant domain around the model's current parameters.

    One task: ``compute_lid(model, x, y, tau=0.85)``; several at once: ``tasks={"t1": (x1, y1,
    τ1), ...}`` (one constraint and multiplier each). Certification data: ``cert_x``/``cert_y``
    (one task), ``cert={"t1": (x, y), ...}``, or else a ``cert_fraction`` of the data is held out
    (the search never sees it). ``mask``: name → bool tensor, True where a coordinate must keep
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

    cfg = SearchConfig(**config)
    cfg.validate()
    if keep not in ("meeting_tau", "all"):
        raise InvalidInputError(f"compute_lid: 'keep' must be 'meeting_tau' or 'all', got {keep!r}")
    layers = check_supported(model)
    if cfg.method == "linear":
        linear.check_supported(layers)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("compute_lid: device='cuda' requested but CUDA is not available")
    model = model.to(dev).eval()

    search_tasks, cert_tasks, taus = _collect_tasks(model, x, y, tau, tasks, cert, cert_x, cert_y, cert_fraction, cfg.seed)
    specs = {t: Spec(spec_kind, taus[t], cfg.temperature) for t in taus}
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    p_total = sum(t.numel() for t in theta.values())
    frozen = _check_mask(mask, theta)
    start_free = _check_mask(free, theta, "free")
    for n in start_free.keys() & frozen.keys():
        if bool((start_free[n] & frozen[n]).any()):
            raise InvalidInputError(f"compute_lid: '{n}' has coordinates that are both frozen (mask) and free")
    outer = _check_within(within, theta, dev)

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

    names = list(search_tasks)
    cmp = _BoxCMP(names, cfg.penalty_init, dev, next(iter(theta.values())).dtype)
    base_primal = cfg.primal_lr / p_total
    primal_opt = torch.optim.Adam(list(lower.values()) + list(upper.values()), lr=base_primal)
    dual_opt = torch.optim.SGD(cmp.dual_parameters(), lr=cfg.dual_lr, maximize=True)
    optimizer = cooper.optim.AlternatingDualPrimalOptimizer(
        cmp=cmp, primal_optimizers=primal_opt, dual_optimizers=dual_opt
    )
    penalty_updater = cooper.penalty_coefficients.MultiplicativePenaltyCoefficientUpdater(
        growth_factor=cfg.penalty_growth, violation_tolerance=cfg.violation_tolerance, has_restart=False
    )

    targets = _search_targets(model, search_tasks, specs, cfg.tau_margin)
    gen = torch.Generator().manual_seed(cfg.seed)
    every = max(1, cfg.iterations // cfg.checkpoints)
    snapshots: list[tuple[int, Box]] = []
    multiplier = 1.0
    targets_t = torch.tensor([targets[t] for t in names], dtype=next(iter(theta.values())).dtype, device=dev)
    bar = _progress(cfg.iterations, progress)
    for it in range(1, cfg.iterations + 1):
        box = Box(lower, upper, check=False)

        def state_kwargs() -> dict:
            soft, hard = [], []
            for t in names:
                xb, yb = _minibatch(search_tasks[t], cfg.batch_size, gen, dev)
                lo, hi, lin = _search_bounds(model, box, xb, yb, layers, cfg)
                soft.append(specs[t].soft(lo, hi, yb, lin))
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
            group["lr"] = base_primal * multiplier
        for group in dual_opt.param_groups:
            group["lr"] = cfg.dual_lr / multiplier

        _project_box_(lower, upper, theta, cfg.max_width, frozen, outer)
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
        }
        cfg.history.append(record)
        _advance(bar, record)
    _close(bar)

    return _certify_snapshots(model, snapshots, cert_tasks, specs, confidence, cfg, keep, LID, targets)


# ------------------------------------------------------------------------------------- helpers
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
            cx, cy = _check_task(name, *cert[name], model, "certification data")
            search_tasks[name], cert_tasks[name] = (tx, ty), (cx, cy)
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


@torch.no_grad()
def _search_targets(model, search_tasks, specs, margin: float, chunk: int = 4096) -> dict[str, float]:
    """Per task, the search target from θ's own metric on the whole search data (a plain forward
    pass: this only sizes the margin, it certifies nothing)."""
    param = next(model.parameters())
    out = {}
    for t, (x, y) in search_tasks.items():
        logits = torch.cat([model(x[i : i + chunk].to(param.device, param.dtype)) for i in range(0, len(x), chunk)])
        nominal = float(specs[t].hard(logits, logits, y.to(param.device)))
        out[t] = search_target(specs[t].tau, nominal, margin)
    return out


def _search_bounds(model, box, x, y, layers, cfg: SearchConfig):
    """Differentiable (lo, hi, linear margins or None) of one minibatch (no input checks: done once)."""
    from .bounds import ibp, rounding

    with rounding.native_kernels():
        if cfg.method == "linear":
            return linear.linear_margins(model, box, x.to(box.dtype), y, certify=False, layers=layers,
                                         competitors=cfg.competitors)
        return (*ibp.propagate(model, box, x.to(box.dtype), certify=False, layers=layers), None)


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


def _certify_snapshots(model, snapshots, cert_tasks, specs, confidence, cfg, keep, lid_cls, targets):
    members = [box for _, box in snapshots]
    config = {k: v for k, v in asdict(cfg).items() if k != "history"}
    config["checkpoint_iterations"] = [it for it, _ in snapshots]
    config["search_targets"] = targets
    config["keep"] = keep
    lid = lid_cls.certify(model, members, cert_tasks, specs, confidence=confidence, search_config=config,
                          method=cfg.method)
    lid.history = cfg.history
    if keep == "all":
        return lid
    good = [
        i for i, certs in enumerate(lid.certificates)
        if all(certs[t].certified_accuracy >= specs[t].tau for t in specs)
    ]
    if not good:
        best = max(min(c.certified_accuracy for c in certs.values()) for certs in lid.certificates)
        raise LidSearchError(
            f"compute_lid: no checkpoint reaches τ on the held-out certification data "
            f"(best certified metric {best:.4f}, τ = {[s.tau for s in specs.values()]}); "
            "lower τ, use more iterations with a smaller primal_lr, or keep='all'"
        )
    return lid.subset(good)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="LID search", unit="it", leave=False)


def _advance(bar, record: dict) -> None:
    if bar is None:
        return
    viol = record["hard_violation"]
    bar.set_postfix(width_sum=f"{record['width_sum']:.4g}", worst_violation=f"{max(viol):+.3f}", refresh=False)
    bar.update(1)


def _close(bar) -> None:
    if bar is not None:
        bar.close()


__all__ = ["LidSearchError", "SearchConfig", "compute_lid", "tau_from_accuracy"]
