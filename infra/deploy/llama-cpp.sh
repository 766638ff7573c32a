#!/usr/bin/env bash
# llama.cpp for `steerstore verify-export`: PyPI's llama-cpp-python, compiled from its source
# distribution once (about 3 minutes on 2 cores: the CPU backend and the libraries the binding loads,
# no tools, examples or multimodal library) and the wheel cached, so later setups only install it.
#
#   PY         the Python to install into (default python3)
#   LLAMA_CPP  the pip requirement (default llama-cpp-python==0.3.36); empty skips llama.cpp
#   WHEELS     the wheel cache (default ${XDG_CACHE_HOME:-~/.cache}/steerstore/wheels)
set -euo pipefail
PY="${PY:-python3}"
LLAMA_CPP="${LLAMA_CPP-llama-cpp-python==0.3.36}"
WHEELS="${WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/steerstore/wheels}"
if [ -z "$LLAMA_CPP" ]; then echo "llama.cpp skipped (LLAMA_CPP is empty)"; exit 0; fi
for tool in cmake c++; do
  command -v "$tool" >/dev/null || { echo "llama.cpp needs $tool: install cmake and g++ (make system does)" >&2; exit 1; }
done
# portable x86-64 (AVX2) rather than -march=native, so a cached wheel runs on any such machine;
# the binding needs libllama, libggml* and the common library its install step copies
ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
ARGS="$ARGS -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=OFF"
key="$(printf '%s|%s|%s' "$LLAMA_CPP" "$ARGS" "$(uname -m)" | sha256sum | cut -c1-16)"
cache="$WHEELS/llama-cpp-$key"
if ! ls "$cache"/*.whl >/dev/null 2>&1; then
  echo "building $LLAMA_CPP from source (once; cached in $cache)"
  mkdir -p "$WHEELS"
  tmp="$(mktemp -d "$WHEELS/.build-XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT  # a failed build leaves nothing behind
  CMAKE_ARGS="$ARGS" SKBUILD_BUILD_TARGETS="llama;llama-common" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PY" -m pip wheel --quiet --no-deps --no-binary llama-cpp-python -w "$tmp" "$LLAMA_CPP"
  rm -rf "$cache" && mv "$tmp" "$cache"  # the cache appears whole or not at all
fi
"$PY" -m pip install --quiet "$cache"/*.whl
