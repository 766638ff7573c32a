"""Benchmark of DPS head scoring and decoding on real per-user data, one run, figures as ratios.

Launch: ``steerstore bench dps`` (the default model; reads ``../shared/data``). For one real
user's history items it measures, in the same process:

- **naive exact**: what a plain script does — for each head, for each item, one batch-1 forward
  of the whole model (LM head over every position) with that head ablated;
- **batched exact** (``ModelRuntime.ablation_nll``): all heads' variants batched and forked at
  their block — must equal the naive scores;
- **attribution** (one forward + backward) and **fast mode** (attribution, then exact
  ablation of the top ``candidates``), with their agreement with exact mode (Spearman rank
  correlation over all heads, top-K overlap);
- **agreement over more users**: the same for ``baseline_users`` further real users, and
  **user-specific vs generic**: where the first user's top heads sit with raw PCS and with the
  population baseline (the mean PCS of those other users subtracted);
- **DPS decoding overhead**: greedy decoding with the contrast (two branches) vs plain greedy.
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
from steerstore.operators.dps import select_heads
from steerstore.operators.history import HistoryContextConfig, scoring_sequences
from steerstore.operators.runtime import HeadContrast, ModelConfig, ModelRuntime


@dataclass
class BenchDPSConfig:
    data_dir: str = option("../shared/data", help="folder with the development data")
    source: str = option("blogs", help="blogs or synthpai")
    items: int = option(2, help="history items of the user scored (the reference script used 2)")
    words: int = option(60, help="words per history output")
    context_items: int = option(1, help="other items shown as context per scored item")
    naive_heads: int = option(0, help="heads timed in the naive loop (0 = all); per-head cost is constant")
    top_k: int = option(11, help="K of the top-K overlap (the reference reported top-11)")
    candidates: int = option(32, help="fast mode: heads verified exactly")
    baseline_users: int = option(3, help="other users scored exactly: agreement over more users and the population-baseline figure")
    decode_prompts: int = option(4, help="prompts decoded for the overhead figure")
    max_new_tokens: int = option(32, help="tokens per decoded prompt")
    threads: int | None = option(None, help="torch CPU threads; default torch's")
    seed: int = option(0, help="seed of the item order")
    json: str = option("docs/figures/bench-dps.json", help="where the figures are written ('' = print only)")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})

    def __post_init__(self) -> None:
        check(self.items >= 1 and self.top_k >= 1 and self.candidates >= self.top_k, "items, top_k >= 1; candidates >= top_k")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for value in np.unique(x):  # average ties
            idx = x == value
            r[idx] = r[idx].mean()
        return r
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def top_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


@torch.inference_mode()
def naive_pcs(runtime: ModelRuntime, prompts: list[str], outputs: list[str], heads: list[tuple[int, int]]) -> np.ndarray:
    """Reference: per head, per item, a batch-1 full forward with the head zeroed at o_proj's input."""
    enc = runtime.encode(prompts, outputs)
    tokens = sum(len(e.ids) - e.prompt_len for e in enc)

    def nll(e):
        return -float(naive_response_logprobs(runtime, e).sum())

    base = sum(nll(e) for e in enc)
    out = []
    for head in heads:
        with runtime.head_gating(runtime.head_gates([[head]])):
            out.append((sum(nll(e) for e in enc) - base) / tokens)
    return np.asarray(out)


def main(config: BenchDPSConfig) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    rt = ModelRuntime(config.model)
    need = config.items
    segments = dev_segments(config.data_dir, config.source, need, config.words, random.Random(config.seed))
    user_ids = sorted(segments)
    hist = HistoryContextConfig(context_items=config.context_items, max_items=config.items)

    def sequences(uid):
        items = [{"input": PROMPT.format(opening=o), "output": c} for o, c in segments[uid][: config.items]]
        seqs = scoring_sequences(items, hist)
        return [p for p, _ in seqs], [o for _, o in seqs]

    prompts, outputs = sequences(user_ids[0])
    enc = rt.encode(prompts, outputs)
    tokens = sum(len(e.ids) for e in enc)
    target_tokens = sum(len(e.ids) - e.prompt_len for e in enc)
    heads = [(l, h) for l in range(rt.num_layers) for h in range(rt.num_heads)]
    timed = heads if config.naive_heads <= 0 else heads[:: max(1, len(heads) // config.naive_heads)][: config.naive_heads]

    naive_pcs(rt, prompts, outputs, timed[:1])  # warm-up
    t_naive, ref = best_of(lambda: naive_pcs(rt, prompts, outputs, timed), 1)
    t_naive_all = t_naive * len(heads) / len(timed)

    def batched():
        base, ablated = rt.ablation_nll(enc, heads)
        return ((ablated.sum(1) - base.sum()) / target_tokens).numpy()
    t_exact, exact = best_of(batched, 1)
    idx = [heads.index(h) for h in timed]
    max_diff = float(np.abs(exact[idx] - ref).max())

    t_attr, grads = best_of(lambda: rt.head_attribution(enc, [0] * len(enc), 1)[0].reshape(-1).numpy(), 1)
    estimate = -grads

    def fast():
        cand = sorted(np.argsort(-estimate, kind="stable")[: config.candidates])
        base, ablated = rt.ablation_nll(enc, [heads[i] for i in cand])
        scores = np.full(len(heads), -np.inf)
        scores[cand] = ((ablated.sum(1) - base.sum()) / target_tokens).numpy()
        return scores
    t_fast_exact, fast_scores = best_of(fast, 1)
    t_fast = t_attr + t_fast_exact
    k = config.top_k
    result = {
        "model": rt.model_id, "device": str(rt.device), "dtype": str(next(rt.model.parameters()).dtype),
        "threads": torch.get_num_threads(), "user": user_ids[0], "items": len(enc), "tokens": tokens,
        "target_tokens": target_tokens, "heads": len(heads),
        "naive_heads_timed": len(timed), "naive_seconds_all_heads": round(t_naive_all, 1),
        "exact_batched_seconds": round(t_exact, 2), "exact_speedup_vs_naive": round(t_naive_all / t_exact, 2),
        "exact_heads_per_s": round(len(heads) / t_exact, 1), "exact_vs_naive_max_abs_diff": max_diff,
        "attribution_seconds": round(t_attr, 2), "attribution_speedup_vs_naive": round(t_naive_all / t_attr, 1),
        "attribution_vs_exact_spearman": round(spearman(estimate, exact), 3),
        f"attribution_vs_exact_top{k}_overlap": round(top_overlap(estimate, exact, k), 3),
        "fast_seconds": round(t_fast, 2), "fast_speedup_vs_naive": round(t_naive_all / t_fast, 1),
        "fast_speedup_vs_exact_batched": round(t_exact / t_fast, 2),
        f"fast_vs_exact_top{k}_overlap": round(top_overlap(fast_scores, exact, k), 3),
    }

    # agreement over more users (timings above are the first user's), and the population baseline
    exacts, estimates = [exact], [estimate]
    for uid in user_ids[1: 1 + config.baseline_users]:
        p, o = sequences(uid)
        e = rt.encode(p, o)
        base, ablated = rt.ablation_nll(e, heads)
        exacts.append(((ablated.sum(1) - base.sum()) / sum(len(x.ids) - x.prompt_len for x in e)).numpy())
        estimates.append(-rt.head_attribution(e, [0] * len(e), 1)[0].reshape(-1).numpy())
    def fast_scores_for(ex, est, n):  # what fast mode keeps: exact scores of attribution's top n
        return np.where(np.isin(np.arange(len(heads)), np.argsort(-est)[:n]), ex, -np.inf)
    fast_top = [fast_scores_for(ex, est, config.candidates) for ex, est in zip(exacts, estimates)]
    result.update({
        "agreement_users": len(exacts),
        "attribution_vs_exact_spearman_per_user": [round(spearman(a, b), 3) for a, b in zip(estimates, exacts)],
        f"attribution_vs_exact_top{k}_overlap_per_user": [round(top_overlap(a, b, k), 3) for a, b in zip(estimates, exacts)],
        f"fast_vs_exact_top{k}_overlap_per_user": [round(top_overlap(f, b, k), 3) for f, b in zip(fast_top, exacts)],
        # mean top-K overlap of fast mode as a function of dps.candidates (exact cost grows ~linearly with it)
        f"fast_top{k}_overlap_by_candidates": {
            n: round(float(np.mean([top_overlap(fast_scores_for(ex, est, n), ex, k)
                                    for ex, est in zip(exacts, estimates)])), 3)
            for n in (k, 16, 24, 32, 48, 64, 96) if n >= k},
    })
    if len(exacts) > 1:
        baseline = np.mean(exacts[1:], axis=0)
        group = max(1, rt.num_heads // rt.num_kv_heads)
        raw = select_heads(exact, exact, heads, k, group)
        rel = select_heads(exact - baseline, exact, heads, k, group)
        result.update({
            "baseline_users": len(exacts) - 1,
            "raw_top_head_layers": [h["layer"] for h in raw],
            "raw_top_pcs": [round(h["pcs"], 3) for h in raw[:5]],
            "population_top_head_layers": [h["layer"] for h in rel],
            "population_top_scores": [round(h["score"], 3) for h in rel[:5]],
            "raw_vs_population_top_overlap": round(len({(h["layer"], h["head"]) for h in raw}
                                                       & {(h["layer"], h["head"]) for h in rel}) / k, 3),
        })

    decode_prompts = [PROMPT.format(opening=o) for uid in user_ids[: config.decode_prompts]
                      for o, _ in segments[uid][:1]]
    top = [heads[i] for i in np.argsort(-exact)[:8]]
    contrast = HeadContrast([top] * len(decode_prompts), gamma=1.0)
    rt.generate(decode_prompts[:1], max_new_tokens=2)  # warm-up
    t_plain, plain = best_of(lambda: rt.generate(decode_prompts, config.max_new_tokens), 1)
    t_dps, steered = best_of(lambda: rt.generate(decode_prompts, config.max_new_tokens, contrast=contrast), 1)
    # per generated token (+1 for the end-of-turn token), as the two may stop at different lengths
    n_plain = sum(len(x) + 1 for x in rt.response_ids(plain))
    n_dps = sum(len(x) + 1 for x in rt.response_ids(steered))
    result.update({"decode_prompts": len(decode_prompts), "max_new_tokens": config.max_new_tokens,
                   "plain_decode_ms_per_token": round(1000 * t_plain / n_plain, 2),
                   "dps_decode_ms_per_token": round(1000 * t_dps / n_dps, 2),
                   "dps_decode_overhead_per_token": round((t_dps / n_dps) / (t_plain / n_plain), 2)})
    write_figures(result, config.json)
    return result
