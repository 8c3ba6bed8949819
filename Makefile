# fgstudy: `make test` (everything CI runs) and `make book` (the HTML report from the committed results).
# Both build the pinned venv from nothing on first use (cached under ~/.cache/fgstudy, keyed by
# .ci/requirements.txt) and reuse it afterwards.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PROFILE ?= cpu
JOBS ?= 1
MIRROR := $(abspath ../shared/data)
ifneq ($(wildcard $(MIRROR)/MD5SUMS),)
export FGSTUDY_DATA_MIRROR ?= $(MIRROR)
endif

venv = $(eval VENV := $$(shell bash .ci/venv.sh))$(VENV)
PY = $(venv)/bin/python

.PHONY: help venv test unit smoke book results bench system clean
help:
	@echo "make test     unit + statistical tests, then smoke batch -> book build -> headless-Chromium check"
	@echo "make book     run the batch (PROFILE=$(PROFILE), cached: re-runs nothing unchanged) and build _build/html"
	@echo "make results  only the batch (PROFILE=cpu|quick|full|smoke, JOBS=N, FORCE=1)"
	@echo "make bench    python -m fgstudy.bench (step-time ratios, peak memory)"

venv:
	@echo "venv: $(venv)"

# Debian packages for the browser check (required) and the PostgreSQL storage test (optional: skipped without it).
system:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null 2>&1 || \
		echo "postgresql could not be installed: its storage test will be skipped"

test: system
	$(PY) -m pytest tests -q --durations=15

unit:
	$(PY) -m pytest tests -q -m "not slow"

results:
	$(PY) -m fgstudy.batch --profile $(PROFILE) --jobs $(JOBS) $(if $(FORCE),--force,)

book: results
	$(venv)/bin/jupyter-book build . --quiet
	@echo "open _build/html/index.html"

bench:
	$(PY) -m fgstudy.bench

clean:
	rm -rf _build .pytest_cache
