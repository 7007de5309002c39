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

# The reports in docs/benchmarks/ (about 40 minutes on 2 cores); DATA=PATH for your own copies.
DATA ?= ../shared/data
BENCH := $(BIN)/ally bench --strategies ally,random --init 200 --budget 200 --rounds 5 --seeds 3
bench: $(STAMP)
	$(BENCH) --dataset mnist --data $(DATA)/mnist --out docs/benchmarks/mnist
	$(BENCH) --dataset parkinsons-rows --data $(DATA)/parkinsons --out docs/benchmarks/parkinsons-rows
	$(BENCH) --dataset parkinsons --data $(DATA)/parkinsons --out docs/benchmarks/parkinsons
	$(BIN)/python -m worker.bench_round --data $(DATA)/mnist
	$(BIN)/python -m worker.bench_selection

clean:
	rm -rf $(VENV) data
