# Set-up and the two main commands. `make demo` and `make test` create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_RUN ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
# The demo's data: the built-in code and prose corpora as shards (built once, then reused).
PY_TAG   := $(shell $(PYTHON) -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')
DATA_DIR ?= $(or $(CPMTP_CACHE_DIR),$(HOME)/.cache/cpmtp_dist)/demo-data-$(PY_TAG)
DATA_SEQ := 128

.PHONY: demo test lint format clean-venv gpu-wheels

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: a bare or ranged torch would pull a multi-GB CUDA build on CPU machines.
	$(BIN)/python -m pip install -q torch==2.13.0 -c constraints.txt
	$(BIN)/python -m pip install -q -e '.[dev,hf]' -c constraints.txt
	touch $(STAMP)

## Tokenizer and shards of the built-in corpora (stdlib code and prose); an interrupted build resumes.
$(DATA_DIR)/.complete: $(STAMP)
	$(BIN)/cpmtp data tokenizer --input builtin:stdlib-code builtin:stdlib-prose --vocab-size 2048 \
		--out $(DATA_DIR)/tokenizer
	$(BIN)/cpmtp data shards --input builtin:stdlib-code --tokenizer $(DATA_DIR)/tokenizer \
		--seq-len $(DATA_SEQ) --shard-size-mb 1 --heldout-fraction 0.02 --out $(DATA_DIR)/code
	$(BIN)/cpmtp data shards --input builtin:stdlib-prose --tokenizer $(DATA_DIR)/tokenizer \
		--seq-len $(DATA_SEQ) --shard-size-mb 0.25 --heldout-fraction 0.02 --out $(DATA_DIR)/prose
	touch $@

## Train configs/tiny.yaml (n=4, r=4) on CPU from a blend of the shards (80 % code, 20 % prose),
## checkpoint it, decode a prompt with self-speculative decoding, then decode it both ways (autoregressive
## and speculative, KV cache) and print tokens per forward and the speed-up. Sampled at temperature 0.8:
## greedy decoding of a model this small falls into repeating one token (see docs/RESULTS.md).
demo: $(DATA_DIR)/.complete
	$(BIN)/cpmtp train --config configs/tiny.yaml --run-dir $(DEMO_RUN) \
		data.path="0.8 $(DATA_DIR)/code 0.2 $(DATA_DIR)/prose"
	$(BIN)/cpmtp generate --checkpoint $(DEMO_RUN)/checkpoints --prompt-file configs/prompts/code.txt \
		--max-new-tokens 80 --mode speculative --temperature 0.8
	$(BIN)/cpmtp bench decode --checkpoint $(DEMO_RUN)/checkpoints --prompt-file configs/prompts/code.txt \
		--max-new-tokens 80 --repeats 3 --temperature 0.8 --out $(DEMO_RUN)/bench_decode.json

## Lint and the whole test suite (CPU, gloo). As root, Debian's Slurm and munge are installed first when
## missing, for the tests on a one-node Slurm cluster (tests/slurm_cluster.py); elsewhere those skip.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tests/slurm_cluster.py install
	$(BIN)/python -m pytest -q --durations=25

## The wheels a GPU machine without network lacks (megatron-core, DeepSpeed built from its sdist, webdataset and
## their small dependencies, for CPython 3.12) into .whl/, which bench/gpu_check.sh installs offline.
gpu-wheels: $(STAMP)
	bench/gpu_wheels.sh $(BIN)/python

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-venv:
	rm -rf $(VENV)
