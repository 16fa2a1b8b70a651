# Every target bootstraps .venv from nothing: python3 -m venv, then one pip install of the project.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export RAY_USAGE_STATS_ENABLED := 0
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/curate demo $(ARGS)

bench: $(STAMP)
	$(PY) -m bench.run $(if $(FULL),--full,)

clean:
	rm -rf runs .pytest_cache
