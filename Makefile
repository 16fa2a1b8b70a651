# Every target bootstraps .venv from nothing: python3 -m venv, then one pip install of the project.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export RAY_USAGE_STATS_ENABLED := 0
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install test demo bench bench-gpu bench-recaption clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Lint first (seconds), then the whole suite; PYTEST_ARGS selects, e.g. PYTEST_ARGS='-m "not slow"'.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/curate demo $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.run $(if $(FULL),--full,)

# The GPU benchmark alone (bench/bench_score_gpu.py): installs the project, runs in a few minutes,
# records bench/results/score_gpu.json and the table; on a machine without CUDA it records why not.
bench-gpu: $(STAMP)
	$(PY) -m bench.run --only score_gpu

# The recaption benchmark (bench/bench_recaption.py): Qwen2-VL-2B at its real size with random weights,
# images/s per GPU; on a machine without CUDA it records why not.
bench-recaption: $(STAMP)
	$(PY) -m bench.run --only recaption

clean:
	rm -rf runs .pytest_cache
