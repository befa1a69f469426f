"""ONNX export of promoted model versions, with the certificate digest in the model's metadata.

``export_onnx`` turns a torch module into an ONNX file through ``torch.onnx.export(dynamo=True)``
with a dynamic batch dimension, writes ``lidgate.certificate_sha256`` (and any further
``lidgate.*`` metadata: version, model fingerprint, tasks…) into the ONNX model's
``metadata_props``, and then proves the file computes the same function: onnxruntime
(``CPUExecutionProvider``) is run on the example input *and* on a batch of a different size (which
also proves the batch dimension really is dynamic), and the export is refused with
``OnnxParityError`` when any output differs from torch's by more than ``atol + rtol·|torch output|``.

The file is written to a temporary name in the target directory and moved into place with
``os.replace`` only after every check has passed, so a failed or interrupted export never leaves a
half-written (or unchecked) ``.onnx`` behind. torch.onnx's diagnostics (stdout/stderr prints,
warnings, log records) are captured rather than shown, so CLI output stays clean; when the export
fails they are summarised in the raised ``OnnxExportError``.

``log_onnx_to_mlflow`` stores the checked file as an artifact of an MLflow run.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "CERTIFICATE_KEY",
    "OnnxExport",
    "OnnxExportError",
    "OnnxParityError",
    "export_onnx",
    "log_onnx_to_mlflow",
    "read_onnx_metadata",
]

#: metadata_props key that carries the sha256 of the certificate the exported parameters satisfy.
CERTIFICATE_KEY = "lidgate.certificate_sha256"
ENGINE_VERSION_KEY = "lidgate.engine_version"
BATCH_DIM_NAME = "batch"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOISY_ROOTS = ("torch", "onnx", "onnxscript", "onnx_ir", "onnxruntime")


class OnnxExportError(RuntimeError):
    """The model could not be exported to ONNX (or the exported file is unusable)."""


class OnnxParityError(OnnxExportError):
    """onnxruntime's outputs differ from torch's by more than the tolerance."""

    def __init__(self, message: str, max_abs_diff: float, atol: float):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.atol = atol


@dataclass
class OnnxExport:
    """A checked ONNX file: where it is, its sha256, the parity actually measured, its opset and the
    metadata_props written into it (``lidgate.certificate_sha256`` among them)."""

    path: Path
    sha256: str
    max_abs_diff: float
    opset: int
    metadata: dict[str, str]
    batch_sizes: list[int] = field(default_factory=list)  # batch sizes the parity check ran on


# ------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def _quiet(buffer: io.StringIO) -> Iterator[None]:
    """Capture prints, warnings and torch/onnx log records made inside the block into ``buffer``."""
    handler = logging.StreamHandler(buffer)
    saved = []
    names = [n for n, lg in logging.root.manager.loggerDict.items()
             if isinstance(lg, logging.Logger) and n.split(".")[0] in _NOISY_ROOTS]
    for name in sorted(set(names) | set(_NOISY_ROOTS)):
        logger = logging.getLogger(name)
        if name in _NOISY_ROOTS or logger.handlers:
            # torch._logging attaches its own stderr handlers (and propagate=False) to many loggers
            saved.append((logger, list(logger.handlers)))
            logger.handlers = [handler]
    try:
        with warnings.catch_warnings(record=True) as caught, \
                contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                for w in caught:
                    buffer.write(f"{w.category.__name__}: {w.message}\n")
    finally:
        for logger, handlers in saved:
            logger.handlers = handlers


def _error_summary(exc: BaseException, limit: int = 1500) -> str:
    """The useful part of torch.onnx's (long, coloured) error text."""
    text = _ANSI.sub("", str(exc)).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    marker = "## Exception summary"
    if marker in text:
        summary = text.split(marker, 1)[1].strip()
        summary = summary.split("\n\n(Refer to the full stack trace", 1)[0]
        text = f"{first}\n{summary}"
    if len(text) > limit:
        text = text[:limit] + " …"
    return text


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flatten_outputs(out, where: str) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        flat: list[Tensor] = []
        for o in out:
            flat += _flatten_outputs(o, where)
        return flat
    if isinstance(out, Mapping):
        flat = []
        for k in out:
            flat += _flatten_outputs(out[k], where)
        return flat
    raise OnnxExportError(f"{where}: the model returns {type(out).__name__}; only tensors (or tuples/lists/dicts of "
                          "tensors) can be compared with the ONNX outputs")


def _other_batch(example: Tensor, size: int, seed: int = 0) -> Tensor:
    """A batch of ``size`` rows like ``example``: its rows, cycled, plus noise of the example's scale."""
    idx = torch.arange(size) % example.shape[0]
    base = example.detach()[idx.to(example.device)]
    if not base.is_floating_point():
        return base.clone()
    g = torch.Generator().manual_seed(seed)
    scale = float(example.detach().double().std()) if example.numel() > 1 else 1.0
    if not math.isfinite(scale) or scale == 0.0:
        scale = 1.0
    noise = torch.randn(base.shape, generator=g, dtype=torch.float64) * (0.1 * scale)
    return base + noise.to(base.device, base.dtype)


def _check_metadata(certificate_sha256: str, metadata: Mapping[str, str] | None) -> dict[str, str]:
    if not isinstance(certificate_sha256, str) or not _SHA256.match(certificate_sha256):
        raise ValueError(
            f"export_onnx: 'certificate_sha256' must be a lowercase hex sha256 (64 characters), got {certificate_sha256!r}"
        )
    props: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise TypeError(f"export_onnx: metadata must map non-empty str keys to str values, got {k!r}: {v!r}")
        props[k] = v
    if props.get(CERTIFICATE_KEY, certificate_sha256) != certificate_sha256:
        raise ValueError(
            f"export_onnx: metadata[{CERTIFICATE_KEY!r}] = {props[CERTIFICATE_KEY]!r} contradicts "
            f"certificate_sha256 = {certificate_sha256!r}"
        )
    props[CERTIFICATE_KEY] = certificate_sha256
    if ENGINE_VERSION_KEY not in props:
        from lid_engine import __version__

        props[ENGINE_VERSION_KEY] = __version__
    return props


def _parity(session, model: nn.Module, batches: Sequence[Tensor], input_name: str,
            rtol: float = 0.0) -> tuple[float, float]:
    """(largest |onnx − torch|, largest |onnx − torch| − rtol·|torch|) over every output element."""
    worst, excess = 0.0, 0.0
    for xb in batches:
        with torch.no_grad():
            expected = [t.detach().cpu() for t in _flatten_outputs(model(xb), "export_onnx")]
        got = session.run(None, {input_name: xb.detach().cpu().numpy()})
        if len(got) != len(expected):
            raise OnnxParityError(
                f"export_onnx: the ONNX model has {len(got)} outputs, torch {len(expected)} (batch of {xb.shape[0]})",
                math.inf, 0.0,
            )
        for i, (e, g) in enumerate(zip(expected, got)):
            g = torch.from_numpy(g)
            if tuple(g.shape) != tuple(e.shape):
                raise OnnxParityError(
                    f"export_onnx: output {i} has shape {tuple(g.shape)} in ONNX but {tuple(e.shape)} in torch "
                    f"(batch of {xb.shape[0]}); is the batch dimension dynamic?",
                    math.inf, 0.0,
                )
            if e.numel() == 0:
                continue
            if e.is_floating_point() or e.is_complex():
                gap = (g.double() - e.double()).abs()
                over = gap - rtol * e.double().abs()
                diff, beyond = float(gap.max()), float(over.max())
                if math.isnan(diff):  # NaN where the other side is not (same NaN positions compare equal)
                    same_nan = bool(torch.equal(torch.isnan(g), torch.isnan(e)))
                    finite = ~torch.isnan(e)
                    if same_nan and bool(finite.any()):
                        diff, beyond = float(gap[finite].max()), float(over[finite].max())
                    else:
                        diff = beyond = 0.0 if same_nan else math.inf
            else:
                diff = beyond = 0.0 if bool(torch.equal(g.to(e.dtype), e)) else math.inf
            worst, excess = max(worst, diff), max(excess, beyond)
    return worst, excess


# ------------------------------------------------------------------------------ public API
def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path: str | Path,
    *,
    certificate_sha256: str,
    metadata: Mapping[str, str] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    check_batch_sizes: Sequence[int] | None = None,
    opset: int | None = None,
) -> OnnxExport:
    """Export ``model`` to ONNX at ``path`` with a dynamic batch dimension and check it with onnxruntime.

    ``example_input``: one input tensor whose first dimension is the batch. ``certificate_sha256``
    (hex sha256 of the certificate these parameters satisfy) is stored as
    ``lidgate.certificate_sha256`` in the model's metadata_props, next to ``metadata`` (str → str;
    ``lidgate.engine_version`` is added unless given). The export runs with the model in eval mode
    (its previous mode is restored afterwards).

    The ONNX outputs are compared with torch's on the example input and on batches of other sizes
    (``check_batch_sizes``; by default one size different from the example's). A difference above
    ``atol + rtol·|torch output|`` raises ``OnnxParityError`` (with ``.max_abs_diff``); a model torch.onnx cannot export
    raises ``OnnxExportError``. In either case nothing is left at ``path`` or beside it (an
    existing file at ``path`` is kept untouched).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx: 'model' must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor) or example_input.ndim < 1 or example_input.shape[0] < 1:
        raise ValueError("export_onnx: 'example_input' must be a tensor with a non-empty batch (first) dimension")
    for name, value in (("atol", atol), ("rtol", rtol)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"export_onnx: '{name}' must be a finite number ≥ 0, got {value!r}")
    props = _check_metadata(certificate_sha256, metadata)
    batch = int(example_input.shape[0])
    if check_batch_sizes is None:
        check_batch_sizes = [batch + 5 if batch < 8 else max(1, batch // 2)]
    sizes = [int(s) for s in check_batch_sizes]
    if any(s < 1 for s in sizes):
        raise ValueError(f"export_onnx: 'check_batch_sizes' must be positive, got {sizes}")
    if all(s == batch for s in sizes):
        raise ValueError("export_onnx: 'check_batch_sizes' must include a size different from the example's batch")

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"export_onnx: '{path}' is a directory; give the file name of the .onnx to write")
    path.parent.mkdir(parents=True, exist_ok=True)

    import onnx
    import onnxruntime as ort

    was_training = model.training
    model.eval()
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    log = io.StringIO()
    try:
        try:
            with _quiet(log), torch.no_grad():
                program = torch.onnx.export(
                    model, (example_input,), dynamo=True, verbose=False, opset_version=opset,
                    dynamic_shapes=({0: torch.export.Dim(BATCH_DIM_NAME, min=1)},),
                    external_data=False,
                )
                proto = program.model_proto
        except Exception as exc:
            raise OnnxExportError(
                f"export_onnx: torch.onnx could not export {type(model).__name__}: {_error_summary(exc)}"
            ) from exc
        if proto is None or not proto.graph.input:
            raise OnnxExportError(f"export_onnx: the exported {type(model).__name__} has no graph input")
        existing = {p.key: p.value for p in proto.metadata_props}
        existing.update(props)
        del proto.metadata_props[:]
        for k in sorted(existing):
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, existing[k]
        onnx.save_model(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:
            raise OnnxExportError(f"export_onnx: the exported file fails onnx.checker: {exc}") from exc
        opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        try:
            session = ort.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise OnnxExportError(f"export_onnx: onnxruntime cannot load the exported model: {exc}") from exc
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise OnnxExportError(f"export_onnx: the exported model has {len(inputs)} inputs, expected 1")
        batches = [example_input] + [_other_batch(example_input, s, seed=i) for i, s in enumerate(sizes)]
        try:
            with _quiet(log):
                max_diff, excess = _parity(session, model, batches, inputs[0].name, rtol)
        except OnnxParityError:
            raise
        except Exception as exc:
            raise OnnxExportError(
                f"export_onnx: running the exported model failed (batch sizes {[b.shape[0] for b in batches]}): {exc}"
            ) from exc
        if not excess <= atol:
            raise OnnxParityError(
                f"export_onnx: ONNX and torch outputs differ by up to {max_diff:.3g}, beyond atol {atol:g} + rtol "
                f"{rtol:g}·|torch| (batch sizes {[int(b.shape[0]) for b in batches]})",
                max_diff, float(atol),
            )
        del session
        sha = _file_sha256(tmp)
        os.replace(tmp, path)
    finally:
        if was_training:
            model.train()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return OnnxExport(path=path, sha256=sha, max_abs_diff=max_diff, opset=int(opset_used), metadata=existing,
                      batch_sizes=[int(b.shape[0]) for b in batches])


def read_onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata_props of an ONNX file (without loading its weights into memory twice)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


def log_onnx_to_mlflow(
    export: OnnxExport,
    run_id: str,
    artifact_path: str = "onnx",
    *,
    log_model: bool = False,
    registered_model_name: str | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Log the exported file as an artifact of run ``run_id`` (under ``artifact_path``).

    ``tracking_uri``: the MLflow server or database of the run (default: MLflow's global tracking URI,
    which falls back to a database in the current directory; pass the registry's own).

    The file is re-hashed first: a file changed since ``export_onnx`` checked it is refused. With
    ``log_model=True`` it is also logged as an MLflow ONNX model (``mlflow.onnx.log_model``, CPU
    execution provider, explicit pip requirements) under ``artifact_path + "_model"``, inside run
    ``run_id`` (resumed unless it is the active run; another active run is an error).
    """
    path = Path(export.path)
    if not path.is_file():
        raise FileNotFoundError(f"log_onnx_to_mlflow: '{path}' does not exist")
    actual = _file_sha256(path)
    if actual != export.sha256:
        raise OnnxExportError(
            f"log_onnx_to_mlflow: '{path}' hashes to {actual}, not the {export.sha256} that export_onnx checked"
        )
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_artifact(run_id, str(path), artifact_path)
    if log_model:
        import mlflow
        import mlflow.onnx
        import onnx
        import onnxruntime

        proto = onnx.load(str(path))
        active = mlflow.active_run()
        if active is not None and active.info.run_id != run_id:
            raise ValueError(
                f"log_onnx_to_mlflow: run {active.info.run_id} is active; log_model=True needs run {run_id} "
                "active or no active run"
            )
        ctx = contextlib.nullcontext() if active is not None else mlflow.start_run(run_id=run_id)
        with ctx:
            mlflow.onnx.log_model(
                proto,
                name=f"{artifact_path}_model",
                onnx_execution_providers=["CPUExecutionProvider"],
                pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
                registered_model_name=registered_model_name,
                metadata=dict(export.metadata),
            )
