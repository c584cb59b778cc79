# pricectl: every target sets up .venv by itself (python3 -m venv + pip; pip takes the
# on-disk CPU torch wheel because pyproject pins torch>=2.3,<2.14).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= small

.PHONY: all venv demo test lint bench clean

all: test

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,ray]'
	@touch $(STAMP)

venv: $(STAMP)

## demo: the whole pipeline on the built-in small synthetic market, then the report.
demo: $(STAMP)
	$(BIN)/python -m pricing_cli.demo --preset $(PRESET)

## test: the test suite (tiny preset; a few minutes on 2 cores).
test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider tests

lint: $(STAMP)
	$(BIN)/ruff check pricing_cli tests bench
	$(BIN)/mypy pricing_cli

## bench: scale runs; writes docs/benchmarks.md (takes long: see docs/benchmarks.md).
bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis runs models reports bench/out
	find data -mindepth 2 ! -name .gitkeep -delete 2>/dev/null || true
	find data -mindepth 1 -type d -empty -delete 2>/dev/null || true
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
