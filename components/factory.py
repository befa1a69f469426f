"""Model factories: the one way lidgate turns a reference like ``"pkg.models:build"`` into a model.

A team brings its model as a *factory*: a callable that returns a ``torch.nn.Module``. lidgate never
pickles models; it stores the factory reference and its JSON keyword arguments (``ModelSpec``) next
to the weights and calls the factory again to rebuild the module. The CLI's ``--model``, the
configuration file's ``model.factory``, the registry's ``model/spec.json`` and the certification
flow's candidate directory all go through ``resolve`` / ``build_model`` here.

Grammar of a reference::

    package.module:attr           attr may be dotted: "pkg.mod:Class.create"
    path/to/file.py:attr          a source file (relative paths: against ``roots``, then the cwd);
                                  not allowed in a ModelSpec, which must rebuild on another machine

Every error is a ``FactoryError`` whose message starts with the field or argument the reference
came from (``"model.factory: ..."``, ``"--model: ..."``), names the reference and says what was
expected. torch is imported only when a model is built, so importing this module stays cheap (the
CLI imports it for ``--help``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = ["FactoryError", "ModelSpec", "build_model", "resolve", "use_code_roots"]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_REF = re.compile(rf"^{_IDENT}(\.{_IDENT})*:{_IDENT}(\.{_IDENT})*$")
_EXPECTED = ("expected 'package.module:factory' (the attribute may be dotted, e.g. 'pkg.mod:Class.create') "
             "or 'path/to/file.py:factory'")


class FactoryError(ValueError):
    """A model factory reference could not be resolved, called, or did not return a module.

    The message starts with the field or argument that named the factory (``"model.factory: ..."``),
    then the reference and what was expected.
    """


# ------------------------------------------------------------------------------------ resolve
def resolve(ref: str, *, field: str, roots: Sequence[str | Path] = ()) -> Callable[..., Any]:
    """The callable a factory reference names.

    Args:
        ref: ``"package.module:attr"`` (``attr`` may be dotted) or ``"path/to/file.py:attr"``.
        field: where ``ref`` came from (``"model.factory"``, ``"--model"``); starts every error.
        roots: directories put at the front of ``sys.path`` (unless already on it) before importing,
            e.g. the team's code directory next to its configuration file. Relative ``.py`` paths
            are looked up in these first, then in the current directory.

    Returns:
        The attribute, checked to be callable (it is not called).

    Raises:
        FactoryError: bad grammar, module not importable (and why), the import raised, missing
            attribute, or not callable.
    """
    module_part, attr = _split(ref, field)
    roots = use_code_roots(roots)
    if module_part.endswith(".py"):
        module = _import_file(ref, module_part, field, roots)
    else:
        module = _import_module(ref, module_part, field)
    target: Any = module
    walked: list[str] = []
    for part in attr.split("."):
        if not hasattr(target, part):
            where = f"module {module_part!r}" if not walked else f"{module_part}:{'.'.join(walked)}"
            raise FactoryError(f"{field}: {where} has no attribute {part!r} (reference {ref!r}); "
                               "expected the name of a function or class that returns a torch.nn.Module")
        target = getattr(target, part)
        walked.append(part)
    if not callable(target):
        raise FactoryError(f"{field}: {ref!r} is a {type(target).__name__}, not callable; "
                           "expected a function or class that returns a torch.nn.Module")
    return target


def use_code_roots(roots: Sequence[str | Path]) -> list[Path]:
    """Put a team's code directories at the front of ``sys.path`` (unless already on it).

    A registered version stores only its factory reference; rebuilding it later (the gate, the audit,
    ``lidgate status``) imports the factory again, so entry points call this once with the
    configuration's ``code`` directories before reading the registry.

    Returns:
        The roots as paths, in the order given.
    """
    paths = [Path(r) for r in roots]
    for root in reversed(paths):
        text = str(root)
        if text not in sys.path:
            sys.path.insert(0, text)
    importlib.invalidate_caches()  # a root created after the interpreter started must be seen
    return paths


def build_model(ref: str, kwargs: Mapping[str, Any] | None = None, *, field: str,
                roots: Sequence[str | Path] = ()) -> nn.Module:
    """``resolve(ref)(**kwargs)``, checked to be a ``torch.nn.Module`` (returned in eval mode).

    Raises:
        FactoryError: anything ``resolve`` raises; the factory raised (its type and message); the
            factory returned something that is not a ``torch.nn.Module``.
    """
    from torch import nn

    factory = resolve(ref, field=field, roots=roots)
    kwargs = dict(kwargs or {})
    call = f"{ref}(**{kwargs})" if kwargs else f"{ref}()"
    try:
        model = factory(**kwargs)
    except Exception as exc:  # noqa: BLE001 — the team's code failed: say so, without a traceback
        raise FactoryError(f"{field}: calling {call} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise FactoryError(f"{field}: {call} returned {type(model).__name__}, expected a torch.nn.Module")
    return model.eval()


def _split(ref: str, field: str) -> tuple[str, str]:
    if not isinstance(ref, str):
        raise FactoryError(f"{field}: the factory reference must be a string, got {type(ref).__name__}; {_EXPECTED}")
    if ":" in ref:
        module_part, attr = ref.rsplit(":", 1)
        if module_part.endswith(".py") and re.fullmatch(rf"{_IDENT}(\.{_IDENT})*", attr):
            return module_part, attr
        if _MODULE_REF.match(ref):
            return module_part, attr
    raise FactoryError(f"{field}: {ref!r} is not a factory reference; {_EXPECTED}")


def _import_module(ref: str, name: str, field: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only the named module (or one of its parents) missing means "not importable"; a module
        # the team's code imports being missing is an error *inside* their import.
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise FactoryError(f"{field}: cannot import module {name!r} for {ref!r} ({exc}); expected a module "
                               "on sys.path (installed, or under the configured code directory)") from None
        raise FactoryError(f"{field}: importing module {name!r} for {ref!r} raised "
                           f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 — the team's module failed while importing
        raise FactoryError(f"{field}: importing module {name!r} for {ref!r} raised "
                           f"{type(exc).__name__}: {exc}") from exc


def _import_file(ref: str, file: str, field: str, roots: Sequence[Path]):
    path = Path(file)
    candidates = [path] if path.is_absolute() else [r / path for r in roots] + [path]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        looked = ", ".join(f"'{p}'" for p in candidates)
        raise FactoryError(f"{field}: file '{file}' of {ref!r} does not exist (looked for {looked}); "
                           "expected a Python source file")
    found = found.resolve()
    # A stable, unique module name: dataclasses and typing look their module up in sys.modules.
    name = f"_lidgate_factory_{found.stem}_{hashlib.sha256(str(found).encode()).hexdigest()[:12]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, found)
    if spec is None or spec.loader is None:
        raise FactoryError(f"{field}: '{found}' of {ref!r} cannot be loaded as a Python module; "
                           "expected a .py source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001
        del sys.modules[name]
        raise FactoryError(f"{field}: importing '{found}' for {ref!r} raised {type(exc).__name__}: {exc}") from exc
    return module


# ------------------------------------------------------------------------------------ ModelSpec
@dataclass
class ModelSpec:
    """How to rebuild a model without pickling it: ``factory(**kwargs)``.

    Stored as ``spec.json`` beside the weights of every registered version and candidate.

    Attributes:
        factory: ``"package.module:attr"`` (``attr`` may be dotted), e.g. ``"examples.digits.model:mlp"``.
            A ``file.py:attr`` reference is refused: the spec must rebuild on another machine.
        kwargs: keyword arguments for the factory; JSON values only (checked, stored normalised).
    """

    factory: str
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        module_part, _ = _split(self.factory, "ModelSpec.factory")
        if module_part.endswith(".py"):
            raise FactoryError(f"ModelSpec.factory: {self.factory!r} names a file; expected "
                               "'package.module:factory' so that the model rebuilds on any machine")
        if not isinstance(self.kwargs, Mapping):
            raise FactoryError(f"ModelSpec.kwargs: expected a mapping of JSON values for {self.factory!r}, "
                               f"got {type(self.kwargs).__name__}")
        try:
            self.kwargs = json.loads(json.dumps(dict(self.kwargs), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise FactoryError(f"ModelSpec.kwargs: expected JSON values for {self.factory!r}: {exc}") from None

    def build(self, roots: Sequence[str | Path] = (), *, field: str = "ModelSpec.factory") -> nn.Module:
        """Call the factory with ``kwargs``; the module is returned in eval mode.

        Args:
            roots: directories to import the factory from (see ``resolve``).
            field: names the spec's origin in errors (e.g. ``"model.factory"``).

        Raises:
            FactoryError: the factory cannot be resolved, raised, or did not return a ``nn.Module``.
        """
        return build_model(self.factory, self.kwargs, field=field, roots=roots)

    def to_dict(self) -> dict:
        """``{"factory": ..., "kwargs": {...}}``, the content of ``spec.json``."""
        return {"factory": self.factory, "kwargs": self.kwargs}

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelSpec:
        """The inverse of ``to_dict``; exactly the fields ``factory`` and ``kwargs``."""
        if not isinstance(d, Mapping) or set(d) != {"factory", "kwargs"}:
            raise FactoryError(f"ModelSpec: expected exactly the fields 'factory' and 'kwargs', got {d!r}")
        return cls(d["factory"], d["kwargs"])

    def save(self, path: str | Path) -> Path:
        """Write ``spec.json`` (sorted keys, so equal specs give equal bytes and fingerprints)."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelSpec:
        """Read a ``spec.json`` written by ``save``.

        Raises:
            FactoryError: naming the file, when it is missing, not JSON, or not a spec.
        """
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise FactoryError(f"'{path}': cannot read a model spec ({type(exc).__name__}: {exc}); "
                               'expected JSON {"factory": "package.module:factory", "kwargs": {...}}') from None
        try:
            return cls.from_dict(doc)
        except FactoryError as exc:
            raise FactoryError(f"'{path}': {exc}") from None
