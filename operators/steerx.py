"""SteerX stages 1–2: leave-one-out causal token effects and preference anchor words.

For each of a user's history items j (input xⱼ, output hⱼ) and every token t of hⱼ:

    Δₜ = log p(hₜ | H⁻ʲ, C, h<ₜ) − log p(hₜ | H̃, C, h<ₜ)

with C the task instruction with xⱼ (``operators/history.history_prompt``, through the chat
template), H⁻ʲ up to k other items of the same user (never j; ``recent`` or ``bm25``), and the
counterfactual H̃ either empty (``counterfactual='empty'``, the paper's ∅) or the same number
of items drawn, seeded, from other users (``other_users``): what any history would make
likely cancels, so text every user repeats stops looking like a preference.

Sub-word tokens are merged into words (a word's effect is the sum of its tokens' Δ: the log
probability ratio of the whole word). A word is an anchor when its effect ≥ τ nats, or in
``percentile`` mode above the user's own percentile; when too few pass, the top ``min_anchors``
are kept. Anchors are aggregated per user (count, mean effect).

The refresh stages (smoothing LLM, style vectors) and influence decoding build on these.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from infra.config import check, option
from operators.history import HistoryContextConfig, context_indices, history_prompt
from operators.runtime import ModelRuntime

_WORD = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)


@dataclass
class SteerXConfig:
    counterfactual: Literal["empty", "other_users"] = option(
        "other_users", help="what replaces the user's other items: empty (the paper's ∅) or items of other users (seeded)")
    tau: float = option(1.0, help="absolute mode: a word is an anchor when its effect is at least τ nats")
    anchor_mode: Literal["absolute", "percentile"] = option("absolute", help="anchor threshold: absolute τ or a per-user percentile")
    percentile: float = option(90.0, help="percentile mode: the per-user percentile of word effects to pass")
    min_anchors: int = option(5, help="when fewer words pass, the top-m words are kept")
    seed: int = option(0, help="seed of the other users' items in the counterfactual")
    history: HistoryContextConfig = dataclasses.field(
        default_factory=lambda: HistoryContextConfig(context_items=4, max_items=8),
        metadata={"help": "context items (k), their selection and how many items are scored"})

    def __post_init__(self) -> None:
        check(0 < self.percentile < 100, "steerx.percentile must be in (0, 100)")
        check(self.min_anchors >= 1, "steerx.min_anchors must be >= 1")


def _rng(seed: int, *keys: str) -> np.random.Generator:
    digest = hashlib.sha256("\x1f".join([str(seed), *keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def loo_prompts(user_id: str, items: Sequence[dict], pool: Sequence[dict], config: SteerXConfig) -> list[dict]:
    """Per scored item: the prompt with the user's other items, the counterfactual prompt, and the output.

    ``items`` are the user's history items sorted by time; ``pool`` holds other users' items
    (each with ``user_id``), used by the ``other_users`` counterfactual — the user's own items
    in it are skipped.
    """
    cfg = config.history
    others = [p for p in pool if p.get("user_id") != user_id]
    out = []
    for j in range(max(0, len(items) - cfg.max_items), len(items)):
        context = [items[i] for i in context_indices(items, j, cfg)]
        counter: list[dict] = []
        if config.counterfactual == "other_users" and context:
            if len(others) < len(context):
                raise ValueError(f"the other-users counterfactual needs {len(context)} items of other users; "
                                 f"the pool has {len(others)}")
            pick = _rng(config.seed, user_id, str(items[j].get("item_id", j))).choice(
                len(others), size=len(context), replace=False)
            counter = [others[i] for i in sorted(pick)]
        out.append({"item_id": items[j].get("item_id"), "output": items[j]["output"],
                    "prompt": history_prompt(context, items[j]["input"], cfg),
                    "counterfactual": history_prompt(counter, items[j]["input"], cfg)})
    return out


def token_effects(runtime: ModelRuntime, scored: Sequence[dict]) -> list[np.ndarray]:
    """Δ per output token of each scored item (both conditions of all items in one batched pass)."""
    n = len(scored)
    encoded = runtime.encode([s["prompt"] for s in scored] + [s["counterfactual"] for s in scored],
                             [s["output"] for s in scored] * 2)
    logp = runtime.token_logprobs(encoded)
    return [(logp[i] - logp[n + i]).double().numpy() for i in range(n)]


def word_effects(tokenizer, text: str, delta: np.ndarray) -> list[tuple[str, float]]:
    """(word, Σ Δ of its tokens) for each word of ``text``, in order; tokens outside words are ignored."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) != len(delta):
        raise ValueError(f"{len(delta)} token effects for {len(offsets)} tokens of the text")
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    sums = [0.0] * len(words)
    w = 0
    for (start, end), d in zip(offsets, delta):
        while w < len(words) and words[w][1] <= start:
            w += 1
        if w < len(words) and start < words[w][1] and end > words[w][0]:
            sums[w] += float(d)
    return [(word, total) for (_, _, word), total in zip(words, sums)]


def select_anchors(item_words: Sequence[tuple[str, list[tuple[str, float]]]], config: SteerXConfig) -> list[dict]:
    """A user's anchors from (item_id, [(word, effect)]) per item: per lowercase word, count and mean effect.

    Sorted by mean effect, best first.
    """
    flat = [(item, word, effect) for item, words in item_words for word, effect in words]
    if not flat:
        return []
    effects = np.asarray([e for _, _, e in flat])
    threshold = config.tau if config.anchor_mode == "absolute" else float(np.percentile(effects, config.percentile))
    passed = [f for f in flat if f[2] >= threshold]
    if len(passed) < config.min_anchors:
        passed = sorted(flat, key=lambda f: -f[2])[: config.min_anchors]
    by_word: dict[str, dict] = {}
    for item, word, effect in passed:
        entry = by_word.setdefault(word.lower(), {"word": word.lower(), "count": 0, "total": 0.0, "items": []})
        entry["count"] += 1
        entry["total"] += effect
        if item not in entry["items"]:
            entry["items"].append(item)
    anchors = [{"word": e["word"], "count": e["count"], "mean_effect": e["total"] / e["count"], "items": e["items"]}
               for e in by_word.values()]
    return sorted(anchors, key=lambda a: (-a["mean_effect"], a["word"]))


def user_anchors(runtime: ModelRuntime, user_id: str, items: Sequence[dict], pool: Sequence[dict],
                 config: SteerXConfig) -> tuple[list[dict], list[dict]]:
    """(scored items with per-token Δ and word effects, anchors) for one user."""
    scored = loo_prompts(user_id, items, pool, config)
    deltas = token_effects(runtime, scored)
    for s, d in zip(scored, deltas):
        s["delta"] = d
        s["words"] = word_effects(runtime.tokenizer, s["output"], d)
    return scored, select_anchors([(s["item_id"], s["words"]) for s in scored], config)
