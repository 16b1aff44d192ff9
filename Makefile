# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull several GB of CUDA packages.
TORCH := torch==2.13.0
STAMP := $(VENV)/.setup-done

.PHONY: setup setup-flink demo test test-unit test-engines flink-start flink-stop bench clean

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[gcp,generate,train,report,test]' $(TORCH)
	touch $(STAMP)

# Flink 1.19 (PyPI) and Beam's Flink job server (built from Maven Central's jars) for the tests' Flink cluster:
# cached under .cache/flink, idempotent; needs java and mvn (one line says which is missing). BFT_FLINK=0 skips.
setup-flink: setup
	@if [ "$${BFT_FLINK:-1}" != 0 ]; then bash scripts/flink_local.sh fetch >/dev/null; fi

demo: setup
	BFT_DEMO_ROOT=$${BFT_DEMO_ROOT:-runs/demo} bash scripts/demo.sh

# The suite with one Flink end-to-end test on a real session cluster (started once per run by tests/conftest.py)
test: setup-flink
	$(BIN)/python -m pytest -q -n 3 --dist worksteal -m "not engines" tests

# The fast tests only: no Beam pass, model, server or process (tests/conftest.py marks them `unit`)
test-unit: setup
	$(BIN)/python -m pytest -q -m unit tests

# The whole engine matrix: prepare and assemble on Flink and on Beam's job service, a gs:// root on Flink
test-engines: setup-flink
	$(BIN)/python -m pytest -q -n 2 -m engines tests/test_runners.py

# A local Flink session cluster for your own runs; its last line is the bft flags that run a pass on it
flink-start: setup-flink
	bash scripts/flink_local.sh start
flink-stop:
	bash scripts/flink_local.sh stop

bench: setup
	$(BIN)/python -m benchmarks.prepare_bench --docs $${DOCS:-30000 100000 300000}
	$(BIN)/python -m benchmarks.generate_bench
	$(BIN)/python -m benchmarks.utilization_bench
	$(BIN)/python -m benchmarks.client_bench
	$(BIN)/python -m benchmarks.assemble_bench
	$(BIN)/python -m benchmarks.train_bench

clean:
	rm -rf runs .pytest_cache
