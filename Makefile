# The two first commands of the README: `make demo` and `make test`. Both set up .venv when needed.
# Any interpreter from 3.11 to 3.13: `make test PYTHON=python3.12` (with pyenv: `pyenv shell 3.11.7 3.12.1` first,
# or PYTHON=$$(pyenv prefix 3.12.1)/bin/python3.12). Each minor version gets its own venv (.venv for 3.11,
# .venv-py3.12 for 3.12, ...), so switching back and forth never reinstalls nor mixes interpreters.
PYTHON ?= python3.11
PY_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
VENV ?= $(if $(filter 3.11,$(PY_VERSION)),.venv,.venv-py$(PY_VERSION))
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format bench mutate mutate-sample clean

$(STAMP): pyproject.toml
	@test -n "$(PY_VERSION)" || { echo "make: PYTHON=$(PYTHON) does not run (set PYTHON to a python3.11-3.13 executable)" >&2; exit 2; }
	# a venv made by another interpreter (e.g. VENV set by hand) is rebuilt rather than mixed
	test ! -x $(BIN)/python || $(BIN)/python -c 'import sys; sys.exit("%d.%d" % sys.version_info[:2] != "$(PY_VERSION)")' || rm -rf $(VENV)
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
	$(BIN)/ruff check siclip tests benchmarks
	$(BIN)/ruff format --check siclip tests benchmarks
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix siclip tests benchmarks
	$(BIN)/ruff format siclip tests benchmarks

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

# A seeded random FRACTION of the still-unchecked mutants matching MUTANTS (default: all targeted modules):
# an estimate of the score in a fraction of the time; repeated runs add to the same results.
FRACTION ?= 0.3
mutate-sample: $(STAMP)
	nice -n 10 $(BIN)/mutmut run --max-children 2 $$($(BIN)/python benchmarks/mutation_sample.py --fraction $(FRACTION) $(or $(MUTANTS),'siclip.*'))
	$(BIN)/python benchmarks/mutation_report.py --out benchmarks/mutation.md

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
