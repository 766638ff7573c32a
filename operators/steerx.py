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

Stage 4, style vectors (``SteerXStyleVectors``), per layer and history item j, at the last
token (StyleVector's convention):

    history:     h(xⱼ ⊕ hⱼ) − h(xⱼ ⊕ nⱼ)      the user's real response vs the model's own
                                             unpersonalised greedy answer nⱼ to xⱼ
    description: h(S ⊕ xⱼ ⊕ nⱼ) − h(xⱼ ⊕ nⱼ)  the description in the prompt vs not, on nⱼ

each averaged over items; ``blend`` mixes the two. ``history`` is the StyleVector baseline,
``description``/``blend`` are SteerX. The recommended layer and γ per source, and the influence
λ, are chosen on a seeded sample of calibration users, out of sample: each calibration user's
most recent ``validation_items`` are held out, its anchors, description S and vectors are
computed from the rest, and the held-out items' real responses are scored under them, γ·v
added at one layer (or influence decoding's distribution with S at λ, teacher-forced). The
(layer, γ) and the λ with the highest log-likelihood gain per token over the plain prompt win
(a vector that breaks fluency lowers it). Stage 5, influence decoding with S, is
``ModelRuntime.generate(influence=...)``; its with-context prompt is ``STYLE_TEMPLATE`` as here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import torch

from steerstore.infra.config import check, option
from steerstore.operators.history import HistoryContextConfig, context_indices, history_prompt, retrieved_prompt
from steerstore.operators.runtime import ModelConfig, ModelRuntime, Position, Steering, SteerPositions
from steerstore.operators.smoothing import SmoothingConfig, user_context
from steerstore.operators.validate import isolate_failures, require_columns
from steerstore.schemas.store import HISTORY_STRUCT, STEERX_ANCHOR_STRUCT

_WORD = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)
SOURCES = ("history", "description", "blend")
# how a style description S enters a prompt (description vectors and influence decoding)
# (on SmolLM2-135M, a header that ends with an instruction after S made the model echo S more)
STYLE_TEMPLATE = "Answer in this style: {context}\n\nQuestion: {prompt}"


def style_prompt(description: str, prompt: str) -> str:
    return STYLE_TEMPLATE.format(context=description, prompt=prompt) if description else prompt


@dataclass
class StyleVectorConfig:
    enabled: bool = option(True, help="compute style vectors (SteerX stage 4)")
    layers: list[int] = option([], help="layers to compute and store; empty = the layers at 50%, 60% and 70% of depth")
    source: Literal["history", "description", "blend"] = option(
        "blend", help="the source serving uses by default (all computed sources are stored)")
    blend_weight: float = option(0.5, help="blend = (1 − w)·history + w·description")
    position: Position = option("last", help="activation per response: its last token (StyleVector) or the mean")
    apply_positions: SteerPositions = option("all", help="where serving adds the vector: all positions or response")
    neutral_max_new_tokens: int = option(48, help="length of the model's unpersonalised greedy answer nⱼ")
    gamma_grid: list[float] = option([0.25, 0.5, 1.0, 2.0, 4.0], help="candidate γ for the recommended strength")
    calibration_users: int = option(8, help="users (seeded sample) the recommended layer, γ and influence λ are "
                                            "chosen on")
    validation_items: int = option(
        2, help="per calibration user: its most recent items, held out of its anchors, description and vectors and "
                "scored under them (the choice of layer, γ and λ is out of sample)")
    lambda_grid: list[float] = option([0.0, 0.5, 1.0, 2.0], help="candidate influence-decoding λ (0: the "
                                      "description in the prompt), chosen on the same validation items")
    seed: int = option(0, help="seed of the calibration sample")

    def __post_init__(self) -> None:
        check(0.0 <= self.blend_weight <= 1.0, "steerx.vectors.blend_weight must be in [0, 1]")
        check(bool(self.gamma_grid) and all(g > 0 for g in self.gamma_grid), "steerx.vectors.gamma_grid must be > 0")
        check(self.neutral_max_new_tokens >= 1, "steerx.vectors.neutral_max_new_tokens must be >= 1")
        check(self.calibration_users >= 1, "steerx.vectors.calibration_users must be >= 1")
        check(self.validation_items >= 1, "steerx.vectors.validation_items must be >= 1")
        check(all(lam >= 0 for lam in self.lambda_grid), "steerx.vectors.lambda_grid must be >= 0")

    def resolve_layers(self, num_layers: int) -> list[int]:
        layers = sorted(set(self.layers)) or sorted({min(num_layers - 1, round(f * num_layers)) for f in (0.5, 0.6, 0.7)})
        bad = [l for l in layers if not 0 <= l < num_layers]
        if bad:
            raise ValueError(f"steerx.vectors.layers {bad} do not exist: the model has layers 0..{num_layers - 1}")
        return layers


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
    counterfactual_draw: Literal["user", "item"] = option(
        "item", help="other_users: one seeded draw of other users' items per user, shared by all its scored items "
                     "(the shared context is computed once), or a new draw per item")
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
        context = [items[i] for i in context_indices(items, j, cfg)]
        counter: list[dict] = []
        if config.counterfactual == "other_users" and context:
            if len(others) < len(context):
                raise ValueError(f"the other-users counterfactual needs {len(context)} items of other users; "
                                 f"the pool has {len(others)}")
            keys = (user_id,) if config.counterfactual_draw == "user" else (user_id, str(items[j].get("item_id", j)))
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


# ---- stage 4: style vectors ---------------------------------------------------------------------

STYLE_OUTPUT_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),
    pa.field("status", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("layers", pa.list_(pa.int32())),
    pa.field("sources", pa.list_(pa.string())),
    pa.field("vectors", pa.list_(pa.list_(pa.list_(pa.float32())))),  # (sources, layers, hidden)
    pa.field("n_items", pa.int32()),
    # calibration users only: (source, layer, γ) -> the validation items' summed log-likelihood gain and tokens
    # (source 'influence': layer −1, γ holds λ)
    pa.field("calibration", pa.list_(pa.struct([("condition", pa.string()), ("source", pa.string()), ("layer", pa.int32()),
                                                ("gamma", pa.float32()), ("gain", pa.float64()),
                                                ("tokens", pa.int64())]))),
    pa.field("model_id", pa.string()),
    pa.field("model_fingerprint", pa.string()),
    pa.field("hidden_size", pa.int32()),
])


def item_differences(runtime: ModelRuntime, items: Sequence[dict], contexts: Sequence[str], layers: list[int],
                     position: Position, max_new_tokens: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per item, per layer: the history and description differences, and the neutral answers nⱼ.

    ``items`` are (input, output) dicts; ``contexts`` the description S used for each item ('' = none,
    then the description difference is 0). Returns ({'history': (items, layers, hidden),
    'description': ...}, neutral answers). All items go through the model together.
    """
    inputs = [it["input"] for it in items]
    neutral = runtime.generate(inputs, max_new_tokens=max_new_tokens)
    empty = [i for i, n in enumerate(neutral) if not n.strip()]
    if empty:
        raise ValueError(f"the model's unpersonalised answer is empty for {len(empty)} item(s)")
    real = runtime.activations(inputs, [it["output"] for it in items], layers, position)
    base = runtime.activations(inputs, neutral, layers, position)
    described = [i for i, c in enumerate(contexts) if c]
    desc = torch.zeros_like(base)
    if described:
        with_s = runtime.activations([style_prompt(contexts[i], inputs[i]) for i in described],
                                     [neutral[i] for i in described], layers, position)
        desc[described] = with_s - base[described]
    return {"history": (real - base).numpy(), "description": desc.numpy()}, neutral


def source_differences(diffs: dict[str, np.ndarray], source: str, blend_weight: float) -> np.ndarray:
    """Per-item differences (items, layers, hidden) of one source; blend mixes history and description."""
    if source == "blend":
        return (1 - blend_weight) * diffs["history"] + blend_weight * diffs["description"]
    return diffs[source]


def combine(diffs: dict[str, np.ndarray], sources: Sequence[str], blend_weight: float) -> np.ndarray:
    """Style vectors (sources, layers, hidden): the mean difference over items per source."""
    return np.stack([source_differences(diffs, s, blend_weight).mean(0) for s in sources])


def validation_gains(runtime: ModelRuntime, items: Sequence[dict], vectors: np.ndarray, description: str,
                     sources: Sequence[str], layers: list[int], config: StyleVectorConfig,
                     train: Sequence[dict] = (), composed: HistoryContextConfig | None = None) -> list[dict]:
    """Log-likelihood gains of held-out items' real responses per (source, layer, γ) and per influence λ.

    ``vectors`` (sources, layers, hidden) and S were computed without ``items``. Each response is
    scored with γ·v added at one layer, and under influence decoding with S at each λ of
    ``config.lambda_grid`` (source ``influence``, layer −1, ``gamma`` holding λ; none without S);
    the gain Σ [log p(hⱼ | ·) − log p(hⱼ | xⱼ)] is reported with the token count, ``condition``
    ``plain``. With ``composed`` and the user's ``train`` items, every candidate is scored again
    on top of retrieved history (each input after its top-k training items by BM25, condition
    ``history``; source ``none`` is the history alone), its gain still over the plain prompt.
    """
    if not items:
        return []
    inputs, outputs = [it["input"] for it in items], [it["output"] for it in items]
    base, tokens = runtime.response_logprobs(inputs, outputs)
    total = int(tokens.sum())
    usable = [h for h in train if (h["output"] or "").strip()]
    conditions = [("plain", inputs)]
    if composed is not None and usable:
        shown = [retrieved_prompt(usable, x, composed) for x in inputs]
        conditions.append(("history", shown))
    out = []
    for condition, prompts in conditions:
        row = {"condition": condition, "tokens": total}
        if condition != "plain":
            lp, _ = runtime.response_logprobs(prompts, outputs)
            out.append({**row, "source": "none", "layer": -1, "gamma": 0.0, "gain": float((lp - base).sum())})
        out += [{**row, **c} for c in _candidate_gains(runtime, prompts, outputs, base, vectors, description,
                                                        sources, layers, config)]
    return out


def _candidate_gains(runtime: ModelRuntime, prompts: list[str], outputs: list[str], base: torch.Tensor,
                     vectors: np.ndarray, description: str, sources: Sequence[str], layers: list[int],
                     config: StyleVectorConfig) -> list[dict]:
    """Summed gains over ``base`` of every (source, layer, γ) vector and influence λ on these prompts."""
    n, grid = len(prompts), list(config.gamma_grid)
    out = []
    for si, source in enumerate(sources):
        for li, layer in enumerate(layers):
            vecs = torch.as_tensor(np.repeat(np.asarray(vectors[si][li], dtype=np.float32)[None], n * len(grid), 0))
            steer = Steering({layer: vecs}, torch.as_tensor(grid * n, dtype=torch.float32), config.apply_positions)
            lp, _ = runtime.response_logprobs([x for x in prompts for _ in grid], [y for y in outputs for _ in grid],
                                              steer=steer)
            gain = (lp.view(n, len(grid)) - base[:, None]).sum(0)
            out += [{"source": source, "layer": layer, "gamma": g, "gain": float(gain[k])} for k, g in enumerate(grid)]
    if description.strip() and config.lambda_grid:
        lams = list(config.lambda_grid)
        lp, _ = runtime.influence_logprobs(prompts, [style_prompt(description, x) for x in prompts], outputs, lams)
        gain = (lp - base[None]).sum(1)
        out += [{"source": "influence", "layer": -1, "gamma": lam, "gain": float(gain[k])} for k, lam in enumerate(lams)]
    return out


def choose_recommended(calibration: Sequence[dict], condition: str = "plain") -> dict[str, dict]:
    """Per source, the (layer, γ) with the highest pooled gain per token (ties: smaller γ, then layer), on the
    calibration rows of ``condition`` (plain prompt, or ``history``: on top of retrieved history).

    ``improves`` says whether that gain is positive (over the plain prompt; in the history condition, over
    the history alone); when it is not, no candidate helped and the least harmful one is returned (the refresh
    job logs a warning). Influence decoding (source ``influence``) gets ``{"lambda": λ, ...}`` (ties: the
    smaller λ).
    """
    rows = [c for c in calibration if c.get("condition", "plain") == condition]
    pooled: dict[tuple, list[float]] = {}
    for c in rows:
        acc = pooled.setdefault((c["source"], c["layer"], c["gamma"]), [0.0, 0])
        acc[0] += c["gain"]
        acc[1] += c["tokens"]
    alone = pooled.pop(("none", -1, 0.0), None)  # the history condition: the history's own gain
    floor = 0.0 if alone is None else alone[0] / max(alone[1], 1)
    best: dict[str, dict] = {}
    for (source, layer, gamma), (gain, tokens) in sorted(pooled.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        per_token = gain / max(tokens, 1)
        if source not in best or per_token > best[source]["gain_per_token"]:
            best[source] = {"layer": int(layer), "gamma": float(gamma), "gain_per_token": per_token, "tokens": tokens}
    for choice in best.values():
        # no (layer, γ) of the grid raised held-out likelihood: the least harmful is kept, and flagged
        choice["improves"] = choice["gain_per_token"] > floor
    if "influence" in best:
        inf = best["influence"]
        best["influence"] = {"lambda": inf["gamma"], **{k: inf[k] for k in ("gain_per_token", "tokens", "improves")}}
    return best


class SteerXStyleVectors:
    """User rows (user_id, histories, descriptions, validation) -> STYLE_OUTPUT_SCHEMA rows.

    Rows in == rows out. The scored items (the last ``history.max_items``) of every user in the
    batch go through the model together: neutral answers, then three activation passes. Rows
    with ``validation`` items (calibration users, whose histories and description left them out)
    also get those items' gains under the vectors and the description (``validation_gains``; with
    ``composed``, also on top of their retrieved training items), which choose the recommended layer,
    γ and λ per condition. A user that fails is returned quarantined with
    the reason.
    """

    def __init__(self, config: SteerXConfig, model: ModelConfig, composed: HistoryContextConfig | None = None):
        self.config = config
        self.composed = composed  # validation items are also scored on top of retrieved history, shown so
        self.runtime = ModelRuntime.shared(model)
        self.layers = config.vectors.resolve_layers(self.runtime.num_layers)

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(type(self).__name__, batch, ["user_id", "histories", "descriptions", "validation"])
        users = batch.select(["user_id", "histories", "descriptions", "validation"]).to_pylist()
        rows = isolate_failures(users, self._vectors, lambda user, exc: self._row(
            user, status="quarantined", reason=f"steerx style vectors failed: {type(exc).__name__}: {str(exc)[:300]}"))
        order = {u["user_id"]: i for i, u in enumerate(users)}
        rows.sort(key=lambda r: order[r["user_id"]])
        return pa.Table.from_pylist(rows, schema=STYLE_OUTPUT_SCHEMA)

    def _row(self, user: dict, **values) -> dict:
        row = {"user_id": user["user_id"], "status": "ok", "reason": None, "layers": self.layers, "sources": [],
               "vectors": [], "n_items": 0, "calibration": None, "model_id": self.runtime.model_id,
               "model_fingerprint": self.runtime.fingerprint, "hidden_size": self.runtime.hidden_size}
        row.update(values)
        return row

    def _items(self, user: dict) -> tuple[list[dict], list[str]]:
        items = [h for h in user["histories"][-self.config.history.max_items:] if (h["output"] or "").strip()]
        if not items:
            raise ValueError("no history item with a non-empty output")
        descs = user["descriptions"] or []
        by_item = {d["item_id"]: d["description"] for d in descs if d.get("item_id") is not None}
        whole = user_context(descs)
        return items, [by_item.get(it["item_id"], whole) for it in items]

    def _vectors(self, users: list[dict]) -> list[dict]:
        if not users:
            return []
        vc, sources = self.config.vectors, self.config.sources
        prepared = [(u, *self._items(u)) for u in users]
        flat_items = [it for _, items, _ in prepared for it in items]
        flat_ctx = [c for _, _, ctx in prepared for c in ctx]
        diffs, _ = item_differences(self.runtime, flat_items, flat_ctx, self.layers, vc.position,
                                    vc.neutral_max_new_tokens)
        rows, start = [], 0
        for user, items, _ in prepared:
            mine = {k: v[start:start + len(items)] for k, v in diffs.items()}
            start += len(items)
            vectors = combine(mine, sources, vc.blend_weight)
            calibration = None
            if user["validation"] is not None:
                held = [h for h in user["validation"] if (h["output"] or "").strip()]
                calibration = validation_gains(self.runtime, held, vectors, user_context(user["descriptions"] or []),
                                               sources, self.layers, vc, user["histories"], self.composed)
            rows.append(self._row(user, sources=sources, vectors=vectors.tolist(), n_items=len(items),
                                  calibration=calibration))
        return rows
