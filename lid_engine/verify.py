"""Re-check a saved LID from scratch, as an auditor would.

``verify(directory, model, x, y)`` trusts nothing in the directory: it re-reads every file,
recomputes every fingerprint, every derived number of every certificate, and the sound bounds and
certified counts of every member on the supplied certification data; and it checks that the
supplied model is the certified one (or, with ``allow_update=True``, lies inside the LID). It never
raises on a bad directory: every problem becomes a failed ``Check`` in the report, and
``report.ok`` is True only when every check ran and passed (fail closed).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .certificate import (
    BUFFER_PREFIX,
    DTYPES,
    CertData,
    Certificate,
    Counter,
    Counts,
    count_certified,
    data_fingerprint,
    fingerprint_architecture,
    fingerprint_model,
    fingerprint_tensors,
)
from .domains import Box
from .stream import CertificationStream
from .errors import CertificateError, LidError
from .lid import (
    LID_FILE,
    NOMINAL_FILE,
    check_files,
    member_dir,
    outside_coordinate,
    read_manifest,
    read_member,
    read_nominal,
    spec_from_dict,
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass
class VerificationReport:
    directory: str
    checks: list[Check] = field(default_factory=list)
    member: int | None = None  # with allow_update: the member the model lies in

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def tampered(self) -> bool:
        """Whether a failed check says the saved files themselves are not what was certified (a digest,
        fingerprint, signature or internally inconsistent certificate), as opposed to the model or the
        data given not matching them, or a certificate that does not hold when recomputed."""
        return any(_is_integrity(c.name) for c in self.failures)

    def failed(self, name: str) -> bool:
        return any(c.name == name and not c.ok for c in self.checks)

    def summary(self) -> str:
        head = f"{'VERIFIED' if self.ok else 'VERIFICATION FAILED'}: {self.directory} " \
               f"({len(self.checks) - len(self.failures)}/{len(self.checks)} checks passed)"
        lines = [head]
        for c in self.checks:
            lines.append(f"  [{'ok' if c.ok else 'FAIL'}] {c.name}" + (f": {c.detail}" if c.detail else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"directory": self.directory, "ok": self.ok, "member": self.member,
                "checks": [c.to_dict() for c in self.checks]}

    def __str__(self) -> str:
        return self.summary()


# the detail of a recomputation that raised (a worker or a file that failed), as opposed to a lower count
UNCHECKED = "could not be recomputed"


def _is_integrity(check: str) -> bool:
    """The checks of the saved files' integrity (see :attr:`VerificationReport.tampered`)."""
    return (check in (LID_FILE, NOMINAL_FILE, "files", "signature") or check.startswith("file ")
            or check.endswith((" domain", " tasks", " certificate", " certificates agree")))


def _err(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, LidError) else f"{type(exc).__name__}: {exc}"


def _resolve_data(tasks: list[str], x, y, data, report: VerificationReport) -> dict[str, CertData]:
    if data is not None and (x is not None or y is not None):
        report.add("inputs", False, "give either x, y (one task) or data={task: (x, y)}, not both")
        return {}
    if data is None:
        if x is None and y is None:
            for t in tasks:
                report.add(f"data '{t}'", False, "no certification data supplied; the counts cannot be recomputed")
            return {}
        stream = isinstance(x, CertificationStream) and y is None  # a stream holds its labels
        if not stream and (x is None or y is None):
            report.add("inputs", False, "x and y must be given together (or x a CertificationStream)")
            return {}
        if len(tasks) != 1:
            report.add("inputs", False, f"the LID has tasks {tasks}; pass data={{task: (x, y)}}")
            return {}
        data = {tasks[0]: x if stream else (x, y)}
    if not isinstance(data, Mapping):
        report.add("inputs", False, f"'data' must be a mapping task -> (x, y), got {type(data).__name__}")
        return {}
    out = {}
    for t in tasks:
        if t not in data:
            report.add(f"data '{t}'", False, "no certification data supplied for this task")
            continue
        xy = data[t]
        if isinstance(xy, CertificationStream):
            out[t] = xy
            continue
        if not isinstance(xy, (tuple, list)) or len(xy) != 2 or not all(isinstance(v, Tensor) for v in xy):
            report.add(f"data '{t}'", False, "must be a pair of tensors (x, y) or a CertificationStream")
            continue
        out[t] = (xy[0], xy[1])
    extra = sorted(set(data) - set(tasks))
    if extra:
        report.add("inputs", False, f"data for tasks {extra} that the LID does not certify")
    return out


def verify(
    directory: str | Path,
    model: nn.Module,
    x: Tensor | None = None,
    y: Tensor | None = None,
    *,
    data: Mapping[str, CertData] | None = None,
    allow_update: bool = False,
    dtype: torch.dtype | None = None,
    batch_size: int | None = 2048,
    recompute: str = "all",
    counter: Counter | None = None,
) -> VerificationReport:
    """Recompute everything about the LID saved in ``directory``; see the module docstring.

    ``x, y``: the certification data of a single-task LID; ``data={task: (x, y)}`` for several (a
    ``CertificationStream`` in place of a pair is read in chunks; ``counter`` counts, as in ``certify_box``).
    ``allow_update=False``: ``model`` must be the nominal model (same fingerprint).
    ``allow_update=True``: ``model`` may be any update that lies inside some member (δ-safe update).
    ``dtype``: the arithmetic of the recomputation; must equal the certificates' (default: theirs).
    ``recompute``: ``"all"`` recomputes the bounds of every member; ``"containing"`` (only with
    ``allow_update=True``) recomputes just the member the updated model lies in — the certificate
    that covers it — which is what a promotion gate needs, at a fraction of the cost. Every
    integrity and fingerprint check runs either way.
    """
    directory = Path(directory)
    report = VerificationReport(str(directory))
    if recompute not in ("all", "containing") or (recompute == "containing" and not allow_update):
        report.add("inputs", False, f"'recompute' must be 'all', or 'containing' with allow_update=True; got {recompute!r}")
        return report
    if not isinstance(model, nn.Module):
        report.add("inputs", False, f"'model' must be a torch.nn.Module, got {type(model).__name__}")
        return report

    # ------------------------------------------------------------ manifest
    try:
        manifest = read_manifest(directory)
    except CertificateError as exc:
        report.add(LID_FILE, False, str(exc))
        return report
    except Exception as exc:  # noqa: BLE001 — report, never raise
        report.add(LID_FILE, False, _err(exc))
        return report
    report.add(LID_FILE, True, f"format {manifest['format']}, digest matches")
    try:
        for rel, ok, detail in check_files(directory, manifest):
            report.add(f"file {rel}", ok, detail)
    except Exception as exc:  # noqa: BLE001
        report.add("files", False, _err(exc))

    tasks = {}
    for t, s in manifest["tasks"].items():
        try:
            tasks[t] = spec_from_dict(s, f"task '{t}'")
            report.add(f"task '{t}' spec", True, f"{tasks[t].kind} ≥ {tasks[t].tau}")
        except CertificateError as exc:
            report.add(f"task '{t}' spec", False, str(exc))
    n_members = len(manifest["members"])

    # ------------------------------------------------------------ nominal
    nominal_state = None
    try:
        nominal_state = read_nominal(directory, manifest["model_sha256"])
        report.add(NOMINAL_FILE, True, "fingerprint matches model_sha256")
    except Exception as exc:  # noqa: BLE001
        report.add(NOMINAL_FILE, False, _err(exc))
    nominal = None if nominal_state is None else {
        n: t for n, t in nominal_state.items() if not n.startswith(BUFFER_PREFIX)}

    # ------------------------------------------------------------ members and certificates
    boxes: dict[int, Box] = {}
    certs: dict[tuple[int, str], Certificate] = {}
    for i, entry in enumerate(manifest["members"]):
        name = f"member {i} domain"
        try:
            boxes[i] = read_member(directory, i, entry["domain_sha256"])
            report.add(name, True, f"{member_dir(directory, i).relative_to(directory)} matches its fingerprint")
        except Exception as exc:  # noqa: BLE001
            report.add(name, False, _err(exc))
        if i in boxes and nominal is not None:
            try:
                if set(boxes[i].names) != set(nominal):
                    report.add(f"member {i} contains nominal", False, "the box and the nominal model name different parameters")
                else:
                    where = outside_coordinate(boxes[i], nominal)
                    report.add(f"member {i} contains nominal", where is None,
                               "θ inside (the union is star-shaped, hence connected)" if where is None else where)
            except Exception as exc:  # noqa: BLE001
                report.add(f"member {i} contains nominal", False, _err(exc))
        else:
            report.add(f"member {i} contains nominal", False, "not checked: the member or the nominal file did not load")

        if set(entry["certificates"]) != set(manifest["tasks"]):
            report.add(f"member {i} tasks", False,
                       f"certificates for {sorted(entry['certificates'])}, tasks are {sorted(manifest['tasks'])}")
        for t, d in entry["certificates"].items():
            cname = f"member {i} / '{t}' certificate"
            try:
                c = Certificate.from_dict(d)
            except Exception as exc:  # noqa: BLE001
                report.add(cname, False, _err(exc))
                continue
            problems = c.problems()
            if c.task != t:
                problems.append(f"'task' is {c.task!r}")
            if c.member != i:
                problems.append(f"'member' is {c.member}")
            if t in tasks and (c.kind != tasks[t].kind or c.tau != tasks[t].tau):
                problems.append(f"certifies {c.kind} ≥ {c.tau}, the task spec is {tasks[t].kind} ≥ {tasks[t].tau}")
            if c.model_sha256 != manifest["model_sha256"]:
                problems.append("'model_sha256' differs from lid.json's")
            if c.architecture_sha256 != manifest["architecture_sha256"]:
                problems.append("'architecture_sha256' differs from lid.json's")
            if c.domain_sha256 != entry["domain_sha256"]:
                problems.append("'domain_sha256' differs from the member's recorded fingerprint")
            elif i in boxes and c.domain_sha256 != fingerprint_tensors(boxes[i].tensors()):
                problems.append("'domain_sha256' does not match the member's tensors")
            if c.n_domains < n_members:
                problems.append(f"n_domains = {c.n_domains} < {n_members} members: the union bound is too small")
            report.add(cname, not problems, "; ".join(problems) if problems else
                       f"{c.certified}/{c.n} certified, {c.kind} {c.certified_accuracy:.4f}, "
                       f"lower bound {c.lower_bound:.4f} at confidence {c.confidence:g} over {c.n_domains} domain(s)")
            certs[(i, t)] = c
    for t in manifest["tasks"]:
        group = [c for (i, tt), c in certs.items() if tt == t]
        for f in ("data_sha256", "n", "confidence", "n_domains", "dtype", "evaluation_dtypes", "bound_method"):
            values = {json.dumps(getattr(c, f)) for c in group}
            if len(values) > 1:
                report.add(f"task '{t}' certificates agree", False, f"members disagree on '{f}': {sorted(values)}")
                break
        else:
            report.add(f"task '{t}' certificates agree", True, "same data, n, confidence, n_domains, dtype, method")

    # ------------------------------------------------------------ data
    supplied = _resolve_data(list(manifest["tasks"]), x, y, data, report)
    data_ok: dict[str, bool] = {}
    for t, xy in supplied.items():
        expected = {c.data_sha256 for (i, tt), c in certs.items() if tt == t}
        try:
            sha = data_fingerprint(xy)
        except Exception as exc:  # noqa: BLE001
            report.add(f"data '{t}' fingerprint", False, _err(exc))
            data_ok[t] = False
            continue
        data_ok[t] = expected == {sha}
        report.add(f"data '{t}' fingerprint", data_ok[t],
                   "matches the certificates" if data_ok[t] else
                   f"the supplied data hashes to {sha}, the certificates record {sorted(expected)}")

    # ------------------------------------------------------------ model
    arch_ok = False
    try:
        arch = fingerprint_architecture(model)
        arch_ok = arch == manifest["architecture_sha256"]
        report.add("model architecture", arch_ok,
                   "matches" if arch_ok else "the module tree (layer types or hyper-parameters) differs from the certified one")
    except Exception as exc:  # noqa: BLE001
        report.add("model architecture", False, _err(exc))
    if not allow_update:
        try:
            sha = fingerprint_model(model)
            ok = sha == manifest["model_sha256"]
            report.add("model fingerprint", ok, "the model is the certified nominal model" if ok else
                       f"the model hashes to {sha}, the LID's nominal model to {manifest['model_sha256']}")
        except Exception as exc:  # noqa: BLE001
            report.add("model fingerprint", False, _err(exc))
    else:
        _check_update(model, nominal_state, boxes, n_members, report)

    # ------------------------------------------------------------ recompute the bounds
    ref_model = None
    if arch_ok and nominal_state is not None:
        try:
            ref_model = _nominal_model(model, nominal_state)
        except Exception as exc:  # noqa: BLE001
            report.add("nominal model", False, f"cannot load the nominal parameters into the model: {_err(exc)}")
    for (i, t), c in sorted(certs.items()):
        if recompute == "containing" and i != report.member:
            continue  # not the certificate that covers this model (its member is checked below)
        name = f"member {i} / '{t}' recomputed"
        if t not in supplied:
            report.add(name, False, "not recomputed: no certification data")
            continue
        if not data_ok.get(t):
            report.add(name, False, "not recomputed: the supplied data is not the certified data")
            continue
        if i not in boxes:
            report.add(name, False, "not recomputed: the member's domain did not load")
            continue
        if ref_model is None:
            report.add(name, False, "not recomputed: the model's architecture or the nominal file does not match")
            continue
        if dtype is not None and dtype != DTYPES[c.dtype]:
            report.add(name, False, f"requested dtype {dtype} but the certificate was computed in {c.dtype}")
            continue
        try:
            got = (counter or count_certified)(ref_model, boxes[i], supplied[t], dtype=DTYPES[c.dtype],
                                               batch_size=batch_size, where="verify", method=c.bound_method)
        except Exception as exc:  # noqa: BLE001 — not a failed claim, but no confirmed one either (fail closed)
            report.add(name, False, f"{UNCHECKED}: {_err(exc)}")
            continue
        if got.evaluation_dtypes != tuple(c.evaluation_dtypes):
            report.add(name, False, f"the certificate claims evaluation in {c.evaluation_dtypes}, the model needs "
                                    f"{list(got.evaluation_dtypes)}")
            continue
        report.add(name, *_confirms(got, c))
    return report


def _confirms(got: Counts, c: Certificate) -> tuple[bool, str]:
    """Whether the recomputed counts confirm the certificate's claim, and why.

    Another CPU or BLAS (or a CPU re-check of a CUDA certificate) may round differently, so a borderline
    example can come out certified in one sound computation and not in the other. Every stored number
    is a lower bound, and the hard metric and the Clopper–Pearson bound only grow with each class's
    certified count: the claim holds when the same examples per class (``n``) are recomputed with at
    least the stored certified count in every class. A lower count fails, naming both numbers."""
    evaluated = " and ".join(got.evaluation_dtypes)
    if got.n != c.n or {k: v["n"] for k, v in got.per_class.items()} != {k: v["n"] for k, v in c.per_class.items()}:
        return False, (f"the data has {got.n} examples (per class {_class_sizes(got.per_class)}), the certificate "
                       f"{c.n} ({_class_sizes(c.per_class)})")
    short = [k for k in c.per_class if got.per_class[k]["certified"] < c.per_class[k]["certified"]]
    if short:
        return False, (f"recomputed {got.certified}/{got.n} certified, stored {c.certified}/{c.n}: fewer in class "
                       + ", ".join(f"{k} ({got.per_class[k]['certified']} < {c.per_class[k]['certified']})" for k in short))
    if got.certified == c.certified:
        return True, f"{got.certified}/{got.n} certified in {evaluated}, as stored"
    return True, (f"{got.certified}/{got.n} certified in {evaluated} ≥ {c.certified} stored (this machine's rounding "
                  "certifies more borderline examples; the stored claim holds)")


def _class_sizes(per_class) -> dict[str, int]:
    return {k: v["n"] for k, v in per_class.items()}


def _nominal_model(model: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``model`` carrying the nominal parameters and buffers (the function that was certified)."""
    ref = copy.deepcopy(model)
    params, buffers = dict(ref.named_parameters()), dict(ref.named_buffers())
    expected = set(params) | {BUFFER_PREFIX + n for n in buffers}
    if expected != set(state):
        raise CertificateError(
            f"names differ: model only {sorted(expected - set(state))}, nominal file only {sorted(set(state) - expected)}"
        )
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise CertificateError(f"parameter '{n}' has shape {tuple(p.shape)}, nominal {tuple(state[n].shape)}")
            p.copy_(state[n].to(p.device, p.dtype))
        for n, b in buffers.items():
            src = state[BUFFER_PREFIX + n]
            if b.shape != src.shape or b.dtype != src.dtype:
                raise CertificateError(f"buffer '{n}' differs in shape or dtype from the nominal one")
            b.copy_(src.to(b.device))
    if fingerprint_model(ref) != fingerprint_tensors(state):
        raise CertificateError("the model's parameter dtypes differ from the nominal ones")
    return ref


def _check_update(model: nn.Module, nominal_state, boxes: dict[int, Box], n_members: int,
                  report: VerificationReport) -> None:
    """``allow_update=True``: same buffers as the nominal model, parameters inside some member."""
    if nominal_state is None:
        report.add("model buffers", False, "not checked: the nominal file did not load")
    else:
        try:
            buffers = {BUFFER_PREFIX + n: b for n, b in model.named_buffers()}
            nominal_buffers = {n: t for n, t in nominal_state.items() if n.startswith(BUFFER_PREFIX)}
            ok = fingerprint_tensors(buffers) == fingerprint_tensors(nominal_buffers)
            report.add("model buffers", ok, "equal to the nominal model's" if ok else
                       "the model's buffers (e.g. BatchNorm running statistics) differ from the certified ones; "
                       "the domain only covers parameters")
        except Exception as exc:  # noqa: BLE001
            report.add("model buffers", False, _err(exc))
    if len(boxes) != n_members:
        report.add("model inside LID", False, "not checked: some member did not load")
        return
    try:
        params = dict(model.named_parameters())
        for i in range(n_members):
            box = boxes[i]
            if set(box.names) != set(params):
                report.add("model inside LID", False, "the model and the domain name different parameters")
                return
            if outside_coordinate(box, params) is None:
                report.member = i
                report.add("model inside LID", True, f"the parameters lie in member {i}")
                return
        where = outside_coordinate(boxes[0], params)
        report.add("model inside LID", False, f"the parameters lie in no member (member 0: {where})")
    except Exception as exc:  # noqa: BLE001
        report.add("model inside LID", False, _err(exc))


__all__ = ["Check", "VerificationReport", "verify"]
