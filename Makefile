# steerstore: `make demo` runs the main job on the embedded default; `make test` runs the tests.
# Both set everything up first on a fresh machine (virtualenv, packages, the default model).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The pinned CPU wheel on the dev/CI machines; on a GPU box use e.g. TORCH="torch==2.13.0" from
# the CUDA index, or any torch satisfying pyproject's range.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.steerstore-setup
# llama.cpp (PyPI's llama-cpp-python, compiled once and the wheel cached) for verify-export and its
# test; LLAMA_CPP= skips it
LLAMA_CPP ?= llama-cpp-python==0.3.36
# the stamp names the requirement: another version (or LLAMA_CPP= once) does not hide the next setup's
LLAMA_STAMP := $(VENV)/.steerstore-llama-cpp-$(subst =,-,$(subst >,-,$(subst <,-,$(LLAMA_CPP))))

.PHONY: setup system demo test test-fast lint s3-local clean

setup: system $(STAMP) $(LLAMA_STAMP)

# System packages from Debian: WordNet for METEOR (the evaluation job), headless Chromium for the
# report's browser test, CMake and a C++ compiler to build llama.cpp. Installed only when missing;
# needs root (or sudo) and apt.
SYSTEM_PKGS := wordnet-base wordnet-sense-index chromium cmake g++
system:
	@missing=""; for p in $(SYSTEM_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	fi

# the same install script as the cluster image (infra/deploy/Containerfile)
$(STAMP): pyproject.toml Makefile infra/deploy/install.sh infra/deploy/constraints.txt
	$(PYTHON) -m venv $(VENV)
	PY=$(BIN)/python TORCH="$(TORCH)" EXTRAS=eval,test EDITABLE=1 bash infra/deploy/install.sh
	touch $(STAMP)

$(LLAMA_STAMP): $(STAMP) infra/deploy/llama-cpp.sh
	PY=$(BIN)/python LLAMA_CPP="$(LLAMA_CPP)" bash infra/deploy/llama-cpp.sh
	touch $(LLAMA_STAMP)

demo: setup
	$(BIN)/steerstore demo

test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=30

# unit tests on tiny models only: no real model, Ray, S3 server, browser or sentence encoder (~1 min)
test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

# the layer contracts of DESIGN.md (pyproject's [tool.importlinter]). steerstore is a namespace package
# whose editable install import-linter cannot walk, so it checks a copy laid out as the wheel is.
lint: setup
	@rm -rf build/lint && mkdir -p build/lint/steerstore
	@cp -r jobs operators infra schemas build/lint/steerstore/
	PYTHONPATH=build/lint $(BIN)/lint-imports
	@rm -rf build/lint

# an S3-compatible server (moto) on loopback for trying s3:// locally; prints the environment to export
s3-local: setup
	$(BIN)/python -m tests.s3server

clean:
	rm -rf steerstore-out
