"""Per-user steering directions on an evaluation's held-out pairs: which estimator raises the own-vs-other margin?

Launch: ``steerstore bench directions --inputs <eval out>/inputs`` (the folder ``steerstore eval`` writes:
``train_pairs.jsonl`` and ``heldout_pairs.jsonl``, e.g. from ``--config infra/deploy/eval-dev-cpu.yaml``).

Per user, from its training pairs only, at one layer (``caa.recommended_layers``' default, 40% of depth):

- ``caa``: the refresh's per-user CAA vector: the mean activation difference h(prompt ⊕ chosen) −
  h(prompt ⊕ rejected) over the response tokens, shrunk toward the population by ``caa.shrinkage`` pseudo-pairs
  (``operators/caa.py``; pair weights are 1 here);
- ``caa_margin_gradient``: the refresh's vector under ``caa.direction: margin_gradient``: each pair contributes the
  gradient of its margin, mean log p(chosen) − mean log p(rejected) per token, with respect to a vector added at
  that layer from the last prompt token on (as the vector is served), rescaled to the norm of its activation
  difference; the user's mean is shrunk toward the population's like CAA;
- ``margin_gradient_sum``: the plain sum of the user's pairs' gradients (no per-pair rescaling, no shrinkage);
- ``population_gradient``: the population's mean of the rescaled gradients, the same for every user (is the
  gain per-user?);
- ``random``: a random direction per user (the null).

Every direction except ``caa`` is rescaled to the norm of the user's CAA vector, so one α means the same
step length. A held-out pair (prompt, the user's own text, the rejected text: the model's own answer or
another user's text) counts when steering by α·v raises log p(own) − log p(rejected). Reported: the share of
held-out pairs, overall and per kind of rejected text, with a 95% bootstrap CI that resamples users.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from steerstore.infra import storage
from steerstore.infra.config import check, option
from steerstore.jobs.bench.common import write_figures
from steerstore.operators.caa import CAAConfig, margin_gradients, pair_differences, scaled_to, shrink
from steerstore.operators.metrics import bootstrap_ci
from steerstore.operators.runtime import ModelConfig, ModelRuntime, Steering

DIRECTIONS = ("caa", "caa_margin_gradient", "margin_gradient_sum", "population_gradient", "random")


@dataclass
class BenchDirectionsConfig:
    inputs: str = option("", help="an evaluation's inputs folder (train_pairs.jsonl, heldout_pairs.jsonl)")
    alpha: float = option(0.5, help="the multiplier every direction is scored at (the eval preset's per-user CAA α)")
    layer: int = option(-1, help="the layer; -1: caa's default recommended layer (40% of depth)")
    seed: int = option(0, help="seed of the random directions and the bootstrap")
    json: str = option("docs/figures/bench-directions.json", help="where the figures are written ('' = print only)")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})
    caa: CAAConfig = dataclasses.field(default_factory=CAAConfig, metadata={"help": "CAA settings (shrinkage)"})

    def __post_init__(self) -> None:
        check(bool(self.inputs), "bench directions needs --inputs (an evaluation's inputs folder)")
        check(self.alpha > 0, "alpha must be > 0")


def _read(folder: str, name: str) -> list[dict]:
    return [json.loads(line) for line in storage.read_text(storage.join(folder, name)).splitlines() if line.strip()]


def directions(runtime: ModelRuntime, train: dict[str, list[dict]], layer: int, kappa: float,
               seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Each estimator's direction per user (see the module docstring), from the users' training pairs."""
    users = sorted(train)
    flat = [p for u in users for p in train[u]]
    d = pair_differences(runtime, flat, [layer], "mean")[:, 0]
    g = margin_gradients(runtime, flat, [layer])[:, 0]
    e = scaled_to(g, d)  # what each pair contributes under caa.direction: margin_gradient
    spans, start = {}, 0
    for u in users:
        spans[u] = slice(start, start + len(train[u]))
        start += len(train[u])
    pop_d, pop_e = d.mean(0), e.mean(0)
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in DIRECTIONS}
    for u in users:
        n = len(train[u])
        caa = shrink(d[spans[u]].mean(0), n, pop_d, kappa)
        norm = float(np.linalg.norm(caa))

        def scaled(v: np.ndarray) -> np.ndarray:
            return (v / max(float(np.linalg.norm(v)), 1e-12) * norm).astype(np.float32)
        out["caa"][u] = caa.astype(np.float32)
        out["caa_margin_gradient"][u] = scaled(shrink(e[spans[u]].mean(0), n, pop_e, kappa))
        out["margin_gradient_sum"][u] = scaled(g[spans[u]].sum(0))
        out["population_gradient"][u] = scaled(pop_e)
        out["random"][u] = scaled(rng.standard_normal(runtime.hidden_size))
    return out


def steered_margins(runtime: ModelRuntime, pairs: list[dict], vectors: list[np.ndarray], layer: int, alpha: float,
                    base: tuple[torch.Tensor, torch.Tensor]) -> np.ndarray:
    """Per held-out pair: the change in log p(chosen) − log p(rejected) when steered by α·vectors[i]."""
    prompts = [p["prompt"] for p in pairs]
    steer = Steering({layer: torch.as_tensor(np.stack(vectors))}, torch.full((len(pairs),), float(alpha)), "response")
    c, _ = runtime.response_logprobs(prompts, [p["chosen"] for p in pairs], steer, min_shared=16)
    r, _ = runtime.response_logprobs(prompts, [p["rejected"] for p in pairs], steer, min_shared=16)
    return ((c - base[0]) - (r - base[1])).numpy()


def share(pairs: list[dict], raised: np.ndarray, seed: int) -> dict:
    """The share of pairs whose margin rose, with a 95% CI resampling users (each weighted by its pairs)."""
    by_user: dict[str, list[bool]] = defaultdict(list)
    for p, up in zip(pairs, raised):
        by_user[p["user_id"]].append(bool(up))
    values = [float(np.mean(v)) for v in by_user.values()]
    mean, lo, hi = bootstrap_ci(values, seed=seed, weights=[len(v) for v in by_user.values()])
    return {"share": round(mean, 4), "ci": [round(lo, 4), round(hi, 4)], "pairs": len(pairs), "users": len(by_user)}


def main(config: BenchDirectionsConfig) -> dict:
    t0 = time.perf_counter()
    train_pairs, held = _read(config.inputs, "train_pairs.jsonl"), _read(config.inputs, "heldout_pairs.jsonl")
    train: dict[str, list[dict]] = defaultdict(list)
    for p in train_pairs:
        train[p["user_id"]].append(p)
    held = [p for p in held if p["user_id"] in train]
    check(bool(held), "no held-out pair belongs to a user with training pairs")
    runtime = ModelRuntime(config.model)
    runtime.model.requires_grad_(False)
    layer = config.layer if config.layer >= 0 else config.caa.resolve_layers(runtime.num_layers)[1][0]
    found = directions(runtime, dict(train), layer, config.caa.shrinkage, config.seed)
    t_fit = time.perf_counter() - t0
    prompts = [p["prompt"] for p in held]
    base = (runtime.response_logprobs(prompts, [p["chosen"] for p in held], min_shared=16)[0],
            runtime.response_logprobs(prompts, [p["rejected"] for p in held], min_shared=16)[0])
    kinds = sorted({p.get("rejected_kind") or "other_user" for p in held})
    results = {}
    for name in DIRECTIONS:
        raised = steered_margins(runtime, held, [found[name][p["user_id"]] for p in held], layer, config.alpha,
                                 base) > 0
        row = {"all": share(held, raised, config.seed)}
        for kind in kinds:
            idx = [i for i, p in enumerate(held) if (p.get("rejected_kind") or "other_user") == kind]
            row[kind] = share([held[i] for i in idx], raised[idx], config.seed)
        results[name] = row
        print(f"{name:24s} " + "  ".join(f"{k} {v['share']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]"
                                          for k, v in row.items()), flush=True)
    out = {"benchmark": "directions", "model": runtime.model_id, "layer": layer, "alpha": config.alpha,
           "shrinkage": config.caa.shrinkage, "users": len({p["user_id"] for p in held}),
           "train_pairs": len(train_pairs), "heldout_pairs": len(held), "results": results,
           "ratio_to_caa": {name: round(r["all"]["share"] / max(results["caa"]["all"]["share"], 1e-12), 3)
                            for name, r in results.items()},
           "seconds": {"fit": round(t_fit, 1), "total": round(time.perf_counter() - t0, 1)}}
    write_figures(out, config.json, quiet=True)
    return out


__all__ = ["BenchDirectionsConfig", "DIRECTIONS", "directions", "main"]
