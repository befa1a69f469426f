"""The LID: a certified union of boxes around the nominal parameters.

Every member box contains the nominal parameters θ, so the union is star-shaped about θ and hence
connected (METHOD.md §1.3) — this is checked whenever an ``LID`` is built or loaded. A point of the
union lies in some member, so the union's guarantee is the *minimum* over the members: on the
certification set its (balanced) accuracy is ≥ ``certified_accuracy()``, and with probability ≥
``confidence`` its population (balanced) accuracy is ≥ ``lower_bound()`` (the members' bounds hold
simultaneously through the union bound each certificate's ``n_domains`` accounts for).

On disk (``save``/``load``)::

    DIR/lid.json                      manifest: format, tasks, search config, fingerprints,
                                      certificates per member, and a sha256 digest of itself
    DIR/nominal.safetensors           θ (parameters by name) and buffers (``buffer:NAME``)
    DIR/members/000/domain.safetensors, domain.json   (``Box.save``)

``load`` recomputes every fingerprint and refuses (``CertificateError``) a file that does not
match. The digest protects against accidental or naive edits of the manifest; it is not a
signature (anyone can recompute it), which is why ``lid_engine.verify`` also recomputes every
number a certificate claims.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .certificate import (
    BOUND_NAMES,
    BUFFER_PREFIX,
    CertData,
    Certificate,
    Counter,
    _engine_version,
    certify_box,
    fingerprint_tensors,
    model_state,
)
from .domains import BOX_FORMAT, Box
from .errors import CertificateError, InvalidDomainError, InvalidInputError, LidError
from .files import atomic_write, file_sha256, utc_now
from .spec import Spec
from .stream import CertificationStream

LID_FORMAT = "lidgate.lid/1"
LID_FILE = "lid.json"
NOMINAL_FILE = "nominal.safetensors"
MEMBERS_DIR = "members"
MANIFEST_KEYS = frozenset(
    {"format", "engine_version", "created_at", "model_sha256", "architecture_sha256", "tasks",
     "search_config", "members", "files", "digest"}
)
MEMBER_KEYS = frozenset({"domain_sha256", "certificates"})
TASK_KEYS = frozenset({"kind", "tau", "temperature"})


# ------------------------------------------------------------------------------ manifest helpers
def canonical_json(obj) -> str:
    """The byte-exact JSON the digest is computed over (sorted keys, no whitespace, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def manifest_digest(manifest: Mapping) -> str:
    """sha256 of the manifest without its ``digest`` field."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


def member_dir(directory: str | Path, index: int) -> Path:
    return Path(directory) / MEMBERS_DIR / f"{index:03d}"  # expected_files() spells the same paths


def expected_files(n_members: int) -> list[str]:
    """Every file of a saved LID besides ``lid.json``, as POSIX paths relative to the directory."""
    files = [NOMINAL_FILE]
    for i in range(n_members):
        rel = f"{MEMBERS_DIR}/{i:03d}"
        files += [f"{rel}/domain.safetensors", f"{rel}/domain.json"]
    return files


def box_meta(box: Box) -> dict:
    """The ``domain.json`` that ``Box.save`` writes for ``box`` (to check a saved one is untouched)."""
    return {
        "format": BOX_FORMAT,
        "kind": box.kind,
        "names": box.names,
        "shapes": {n: list(box.lower[n].shape) for n in box.names},
        "dtype": str(box.dtype).removeprefix("torch."),
    }


def spec_from_dict(d, where: str) -> Spec:
    if not isinstance(d, Mapping) or set(d) != TASK_KEYS:
        raise CertificateError(f"{where}: a task spec must have exactly the fields {sorted(TASK_KEYS)}, got {d!r}")
    for k in ("tau", "temperature"):
        if isinstance(d[k], bool) or not isinstance(d[k], (int, float)):
            raise CertificateError(f"{where}: task field '{k}' must be a number, got {d[k]!r}")
    try:
        return Spec(d["kind"], float(d["tau"]), float(d["temperature"]))
    except OverflowError:
        raise CertificateError(f"{where}: task fields 'tau' and 'temperature' must be finite, got {d!r}") from None
    except LidError as exc:
        raise CertificateError(f"{where}: {exc}") from None


def _json_able(obj, where: str):
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: 'search_config' must be JSON-serialisable (no NaN/inf): {exc}") from None


def outside_coordinate(box: Box, params: Mapping[str, Tensor]) -> str | None:
    """A description of the first coordinate of ``params`` outside ``box``, or None if inside."""
    with torch.no_grad():
        for name in box.names:
            p = params[name].detach()
            dtype = torch.promote_types(torch.promote_types(p.dtype, box.lower[name].dtype), box.upper[name].dtype)
            p = p.to(box.device, dtype)
            lo, hi = box.lower[name].detach().to(dtype), box.upper[name].detach().to(dtype)
            bad = (p < lo) | (p > hi) | torch.isnan(p)
            if bool(bad.any()):
                idx = tuple(int(i) for i in bad.nonzero()[0])
                return (f"parameter '{name}' at index {idx}: {float(p[idx]):.9g} not in "
                        f"[{float(lo[idx]):.9g}, {float(hi[idx]):.9g}]")
    return None


# ------------------------------------------------------------------------------ the LID
class LID:
    """A certified union of boxes around the nominal parameters (see the module docstring).

    ``members``: the boxes; ``certificates[i][task]``: member i's certificate on ``task``;
    ``nominal``: θ by parameter name; ``buffers``: the nominal model's buffers (part of the function
    the certificates are about); ``tasks``: task name → ``Spec``; ``search_config``: JSON-able
    record of how the members were found.
    """

    def __init__(
        self,
        members: Sequence[Box],
        certificates: Sequence[Mapping[str, Certificate]],
        nominal: Mapping[str, Tensor],
        model_sha256: str,
        search_config: Mapping | None = None,
        tasks: Mapping[str, Spec] | None = None,
        *,
        buffers: Mapping[str, Tensor] | None = None,
        architecture_sha256: str | None = None,
        created_at: str | None = None,
        engine_version: str | None = None,
    ):
        if isinstance(members, Box) or not isinstance(members, Sequence) or not members:
            raise InvalidDomainError("LID: 'members' must be a non-empty list of Box")
        for i, m in enumerate(members):
            if not isinstance(m, Box):
                raise InvalidDomainError(f"LID: member {i} must be a lid_engine Box, got {type(m).__name__}")
        if not isinstance(nominal, Mapping) or not nominal:
            raise InvalidDomainError("LID: 'nominal' must be a non-empty mapping name -> tensor")
        for name, t in nominal.items():
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise InvalidDomainError(f"LID: nominal['{name}'] must be a floating-point tensor")
        buffers = dict(buffers or {})
        for name, t in buffers.items():
            if not isinstance(t, Tensor):
                raise InvalidDomainError(f"LID: buffers['{name}'] must be a tensor")
        self.members: list[Box] = list(members)
        self.nominal: dict[str, Tensor] = {n: t.detach().clone() for n, t in nominal.items()}
        self.buffers: dict[str, Tensor] = {n: t.detach().clone() for n, t in buffers.items()}
        self.search_config: dict = _json_able(dict(search_config or {}), "LID")
        self.created_at = created_at or utc_now()
        self.engine_version = engine_version or _engine_version()
        self.history: list | None = None  # optional search trace; not saved, not certified

        # Every member is a box over exactly the nominal parameters and contains θ (star-shaped union).
        names = set(self.nominal)
        for i, m in enumerate(self.members):
            if set(m.names) != names:
                raise InvalidDomainError(
                    f"LID: member {i} names parameters {sorted(set(m.names) ^ names)} that differ from the nominal ones"
                )
            for n in m.names:
                if tuple(m.lower[n].shape) != tuple(self.nominal[n].shape):
                    raise InvalidDomainError(
                        f"LID: member {i}, parameter '{n}': shape {tuple(m.lower[n].shape)} but nominal "
                        f"{tuple(self.nominal[n].shape)}"
                    )
            where = outside_coordinate(m, self.nominal)
            if where is not None:
                raise InvalidDomainError(
                    f"LID: member {i} does not contain the nominal parameters ({where}); every member must "
                    "contain θ so that the union is connected"
                )

        computed = fingerprint_tensors(self.state())
        if model_sha256 != computed:
            raise CertificateError(
                f"LID: 'model_sha256' {model_sha256!r} is not the fingerprint of the nominal parameters and "
                f"buffers ({computed})"
            )
        self.model_sha256 = model_sha256

        if tasks is None:
            tasks = {}
            for certs in certificates:
                for t, c in certs.items():
                    tasks.setdefault(t, c.spec)
        if not isinstance(tasks, Mapping) or not tasks:
            raise CertificateError("LID: 'tasks' must be a non-empty mapping task name -> Spec")
        for t, s in tasks.items():
            if not isinstance(t, str) or not t or not isinstance(s, Spec):
                raise CertificateError(f"LID: tasks must map non-empty names to Spec, got {t!r}: {s!r}")
        self.tasks: dict[str, Spec] = dict(tasks)

        if isinstance(certificates, Mapping) or len(certificates) != len(self.members):
            raise CertificateError(
                f"LID: 'certificates' must be a list with one mapping per member ({len(self.members)})"
            )
        self.certificates: list[dict[str, Certificate]] = [dict(c) for c in certificates]
        first = next(iter(self.certificates[0].values()), None)
        if architecture_sha256 is None and first is not None:
            architecture_sha256 = first.architecture_sha256
        self.architecture_sha256 = architecture_sha256
        self._check_certificates()

    # ---------------------------------------------------------------- validation
    def _check_certificates(self) -> None:
        reference: dict[str, Certificate] = {}
        for i, (m, certs) in enumerate(zip(self.members, self.certificates)):
            if set(certs) != set(self.tasks):
                raise CertificateError(
                    f"LID: member {i} has certificates for tasks {sorted(certs)}, expected {sorted(self.tasks)}"
                )
            domain_sha = fingerprint_tensors(m.tensors())
            for t, c in certs.items():
                where = f"LID: member {i}, task '{t}'"
                if not isinstance(c, Certificate):
                    raise CertificateError(f"{where}: expected a Certificate, got {type(c).__name__}")
                problems = c.problems()
                if c.task != t:
                    problems.append(f"certificate is for task {c.task!r}")
                if c.member != i:
                    problems.append(f"certificate names member {c.member}")
                if c.kind != self.tasks[t].kind or c.tau != self.tasks[t].tau:
                    problems.append(
                        f"certificate is for {c.kind} ≥ {c.tau}, the task spec is {self.tasks[t].kind} ≥ {self.tasks[t].tau}"
                    )
                if c.model_sha256 != self.model_sha256:
                    problems.append("certificate's model_sha256 is not the LID's nominal model")
                if c.architecture_sha256 != self.architecture_sha256:
                    problems.append("certificate's architecture_sha256 differs from the LID's")
                if c.domain_sha256 != domain_sha:
                    problems.append(f"certificate's domain_sha256 does not match member {i}'s tensors ({domain_sha})")
                if c.n_domains < len(self.members):
                    problems.append(
                        f"n_domains = {c.n_domains} is smaller than the {len(self.members)} members (the union "
                        "bound must count every certified domain)"
                    )
                ref = reference.setdefault(t, c)
                for f in ("data_sha256", "n", "confidence", "n_domains", "dtype", "evaluation_dtypes", "bound_method"):
                    if getattr(c, f) != getattr(ref, f):
                        problems.append(f"'{f}' differs from member {ref.member}'s certificate for this task")
                if problems:
                    raise CertificateError(f"{where}: " + "; ".join(problems))

    # ---------------------------------------------------------------- construction
    @classmethod
    def certify(
        cls,
        model: nn.Module,
        members: Sequence[Box],
        data: Mapping[str, CertData],
        specs: Mapping[str, Spec],
        *,
        confidence: float = 0.95,
        dtype: torch.dtype = torch.float64,
        search_config: Mapping | None = None,
        progress: bool = False,
        n_domains: int | None = None,
        batch_size: int | None = 2048,
        method: str = "ibp",
        counter: Counter | None = None,
    ) -> LID:
        """Certify every member on every task's held-out data; θ = the model's current parameters.

        ``data[task]``: ``(x, y)``, or a ``CertificationStream`` read a chunk at a time.
        ``n_domains`` (default ``len(members)``) is the union-bound size; pass a larger number when
        more candidate domains were certified on the same data than are kept here. ``method`` is the
        sound bound used (``"ibp"`` or ``"linear"``), recorded in every certificate. ``counter``: what
        counts the certified examples (see ``certify_box``), e.g. shards on a cluster.
        """
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"LID.certify: 'model' must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(members, Box) or not isinstance(members, Sequence) or not members:
            raise InvalidInputError("LID.certify: 'members' must be a non-empty list of Box")
        if not isinstance(data, Mapping) or not isinstance(specs, Mapping) or not specs:
            raise InvalidInputError("LID.certify: 'data' and 'specs' must be non-empty mappings keyed by task name")
        if set(data) != set(specs):
            raise InvalidInputError(
                f"LID.certify: 'data' has tasks {sorted(data)} but 'specs' has {sorted(specs)}; they must match"
            )
        for t, xy in data.items():
            if not isinstance(xy, CertificationStream) and (not isinstance(xy, (tuple, list)) or len(xy) != 2):
                raise InvalidInputError(f"LID.certify: data['{t}'] must be a pair (x, y) or a CertificationStream")
        if n_domains is None:
            n_domains = len(members)
        if isinstance(n_domains, bool) or not isinstance(n_domains, int) or n_domains < len(members):
            raise InvalidInputError(
                f"LID.certify: 'n_domains' must be an integer ≥ the number of members ({len(members)}), got {n_domains!r}"
            )
        for i, m in enumerate(members):
            if not isinstance(m, Box):
                raise InvalidInputError(f"LID.certify: member {i} must be a lid_engine Box, got {type(m).__name__}")
            m.check_matches(model, f"LID.certify (member {i})")
        state = model_state(model)
        nominal = {n: p.detach().clone() for n, p in model.named_parameters()}
        buffers = {n[len(BUFFER_PREFIX):]: t.detach().clone() for n, t in state.items() if n.startswith(BUFFER_PREFIX)}
        model_sha = fingerprint_tensors(state)
        for i, m in enumerate(members):  # fail before the expensive part
            where = outside_coordinate(m, nominal)
            if where is not None:
                raise InvalidDomainError(
                    f"LID.certify: member {i} does not contain the model's parameters ({where}); every member "
                    "must contain θ so that the union is connected"
                )
        certificates = []
        for i, m in enumerate(members):
            certs = {}
            for t, spec in specs.items():
                x, y = (data[t], None) if isinstance(data[t], CertificationStream) else data[t]
                certs[t] = certify_box(
                    model, m, x, y, spec, task=t, member=i, n_domains=n_domains, confidence=confidence,
                    dtype=dtype, batch_size=batch_size, model_sha256=model_sha, method=method, counter=counter,
                )
                if progress:
                    c = certs[t]
                    print(
                        f"[lidgate] member {i + 1}/{len(members)} task '{t}': {c.certified}/{c.n} examples certified, "
                        f"{c.kind.replace('_', ' ')} {c.certified_accuracy:.4f} vs τ {c.tau:g}, lower bound "
                        f"{c.lower_bound:.4f}",
                        file=sys.stderr,
                    )
            certificates.append(certs)
        return cls(members, certificates, nominal, model_sha, search_config, dict(specs), buffers=buffers)

    def subset(self, indices: Sequence[int]) -> LID:
        """The LID of the members ``indices`` (in that order). Certificates keep their ``n_domains``
        (the union bound must count every domain certified on the data); their ``member`` index is
        renumbered, nothing else changes."""
        indices = list(indices)
        if not indices:
            raise InvalidInputError("LID.subset: 'indices' must not be empty")
        for i in indices:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.members):
                raise InvalidInputError(f"LID.subset: index {i!r} outside 0..{len(self.members) - 1}")
        if len(set(indices)) != len(indices):
            raise InvalidInputError(f"LID.subset: repeated indices {indices}")
        certs = [
            {t: dataclasses.replace(c, member=new) for t, c in self.certificates[old].items()}
            for new, old in enumerate(indices)
        ]
        config = dict(self.search_config)
        previous = config.get("member_indices")
        if not (isinstance(previous, list) and len(previous) == len(self.members)):
            previous = list(range(len(self.members)))
        config["member_indices"] = [previous[i] for i in indices]  # positions among the certified domains
        out = LID(
            [self.members[i] for i in indices], certs, self.nominal, self.model_sha256, config,
            self.tasks, buffers=self.buffers, architecture_sha256=self.architecture_sha256,
            created_at=self.created_at, engine_version=self.engine_version,
        )
        out.history = self.history
        return out

    # ---------------------------------------------------------------- queries
    def state(self) -> dict[str, Tensor]:
        """Nominal parameters and buffers as ``fingerprint_model`` names them."""
        return {**self.nominal, **{BUFFER_PREFIX + n: b for n, b in self.buffers.items()}}

    def _task(self, task: str | None) -> str:
        if task is None:
            if len(self.tasks) == 1:
                return next(iter(self.tasks))
            raise LidError(f"LID: several tasks {sorted(self.tasks)}; name one with task=...")
        if task not in self.tasks:
            raise LidError(f"LID: unknown task {task!r}; tasks are {sorted(self.tasks)}")
        return task

    @property
    def n_domains(self) -> int:
        """The union-bound size the certificates were issued with (≥ number of members)."""
        return max(c.n_domains for certs in self.certificates for c in certs.values())

    @property
    def confidence(self) -> float:
        return min(c.confidence for certs in self.certificates for c in certs.values())

    def certificate(self, member: int, task: str | None = None) -> Certificate:
        return self.certificates[member][self._task(task)]

    def certified_accuracy(self, task: str | None = None) -> float:
        """Sound certified metric of the whole union on the certification set (min over members)."""
        t = self._task(task)
        return min(certs[t].certified_accuracy for certs in self.certificates)

    def lower_bound(self, task: str | None = None) -> float:
        """Population lower bound for every point of the union, at the certificates' confidence."""
        t = self._task(task)
        return min(certs[t].lower_bound for certs in self.certificates)

    def meets_spec(self, task: str | None = None) -> bool:
        """Every member's certified metric reaches τ (on ``task``, or on every task)."""
        tasks = self.tasks if task is None else [self._task(task)]
        return all(certs[t].certified_accuracy >= self.tasks[t].tau for certs in self.certificates for t in tasks)

    def member_index(self, model_or_params: nn.Module | Mapping[str, Tensor], atol: float = 0.0) -> int | None:
        """Index of the first member containing the parameters, or None."""
        for i, m in enumerate(self.members):
            if m.contains(model_or_params, atol=atol):
                return i
        return None

    def contains(self, model_or_params: nn.Module | Mapping[str, Tensor], atol: float = 0.0) -> bool:
        return self.member_index(model_or_params, atol) is not None

    def width_sum(self) -> list[float]:
        """Sum of widths of each member."""
        return [m.width_sum() for m in self.members]

    def widths(self) -> list[dict[str, dict[str, float]]]:
        """Per member, per parameter tensor: sum, mean and max width."""
        out = []
        with torch.no_grad():
            for m in self.members:
                row = {}
                for n in m.names:
                    w = m.width(n).detach().double()
                    row[n] = {"numel": w.numel(), "sum": float(w.sum()), "mean": float(w.mean()) if w.numel() else 0.0,
                              "max": float(w.max()) if w.numel() else 0.0}
                out.append(row)
        return out

    def best(self, task: str | None = None) -> int | None:
        """Index of the largest member (width sum) whose certificate reaches τ on ``task`` (or on every
        task); None if no member does."""
        tasks = list(self.tasks) if task is None else [self._task(task)]
        good = [i for i, certs in enumerate(self.certificates)
                if all(certs[t].certified_accuracy >= self.tasks[t].tau for t in tasks)]
        if not good:
            return None
        sums = self.width_sum()
        return max(good, key=lambda i: sums[i])

    def statement(self, task: str | None = None) -> str:
        """The union's guarantee for ``task`` in words."""
        t = self._task(task)
        c0 = self.certificates[0][t]
        metric = "balanced accuracy" if c0.kind == "balanced_accuracy" else "accuracy"
        return (
            f"Task '{t}' ({metric} ≥ τ = {c0.tau:g}): every parameter vector in the union of the {len(self)} "
            f"domain(s) has {metric} ≥ {self.certified_accuracy(t):.4f} on the {c0.n} held-out certification "
            f"examples (deterministic, sound {BOUND_NAMES[c0.bound_method]} covering exact arithmetic and evaluation in "
            f"{' and '.join(c0.evaluation_dtypes)}). Provided those examples are i.i.d. draws "
            f"from the deployment distribution that the search never saw, with probability ≥ {c0.confidence:g} "
            f"over their draw every such parameter vector has population {metric} ≥ {self.lower_bound(t):.4f} "
            f"(one-sided Clopper–Pearson, union bound over {c0.n_domains} certified domain(s)"
            + (" and the classes" if c0.kind == "balanced_accuracy" else "") + ")"
            + (f"; {c0.n_domains - len(self)} of the {c0.n_domains} domains certified on this data were not kept "
               "(below τ on some task) and still count in the union bound" if c0.n_domains > len(self) else "") + "."
        )

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[Box]:
        return iter(self.members)

    def __getitem__(self, i: int) -> Box:
        return self.members[i]

    def __repr__(self) -> str:
        parts = ", ".join(f"{t}: cert {self.certified_accuracy(t):.4f} / LB {self.lower_bound(t):.4f}" for t in self.tasks)
        return f"LID({len(self)} member(s), {parts})"

    # ---------------------------------------------------------------- persistence
    def manifest(self, files: Mapping[str, str] | None = None) -> dict:
        """The content of ``lid.json`` (with its digest); ``files``: sha256 of every saved file."""
        m = {
            "format": LID_FORMAT,
            "engine_version": self.engine_version,
            "created_at": self.created_at,
            "model_sha256": self.model_sha256,
            "architecture_sha256": self.architecture_sha256,
            "tasks": {t: s.to_dict() for t, s in self.tasks.items()},
            "search_config": self.search_config,
            "members": [
                {"domain_sha256": fingerprint_tensors(b.tensors()),
                 "certificates": {t: c.to_dict() for t, c in certs.items()}}
                for b, certs in zip(self.members, self.certificates)
            ],
            "files": dict(files or {}),
        }
        m["digest"] = manifest_digest(m)
        return m

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the LID into ``directory`` (which must be empty or absent unless ``overwrite``).

        ``lid.json`` is written last, atomically, so an interrupted save never leaves a loadable LID.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise LidError(f"LID.save: '{directory}' exists and is not a directory")
        if directory.exists() and any(directory.iterdir()):
            if not overwrite:
                raise LidError(f"LID.save: '{directory}' is not empty; pass overwrite=True to replace a saved LID")
            if not (directory / LID_FILE).is_file():
                raise LidError(f"LID.save: '{directory}' is not empty and holds no {LID_FILE}; refusing to overwrite it")
            (directory / LID_FILE).unlink()
            if (directory / NOMINAL_FILE).exists():
                (directory / NOMINAL_FILE).unlink()
            if (directory / MEMBERS_DIR).is_dir():
                shutil.rmtree(directory / MEMBERS_DIR)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({n: t.detach().cpu().contiguous().clone() for n, t in self.state().items()},
                  str(directory / NOMINAL_FILE), metadata={"format": "lidgate.nominal/1"})
        for i, m in enumerate(self.members):
            m.save(member_dir(directory, i))
        manifest = self.manifest({rel: file_sha256(directory / rel) for rel in expected_files(len(self.members))})
        atomic_write(directory / LID_FILE, json.dumps(manifest, indent=2, allow_nan=False))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> LID:
        """Load and check a saved LID: format, digest, every fingerprint, every certificate's consistency.

        Raises ``CertificateError`` naming the member and file when anything does not match.
        """
        directory = Path(directory)
        manifest = read_manifest(directory)
        for rel, ok, detail in check_files(directory, manifest):
            if not ok:
                raise CertificateError(f"LID.load: {detail}")
        tasks = {t: spec_from_dict(s, f"LID.load: {directory / LID_FILE}, task '{t}'") for t, s in manifest["tasks"].items()}
        state = read_nominal(directory, manifest["model_sha256"])
        members, certificates = [], []
        for i, entry in enumerate(manifest["members"]):
            box = read_member(directory, i, entry["domain_sha256"])
            certs = {}
            for t, d in entry["certificates"].items():
                try:
                    certs[t] = Certificate.from_dict(d)
                except CertificateError as exc:
                    raise CertificateError(f"LID.load: {directory / LID_FILE}, member {i}, task '{t}': {exc}") from None
            members.append(box)
            certificates.append(certs)
        nominal = {n: t for n, t in state.items() if not n.startswith(BUFFER_PREFIX)}
        buffers = {n[len(BUFFER_PREFIX):]: t for n, t in state.items() if n.startswith(BUFFER_PREFIX)}
        try:
            return cls(
                members, certificates, nominal, manifest["model_sha256"], manifest["search_config"], tasks,
                buffers=buffers, architecture_sha256=manifest["architecture_sha256"],
                created_at=manifest["created_at"], engine_version=manifest["engine_version"],
            )
        except LidError as exc:
            raise CertificateError(f"LID.load: '{directory}': {exc}") from None


# ------------------------------------------------------------------------------ readers (shared with verify)
def read_manifest(directory: Path) -> dict:
    """``lid.json`` parsed and checked: format, exact fields and their types, digest."""
    path = Path(directory) / LID_FILE
    if not path.is_file():
        raise CertificateError(f"'{path}' is missing (not a saved LID directory)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CertificateError(f"'{path}' is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise CertificateError(f"'{path}' must hold a JSON object")
    if manifest.get("format") != LID_FORMAT:
        raise CertificateError(f"'{path}' has format {manifest.get('format')!r}, expected {LID_FORMAT!r}")
    missing, unknown = sorted(MANIFEST_KEYS - set(manifest)), sorted(set(manifest) - MANIFEST_KEYS)
    if missing or unknown:
        raise CertificateError(f"'{path}': missing fields {missing}, unknown fields {unknown}")
    try:
        digest = manifest_digest(manifest)
    except ValueError as exc:
        raise CertificateError(f"'{path}': cannot be canonicalised ({exc})") from None
    if manifest["digest"] != digest:
        raise CertificateError(
            f"'{path}': digest mismatch (stored {manifest['digest']!r}, content hashes to {digest}); "
            "the file was modified after it was written"
        )
    for key in ("engine_version", "created_at", "model_sha256", "architecture_sha256"):
        if not isinstance(manifest[key], str) or not manifest[key]:
            raise CertificateError(f"'{path}': '{key}' must be a non-empty string")
    try:
        ts = datetime.fromisoformat(manifest["created_at"])
    except ValueError:
        raise CertificateError(f"'{path}': 'created_at' is not an ISO-8601 time") from None
    if ts.tzinfo is None or ts.utcoffset().total_seconds() != 0:
        raise CertificateError(f"'{path}': 'created_at' must be UTC")
    if not isinstance(manifest["tasks"], dict) or not manifest["tasks"]:
        raise CertificateError(f"'{path}': 'tasks' must be a non-empty object")
    if not isinstance(manifest["search_config"], dict):
        raise CertificateError(f"'{path}': 'search_config' must be an object")
    members = manifest["members"]
    if not isinstance(members, list) or not members:
        raise CertificateError(f"'{path}': 'members' must be a non-empty list")
    files = manifest["files"]
    expected = expected_files(len(members))
    if not isinstance(files, dict) or set(files) != set(expected) or not all(isinstance(v, str) for v in files.values()):
        raise CertificateError(f"'{path}': 'files' must map exactly {expected} to their sha256")
    for i, entry in enumerate(members):
        if not isinstance(entry, dict) or set(entry) != MEMBER_KEYS:
            raise CertificateError(f"'{path}': member {i} must have exactly the fields {sorted(MEMBER_KEYS)}")
        if not isinstance(entry["domain_sha256"], str) or not isinstance(entry["certificates"], dict):
            raise CertificateError(f"'{path}': member {i} has malformed 'domain_sha256' or 'certificates'")
    return manifest


def check_files(directory: Path, manifest: Mapping) -> list[tuple[str, bool, str]]:
    """(relative path, ok, detail) for every file the manifest lists: present and byte-identical."""
    out = []
    for rel, sha in manifest["files"].items():
        path = Path(directory) / rel
        if not path.is_file():
            out.append((rel, False, f"'{path}' is missing"))
            continue
        actual = file_sha256(path)
        out.append((rel, actual == sha, "bytes match lid.json" if actual == sha else
                    f"'{path}' hashes to {actual}, lid.json records {sha} (tampered or corrupted file)"))
    return out


def read_nominal(directory: Path, model_sha256: str) -> dict[str, Tensor]:
    """``nominal.safetensors``, checked against ``model_sha256``."""
    path = Path(directory) / NOMINAL_FILE
    if not path.is_file():
        raise CertificateError(f"'{path}' is missing")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CertificateError(f"'{path}' is not a readable safetensors file ({exc})") from None
    sha = fingerprint_tensors(state)
    if sha != model_sha256:
        raise CertificateError(
            f"'{path}': the nominal parameters hash to {sha}, but lid.json's model_sha256 is {model_sha256} "
            "(tampered or corrupted file)"
        )
    return state


def read_member(directory: Path, index: int, domain_sha256: str) -> Box:
    """Member ``index``'s box, checked against its fingerprint and its ``domain.json``."""
    d = member_dir(directory, index)
    try:
        box = Box.load(d)
    except LidError as exc:
        raise CertificateError(f"member {index}: cannot load '{d}': {exc}") from None
    sha = fingerprint_tensors(box.tensors())
    if sha != domain_sha256:
        raise CertificateError(
            f"member {index}: '{d / 'domain.safetensors'}' hashes to {sha}, but lid.json records {domain_sha256} "
            "(tampered or corrupted file)"
        )
    try:
        meta = json.loads((d / "domain.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise CertificateError(f"member {index}: '{d / 'domain.json'}' is unreadable ({exc})") from None
    if meta != box_meta(box):
        raise CertificateError(f"member {index}: '{d / 'domain.json'}' does not describe the tensors it accompanies")
    return box


__all__ = ["LID", "LID_FORMAT", "canonical_json", "manifest_digest"]
