# The two first commands of the README: `make demo` and `make test`. Both set up .venv when needed.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format bench mutate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: this machine's pip takes these wheels from local disk
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/siclip demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests/unit

lint: $(STAMP)
	$(BIN)/ruff check siclip tests
	$(BIN)/ruff format --check siclip tests
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix siclip tests
	$(BIN)/ruff format siclip tests

bench: $(STAMP)
	$(BIN)/siclip bench infer
	$(BIN)/siclip bench memory
	$(BIN)/siclip bench train
	$(BIN)/siclip bench data

# Mutation testing (not part of `make test`: hours on 2 cores). Config in pyproject.toml [tool.mutmut];
# mutants/ caches results, so a rerun checks only what changed. MUTANTS narrows it, e.g.
# `make mutate MUTANTS='siclip.losses.*'`. The score table goes to benchmarks/mutation.md.
mutate: $(STAMP)
	nice -n 10 $(BIN)/mutmut run --max-children 2 $(MUTANTS)
	$(BIN)/python benchmarks/mutation_report.py --out benchmarks/mutation.md

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
