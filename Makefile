# The README's two commands. Both are idempotent: the virtual environment is created and
# the package installed only when pyproject.toml changed since the last install.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: quickstart test lint install postgres

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: pip takes the local CPU/CUDA wheels instead of a download.
	$(BIN)/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default (synthetic world, local SQLite stores). Two
## workers: on a small CPU two small Cells side by side beat one Cell on every core.
quickstart: $(STAMP)
	$(BIN)/benchmark run --matrix studies/quickstart.yaml --workers 2

## The test suite (CPU, offline). CI runs exactly this. The scale-out tests start a real
## PostgreSQL server: its Debian package is installed first when it is missing.
test: $(STAMP) postgres
	$(BIN)/python -m pytest -q

postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql; } || \
	  { echo "install PostgreSQL's server (Debian: apt-get install postgresql)"; exit 1; }

lint: $(STAMP)
	$(BIN)/ruff check benchmark backbones aggregators tests perf
