# Two commands are the contract: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
# The CPU build on a machine without CUDA; on a GPU machine, for example:
#   make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# TORCH_SPEC= (empty) uses the torch already installed: a new venv then sees the system site-packages.
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
EXTRAS ?= dev,peft,notebook,bench,trackers,gguf
# Offline installs: `make wheelhouse` (with a network) writes every wheel but torch's to WHEELHOUSE (default
# wheelhouse/) for WHEEL_PYTHON on WHEEL_PLATFORM (default: this machine's); `make install WHEELHOUSE=dir`
# (or gpu-check, test, demo) then installs from it alone, with no index.
WHEELHOUSE ?=
# `make gpu-wheels`: only the wheels the GPU machine's image (GPU_IMAGE) lacks, for its CPython 3.12, into
# GPU_WHEELS (under the 64 MiB a device call carries); run it with a Python 3.12 where there is one (PYTHON=python3.12).
GPU_IMAGE ?= scripts/gpu_image.txt
GPU_WHEELS ?= .gpu-wheels
GPU_EXTRAS ?= peft
WHEEL_PYTHON ?=
WHEEL_PLATFORM ?=
PIP_SOURCE := $(if $(WHEELHOUSE),--no-index --find-links $(abspath $(WHEELHOUSE)))
BIN := $(VENV)/bin
SYSTEM_SITE := $(if $(strip $(TORCH_SPEC)),,--system-site-packages)
PRINT_VENV_SITE := import site, sys; sys.prefix != sys.base_prefix and print(*site.getsitepackages(), sep="\n")
PRINT_PURELIB := import sysconfig; print(sysconfig.get_path("purelib"))
STAMP := $(VENV)/.installed-$(shell echo '$(TORCH_SPEC) $(EXTRAS)' | cksum | cut -d' ' -f1)

# Nothing here may wait for the Hugging Face hub: every model and dataset used by tests,
# the demo and the benchmarks is built locally.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export PYTHONUNBUFFERED ?= 1

.PHONY: install test test-slow demo bench bench-quick gpu-check new-venv wheelhouse gpu-wheels lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(MAKE) --no-print-directory new-venv
	$(if $(WHEELHOUSE),,$(BIN)/python -m pip install -q --upgrade pip)
	@if [ -n "$(strip $(TORCH_SPEC))" ]; then \
		echo "$(BIN)/python -m pip install -q $(PIP_SOURCE) $(TORCH_SPEC)"; \
		$(BIN)/python -m pip install -q $(PIP_SOURCE) $(TORCH_SPEC); \
	elif ! $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "TORCH_SPEC is empty, so torch must be installed already: in $(PYTHON)'s site-packages (the new"; \
		echo "venv sees them) or in an existing VENV=<environment>; or set TORCH_SPEC to a torch wheel file."; \
		exit 1; \
	fi
	$(BIN)/python -m pip install -q $(PIP_SOURCE) -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

# With TORCH_SPEC= the venv sees PYTHON's packages. Where PYTHON is itself a venv's (a GPU image's, say), a
# new venv would see only its base Python's: a .pth file adds that venv's site-packages. Where PYTHON has no
# ensurepip (Debian without python3-venv), the venv is made without pip and uses the one PYTHON sees.
new-venv:
	$(PYTHON) -m venv $(SYSTEM_SITE) $(VENV) || $(PYTHON) -m venv $(SYSTEM_SITE) --without-pip $(VENV)
	$(if $(SYSTEM_SITE),$(PYTHON) -c '$(PRINT_VENV_SITE)' > "$$($(BIN)/python -c '$(PRINT_PURELIB)')/_base_environment.pth")

wheelhouse:
	$(PYTHON) scripts/wheelhouse.py --dest $(or $(WHEELHOUSE),wheelhouse) --extras $(EXTRAS) \
		--torch-version $(TORCH_VERSION) $(if $(WHEEL_PYTHON),--python-version $(WHEEL_PYTHON)) \
		$(if $(WHEEL_PLATFORM),--platform $(WHEEL_PLATFORM))

gpu-wheels:
	$(PYTHON) scripts/wheelhouse.py --dest $(GPU_WHEELS) --image $(GPU_IMAGE) --extras $(GPU_EXTRAS) \
		--python-version 3.12 --platform manylinux_2_28_x86_64 --max-mib 64

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

# Every stage at Llama-3.2-1B's shape on CUDA (benchmarks/gpu_check.py); e.g. GPU_CHECK_ARGS="--devices 8".
gpu-check: install
	$(BIN)/python -m benchmarks.gpu_check --device cuda $(GPU_CHECK_ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: install
	$(BIN)/ruff check --fix src tests benchmarks scripts
	$(BIN)/ruff format src tests benchmarks scripts

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
