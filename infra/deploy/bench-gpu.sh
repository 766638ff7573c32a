#!/usr/bin/env bash
# The cost benchmark at Llama-3.1-8B shape on one GPU (random weights, bf16, SDPA), for several
# profiles in one process (the model is built once), on a node that has PyTorch and transformers but
# no steerstore install and no Ray: the repository is imported in place.
#
#   OUT=/some/folder TOKENIZER=/path/to/tokenizer-folder bash infra/deploy/bench-gpu.sh
#
# TOKENIZER: a folder with the default model's tokenizer files (tokenizer.json, tokenizer_config.json,
# chat_template.jinja), e.g. ~/.cache/steerstore/models/smollm2-135m-instruct after `make setup`.
# Writes OUT/bench-cost-<shape>-<profile>-<users>users.json per profile and OUT/device.txt. Takes ~5 minutes on an H200 for 8 users (each profile runs twice: once to warm up).
set -euo pipefail
: "${OUT:?set OUT to the folder for the figures}"
: "${TOKENIZER:?set TOKENIZER to a folder with the tokenizer files of the default model}"
USERS="${USERS:-8}"
ONLY="${PROFILES:-}"   # e.g. PROFILES="default dps-items": only those (default: all)
SHAPE="${SHAPE:-llama-3.1-8b}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
shim="$(mktemp -d)"
ln -s "$repo" "$shim/steerstore"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$OUT/device.txt"
cat "$OUT/device.txt"
python3 - "$OUT" "$TOKENIZER" "$USERS" "$SHAPE" "$ONLY" <<'EOF'
import json, sys, time
from steerstore.infra.config import from_dict
from steerstore.jobs.bench.cost import BenchCostConfig, main

out, tokenizer, users, shape, only = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5].split()
PROFILES = {  # name -> the refresh settings it changes (the first is the baseline of the ratios)
    "default": {},  # DPS scores each user's items as one conversation
    "dps-items": {"dps": {"history": {"arrangement": "items"}}},  # one sequence per item, 2 context items (before)
    "dps8-loo-user": {"dps": {"candidates": 8}, "steerx": {"counterfactual_draw": "user"}},
    "budget": {"dps": {"candidates": 8, "history": {"arrangement": "items", "context_items": 0}},
               "steerx": {"counterfactual_draw": "user", "history": {"context_items": 2}}},
}
summary = {}
for name, settings in PROFILES.items():
    if only and name not in only:
        continue
    start = time.perf_counter()
    result = main(from_dict(BenchCostConfig, {"model": "random", "users": users, "tokenizer": tokenizer,
                                              "shape": shape, "json": f"{out}/bench-cost-{shape}-{name}-{users}users.json",
                                              **settings}))
    summary[name] = {"fte": result["total_forward_token_equivalents"],
                     "measured_users_per_hour": result["measured"]["users_per_hour"],
                     "measured_mfu": result["measured"]["mfu"], "wall_s": round(time.perf_counter() - start, 1)}
    print("PROFILE", name, json.dumps(summary[name]), flush=True)
base = summary[next(iter(summary))]
for name, s in summary.items():
    s["fte_vs_first"] = round(s["fte"] / base["fte"], 3)
    s["users_per_hour_vs_first"] = round(s["measured_users_per_hour"] / base["measured_users_per_hour"], 2)
print(json.dumps(summary, indent=1))
EOF
