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

# The reports in docs/benchmarks/ (several hours on 2 cores; each step resumes where it
# stopped); DATA=PATH for your own copies. ALLY appears as the service's default and as the
# paper's own setting; docs/benchmarks/README.md says what each folder holds.
DATA ?= ../shared/data
ALLY := ally:epsilon=auto+confidence=1+dual_cap_quantile=0.95
ALLY_PAPER := ally:epsilon=0.2+confidence=0+dual_cap_quantile=none
ALLY_PAPER_REGRESSION := ally:epsilon=0.1+confidence=0+dual_cap_quantile=none
CLASSIFIERS := $(ALLY),$(ALLY_PAPER),badge,margin,entropy,coreset,random
REGRESSORS := $(ALLY),$(ALLY_PAPER_REGRESSION),coreset,random
# The paper's ablations (ε and k), each one knob away from the paper's setting.
PAPER := epsilon=0.2+confidence=0+dual_cap_quantile=none
ABLATIONS := ally:k=1+$(PAPER),ally:k=20+$(PAPER),ally:k=50+$(PAPER),$\
ally:epsilon=20+confidence=0+dual_cap_quantile=none,$\
ally:epsilon=0.05+confidence=0+dual_cap_quantile=none,$\
ally:epsilon=1.0+confidence=0+dual_cap_quantile=none,$\
ally:epsilon=auto+k=20+dual_cap_quantile=0.95+confidence=0
CURVES := $(BIN)/ally bench --init 200 --budget 200
bench: $(STAMP)
	$(CURVES) --rounds 5 --seeds 5 --dataset mnist --data $(DATA)/mnist \
	    --strategies "$(CLASSIFIERS)" --headline "$(CLASSIFIERS)" --out docs/benchmarks/mnist
	$(CURVES) --rounds 5 --seeds 3 --dataset mnist --data $(DATA)/mnist \
	    --strategies "$(ABLATIONS)" --out docs/benchmarks/mnist-ablations
	$(CURVES) --rounds 4 --seeds 3 --dataset cifar10 --data $(DATA)/cifar10 --pool-size 5000 \
	    --strategies "$(CLASSIFIERS)" --out docs/benchmarks/cifar10
	$(CURVES) --rounds 5 --seeds 3 --dataset parkinsons-rows --data $(DATA)/parkinsons \
	    --strategies "$(REGRESSORS)" --out docs/benchmarks/parkinsons-rows
	$(CURVES) --rounds 5 --seeds 3 --dataset parkinsons --data $(DATA)/parkinsons \
	    --strategies "$(ALLY_PAPER_REGRESSION),random" --out docs/benchmarks/parkinsons
	$(BIN)/python -m worker.bench_dual_head --data $(DATA)/mnist
	$(BIN)/python -m worker.bench_round --data $(DATA)/mnist
	$(BIN)/python -m worker.bench_selection

clean:
	rm -rf $(VENV) data
