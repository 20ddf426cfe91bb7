# Every target sets up its own venv (idempotent: reinstalls only when pyproject.toml changes).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-heavy bench bench-gpu bench-scale lint summary clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "[setup] installing distilpose into $(VENV) (pinned; torch==2.13.0 CPU build)"
	@$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	@$(BIN)/python -c "import torch, ray, zarr, webdataset, pycocotools, boto3, s3fs" \
		|| (echo "[setup] install failed" && exit 1)
	@$(BIN)/pip check
	@touch $(STAMP)

demo: venv
	$(BIN)/python jobs/demo.py $(DEMO_ARGS)

summary: venv
	$(BIN)/python -m distilpose.models.summary

# The default suite in TEST_WORKERS pytest processes, a test file per process at a time (its
# module fixtures built once); about half its wall time waits on Ray and subprocess start-ups.
TEST_WORKERS ?= 2
test: venv
	$(BIN)/python -m pytest -m "not heavy" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Two heavy test files at a time: they mostly wait on Ray, cluster and job start-ups.
test-heavy: venv
	$(BIN)/python -m pytest -m heavy -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# bench_gpu needs a CUDA GPU (BENCH_SMOKE=1: CPU smoke); bench_scale runs ~50 min on 2 cores: own targets.
bench: venv
	@for b in bench/bench_*.py; do case $$b in *bench_gpu.py|*bench_scale.py) continue;; esac; \
		echo "== $$b"; $(BIN)/python $$b || exit 1; done

bench-gpu: venv
	$(BIN)/python bench/bench_gpu.py

bench-scale: venv
	$(BIN)/python bench/bench_scale.py

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
