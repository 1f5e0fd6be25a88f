# llama-orch: two entry points for a fresh machine, `make run` and `make test`.
# Both create .venv, install what they need and build the Cython extensions (a failed
# compile falls back to the pure-Python twins with one clear message).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TRACE  ?= conv
OUT    ?= out/replay

.PHONY: run replay test test-compiled test-pure test-tls bench-smoke bench bench-load build engine clean

# The whole cluster on this machine (2 pools of the real llama-server, the tiny model), one streamed
# sample task, then it keeps serving until Ctrl-C. POOLS=1, UP_ARGS="--engine mock --once" etc.
POOLS  ?= 2
SAMPLE ?= Once upon a time
run: build engine
	$(BIN)/llama-orch up --pools $(POOLS) --sample "$(SAMPLE)" $(UP_ARGS)

# The shipped Azure trace through the core with simulated engines: report and plot in $(OUT).
replay: build
	$(BIN)/llama-orch replay $(TRACE) --seed 0 --out $(OUT)

test: build engine
	$(BIN)/python -c "import llama_orch.ext.queue as q, llama_orch.ext.sse as s; print('ext implementations:', q.IMPLEMENTATION, s.IMPLEMENTATION)"
	$(MAKE) --no-print-directory test-compiled test-tls test-pure bench-smoke

test-compiled:
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# The end-to-end tests of the daemons once more, every hop over mTLS (a development CA per run).
TLS_E2E := tests/e2e/test_cluster.py tests/e2e/test_openai_client.py tests/e2e/test_worker_node.py tests/e2e/test_two_pools.py \
           tests/e2e/test_real_scrapes.py
test-tls:
	LLAMA_ORCH_TEST_TLS=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(TLS_E2E)

test-pure:
	LLAMA_ORCH_NO_EXTENSIONS=1 $(BIN)/python -m pytest -q -p no:cacheprovider tests

bench-smoke:
	$(BIN)/python -m pytest -q -p no:cacheprovider bench --benchmark-disable

bench: build
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-columns=min,median,mean,ops,rounds --benchmark-sort=name

# orchestratord beside its baselines on fast fake engines, as deployed (pinned to one CPU): out/bench-load
bench-load: build
	$(BIN)/llama-orch bench load --out out/bench-load

# llama-server from source, once per machine (cached under ~/.cache/llama-orch; minutes the first time)
engine: $(STAMP)
	$(BIN)/llama-orch build-engine

build: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel "cython>=3.0"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf build $(VENV) llama_orch/ext/*.so llama_orch/ext/*.c out .pytest_cache .benchmarks
