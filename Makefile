# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned torch would pull several GB of CUDA packages.
TORCH := torch==2.13.0
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[gcp,generate,train,report,test]' $(TORCH)
	touch $(STAMP)

demo: setup
	BFT_DEMO_ROOT=$${BFT_DEMO_ROOT:-runs/demo} bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest -q -n 3 --dist worksteal tests

bench: setup
	$(BIN)/python -m benchmarks.prepare_bench --docs $${DOCS:-30000 100000 300000}
	$(BIN)/python -m benchmarks.generate_bench
	$(BIN)/python -m benchmarks.utilization_bench
	$(BIN)/python -m benchmarks.assemble_bench
	$(BIN)/python -m benchmarks.train_bench

clean:
	rm -rf runs .pytest_cache
