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

``SteerXAnchors`` runs both stages as a refresh actor stage. Stage 3, the smoothing LLM that
writes a style description S from the anchors, is ``operators/smoothing.py``.

Stage 4, style vectors (``SteerXStyleVectors``) and their calibration, is ``operators/style.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa

from steerstore.infra.config import check, option
from steerstore.operators.history import HistoryContextConfig, context_indices, history_prompt
from steerstore.operators.runtime import ModelConfig, ModelRuntime
from steerstore.operators.smoothing import SmoothingConfig
from steerstore.operators.style import SOURCES, StyleVectorConfig
from steerstore.operators.validate import isolate_failures, require_columns
from steerstore.schemas.store import HISTORY_STRUCT, STEERX_ANCHOR_STRUCT

_WORD = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)


@dataclass
class SteerXConfig:
    enabled: bool = option(True, help="compute SteerX token effects and anchors (needs inputs.histories)")
    token_effects: bool = option(False, help="also write every scored token's effect (steerx_token_effects table)")
    pool_users: int = option(64, help="users (seeded sample) whose items form the other-users counterfactual pool")
    counterfactual: Literal["empty", "other_users"] = option(
        "other_users", help="what replaces the user's other items: empty (the paper's ∅) or items of other users (seeded)")
    tau: float = option(
        0.75, help="absolute mode: a word is an anchor when its effect is at least τ nats (0.75: best held-out F1 on "
                   "the blogs dev users under other_users, tied best on the tuning half; 1.0 under empty; "
                   "steerstore bench tau)")
    anchor_mode: Literal["absolute", "percentile"] = option("absolute", help="anchor threshold: absolute τ or a per-user percentile")
    percentile: float = option(90.0, help="percentile mode: the per-user percentile of word effects to pass")
    min_anchors: int = option(5, help="when fewer words pass, the top-m words with a positive effect are kept")
    counterfactual_draw: Literal["user", "context", "item"] = option(
        "item", help="other_users: one seeded draw of other users' items per user, shared by all its scored items "
                     "(the shared context is computed once); one per factual context, shared by the items scored "
                     "behind the same context items (history.selection=blocks: one per block); or a new draw per item")
    seed: int = option(0, help="seed of the other users' items in the counterfactual")
    history: HistoryContextConfig = dataclasses.field(
        default_factory=lambda: HistoryContextConfig(context_items=4, max_items=8),
        metadata={"help": "context items (k), their selection and how many items are scored"})
    smoothing: SmoothingConfig = dataclasses.field(default_factory=SmoothingConfig,
                                                   metadata={"help": "stage 3: the smoothing LLM"})
    vectors: StyleVectorConfig = dataclasses.field(default_factory=StyleVectorConfig,
                                                   metadata={"help": "stage 4: style vectors"})

    def __post_init__(self) -> None:
        check(0 < self.percentile < 100, "steerx.percentile must be in (0, 100)")
        check(self.min_anchors >= 1, "steerx.min_anchors must be >= 1")
        check(self.pool_users >= 2, "steerx.pool_users must be >= 2")
        check(self.history.arrangement == "items", "steerx.history.arrangement must be items: leave-one-out scores "
                                                   "each item behind its own context (conversation is for DPS)")
        check(not (self.vectors.enabled and self.vectors.source != "history" and not self.smoothing.enabled),
              f"steerx.vectors.source={self.vectors.source} needs descriptions: enable steerx.smoothing "
              "or use steerx.vectors.source=history")

    @property
    def sources(self) -> list[str]:
        """The style-vector sources this configuration computes."""
        return list(SOURCES) if self.smoothing.enabled else ["history"]


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
        shown = context_indices(items, j, cfg)
        context = [items[i] for i in shown]
        counter: list[dict] = []
        if config.counterfactual == "other_users" and context:
            if len(others) < len(context):
                raise ValueError(f"the other-users counterfactual needs {len(context)} items of other users; "
                                 f"the pool has {len(others)}")
            keys = {"user": (user_id,), "item": (user_id, str(items[j].get("item_id", j))),
                    "context": (user_id, "context", *map(str, shown))}[config.counterfactual_draw]
            pick = _rng(config.seed, *keys).choice(
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

    Sorted by mean effect, best first. A word whose effect is not positive is never an anchor (the
    user's history did not make it more likely), in the percentile mode and in the top-m fallback
    too: a user without any positive word gets no anchors, hence no description.
    """
    flat = [(item, word, effect) for item, words in item_words for word, effect in words]
    if not flat:
        return []
    effects = np.asarray([e for _, _, e in flat])
    threshold = config.tau if config.anchor_mode == "absolute" else float(np.percentile(effects, config.percentile))
    positive = [f for f in flat if f[2] > 0]
    passed = [f for f in positive if f[2] >= threshold]
    if len(passed) < config.min_anchors:
        passed = sorted(positive, key=lambda f: -f[2])[: config.min_anchors]
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


TOKEN_EFFECTS_STRUCT = pa.struct([("item_id", pa.string()), ("tokens", pa.list_(pa.string())),
                                  ("delta", pa.list_(pa.float32()))])

# one row per user out of the SteerXAnchors actors
STEERX_OUTPUT_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),
    pa.field("status", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("anchors", pa.list_(STEERX_ANCHOR_STRUCT)),
    pa.field("n_items", pa.int32()),
    pa.field("n_tokens", pa.int32()),
    pa.field("token_effects", pa.list_(TOKEN_EFFECTS_STRUCT)),
    pa.field("histories", pa.list_(HISTORY_STRUCT)),  # passed through for the later stages
    pa.field("model_id", pa.string()),
    pa.field("model_fingerprint", pa.string()),
    pa.field("content_fingerprint", pa.string()),
])


class SteerXAnchors:
    """User rows (user_id, histories) -> STEERX_OUTPUT_SCHEMA rows: leave-one-out effects and anchors.

    Rows in == rows out. Both conditions of every item of every user in the batch go through the
    model together; a user that fails is returned quarantined with the reason.
    """

    def __init__(self, config: SteerXConfig, model: ModelConfig, pool: list[dict]):
        self.config = config
        self.runtime = ModelRuntime.shared(model)
        self.pool = pool

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(type(self).__name__, batch, ["user_id", "histories", "content_fingerprint"])
        users = batch.select(["user_id", "histories", "content_fingerprint"]).to_pylist()
        for user in users:
            user["histories"] = user["histories"] or []
        rows, ready = [], []
        for user in users:
            try:
                if len(user["histories"]) < 2:
                    raise ValueError(f"SteerX needs at least 2 history items (leave one out); the user has "
                                     f"{len(user['histories'])}")
                ready.append((user, loo_prompts(user["user_id"], user["histories"], self.pool, self.config)))
            except ValueError as exc:
                rows.append(self._row(user, status="quarantined", reason=f"steerx: {exc}"))
        rows += isolate_failures(ready, self._score, lambda ready_user, exc: self._row(
            ready_user[0], status="quarantined", reason=f"steerx failed: {type(exc).__name__}: {str(exc)[:300]}"))
        order = {u["user_id"]: i for i, u in enumerate(users)}
        rows.sort(key=lambda r: order[r["user_id"]])
        return pa.Table.from_pylist(rows, schema=STEERX_OUTPUT_SCHEMA)

    def _row(self, user: dict, **values) -> dict:
        row = {"user_id": user["user_id"], "status": "ok", "reason": None, "anchors": [], "n_items": 0,
               "n_tokens": 0, "token_effects": None, "histories": user["histories"], "model_id": self.runtime.model_id,
               "model_fingerprint": self.runtime.fingerprint, "content_fingerprint": user["content_fingerprint"]}
        row.update(values)
        return row

    def _score(self, ready: list[tuple[dict, list[dict]]]) -> list[dict]:
        if not ready:
            return []
        flat = [s for _, scored in ready for s in scored]
        deltas = token_effects(self.runtime, flat)
        tok = self.runtime.tokenizer
        rows, start = [], 0
        for user, scored in ready:
            mine = deltas[start:start + len(scored)]
            start += len(scored)
            words = [(s["item_id"], word_effects(tok, s["output"], d)) for s, d in zip(scored, mine)]
            effects = None
            if self.config.token_effects:
                effects = [{"item_id": s["item_id"], "delta": d.astype(np.float32).tolist(),
                            "tokens": tok.convert_ids_to_tokens(self.runtime.response_ids([s["output"]])[0])}
                           for s, d in zip(scored, mine)]
            rows.append(self._row(user, anchors=select_anchors(words, self.config), n_items=len(scored),
                                  n_tokens=int(sum(len(d) for d in mine)), token_effects=effects))
        return rows
