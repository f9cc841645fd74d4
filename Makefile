# make demo : set up .venv and run the main job on the bundled default model
# make test : set up .venv and run the test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# torch threads that spin while waiting slow everything down when tests run subprocesses side by side
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test setup bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the CPU wheel pinned here; a bare requirement would pull CUDA packages
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/interp demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/probes.py
	$(BIN)/python bench/kernel.py
	$(BIN)/python bench/steering.py
	$(BIN)/python bench/sae.py
	$(BIN)/python bench/detectors.py

clean:
	rm -rf $(VENV) demo .pytest_cache
