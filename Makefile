# attnflax: the two commands of the quick start, and a few helpers.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= experiments/configs/digits.py
WORKDIR ?= runs/digits

export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv train test test-slow test-faults lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

train: $(STAMP)
	$(BIN)/python -m attnflax.main --config=$(CONFIG) --workdir=$(WORKDIR)
	$(BIN)/python experiments/evaluate.py --workdir=$(WORKDIR)
	@echo ""
	@echo "Outputs of $(CONFIG) in $(WORKDIR)/:"
	@echo "  results.json                  test accuracy, images/s, compile time, config"
	@echo "  metrics.jsonl, events.out.*   training curves (tensorboard --logdir $(dir $(WORKDIR)))"
	@echo "  checkpoints/                  Orbax checkpoints ('make train' again resumes)"
	@echo "  eval/                         confusion matrix, prediction and mistake grids (PNG)"

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=15

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow" --durations=15

# Fault injection (SIGKILLs, damaged checkpoints, full disks, two writers): ~12 min on 2 cores.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow" --durations=15 tests/test_faults.py

lint: $(STAMP)
	$(BIN)/ruff check attnflax experiments tests

bench: $(STAMP)
	$(BIN)/python experiments/bench_attention.py

clean:
	rm -rf $(VENV) runs .pytest_cache
