"""How cost grows: certification against rows and workers, LID search against parameters and batch size,
and the memory peak of each (``python -m benchmarks.scale``; ``--quick`` for a smoke run).

    python -m benchmarks.scale                  # ~10–15 min on 2 shared cores → results/scale.{md,json,*.png}
    python -m benchmarks.scale --quick --out D  # tiny sizes (a smoke test), written to D
    python -m benchmarks.scale --part pipeline  # one part only, merged into the scale.json already in --out

Every measurement ("cell") runs in a fresh subprocess (``python -m benchmarks.scale cell JSON``), so its
peak resident set (``ru_maxrss``) is its own and not the maximum of everything measured before it.

**Certification** counts the certified examples of a ``Box`` around an MNIST-sized MLP (784-100-10,
79,510 parameters; float32 model certified in float64, so two bound passes per row) on 10³ … 10⁶ rows:
in one process (``count_certified``), and sharded on a local Dask cluster of 1 or 2 workers (threads,
and processes) through ``flows.shards.shard_counter`` inside a Prefect flow run. The rows are synthetic
(random pixels, random labels), served by a ``CertificationStream`` that each shard reads itself, as the
pipeline's streamed certification set is: the cost of an IBP count does not depend on the values (the
same tensor operations run whatever they hold). A cell reports the cluster's start, a warm-up count
(one unit of rows per worker: the workers import torch and lid_engine), the count, and the stop; the
per-shard overhead comes from counting the same small set in 1 and in many tiny shards. From these, a
model on paper for more workers: ``T(W) ≈ T_start(W) + o·S + T_count(1)/W`` (S = W shards).

**Search** times ``compute_lid`` (20 iterations, one checkpoint) on MLPs 784-h-10 of 805 … 2·10⁶
parameters and search batch sizes 64 … 1024; seconds per iteration are (T(22 it.) − T(2 it.)) / 20, so
the set-up and the checkpoint's certification are not in them.

**The pipeline with a streamed certification set** (part ``pipeline``) runs what a configuration file
asks for (``components.config.load_config``): ``load_splits`` → ``flows.tasks.validate_data.fn`` →
``DataSplits.fingerprint()`` → ``count_certified`` on the 784-100-10 MLP, with ``certification.memory_mb``
(streamed) and without it (loaded whole), for two sources of N synthetic MNIST-sized rows: a Parquet
``data.certification`` file (row groups of 4,096 rows) and a team's ``data.loader`` whose certification
split is a ``DataLoader`` (batch 1,024) over a map-style Dataset computing each row when asked. The files
are written by a separate subprocess; a cell that loads a set whole is skipped where its peak (the rise
above the baseline of the same source's next smaller size, scaled by the rows) would pass
``pipeline_whole_gib``, and every pipeline cell is
killed if its process passes a cap (so a mistake cannot exhaust the shared machine's memory).

``--part`` (repeatable: certify, compare, search, pipeline) measures only those parts and replaces their
cells in the ``scale.json`` already in ``--out``; the report says which code and load each part saw.

One Prefect test-harness server is started for the whole run and shared by every cell (its URL in
``PREFECT_API_URL``): without one, every Dask process worker would start its own temporary server.
``OMP_WAIT_POLICY=PASSIVE`` is set unless the environment sets it (see the report: on a loaded machine
OpenMP's spinning threads make a 2-thread count up to ~10× slower than a 1-thread one); one cell
measures the default policy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from lid_engine.stream import CertificationStream

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
FEATURES = 784
HIDDEN = 100  # the certification model: 784-100-10
RADIUS = 1e-5  # Box.around radius: ~7 % of random labels certified, so the counts are not all zero
BATCH = 2048  # rows per bound pass (the pipeline's default certification.batch_size)
BLOCK = 4096  # rows per generated block of the synthetic stream
POOL = 8  # distinct blocks, cycled (generating 10⁶ × 784 random numbers would cost more than reading)
SEARCH_ROWS = 4096
SEARCH_ITERS = (2, 22)
PAPER_WORKERS = (4, 8, 16)

FULL = {
    "rows": [1_000, 10_000, 100_000, 1_000_000],
    "probe": {"rows": 2048, "batch": 64, "shards": 32, "repeats": 3},
    "hidden": [1, 13, 126, 1258, 2516],  # 805, 10,345, 100,180, 1,000,120, 2,000,230 parameters
    "search_batch": 256,
    "batches": [64, 256, 1024],
    "batch_hidden": [126, 1258],
    "compare_rows": 100_000,
    "pipeline_rows": [10_000, 100_000, 1_000_000],
    "pipeline_whole_gib": 6.0,
}
QUICK = {
    "rows": [4_096],
    "probe": {"rows": 256, "batch": 64, "shards": 4, "repeats": 1},
    "hidden": [13],
    "search_batch": 64,
    "batches": [64],
    "batch_hidden": [13],
    "compare_rows": None,
    "pipeline_rows": [3_000],
    "pipeline_whole_gib": 6.0,
}
PARTS = ("certify", "compare", "search", "pipeline")
PIPE_MEMORY_MB = 64  # certification.memory_mb of the streamed cells
PIPE_GROUP = 4096  # rows per Parquet row group
PIPE_LOADER_BATCH = 1024  # the team's DataLoader batch_size
PIPE_SMALL = 1024  # rows of the train and search splits
PIPE_POOL = 4096  # distinct base rows; row i is base row i % PIPE_POOL shifted by a per-block offset (mod 1)


_POOLS: dict[int, list[tuple[Tensor, Tensor]]] = {}


class SyntheticStream(CertificationStream):
    """``n`` rows of random pixels and labels, the same rows whoever reads them (a shard reads its own range)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.feature_shape, self.dtype, self.name, self.seed = n, (FEATURES,), torch.float32, "synthetic", seed
        self._check_header()

    def _block(self, k: int) -> tuple[Tensor, Tensor]:
        # one pool per process (made by the warm-up count), so generating it is in no timed count; a shard
        # receives the stream's few numbers, never its rows
        if self.seed not in _POOLS:
            g = torch.Generator().manual_seed(self.seed)
            _POOLS[self.seed] = [(torch.rand(BLOCK, FEATURES, generator=g), torch.randint(0, 10, (BLOCK,), generator=g))
                                 for _ in range(POOL)]
        return _POOLS[self.seed][k % POOL]

    def _read(self, start: int, stop: int):
        for k in range(start // BLOCK, (stop - 1) // BLOCK + 1):
            x, y = self._block(k)
            a, b = max(start, k * BLOCK) - k * BLOCK, min(stop, (k + 1) * BLOCK) - k * BLOCK
            yield x[a:b], y[a:b]


def mlp(hidden: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def peak_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------- cells
class _Sampler:
    """Calls ``sample()`` every ``every`` seconds in a background thread while the ``with`` block runs."""

    def __init__(self, every: float) -> None:
        import threading

        self.every, self.stop = every, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


class TreePeak(_Sampler):
    """The largest resident set of this process and all its descendants together (Dask process workers
    included), sampled every ``every`` seconds in a background thread. ``ru_maxrss`` of the children is no
    use for them: a process started by fork + exec inherits its parent's peak as its own floor."""

    def __init__(self, every: float = 0.1) -> None:
        import psutil

        super().__init__(every)
        self.me, self.peak = psutil.Process(), 0

    def sample(self) -> None:
        total = 0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except Exception:  # a worker that exited between listing and reading
                pass
        self.peak = max(self.peak, total)


def cell(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    if spec.get("torch_threads"):
        torch.set_num_threads(spec["torch_threads"])
    out = {"torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}
    with TreePeak() as tree:
        out.update({"idle": idle_cell, "count": count_cell, "sharded": sharded_cell, "probe": probe_cell,
                    "search": search_cell, "pipeline": pipeline_cell,
                    "pipeline-write": pipeline_write_cell}[spec["kind"]](spec))
    out["peak_mib"] = peak_mib()
    out["tree_peak_mib"] = tree.peak / 2**20
    return out


def idle_cell(spec: dict) -> dict:
    import lid_engine  # noqa: F401

    if spec.get("prefect"):
        import prefect_dask  # noqa: F401

        import flows.shards  # noqa: F401
    return {}


def _data(spec: dict):
    stream = SyntheticStream(spec["rows"])
    return stream.head(stream.n) if spec.get("data") == "tensors" else stream


def _setup(spec: dict):
    import lid_engine as le

    model = mlp(HIDDEN)
    return model, le.Box.around(model, radius=RADIUS), _data(spec)


def _counts(c) -> dict:
    return {"n": c.n, "certified": c.certified, "per_class": c.per_class}


def count_cell(spec: dict) -> dict:
    from lid_engine import count_certified

    model, box, data = _setup(spec)
    count_certified(model, box, SyntheticStream(BATCH), batch_size=BATCH)  # warm-up: first kernels, allocator
    t = time.perf_counter()
    c = count_certified(model, box, data, batch_size=BATCH)
    return {"count_s": time.perf_counter() - t, "counts": _counts(c)}


def _section(spec: dict, shards: int, batch: int = BATCH):
    from components.config import CertificationSection

    return CertificationSection(shards=max(shards, 2), workers=spec["workers"], processes=spec["mode"] == "processes",
                                batch_size=batch)


def _resharded(counter, shards: int):
    """The same cluster's counter, cutting the rows into ``shards`` pieces."""
    import copy

    out = copy.copy(counter)
    out.shards, out.submitted = shards, 0
    return out


def sharded_cell(spec: dict) -> dict:
    from prefect import flow

    from flows.shards import shard_counter

    model, box, data = _setup(spec)
    workers, shards = spec["workers"], spec["shards"]

    @flow(name="scale-certify")
    def run() -> dict:
        r = {}
        t = time.perf_counter()
        # shard_counter needs shards ≥ 2 to start a cluster; the counter below is given the shards asked for
        with shard_counter(_section(spec, shards)) as counter:
            r["start_s"] = time.perf_counter() - t
            t = time.perf_counter()
            # warm-up: one unit of rows per worker, so every worker has imported torch and lid_engine
            _resharded(counter, workers)(
                model, box, SyntheticStream(BATCH * workers), dtype=torch.float64, batch_size=BATCH, method="ibp",
                where="warm-up")
            r["warmup_s"] = time.perf_counter() - t
            sharded = _resharded(counter, shards)
            t = time.perf_counter()
            c = sharded(model, box, data, dtype=torch.float64, batch_size=BATCH, method="ibp", where="scale")
            r["count_s"] = time.perf_counter() - t
            r["shards"], r["counts"] = sharded.submitted, _counts(c)
            t = time.perf_counter()
        r["stop_s"] = time.perf_counter() - t
        return r

    return run()


def probe_cell(spec: dict) -> dict:
    """The per-shard overhead: the same small set counted in 1 shard and in many tiny ones, on 1 worker."""
    from prefect import flow

    from flows.shards import shard_counter
    from lid_engine import count_certified

    model, box, data = _setup(spec)
    batch, many, repeats = spec["batch"], spec["shards"], spec["repeats"]
    inproc = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        count_certified(model, box, data, batch_size=batch)
        inproc.append(time.perf_counter() - t)

    @flow(name="scale-probe")
    def run() -> dict:
        times: dict[int, list[float]] = {1: [], many: []}
        with shard_counter(_section(spec, many, batch)) as counter:
            for r in range(repeats + 1):  # the first round warms the worker up and is discarded
                for k in (1, many):
                    t = time.perf_counter()
                    _resharded(counter, k)(model, box, data, dtype=torch.float64, batch_size=batch, method="ibp",
                                           where="probe")
                    if r:
                        times[k].append(time.perf_counter() - t)
        return {"one_s": statistics.median(times[1]), "many_s": statistics.median(times[many]),
                "inprocess_s": statistics.median(inproc[1:])}

    r = run()
    r["per_shard_s"] = (r["many_s"] - r["one_s"]) / (many - 1)
    return r


def search_cell(spec: dict) -> dict:
    from lid_engine import compute_lid

    model = mlp(spec["hidden"])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(SEARCH_ROWS, FEATURES, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # the nominal model is right everywhere, so τ is reachable
    r = {"params": params(model)}
    # warm-up (lazy imports, first kernels), then the two timed runs
    compute_lid(model, x[:256], y[:256], tau=0.9, iterations=1, checkpoints=1, batch_size=spec["batch"],
                progress=False, keep="all", seed=0)
    for iters in SEARCH_ITERS:
        t = time.perf_counter()
        compute_lid(model, x, y, tau=0.9, iterations=iters, checkpoints=1, batch_size=spec["batch"], progress=False,
                    keep="all", seed=0)
        r[f"t{iters}_s"] = time.perf_counter() - t
    lo, hi = SEARCH_ITERS
    r["per_iter_s"] = (r[f"t{hi}_s"] - r[f"t{lo}_s"]) / (hi - lo)
    return r


# ------------------------------------------------------------------- the pipeline with a streamed set
_PIPE_POOLS: dict[int, tuple] = {}


def pipeline_rows(idx, salt: int = 0):
    """Rows ``idx`` (an int64 array) of the synthetic MNIST-sized set ``salt`` (0: certification, 1: train,
    2: search): float32 features in [0, 1] and labels 0..9, the same values whichever rows are asked for
    together (the Parquet writer asks for a row group, the Dataset for one row)."""
    import numpy as np

    if salt not in _PIPE_POOLS:
        rng = np.random.default_rng(100 + salt)
        _PIPE_POOLS[salt] = (rng.random((PIPE_POOL, FEATURES), dtype=np.float32), rng.integers(0, 10, PIPE_POOL))
    px, py = _PIPE_POOLS[salt]
    idx = np.asarray(idx, dtype=np.int64)
    block = idx // PIPE_POOL
    shift = ((block * 0.6180339887498949) % 1.0).astype(np.float32)
    x = np.mod(px[idx % PIPE_POOL] + shift[:, None], np.float32(1.0))
    y = (py[idx % PIPE_POOL] + block) % 10
    return x, y.astype(np.int64)


class PipelineRows(torch.utils.data.Dataset):
    """The certification rows of ``pipeline_rows``, each computed when it is read (a map-style Dataset)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        import numpy as np

        x, y = pipeline_rows(np.array([i]))
        return torch.from_numpy(x[0]), int(y[0])


def pipeline_loader(rows: int) -> dict:
    """A team's ``data.loader``: small train and search arrays, the certification split as a DataLoader."""
    import numpy as np

    small = np.arange(PIPE_SMALL)
    return {"train": pipeline_rows(small, 1), "search": pipeline_rows(small, 2),
            "certification": torch.utils.data.DataLoader(PipelineRows(rows), batch_size=PIPE_LOADER_BATCH,
                                                         shuffle=False)}


def pipeline_model():
    """The configuration's model factory (the cells build the same MLP themselves)."""
    return mlp(HIDDEN)


def _parquet(path: Path, n: int, salt: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = [f"px{j}" for j in range(FEATURES)]
    schema = pa.schema([*(pa.field(c, pa.float32()) for c in names), pa.field("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as w:
        for a in range(0, n, PIPE_GROUP):
            x, y = pipeline_rows(np.arange(a, min(n, a + PIPE_GROUP)), salt)
            cols = np.ascontiguousarray(x.T)
            w.write_table(pa.Table.from_arrays([*cols, y], schema=schema), row_group_size=PIPE_GROUP)


def pipeline_write_cell(spec: dict) -> dict:
    """Write the Parquet files of one size (train, search: PIPE_SMALL rows; certification: N rows)."""
    work = Path(spec["dir"])
    t = time.perf_counter()
    for name, n, salt in (("train", PIPE_SMALL, 1), ("search", PIPE_SMALL, 2), ("certification", spec["rows"], 0)):
        _parquet(work / f"{name}.parquet", n, salt)
    return {"write_s": time.perf_counter() - t, "file_mib": (work / "certification.parquet").stat().st_size / 2**20}


def pipeline_config(spec: dict) -> Path:
    """The configuration file of a pipeline cell (written beside its data)."""
    import yaml

    work = Path(spec["dir"])
    data = {"task": "synthetic-mnist", "classes": list(range(10)), "value_range": [0.0, 1.0]}
    if spec["source"] == "parquet":
        data.update(train="train.parquet", search="search.parquet", certification="certification.parquet",
                    label="label")
    else:
        data["loader"] = {"function": "benchmarks.scale:pipeline_loader", "kwargs": {"rows": spec["rows"]}}
    doc = {"version": 1, "name": "scale-pipeline", "code": [str(ROOT)],
           "model": {"factory": "benchmarks.scale:pipeline_model"}, "data": data,
           "spec": {"tau": 0.5, "confidence": 0.95},
           "certification": {"batch_size": BATCH, **({"memory_mb": spec["memory_mb"]} if spec["memory_mb"] else {})}}
    path = work / f"{spec['source']}-{'streamed' if spec['memory_mb'] else 'whole'}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


class PhasePeak(_Sampler):
    """Resident memory of this process per phase, sampled every ``every`` seconds from /proc/self/status:
    the largest VmRSS, RssAnon (heap, tensors) and RssFile (pages of mapped files) seen in the phase."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, every: float = 0.02) -> None:
        import threading

        super().__init__(every)
        self.lock = threading.Lock()
        self.peak = dict.fromkeys(self.FIELDS, 0)

    def read(self) -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in self.FIELDS:
                    out[k] = int(v.split()[0]) * 1024
        return out

    def sample(self) -> None:
        now = self.read()
        with self.lock:
            for k in self.FIELDS:
                self.peak[k] = max(self.peak[k], now.get(k, 0))

    def take(self) -> dict[str, float]:
        """The peaks since the last ``take`` (MiB), and start afresh."""
        self.sample()
        with self.lock:
            out, self.peak = {k: v / 2**20 for k, v in self.peak.items()}, dict.fromkeys(self.FIELDS, 0)
        return out


def pipeline_cell(spec: dict) -> dict:
    """load_splits → validate_data → fingerprint → count_certified, as the pipeline runs them, timed and
    with the memory of each phase; the set streamed (``memory_mb``) or loaded whole."""
    import great_expectations  # noqa: F401  (imported before the phases: its import is not the data's cost)

    import lid_engine as le
    from components.config import load_config
    from components.data import load_splits
    from flows.tasks import validate_data

    config = load_config(pipeline_config(spec))
    model = mlp(HIDDEN).eval()
    box = le.Box.around(model, radius=RADIUS)
    le.count_certified(model, box, SyntheticStream(BATCH), batch_size=BATCH)  # warm-up: first kernels, allocator
    scratch = Path(spec["dir"]) / f"scratch-{spec['source']}-{'streamed' if spec['memory_mb'] else 'whole'}"
    out: dict = {"baseline_mib": peak_mib(), "phases": {}}
    with PhasePeak() as pp:
        pp.take()
        out["baseline_now"] = {k: v / 2**20 for k, v in pp.read().items()}

        def phase(name: str, fn):
            t = time.perf_counter()
            r = fn()
            out[f"{name}_s"] = time.perf_counter() - t
            out["phases"][name] = {**pp.take(), "maxrss_mib": peak_mib()}
            return r

        data = phase("load", lambda: load_splits(config, scratch=scratch))
        validation = phase("validate", lambda: validate_data.fn(config, data))
        fp = phase("fingerprint", data.fingerprint)
        c = phase("count", lambda: le.count_certified(model, box, data.certification, batch_size=BATCH))
    out.update(streamed=data.streamed, validation_passed=validation.passed, fingerprint=fp, counts=_counts(c),
               cert_rows=len(data.certification) if data.streamed else len(data.certification[1]))
    if not validation.passed:
        out["validation"] = validation.reports
    return out


# ----------------------------------------------------------------------------------------- the driver
def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_cell(spec: dict, env: dict, cap_mib: float | None = None) -> dict:
    """Run one cell in a fresh process; with ``cap_mib``, kill it (and fail) if its process tree's resident
    memory passes that many MiB (checked every 0.2 s)."""
    # through sh, which forks the cell: a process exec'd straight from this one would inherit this process's
    # (torch + prefect) peak as the floor of its own ru_maxrss
    cmd = ["sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-m", "benchmarks.scale", "cell", json.dumps(spec)]
    cell_env = dict(env)
    if spec.get("omp") == "default":
        cell_env.pop("OMP_WAIT_POLICY", None)
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cell_env, stdout=fout, stderr=ferr, text=True)
        killed = None
        while proc.poll() is None:
            if time.perf_counter() - t > 1800:
                killed = "ran past 1800 s"
            elif cap_mib is not None and (rss := _tree_rss(proc.pid) / 2**20) > cap_mib:
                killed = f"its resident memory passed the cap of {cap_mib:,.0f} MiB ({rss:,.0f} MiB)"
            if killed:
                import psutil

                for c in psutil.Process(proc.pid).children(recursive=True):
                    c.kill()
                proc.kill()
                proc.wait()
                break
            time.sleep(0.2)
        wall = time.perf_counter() - t
        fout.seek(0), ferr.seek(0)
        stdout, stderr = fout.read(), ferr.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if killed:
        raise CellKilled(f"benchmarks.scale: cell {spec} was killed: {killed}")
    if proc.returncode or not lines:
        raise RuntimeError(f"benchmarks.scale: cell {spec} failed (exit {proc.returncode}):\n{stdout[-3000:]}\n"
                           f"{stderr[-5000:]}")
    out = {**spec, **json.loads(lines[-1][len("RESULT "):]), "process_s": wall}
    out.pop("dir", None)
    print(f"  {label(out)}: {brief(out)}", flush=True)
    return out


class CellKilled(RuntimeError):
    """A cell stopped by ``run_cell`` for its memory or time."""


def label(c: dict) -> str:
    if c["kind"] == "pipeline":
        return (f"pipeline {c['source']} {c['rows']:,} rows, "
                + (f"streamed (memory_mb {c['memory_mb']})" if c["memory_mb"] else "whole"))
    if c["kind"] == "pipeline-write":
        return f"write Parquet files, {c['rows']:,} certification rows"
    if c["kind"] in ("count", "sharded"):
        where = "in process" if c["kind"] == "count" else f"{c['mode']} ×{c['workers']}"
        extra = f" {c['data']}" if c.get("data") else ""
        extra += " OMP default" if c.get("omp") == "default" else ""
        return f"certify {c['rows']:,} rows, {where}, {c['torch_threads']} torch threads{extra}"
    if c["kind"] == "probe":
        return f"overhead probe, {c['mode']} ×1"
    if c["kind"] == "search":
        return f"search h={c['hidden']} batch {c['batch']}"
    return f"idle ({'prefect' if c.get('prefect') else 'torch'})"


def brief(c: dict) -> str:
    if c["kind"] == "pipeline":
        return (f"load {c['load_s']:.2f} s, validate {c['validate_s']:.2f} s, fingerprint {c['fingerprint_s']:.2f} s, "
                f"count {c['count_s']:.2f} s, peak {c['peak_mib']:,.0f} MiB")
    if "write_s" in c:
        return f"{c['write_s']:.1f} s, {c['file_mib']:,.0f} MiB"
    if "count_s" in c:
        return f"count {c['count_s']:.2f} s ({c['rows'] / c['count_s']:,.0f} rows/s), peak {c['peak_mib']:.0f} MiB"
    if "per_shard_s" in c:
        return f"per-shard overhead {c['per_shard_s'] * 1e3:.0f} ms"
    if "per_iter_s" in c:
        return f"{c['params']:,} params, {c['per_iter_s'] * 1e3:.1f} ms/iteration, peak {c['peak_mib']:.0f} MiB"
    return f"peak {c['peak_mib']:.0f} MiB"


def part_of(c: dict) -> str:
    """Which part (``--part``) a cell belongs to."""
    if c["kind"].startswith("pipeline"):
        return "pipeline"
    if c["kind"] == "search":
        return "search"
    if c["kind"] in ("count", "sharded") and (c.get("data") or c.get("omp")):
        return "compare"
    return "certify"  # the row/worker grid, the probes and the idle baselines


def plan(sizes: dict, parts: tuple[str, ...] = PARTS) -> list[dict]:
    """The cells of ``parts`` (the pipeline's are planned as they run: see ``pipeline_cells``)."""
    cells: list[dict] = [{"kind": "idle"}, {"kind": "idle", "prefect": True}]
    for n in sizes["rows"]:
        cells += [{"kind": "count", "rows": n, "torch_threads": t} for t in (1, 2)]
        cells += [{"kind": "sharded", "rows": n, "mode": m, "workers": w, "shards": w}
                  for m in ("threads", "processes") for w in (1, 2)]
    probe = sizes["probe"]
    cells += [{"kind": "probe", "mode": m, "workers": 1, **probe} for m in ("threads", "processes")]
    if sizes["compare_rows"]:
        n = sizes["compare_rows"]
        cells += [{"kind": "count", "rows": n, "torch_threads": 2, "omp": "default"},
                  {"kind": "count", "rows": n, "torch_threads": 1, "data": "tensors"},
                  {"kind": "sharded", "rows": n, "mode": "processes", "workers": 2, "shards": 2, "data": "tensors"}]
    cells += [{"kind": "search", "hidden": h, "batch": sizes["search_batch"]} for h in sizes["hidden"]]
    cells += [{"kind": "search", "hidden": h, "batch": b} for h in sizes["batch_hidden"] for b in sizes["batches"]
              if b != sizes["search_batch"]]
    return [c for c in cells if part_of(c) in parts]


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def pipeline_cells(sizes: dict, env: dict) -> list[dict]:
    """Part 3: per size, the Parquet files written by one subprocess, then for each source the set streamed
    and loaded whole, each cell in its own process. A whole cell is skipped where its peak (the baseline plus
    the rise above it of the same source's next smaller whole cell, scaled by the rows) would pass
    ``pipeline_whole_gib`` or half the memory available; a streamed cell where the growth of its peak between the two smaller sizes, carried on, would pass half
    the memory available. Every cell is killed at min(whole limit + 2 GiB, 70 % of the memory available)."""
    import shutil

    limit_mib = sizes["pipeline_whole_gib"] * 1024
    cells: list[dict] = []
    seen: dict[tuple[str, bool], list[tuple[int, float]]] = {}
    for n in sorted(sizes["pipeline_rows"]):
        work = Path(tempfile.mkdtemp(prefix=f"lidgate-scale-pipeline-{n}-"))
        try:
            cells.append(run_cell({"kind": "pipeline-write", "rows": n, "dir": str(work)}, env))
            for source in ("parquet", "loader"):
                for streamed in (True, False):
                    spec = {"kind": "pipeline", "source": source, "rows": n,
                            "memory_mb": PIPE_MEMORY_MB if streamed else None}
                    avail = mem_available_mib()
                    before = seen.get((source, streamed), [])
                    predicted = None
                    if before and not streamed:  # the peak above the baseline grows with the rows
                        m, peak, base = before[-1]
                        predicted = base + (peak - base) * n / m
                    elif len(before) >= 2 and streamed:
                        (m1, p1, _), (m2, p2, _) = before[-2:]
                        predicted = p2 + max(0.0, p2 - p1) * (n - m2) / (m2 - m1)
                    why = None
                    if not streamed and not before and n > min(sizes["pipeline_rows"]):
                        why = "no smaller whole cell of this source was measured to scale its peak from"
                    elif predicted is not None and not streamed and predicted > limit_mib:
                        why = (f"its peak, scaled from {before[-1][0]:,} rows, would be about {predicted:,.0f} MiB, "
                               f"above the {limit_mib:,.0f} MiB this benchmark allows a whole set")
                    elif predicted is not None and predicted > avail / 2:
                        why = (f"its peak would be about {predicted:,.0f} MiB, above half the {avail:,.0f} MiB "
                               "available")
                    if why:
                        cells.append({**spec, "skipped": why, "predicted_mib": predicted, "available_mib": avail})
                        print(f"  {label(spec)}: skipped ({why})", flush=True)
                        continue
                    cap = min(limit_mib + 2048, 0.7 * avail)
                    try:
                        c = run_cell({**spec, "dir": str(work)}, env, cap_mib=cap)
                    except CellKilled as exc:
                        cells.append({**spec, "skipped": str(exc).split(": ", 1)[-1], "available_mib": avail})
                        print(f"  {label(spec)}: {exc}", flush=True)
                        continue
                    c["available_mib"] = avail
                    cells.append(c)
                    seen.setdefault((source, streamed), []).append((n, c["peak_mib"], c["baseline_mib"]))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return cells


def machine(prefix: str) -> dict:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    from benchmarks._common import cpu_model

    return {f"{prefix}_uptime": sh("uptime"), f"{prefix}_loadavg": list(os.getloadavg()), "cpu": cpu_model(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "commit": sh("git", "rev-parse", "HEAD"),
            "dirty": bool(sh("git", "status", "--porcelain", "--untracked-files=no")),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def environment(home: str) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PREFECT_HOME"] = home
    env.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    return env


def measure(quick: bool, parts: tuple[str, ...] = PARTS) -> dict:
    sizes = QUICK if quick else FULL
    doc = {"quick": quick, "machine": machine("start"), "sizes": sizes, "cells": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lidgate-scale-") as home:
        env = environment(home)
        os.environ["PREFECT_HOME"] = home  # the harness below reads it in this process
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        cells = plan(sizes, parts)
        if cells:  # the sharded cells need a Prefect API; the pipeline's run its steps' functions directly
            import prefect.settings
            from prefect.testing.utilities import prefect_test_harness

            t = time.perf_counter()
            with prefect_test_harness(server_startup_timeout=90):
                doc["server_start_s"] = time.perf_counter() - t
                env["PREFECT_API_URL"] = prefect.settings.PREFECT_API_URL.value()
                print(f"Prefect test-harness server at {env['PREFECT_API_URL']} ({doc['server_start_s']:.1f} s)",
                      flush=True)
                doc["cells"] = [run_cell(spec, env) for spec in cells]
        if "pipeline" in parts:
            doc["cells"] += pipeline_cells(sizes, env)
    doc["wall_s"] = time.perf_counter() - t0
    doc["machine"].update(machine("end"))
    doc["runs"] = [{"parts": list(parts), "machine": doc["machine"], "wall_s": doc["wall_s"]}]
    for c in doc["cells"]:
        c["run"] = 0
    return finish(doc)


def finish(doc: dict) -> dict:
    """The figures computed from the cells (after a measurement, a merge, or reading the JSON)."""
    doc["equal_counts"] = equal_counts(doc["cells"])
    doc["pipeline_equal"] = pipeline_equal(doc["cells"])
    parts = {part_of(c) for c in doc["cells"]}
    doc["model"] = paper_model(doc["cells"], doc["sizes"]) if "certify" in parts else None
    return doc


def merge(old: dict, new: dict) -> dict:
    """``old`` with the parts ``new`` measured replaced by ``new``'s cells; each cell keeps the index of
    the run (``doc["runs"]``: its parts, machine, load and code) that measured it."""
    if old["quick"] != new["quick"]:
        raise SystemExit("benchmarks.scale: --part merges into a scale.json of the same mode (--quick or not)")
    runs = old.get("runs") or [{"parts": sorted({part_of(c) for c in old["cells"]}, key=PARTS.index),
                                "machine": old["machine"], "wall_s": old["wall_s"]}]
    run = new["runs"][0]
    index = len(runs)
    parts = set(run["parts"])
    cells = [{**c, "run": c.get("run", 0)} for c in old["cells"] if part_of(c) not in parts]
    cells += [{**c, "run": index} for c in new["cells"]]
    cells.sort(key=lambda c: PARTS.index(part_of(c)))  # (stable: each part keeps its order)
    doc = {**old, "cells": cells, "runs": [*runs, run], "sizes": {**old["sizes"], **new["sizes"]}}
    return finish(doc)


def equal_counts(cells: list[dict]) -> dict[str, bool]:
    """Per row count: every way of counting gave the same counts (class by class)."""
    by_rows: dict[int, list[dict]] = {}
    for c in cells:
        if "counts" in c and c["kind"] in ("count", "sharded"):
            by_rows.setdefault(c["rows"], []).append(c["counts"])
    return {str(n): all(x == cs[0] for x in cs) for n, cs in sorted(by_rows.items())}


def pipeline_equal(cells: list[dict]) -> dict[str, bool]:
    """Per size: the pipeline's cells (both sources, streamed and whole) hold the same rows, so they must
    give the same counts and the same data fingerprint."""
    by_rows: dict[int, list[tuple]] = {}
    for c in cells:
        if c["kind"] == "pipeline" and "counts" in c:
            by_rows.setdefault(c["rows"], []).append((c["counts"], c["fingerprint"], c["cert_rows"]))
    return {str(n): all(x == cs[0] for x in cs) and cs[0][2] == n for n, cs in sorted(by_rows.items())}


def _find(cells, **kw) -> dict | None:
    for c in cells:
        if all(c.get(k) == v for k, v in kw.items()):
            return c
    return None


def paper_model(cells: list[dict], sizes: dict) -> dict:
    """T(W) ≈ T_start(W) + o·W + N/(r1·W): process workers, one shard per worker, one core each.

    r1: rows/s of one single-threaded count in process (largest N); T_start(W) = a + b·W from the
    process cells at W = 1, 2 (cluster start + warm-up + stop, medians over the row counts); o: the
    probe's per-shard overhead on process workers."""
    n_max = max(sizes["rows"])
    one = _find(cells, kind="count", rows=n_max, torch_threads=1, data=None, omp=None)
    probe = _find(cells, kind="probe", mode="processes")
    fixed = {}
    for w in (1, 2):
        fixed[w] = statistics.median(c["start_s"] + c["warmup_s"] + c["stop_s"] for c in cells
                                     if c["kind"] == "sharded" and c["mode"] == "processes" and c["workers"] == w
                                     and not c.get("data"))
    b = fixed[2] - fixed[1]
    a = fixed[1] - b
    r1, o = n_max / one["count_s"], probe["per_shard_s"]
    out = {"r1_rows_per_s": r1, "start_a_s": a, "start_b_s": b, "per_shard_s": o, "rows": {}}
    for n in sizes["rows"]:
        pred = {w: max(a + b * w, 0.0) + o * w + n / (r1 * w) for w in (1, 2, *PAPER_WORKERS)}
        meas = {w: (c["start_s"] + c["warmup_s"] + c["count_s"] + c["stop_s"]) for w in (1, 2)
                if (c := _find(cells, kind="sharded", rows=n, mode="processes", workers=w, data=None))}
        out["rows"][str(n)] = {"model_s": pred, "measured_s": meas}
    return out


# ----------------------------------------------------------------------------------------- the report
def mib(v: float) -> str:
    return f"{v:,.0f}"


def report(doc: dict, out: Path) -> None:
    cells, m = doc["cells"], doc["machine"]
    idle = _find(cells, kind="idle", prefect=None)
    idle_p = _find(cells, kind="idle", prefect=True)
    lines = [
        "# How cost grows: certification against rows and workers, search against parameters, the pipeline with "
        "a streamed certification set",
        "",
        f"Measured by `python -m benchmarks.scale{' --quick' if doc['quick'] else ''}` "
        f"(code at {m['commit'][:10]}{' + local changes' if m['dirty'] else ''}), {m['date']}, "
        f"{doc['wall_s'] / 60:.1f} min in all.",
        "",
        f"- machine: {m['cpu']}, {m['cpus']} logical CPUs, torch {m['torch']}; shared with other engineers' "
        "tests and benchmarks while this ran (run under `nice -n 10`)",
        f"- load at start: `{m['start_uptime']}`",
        f"- load at end: `{m['end_uptime']}`",
        f"- torch threads: as given per cell (1 or 2; torch's default here is 2); "
        f"`OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}` unless a cell says otherwise",
        "- every cell in a fresh subprocess (forked by `sh`, so it does not inherit the driver's peak); peak RSS = "
        "its `ru_maxrss`; process tree peak = the largest sum of the RSS of the cell and its descendants (the Dask "
        "process workers), sampled every 0.1 s. Baseline of a cell that only imports torch + lid_engine: "
        f"{mib(idle['peak_mib'])} MiB; "
        f"with prefect, prefect-dask and flows.shards too: {mib(idle_p['peak_mib'])} MiB",
        f"- one Prefect test-harness server for the whole run (started in {doc['server_start_s']:.1f} s, not "
        "counted in any cell)",
        "- **CUDA: not measured** (no GPU was lent to this task); every number is CPU",
        *later_runs(doc),
        "",
        "## 1. Certification against rows and workers",
        "",
        f"Model: MLP 784-{HIDDEN}-10 ({params(mlp(HIDDEN)):,} parameters), float32, `Box.around(radius={RADIUS})`, "
        f"counted with IBP in float64 and again in float32 (the model's own precision), bound passes of {BATCH} "
        "rows. Data: synthetic rows (random pixels in [0, 1), random labels) from a `CertificationStream` that "
        "each shard reads itself (no rows travel to the workers); an IBP count runs the same tensor operations "
        "whatever the values, so its cost does not depend on them. Sharded: `flows.shards.shard_counter` "
        "inside a Prefect flow run, one shard per worker, each a `certify-shard` task run on a local Dask "
        "cluster; process workers get `cpus // workers` torch threads, thread workers share the process's pool.",
        "",
        "| rows | where | workers | shards | torch threads | cluster start s | warm-up s | count s | stop s | "
        "total s | rows/s (count) | rows/s (total) | certified | peak RSS MiB | process tree peak MiB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        if c["kind"] not in ("count", "sharded"):
            continue
        where = "in process" if c["kind"] == "count" else f"{c['mode']}"
        where += f", {c['data']}" if c.get("data") else ""
        where += ", OMP default (active)" if c.get("omp") == "default" else ""
        fixed = [c.get("start_s"), c.get("warmup_s"), c["count_s"], c.get("stop_s")]
        total = sum(v for v in fixed if v is not None)
        cols = ["—" if v is None else f"{v:.2f}" for v in fixed]
        lines.append(f"| {c['rows']:,} | {where} | {c.get('workers', '—')} | {c.get('shards', 1)} | "
                     f"{c['torch_threads'] if c['kind'] == 'count' or c['mode'] == 'threads' else 'cpus/W'} | "
                     f"{' | '.join(cols)} | {total:.2f} | {c['rows'] / c['count_s']:,.0f} | "
                     f"{c['rows'] / total:,.0f} | {c['counts']['certified']:,} | {mib(c['peak_mib'])} | "
                     f"{mib(c['tree_peak_mib'])} |")
    eq = doc["equal_counts"]
    lines += ["", "Sharded counts equal the unsharded counts, class by class: "
              + ", ".join(f"{int(n):,} rows {'✓' if ok else '✗'}" for n, ok in eq.items()), ""]
    lines += ["### Fixed overhead", "", "| what | threads | processes |", "|---|---:|---:|"]
    for key, name in (("start_s", "cluster start (enter `shard_counter`)"), ("warmup_s", "warm-up count (first task on "
                      "each worker)"), ("stop_s", "cluster stop")):
        for w in (1, 2):
            vals = {mode: [c[key] for c in cells if c["kind"] == "sharded" and c["mode"] == mode and c["workers"] == w]
                    for mode in ("threads", "processes")}
            lines.append(f"| {name}, {w} worker{'s' if w > 1 else ''} (median of {len(vals['threads'])}) | "
                         + " | ".join(f"{statistics.median(v):.2f} s" if v else "—" for v in vals.values()) + " |")
    pt, pp = _find(cells, kind="probe", mode="threads"), _find(cells, kind="probe", mode="processes")
    lines.append(f"| per-shard overhead (1 worker: {pt['rows']:,} rows in 1 vs {pt['shards']} shards of "
                 f"{pt['rows'] // pt['shards']} rows, batch {pt['batch']}, median of {pt['repeats']}) | "
                 f"{pt['per_shard_s'] * 1e3:.0f} ms | {pp['per_shard_s'] * 1e3:.0f} ms |")
    lines.append(f"| the probe's set: in process / 1 shard / {pt['shards']} shards | {pt['inprocess_s']:.2f} / "
                 f"{pt['one_s']:.2f} / {pt['many_s']:.2f} s | {pp['inprocess_s']:.2f} / {pp['one_s']:.2f} / "
                 f"{pp['many_s']:.2f} s |")
    pm = doc["model"]
    lines += ["", "### More workers, on paper (a model, not a measurement)", "",
              "T(W) ≈ T_start(W) + o·S + T_count(1)/W with process workers, S = W shards, one core per worker: "
              f"T_count(1) = N / r₁ with r₁ = {pm['r1_rows_per_s']:,.0f} rows/s (the single-threaded in-process "
              f"count at the largest N); T_start(W) = {pm['start_a_s']:.2f} s + {pm['start_b_s']:.2f} s·W (cluster "
              "start + warm-up + stop of the process cells at W = 1 and 2, a straight line through the two); "
              f"o = {pm['per_shard_s'] * 1e3:.0f} ms per shard (the probe). It assumes W free cores and memory "
              "bandwidth that keeps up; the 2-core machine here cannot check W > 2. The start's slope b is pessimistic: "
              "here the second worker's start (importing torch and lid_engine) competed for the same loaded cores; with "
              f"W free cores the workers start side by side and T_start stays near a + b = {pm['start_a_s'] + pm['start_b_s']:.1f} s, "
              "and W workers would break even with one in-process thread at N = (T_start + o·W)·r₁·W/(W − 1) rows: "
              + ", ".join(f"{(pm['start_a_s'] + pm['start_b_s'] + pm['per_shard_s'] * w) * pm['r1_rows_per_s'] * w / (w - 1):,.0f}"
                          f" for W = {w}" for w in PAPER_WORKERS) + " (model).", "",
              "| rows | measured W=1 s | model W=1 s | measured W=2 s | model W=2 s | model W=4 s | model W=8 s | "
              "model W=16 s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in pm["rows"].items():
        md, ms = r["model_s"], r["measured_s"]
        meas = {w: f"{ms[w]:.2f}" if w in ms else "—" for w in (1, 2)}
        lines.append(f"| {int(n):,} | {meas[1]} | {md[1]:.2f} | {meas[2]} | "
                     + " | ".join(f"{md[w]:.2f}" for w in (2, *PAPER_WORKERS)) + " |")
    lines += ["", "![certification time against rows](scale_rows.png)", ""]
    lines += reading(doc)
    lines += ["## 2. LID search against parameters and batch size", "",
              f"`compute_lid(model, x, y, tau=0.9, iterations=N, checkpoints=1, batch_size=B, keep=\"all\")` on "
              f"MLPs 784-h-10 (float32), {SEARCH_ROWS:,} random rows labelled by the model itself (so τ is "
              f"reachable; 30 % held out for certification), torch's default threads. Seconds per iteration = "
              f"(T({SEARCH_ITERS[1]} it.) − T({SEARCH_ITERS[0]} it.)) / {SEARCH_ITERS[1] - SEARCH_ITERS[0]}; "
              "T(2 it.) is set-up plus two iterations plus the checkpoint's certification.", "",
              "| hidden h | parameters | batch | s / iteration | T(2 it.) s | T(22 it.) s | peak RSS MiB | "
              "peak − baseline MiB |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lo, hi = SEARCH_ITERS
    for c in sorted((c for c in cells if c["kind"] == "search"), key=lambda c: (c["params"], c["batch"])):
        lines.append(f"| {c['hidden']:,} | {c['params']:,} | {c['batch']} | {c['per_iter_s']:.4f} | "
                     f"{c[f't{lo}_s']:.2f} | {c[f't{hi}_s']:.2f} | {mib(c['peak_mib'])} | "
                     f"{mib(c['peak_mib'] - idle['peak_mib'])} |")
    lines += ["", *search_reading(cells, doc["sizes"]),
              "", "![search time against parameters](scale_params.png)", ""]
    lines += pipeline_section(doc)
    (out / "scale.md").write_text("\n".join(lines) + "\n")


def run_of(doc: dict, c: dict) -> dict:
    """The machine record (code, load, date) of the run that measured cell ``c``."""
    runs = doc.get("runs") or [{"machine": doc["machine"]}]
    return runs[c.get("run", 0)]["machine"]


def later_runs(doc: dict) -> list[str]:
    """Header lines for the parts measured again after the first run (``--part``)."""
    out = []
    for r in (doc.get("runs") or [])[1:]:
        m = r["machine"]
        out.append(f"- **measured in a later run**, part{'s' if len(r['parts']) > 1 else ''} {', '.join(r['parts'])}: "
                   f"`python -m benchmarks.scale{' --quick' if doc['quick'] else ''} "
                   + " ".join(f"--part {p}" for p in r["parts"])
                   + f"` (code at {m['commit'][:10]}{' + local changes' if m['dirty'] else ''}), {m['date']}, "
                   f"{r['wall_s'] / 60:.1f} min; load at start `{m['start_uptime']}`, at end `{m['end_uptime']}`"
                   + (f". {r['note']}" if r.get("note") else ""))
    return out


def pipeline_section(doc: dict) -> list[str]:
    cells = [c for c in doc["cells"] if c["kind"] == "pipeline"]
    writes = {c["rows"]: c for c in doc["cells"] if c["kind"] == "pipeline-write"}
    if not cells:
        return []
    m = run_of(doc, cells[0])
    lines = ["## 3. The pipeline with a streamed certification set", "",
             f"Measured at code {m['commit'][:10]}{' + local changes' if m['dirty'] else ''}, {m['date']}; load at "
             f"start `{m['start_uptime']}`, at end `{m['end_uptime']}`.", "",
             "A configuration file (parsed by `components.config.load_config`) names N synthetic MNIST-sized rows "
             f"(784 float32 features in [0, 1], labels 0..9; train and search {PIPE_SMALL:,} rows each) in two "
             f"sources: a Parquet `data.certification` file in row groups of {PIPE_GROUP:,} rows, and a team's "
             "`data.loader` returning `{\"train\": (x, y), \"search\": (x, y), \"certification\": DataLoader}`, the "
             f"DataLoader (batch_size {PIPE_LOADER_BATCH:,}) over a map-style Dataset that computes each row when "
             "it is read. Both sources hold the same rows. Each cell, in a fresh process, runs `load_splits` → "
             "`flows.tasks.validate_data.fn` (Great Expectations; imported before the phases) → "
             "`DataSplits.fingerprint()` → `count_certified` (MLP 784-100-10, `Box.around(radius=1e-05)`, "
             f"batch_size {BATCH:,}, torch's default 2 threads), once with `certification: {{memory_mb: "
             f"{PIPE_MEMORY_MB}}}` (streamed) and once without (whole: the Parquet file read by `load_file`'s path, "
             "the DataLoader read once into a temporary safetensors file and then whole into memory). The Parquet "
             "files are written by a separate process first. Peak RSS is the cell's `ru_maxrss`; it includes the "
             "imports (torch, lid_engine, pandas, pyarrow, Great Expectations, prefect) and a warm-up count, "
             "whose level before the first phase is the baseline column.", "",
             "| source | rows | streamed / whole | memory_mb | load s | validate s | fingerprint s | count s | "
             "total s | peak RSS MiB | baseline MiB | peak − baseline MiB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    skipped = []
    for c in sorted(cells, key=lambda c: (c["source"] != "parquet", c["rows"], c["memory_mb"] is None)):
        mode = "streamed" if c["memory_mb"] else "whole"
        head = f"| {'Parquet file' if c['source'] == 'parquet' else 'DataLoader'} | {c['rows']:,} | {mode} | " \
               f"{c['memory_mb'] or '—'} | "
        if "skipped" in c:
            lines.append(head + "not run | | | | | | | |")
            skipped.append(c)
            continue
        ph = [c[f"{k}_s"] for k in ("load", "validate", "fingerprint", "count")]
        lines.append(head + " | ".join(f"{v:.2f}" for v in ph) + f" | {sum(ph):.2f} | {mib(c['peak_mib'])} | "
                     f"{mib(c['baseline_mib'])} | {mib(c['peak_mib'] - c['baseline_mib'])} |")
    lines += [""]
    for c in skipped:
        lines.append(f"- Not run: {'Parquet file' if c['source'] == 'parquet' else 'DataLoader'}, {c['rows']:,} rows, "
                     f"{'streamed' if c['memory_mb'] else 'whole'}: {c['skipped']} (memory available then: "
                     f"{c['available_mib']:,.0f} MiB).")
    if writes:
        lines.append("- Writing the Parquet files (separate process, not in the table): "
                     + ", ".join(f"{n:,} rows {w['write_s']:.1f} s ({w['file_mib']:,.0f} MiB)"
                                 for n, w in sorted(writes.items())) + ".")
    eq = doc.get("pipeline_equal", {})
    lines += ["- Same counts (class by class), same data fingerprint and N certification rows in every cell of "
              "a size, both sources, streamed and whole: "
              + ", ".join(f"{int(n):,} rows {'✓' if ok else '✗'}" for n, ok in eq.items()), ""]
    lines += ["Resident memory by phase (sampled every 20 ms from /proc/self/status: the largest VmRSS in the phase, "
              "and of it the largest RssAnon — heap, tensors — and RssFile — pages of files mapped into the "
              "process, such as a safetensors file read through `safe_open`; MiB):", "",
              "| source | rows | streamed / whole | load | validate | fingerprint | count |",
              "|---|---:|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["source"] != "parquet", c["rows"], c["memory_mb"] is None)):
        if "skipped" in c:
            continue
        ph = c["phases"]
        lines.append(f"| {'Parquet file' if c['source'] == 'parquet' else 'DataLoader'} | {c['rows']:,} | "
                     f"{'streamed' if c['memory_mb'] else 'whole'} | "
                     + " | ".join(f"{ph[k]['VmRSS']:,.0f} (anon {ph[k]['RssAnon']:,.0f}, file {ph[k]['RssFile']:,.0f})"
                                  for k in ("load", "validate", "fingerprint", "count")) + " |")
    lines += ["", "### What the numbers say", "", *pipeline_reading(doc, cells), ""]
    return lines


def pipeline_reading(doc: dict, cells: list[dict]) -> list[str]:
    """The pipeline table in words, computed from it."""
    out = []
    run = [c for c in cells if "skipped" not in c]
    m = run_of(doc, run[0]) if run else doc["machine"]
    load = max(m["start_loadavg"][0], m["end_loadavg"][0])
    out.append(f"- Machine load: 1-min load {m['start_loadavg'][0]:.1f} at the start and {m['end_loadavg'][0]:.1f} at "
               f"the end on {m['cpus']} CPUs" + (" — the cells shared the cores with other work, so times can be off by "
                                                 "up to ~2× either way; memory is not affected" if load > m["cpus"] else "")
               + ".")
    for source, name in (("parquet", "Parquet file"), ("loader", "DataLoader")):
        st = sorted((c for c in run if c["source"] == source and c["memory_mb"]), key=lambda c: c["rows"])
        wh = {c["rows"]: c for c in run if c["source"] == source and not c["memory_mb"]}
        if len(st) >= 2:
            a, b = st[0], st[-1]
            ga, gb = a["peak_mib"] - a["baseline_mib"], b["peak_mib"] - b["baseline_mib"]
            anon = max(b["phases"][k]["RssAnon"] for k in b["phases"]) - b["baseline_now"]["RssAnon"]
            out.append(f"- {name}, streamed: from {a['rows']:,} to {b['rows']:,} rows ({b['rows'] // a['rows']:,}× the "
                       f"rows) the peak above the baseline went from {mib(ga)} to {mib(gb)} MiB (peak RSS "
                       f"{mib(a['peak_mib'])} → {mib(b['peak_mib'])} MiB); at {b['rows']:,} rows the largest anonymous "
                       f"memory (RssAnon) was {mib(anon)} MiB above the level before loading, the largest file-mapped "
                       f"memory (RssFile) {mib(max(b['phases'][k]['RssFile'] for k in b['phases']))} MiB. Time: "
                       f"{b['rows'] / sum(b[f'{k}_s'] for k in ('load', 'validate', 'fingerprint', 'count')):,.0f} rows/s "
                       "for the four phases together at the largest size.")
        both = [n for n in sorted(wh) if any(c["rows"] == n for c in st)]
        if both:
            n = both[-1]
            s_, w = next(c for c in st if c["rows"] == n), wh[n]
            ts = {k: s_[f"{k}_s"] for k in ("load", "validate", "fingerprint", "count")}
            tw = {k: w[f"{k}_s"] for k in ts}
            out.append(f"- {name} at {n:,} rows, streamed against whole: peak {mib(s_['peak_mib'])} against "
                       f"{mib(w['peak_mib'])} MiB ({mib(s_['peak_mib'] - s_['baseline_mib'])} against "
                       f"{mib(w['peak_mib'] - w['baseline_mib'])} MiB above the baseline); time {sum(ts.values()):.1f} "
                       f"against {sum(tw.values()):.1f} s ({sum(ts.values()) / sum(tw.values()):.2f}×) — per phase "
                       + ", ".join(f"{k} {ts[k]:.2f} / {tw[k]:.2f} s" for k in ts) + ".")
    big = max((c for c in run if c["source"] == "loader" and c["memory_mb"]), key=lambda c: c["rows"], default=None)
    if big and max(p["RssFile"] for p in big["phases"].values()) - big["baseline_now"]["RssFile"] > 4 * big["memory_mb"]:
        out.append("- The DataLoader's streamed peak grows with the rows in file-mapped pages only (RssFile), not in "
                   "the process's own memory (RssAnon): `lid_engine.stream.SafetensorsStream._read` (and `labels`) "
                   "keeps one `safetensors.safe_open` handle — a memory map of the whole file — open for a whole "
                   "reading, and every chunk it slices leaves its pages mapped and resident until the reading ends; "
                   "validate, fingerprint and count each read the file once, so each ends with the whole file "
                   "resident in the process. These are clean page-cache pages the kernel can drop under pressure, "
                   "but they count in RSS, in `ru_maxrss` and in a container's memory accounting, so a memory "
                   "limit or an RSS-based monitor sees a set-sized peak despite `memory_mb`.")
    pq_ = sorted((c for c in run if c["source"] == "parquet" and c["memory_mb"]), key=lambda c: c["rows"])
    if len(pq_) >= 2:
        a, b = pq_[0], pq_[-1]
        out.append(f"- The Parquet stream's anonymous memory is not flat either, though it grows far slower than the set: the load phase peaked at "
                   f"{mib(a['phases']['load']['RssAnon'])} MiB at {a['rows']:,} rows and "
                   f"{mib(b['phases']['load']['RssAnon'])} MiB at {b['rows']:,} (`ParquetStream` keeps the file's "
                   f"footer open — {math.ceil(b['rows'] / PIPE_GROUP)} row groups × 785 column chunks of metadata at "
                   "the largest size — and `_assemble` reads every label, 8 bytes a row; not separated here), and "
                   "validation holds the per-row aggregates (`y`, `x_nonfinite`, `x_min`, `x_max`: 32 bytes a row "
                   "plus pandas and GX copies) of up to `components.validation.STREAM_BLOCK_ROWS` = 2²⁰ rows before "
                   f"each GX run, a bound that does not follow `memory_mb` (validate phase: "
                   f"{mib(a['phases']['validate']['RssAnon'])} → {mib(b['phases']['validate']['RssAnon'])} MiB).")
    out.append("- Streaming trades time for memory where the source is slow to re-read: a streamed Parquet set is parsed "
               "again (Arrow → pandas → float64 → float32) by each of validate, fingerprint and count, while loaded "
               "whole it is parsed once; a DataLoader is read once either way (into a safetensors file), and reading "
               "that file again is cheap.")
    return out


def reading(doc: dict) -> list[str]:
    """What the certification numbers say, computed from them (so a rerun keeps it true)."""
    cells, rows = doc["cells"], doc["sizes"]["rows"]
    out = ["### What the numbers say", ""]
    m = doc["machine"]
    load = max(m["start_loadavg"][0], m["end_loadavg"][0])
    one_thread = ", ".join(f"{c['rows'] / c['count_s']:,.0f}" for c in cells
                           if c["kind"] == "count" and c["torch_threads"] == 1 and not c.get("data"))
    if load > 1.5 * m["cpus"]:
        out.append(f"- The machine was busy (1-min load {m['start_loadavg'][0]:.1f} at the start, {m['end_loadavg'][0]:.1f} at "
                   f"the end, on {m['cpus']} CPUs): every cell shared the cores with other work, so neighbouring cells "
                   "differ by up to ~2× for no reason of their own (the same count on 1 thread in process ran at "
                   f"{one_thread} rows/s over the sizes). Read the fixed costs and the orders of magnitude, not small ratios.")
    n = max(rows)
    one = _find(cells, kind="count", rows=n, torch_threads=1, data=None, omp=None)
    two = _find(cells, kind="count", rows=n, torch_threads=2, data=None, omp=None)
    best = {f"{c['mode']} ×{c['workers']}": c for c in cells
            if c["kind"] == "sharded" and c["rows"] == n and not c.get("data")}
    if one and two:
        out.append(f"- In process at {n:,} rows: {n / one['count_s']:,.0f} rows/s on 1 torch thread, "
                   f"{n / two['count_s']:,.0f} on 2 (the machine's other load takes most of the second core).")
    for name, c in best.items():
        total = c["start_s"] + c["warmup_s"] + c["count_s"] + c["stop_s"]
        out.append(f"- {name} at {n:,} rows: count {n / c['count_s']:,.0f} rows/s, {total:.1f} s in all with the "
                   f"cluster = {total / one['count_s']:.2f}× the 1-thread in-process count.")
    small = min(rows)
    c1 = _find(cells, kind="count", rows=small, torch_threads=1, data=None, omp=None)
    cp = _find(cells, kind="sharded", rows=small, mode="processes", workers=2, data=None)
    if c1 and cp:
        total = cp["start_s"] + cp["warmup_s"] + cp["count_s"] + cp["stop_s"]
        out.append(f"- Small sets do not pay: {small:,} rows take {c1['count_s']:.3f} s in process and {total:.1f} s on "
                   f"2 process workers ({cp['shards']} shard{'s' if cp['shards'] > 1 else ''}: a set is cut at "
                   f"multiples of the {BATCH}-row bound pass, so it has at most ⌈rows / {BATCH}⌉ shards). The fixed "
                   "cost (cluster start, workers importing torch and lid_engine, stop) and a Prefect task run per "
                   "shard (state changes through the API server) dwarf a count that takes milliseconds.")
    out.append("- Thread workers share one process's torch pool, and the certify block holds "
               "`lid_engine.numerics.SWITCHES` (a process-wide lock around the kernel switches), so shards on "
               "thread workers run one at a time: they can add overhead, never speed. Process workers are the "
               "configuration that scales; thread workers only avoid the per-process start.")
    default = _find(cells, kind="count", omp="default")
    passive = _find(cells, kind="count", rows=default["rows"], torch_threads=2, data=None, omp=None) if default else None
    if default and passive and default.get("run", 0) == passive.get("run", 0):
        out.append(f"- OpenMP's default wait policy on this shared machine: {default['rows']:,} rows on 2 torch threads "
                   f"took {default['count_s']:.2f} s with the default (active, spinning) policy against "
                   f"{passive['count_s']:.2f} s with `OMP_WAIT_POLICY=PASSIVE` ({default['count_s'] / passive['count_s']:.1f}×"
                   "): a spinning thread waits for a peer that the scheduler has given to another process. Set "
                   "PASSIVE (or 1 thread) on loaded or oversubscribed hosts, such as several process workers per core.")
    tp = _find(cells, kind="sharded", data="tensors")
    sp = _find(cells, kind="sharded", rows=tp["rows"], mode=tp["mode"], workers=tp["workers"], data=None) if tp else None
    if tp and sp:
        at = {k: run_of(doc, c)["commit"][:7] for k, c in (("t", tp), ("s", sp))}
        when = (f"; both measured at code {at['t']}" if at["t"] == at["s"] else
                f"; the tensors row measured at code {at['t']}, the stream row at {at['s']}, in another run and load")
        out.append(f"- Rows as tensors instead of a stream ({tp['rows']:,} rows, {tp['mode']} ×{tp['workers']}{when}): "
                   f"count {tp['count_s']:.2f} s against {sp['count_s']:.2f} s, process tree peak "
                   f"{mib(tp['tree_peak_mib'])} MiB against {mib(sp['tree_peak_mib'])} MiB. Since 3358ac3 local "
                   "process workers read in-memory tensors from a safetensors file written once per certification set "
                   "(pickled as its path) instead of receiving every shard's slice pickled; measured before that (at "
                   "381fe18), this row's process tree peaked at 6,352 MiB and its count took 24.00 s.")
    return out + [""]


def search_reading(cells: list[dict], sizes: dict) -> list[str]:
    """The search table in words, computed from it."""
    search = {(c["hidden"], c["batch"]): c for c in cells if c["kind"] == "search"}
    b, hs = sizes["search_batch"], sorted(sizes["hidden"])
    out = ["Per-iteration times of a few ms are differences of two sub-second runs and within the machine's noise."]
    if 1 in hs and len(hs) > 1:
        out[0] += (" The 805-parameter point (784-1-10) sat above the 10,345-parameter one again on a rerun (18.8 against "
                   "7.4 ms): one hidden unit gives every row the same label, a degenerate task (not investigated).")
    big = search[(hs[-1], b)]
    mid = next((search[(h, b)] for h in hs if search[(h, b)]["params"] >= 100_000), None)
    if mid and mid is not big:
        out.append(f"From {mid['params']:,} to {big['params']:,} parameters (batch {b}) the time per iteration grows "
                   f"{big['per_iter_s'] / mid['per_iter_s']:.0f}× for {big['params'] / mid['params']:.0f}× the parameters.")
    for h in sizes["batch_hidden"]:
        bs = sorted(bb for hh, bb in search if hh == h)
        if len(bs) > 1:
            lo, hi = search[(h, bs[0])], search[(h, bs[-1])]
            out[-1] += (f" At {lo['params']:,} parameters, batch {bs[-1]} costs {hi['per_iter_s'] / lo['per_iter_s']:.1f}× "
                        f"batch {bs[0]} per iteration.")
    extra = (big["peak_mib"] - _find(cells, kind="idle", prefect=None)["peak_mib"]) * 2**20 / big["params"]
    out.append(f"Peak memory above the torch + lid_engine baseline at {big['params']:,} parameters: "
               f"{extra:.0f} bytes per parameter (the search's copies of the parameters, bounds, gradients, optimiser "
               "state and activations together; not broken down here).")
    return [" ".join(out)]


def plots(doc: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, rows = doc["cells"], doc["sizes"]["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = [("in process, 1 thread", dict(kind="count", torch_threads=1)),
              ("in process, 2 threads", dict(kind="count", torch_threads=2)),
              *[(f"{m} ×{w}", dict(kind="sharded", mode=m, workers=w)) for m in ("threads", "processes") for w in (1, 2)]]
    for name, kw in series:
        pts = [(n, c) for n in rows if (c := _find(cells, rows=n, data=None, omp=None, **kw))]
        total = [sum(c.get(k, 0.0) for k in ("start_s", "warmup_s", "count_s", "stop_s")) for _, c in pts]
        ax.plot([n for n, _ in pts], total, marker="o", label=f"{name} (total)")
    for w in PAPER_WORKERS:
        ax.plot(rows, [doc["model"]["rows"][str(n)]["model_s"][w] for n in rows], ls="--", lw=1,
                label=f"model, processes ×{w} (not measured)")
    ax.set(xscale="log", yscale="log", xlabel="certification rows", ylabel="seconds",
           title=f"Certification, MLP 784-{HIDDEN}-10, IBP float64+float32")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scale_rows.png", dpi=110)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    search = [c for c in cells if c["kind"] == "search"]
    for b in sorted({c["batch"] for c in search}):
        pts = sorted((c["params"], c["per_iter_s"], c["peak_mib"]) for c in search if c["batch"] == b)
        a1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {b}")
        a2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"batch {b}")
    a1.set(xscale="log", yscale="log", xlabel="parameters", ylabel="seconds / iteration", title="LID search")
    a2.set(xscale="log", xlabel="parameters", ylabel="peak RSS (MiB)", title="memory peak of the search")
    for a in (a1, a2):
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "scale_params.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["cell"]:
        print("RESULT " + json.dumps(cell(json.loads(argv[1]))), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for scale.{md,json} and the plots")
    p.add_argument("--render", action="store_true", help="rewrite scale.md and the plots from scale.json, measure nothing")
    p.add_argument("--part", action="append", choices=PARTS,
                   help="measure only this part (repeatable) and merge it into the scale.json in --out")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.render:
        doc = finish(json.loads((args.out / "scale.json").read_text()))
    elif args.part:
        parts = tuple(p for p in PARTS if p in args.part)
        if not (args.out / "scale.json").exists():
            raise SystemExit(f"benchmarks.scale: --part merges into {args.out / 'scale.json'}, which does not exist; "
                             "run every part first (no --part)")
        old = json.loads((args.out / "scale.json").read_text())
        doc = merge(old, measure(args.quick, parts))
        (args.out / "scale.json").write_text(json.dumps(doc, indent=1))
    else:
        doc = measure(args.quick)
        (args.out / "scale.json").write_text(json.dumps(doc, indent=1))
    report(doc, args.out)
    plots(doc, args.out)
    print(f"wrote {args.out / 'scale.md'} ({doc['wall_s']:.0f} s)")
    return 0 if all(doc["equal_counts"].values()) and all(doc["pipeline_equal"].values()) else 1


if __name__ == "__main__":
    # run the copy imported as benchmarks.scale, so the classes a Dask process worker unpickles
    # (SyntheticStream) are named by their module, not by this process's __main__
    from benchmarks.scale import main as _main

    sys.exit(_main())
