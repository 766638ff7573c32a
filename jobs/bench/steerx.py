"""Benchmark of SteerX on real data: each stage batched vs its plain baseline, in one run, and cost per user.

Launch: ``steerstore bench steerx`` (the default model; reads ``../shared/data``).

1. Leave-one-out scoring: for a few real users' history items, both conditions (the user's
   other items as context, and the counterfactual) are scored for every output token. The
   baseline is what a plain script does: one item, one condition, batch 1, a full forward with
   log-softmax at every position.
2. Smoothing generation: the users' smoothing prompts (from the anchors just found) generated
   as one left-padded batch vs one prompt at a time (greedy both ways).
3. Style vectors: neutral answers + activation passes for every item, and the
   leave-one-item-out calibration, timed per user.

Both variants of a comparison run in the same process on the same inputs; the figures are ratios.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np
import torch

from steerstore.infra.config import check, option
from steerstore.jobs.bench.common import best_of, naive_response_logprobs, write_figures
from steerstore.jobs.devdata import PROMPT
from steerstore.jobs.devdata import segments as dev_segments
from steerstore.operators.history import HistoryContextConfig
from steerstore.operators.runtime import ModelConfig, ModelRuntime
from steerstore.operators.smoothing import SmoothingConfig, special_strings, unit_prompt, units
from steerstore.operators.steerx import SteerXConfig, loo_prompts, select_anchors, token_effects, word_effects
from steerstore.operators.style import SOURCES, StyleVectorConfig, combine, item_differences, validation_gains


@dataclass
class BenchSteerXConfig:
    data_dir: str = option("../shared/data", help="folder with the development data")
    source: str = option("blogs", help="blogs or synthpai")
    users: int = option(4, help="real users")
    items: int = option(4, help="history items per user (all scored)")
    words: int = option(60, help="words per history output")
    context_items: int = option(2, help="other items of the user shown as context (k)")
    counterfactual: str = option("other_users", help="empty or other_users")
    threads: int | None = option(None, help="torch CPU threads; default torch's")
    seed: int = option(0, help="seed of the item order and the counterfactual")
    smoothing_tokens: int = option(96, help="max new tokens of each smoothing generation")
    json: str = option("docs/figures/bench-steerx.json", help="where the figures are written ('' = print only)")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})

    def __post_init__(self) -> None:
        check(self.users >= 2 and self.items >= 2, "need >= 2 users and >= 2 items per user")
        check(self.counterfactual in ("empty", "other_users"), "counterfactual must be empty or other_users")


@torch.inference_mode()
def naive_effects(runtime: ModelRuntime, scored: list[dict]) -> list[np.ndarray]:
    """Reference: per item, per condition, a batch-1 full forward with log-softmax at every position."""
    def logp(prompt: str, output: str) -> np.ndarray:
        return naive_response_logprobs(runtime, runtime.encode([prompt], [output])[0]).numpy()
    return [logp(s["prompt"], s["output"]) - logp(s["counterfactual"], s["output"]) for s in scored]


def main(config: BenchSteerXConfig) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    rt = ModelRuntime(config.model)
    segments = dev_segments(config.data_dir, config.source, config.items, config.words, random.Random(config.seed))
    users = sorted(segments)[: config.users]
    items = {u: [{"item_id": f"{u}-{k}", "user_id": u, "input": PROMPT.format(opening=o), "output": c}
                 for k, (o, c) in enumerate(segments[u][: config.items])] for u in users}
    pool = [it for u in users for it in items[u]]
    sx = SteerXConfig(counterfactual=config.counterfactual, seed=config.seed,  # type: ignore[arg-type]
                      history=HistoryContextConfig(context_items=config.context_items, max_items=config.items))
    scored = [s for u in users for s in loo_prompts(u, items[u], pool, sx)]
    encoded = rt.encode([s["prompt"] for s in scored] + [s["counterfactual"] for s in scored],
                        [s["output"] for s in scored] * 2)
    tokens = sum(len(e.ids) for e in encoded)
    scored_tokens = sum(len(e.ids) - e.prompt_len for e in encoded[: len(scored)])
    naive_effects(rt, scored[:1])  # warm-up
    t_naive, ref = best_of(lambda: naive_effects(rt, scored), 1)
    t_batched, got = best_of(lambda: token_effects(rt, scored), 1)
    n_users = len(users)
    # anchors per user from the batched effects
    anchors, start = {}, 0
    for u in users:
        mine = scored[start:start + len(items[u])]
        words = [(s["item_id"], word_effects(rt.tokenizer, s["output"], d))
                 for s, d in zip(mine, got[start:start + len(items[u])])]
        anchors[u] = select_anchors(words, sx)
        start += len(items[u])
    # smoothing: one batch vs one prompt at a time
    sm = SmoothingConfig(max_new_tokens=config.smoothing_tokens)
    specials = special_strings(rt.tokenizer)
    prompts = [unit_prompt(unit, "excerpts", sm, specials) for u in users for unit in units(u, anchors[u], items[u], sm)]
    t_seq, seq_out = best_of(lambda: [rt.generate([p], sm.max_new_tokens)[0] for p in prompts], 1)
    t_batch_gen, batch_out = best_of(lambda: rt.generate(prompts, sm.max_new_tokens), 1)
    gen_tokens = sum(len(rt.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in batch_out)
    # style vectors: neutral answers + activations for all items at once, then calibration per user
    vc = StyleVectorConfig()
    layers = vc.resolve_layers(rt.num_layers)
    flat = [it for u in users for it in items[u]]
    contexts = [batch_out[k] for k, u in enumerate(users) for _ in items[u]]
    t_vec, (diffs, _) = best_of(lambda: item_differences(rt, flat, contexts, layers, vc.position,
                                                         vc.neutral_max_new_tokens), 1)
    u0 = users[0]  # a calibration user: its last validation_items scored under vectors from the others
    n0, held = len(items[u0]), vc.validation_items
    mine = {k: v[: n0 - held] for k, v in diffs.items()}
    vectors = combine(mine, list(SOURCES), vc.blend_weight)
    t_cal, _ = best_of(lambda: validation_gains(rt, items[u0][n0 - held:], vectors, batch_out[0], list(SOURCES),
                                                layers, vc), 1)
    result = {
        "model": rt.model_id, "device": str(rt.device), "dtype": str(next(rt.model.parameters()).dtype),
        "threads": torch.get_num_threads(), "users": len(users), "items": len(scored),
        "counterfactual": config.counterfactual, "context_items": config.context_items,
        "sequences": len(encoded), "tokens": tokens, "output_tokens_scored": scored_tokens,
        "naive_seconds": round(t_naive, 2), "batched_seconds": round(t_batched, 2),
        "naive_tokens_per_s": round(tokens / t_naive, 1), "batched_tokens_per_s": round(tokens / t_batched, 1),
        "naive_effects_per_s": round(scored_tokens / t_naive, 1),
        "batched_effects_per_s": round(scored_tokens / t_batched, 1),
        "speedup": round(t_naive / t_batched, 2),
        "max_abs_diff": float(max(np.abs(a - b).max() for a, b in zip(got, ref))),
        "smoothing": {"prompts": len(prompts), "max_new_tokens": sm.max_new_tokens, "generated_tokens": gen_tokens,
                      "sequential_seconds": round(t_seq, 2), "batched_seconds": round(t_batch_gen, 2),
                      "speedup": round(t_seq / t_batch_gen, 2),
                      "same_text": sum(a == b for a, b in zip(seq_out, batch_out)),
                      "example": batch_out[0]},
        "per_user_seconds": {"anchors": round(t_batched / n_users, 2), "smoothing": round(t_batch_gen / n_users, 2),
                             "style_vectors": round(t_vec / n_users, 2),
                             "calibration_user": round(t_cal, 2)},
        "vectors": {"layers": layers, "sources": list(SOURCES), "gamma_grid": vc.gamma_grid},
    }
    write_figures(result, config.json)
    return result
