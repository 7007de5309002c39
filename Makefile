# The README's two commands, `make demo` and `make test`, each set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test unit integration lint format bench clean

# Re-runs pip only when pyproject.toml changes; pip keeps an installed torch that satisfies the pin.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ally demo

test: $(STAMP)
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Full benchmarks read ../shared/data (or DATA=PATH); see docs/benchmarks/README.md.
DATA ?= ../shared/data
bench: $(STAMP)
	$(BIN)/ally bench --dataset mnist --data $(DATA)/mnist --strategies ally,random \
		--init 200 --budget 200 --rounds 5 --seeds 3 --out docs/benchmarks/mnist

clean:
	rm -rf $(VENV) data
