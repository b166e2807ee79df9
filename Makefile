# Two commands are the contract: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
# The CPU build on a machine without CUDA; on a GPU machine, for example:
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,peft,notebook,bench,trackers
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH_SPEC) $(EXTRAS)' | cksum | cut -d' ' -f1)

# Nothing here may wait for the Hugging Face hub: every model and dataset used by tests,
# the demo and the benchmarks is built locally.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED ?= 1

.PHONY: install test test-slow demo bench bench-quick lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow -q $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m dvpo_lightning.demo $(DEMO_ARGS)

bench: install
	$(BIN)/python -m benchmarks.run $(BENCH_ARGS)

bench-quick: install
	$(BIN)/python -m benchmarks.run --quick $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
