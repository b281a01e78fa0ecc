# Set-up and the two main commands. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_RUN ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test lint format clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a bare or ranged torch would pull a multi-GB CUDA build on CPU machines.
	$(BIN)/python -m pip install -q torch==2.13.0 -c constraints.txt
	$(BIN)/python -m pip install -q -e '.[dev]' -c constraints.txt
	touch $(STAMP)

## Train configs/tiny.yaml (n=4, r=4) on CPU, checkpoint it, and decode greedily from the checkpoint.
demo: $(STAMP)
	$(BIN)/cpmtp train --config configs/tiny.yaml --run-dir $(DEMO_RUN)
	$(BIN)/cpmtp generate --checkpoint $(DEMO_RUN)/checkpoints --prompt-file configs/prompts/code.txt --max-new-tokens 80

## Lint and the whole test suite (CPU, gloo).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-venv:
	rm -rf $(VENV)
