# `make test` and (from the trainer issue on) `make demo` set themselves up: the first run creates
# .venv and installs the package with its dependencies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
comma := ,

HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# Without a GPU a plain `torch` requirement downloads a multi-GB CUDA build: pin the CPU build.
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.5,torch==2.13.0)
EXTRAS ?= $(if $(HAS_GPU),test$(comma)gpu,test)

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade setuptools wheel
	$(PIP) install "$(TORCH_SPEC)"
	# DeepSpeed ships as source; without build isolation it builds against the torch above
	# instead of fetching another one.
	$(PIP) install --no-build-isolation -c constraints.txt -e ".[$(EXTRAS)]"
	# The loader's peer in bench/peers.py. Its requirements pin older numpy, xxhash and transformers
	# and want torchvision, which would replace the torch above: the library and the compression
	# modules it imports, without their requirements (bench/peer_loader.py says how it is loaded).
	$(PIP) install --no-deps -c constraints.txt mosaicml-streaming brotli python-snappy cramjam zstd catalogue
	touch $(STAMP)

# Two pytest workers, a test file each at a time (its module fixtures built once): most tests run
# 2-rank trainings whose start-up and waits leave a core idle. PYTEST_ARGS="-n 0" runs in one process.
test: install
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# The embedded default: data, tokenizers, shards, 150 steps of the tiny model on 2 ranks, 500 of SFT, pictures.
demo: install
	PY=$(PY) launch/demo.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache demo
