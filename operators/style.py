"""SteerX stage 4: style vectors, and the calibration that chooses their layer, γ and influence λ.

Per layer and history item j, at the last token (StyleVector's convention):

    history:     h(xⱼ ⊕ hⱼ) − h(xⱼ ⊕ nⱼ)      the user's real response vs the model's own
                                             unpersonalised greedy answer nⱼ to xⱼ
    description: h(S ⊕ xⱼ ⊕ nⱼ) − h(xⱼ ⊕ nⱼ)  the description in the prompt vs not, on nⱼ

each averaged over items; ``blend`` mixes the two. ``history`` is the StyleVector baseline,
``description``/``blend`` are SteerX. The recommended layer and γ per source, and the influence
λ, are chosen on a seeded sample of calibration users, out of sample: each calibration user's
most recent ``validation_items`` are held out, its anchors, description S and vectors are
computed from the rest, and the held-out items' real responses are scored under them, γ·v
added at one layer (or influence decoding's distribution with S at λ, teacher-forced). The
(layer, γ) and the λ with the highest log-likelihood gain per token over the plain prompt win among
those whose greedy answers pass the strengths' decoded guards (``scale.*``: perplexity and content drift,
as for α; a strong γ can raise a real text's likelihood and still make the model write worse); the
same is done again on top of retrieved history (the composed condition). Stage 5, influence decoding with S, is
``ModelRuntime.generate(influence=...)``; its with-context prompt is ``STYLE_TEMPLATE`` as here.
Stages 1–2 (anchors) are ``operators/steerx.py``, stage 3 (descriptions) ``operators/smoothing.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np
import pyarrow as pa
import torch

from steerstore.infra.config import check, option
from steerstore.operators.history import HistoryContextConfig, retrieved_prompt
from steerstore.operators.runtime import ModelConfig, ModelRuntime, Position, Steering, SteerPositions
from steerstore.operators.scale import content_drifts, pooled_perplexity_ratio
from steerstore.operators.smoothing import user_context
from steerstore.operators.validate import isolate_failures, require_columns

if TYPE_CHECKING:
    from steerstore.operators.scale import ScaleConfig
    from steerstore.operators.steerx import SteerXConfig

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
                                                ("tokens", pa.int64()),
                                                # the decoded guards (null when off): see validation_gains
                                                ("answer_nll", pa.float64()), ("answer_tokens", pa.int64()),
                                                ("unsteered_nll", pa.float64()), ("unsteered_tokens", pa.int64()),
                                                ("drift", pa.float64()), ("drift_reference", pa.float64()),
                                                ("decoded", pa.int32())]))),
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
                     train: Sequence[dict] = (), composed: HistoryContextConfig | None = None,
                     guard: ScaleConfig | None = None) -> list[dict]:
    """Log-likelihood gains of held-out items' real responses per (source, layer, γ) and per influence λ.

    ``vectors`` (sources, layers, hidden) and S were computed without ``items``. Each response is
    scored with γ·v added at one layer, and under influence decoding with S at each λ of
    ``config.lambda_grid`` (source ``influence``, layer −1, ``gamma`` holding λ; none without S);
    the gain Σ [log p(hⱼ | ·) − log p(hⱼ | xⱼ)] is reported with the token count, ``condition``
    ``plain``. With ``composed`` and the user's ``train`` items, every candidate is scored again
    on top of retrieved history (each input after its top-k training items by BM25, condition
    ``history``; source ``none`` is the history alone), its gain still over the plain prompt.

    With a ``guard`` whose ``fluency_tokens`` > 0 (the strengths' decoded guards, ``scale.*``), every candidate
    also decodes ``fluency_tokens`` greedy tokens per item as serving would (γ·v added; influence decoding at λ
    with serving's temperature and plausibility floor), all in one batch, and its row records what the guards
    pool over users (``choose_recommended``): the answers' NLL and tokens under the unsteered model given the
    plain or composed prompt, the same for the unsteered answers to that prompt, and with the content guard their
    summed content drift from the unsteered answers with the user's reference drift (what showing the retrieved
    history does to the unsteered answers), over ``decoded`` items.
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
    decode = guard is not None and guard.fluency_tokens > 0
    unsteered = {c: runtime.generate(prompts, guard.fluency_tokens) for c, prompts in conditions} if decode else {}
    reference = None  # what the history prompt moves the unsteered answers: the content guard's yardstick
    if decode and guard.drift_guard and "history" in unsteered:
        reference = float(content_drifts(unsteered["history"], unsteered["plain"], guard.drift_encoder).sum())
    out = []
    for condition, prompts in conditions:
        row = {"condition": condition, "tokens": total}
        if condition != "plain":
            lp, _ = runtime.response_logprobs(prompts, outputs)
            out.append({**row, "source": "none", "layer": -1, "gamma": 0.0, "gain": float((lp - base).sum())})
        found = _candidate_gains(runtime, prompts, outputs, base, vectors, description, sources, layers, config)
        if decode:
            _decoded_guard(runtime, prompts, unsteered[condition], found, vectors, description, list(sources),
                           layers, config, guard, reference)
        out += [{**row, **c} for c in found]
    return out


def _decoded_guard(runtime: ModelRuntime, prompts: list[str], unsteered: list[str], found: list[dict],
                   vectors: np.ndarray, description: str, sources: list[str], layers: list[int],
                   config: StyleVectorConfig, guard: ScaleConfig, reference: float | None) -> None:
    """Add the decoded guards' sums to every candidate row of ``found`` (``validation_gains``), decoding all
    candidates' answers to ``prompts`` in one batch: a vector row carries its vector at its layer only (zeros at
    the others), an influence row decodes as serving does."""
    from steerstore.operators.runtime import Influence
    from steerstore.operators.serving import DEFAULT_INFLUENCE_PLAUSIBILITY, DEFAULT_INFLUENCE_TEMPERATURE

    n, tokens = len(prompts), guard.fluency_tokens
    vec = [c for c in found if c["source"] != "influence"]
    inf = [c for c in found if c["source"] == "influence"]
    rows = n * len(found)
    order = vec + inf  # the batch's candidate order (rows k·n … k·n + n − 1)
    per_layer = {l: np.zeros((rows, vectors.shape[-1]), np.float32) for l in layers}
    scales = np.zeros(rows, np.float32)
    for k, c in enumerate(vec):
        per_layer[c["layer"]][k * n:(k + 1) * n] = vectors[sources.index(c["source"])][layers.index(c["layer"])]
        scales[k * n:(k + 1) * n] = c["gamma"]
    steer = Steering({l: torch.as_tensor(v) for l, v in per_layer.items()}, torch.as_tensor(scales),
                     config.apply_positions) if vec else None
    influence = Influence([None] * (len(vec) * n) + [description] * (len(inf) * n),
                          lam=[0.0] * (len(vec) * n) + [c["gamma"] for c in inf for _ in range(n)],
                          temperature=DEFAULT_INFLUENCE_TEMPERATURE, template=STYLE_TEMPLATE,
                          plausibility=DEFAULT_INFLUENCE_PLAUSIBILITY) if inf else None
    answers = runtime.generate(prompts * len(order), tokens, steer=steer, influence=influence)
    lp, counts = runtime.response_logprobs(prompts * len(order), answers)
    lp0, counts0 = runtime.response_logprobs(prompts, unsteered)
    drift = content_drifts(answers, unsteered * len(order), guard.drift_encoder) if reference is not None else None
    for k, c in enumerate(order):
        part = slice(k * n, (k + 1) * n)
        c.update(answer_nll=float(-lp[part].sum()), answer_tokens=int(counts[part].sum()),
                 unsteered_nll=float(-lp0.sum()), unsteered_tokens=int(counts0.sum()), decoded=n,
                 drift=None if drift is None else float(drift[part].sum()), drift_reference=reference)


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


def choose_recommended(calibration: Sequence[dict], condition: str = "plain",
                       guard: ScaleConfig | None = None) -> dict[str, dict]:
    """Per source, the (layer, γ) with the highest pooled gain per token (ties: smaller γ, then layer), on the
    calibration rows of ``condition`` (plain prompt, or ``history``: on top of retrieved history).

    ``improves`` says whether that gain is positive (over the plain prompt; in the history condition, over
    the history alone); when it is not, no candidate helped and the least harmful one is returned (the refresh
    job logs a warning). Influence decoding (source ``influence``) gets ``{"lambda": λ, ...}`` (ties: the
    smaller λ).

    With a ``guard`` and rows that carry decoded answers (``validation_gains(guard=...)``), a candidate is only
    chosen when its answers, pooled over users, pass the strengths' decoded guards (``ScaleConfig.passes``):
    their perplexity under the unsteered model at most ``max_perplexity_ratio`` × the unsteered answers', and,
    with the content guard, their content drift at most ``max_drift_ratio`` × the drift the history prompt
    causes. When no candidate of a source passes, the one with its smallest γ and the best gain is kept (influence:
    the λ nearest the guards, the larger of its perplexity and drift over their limits) and ``passes_guards`` is
    False. The choice records the guard's figures and the largest strength that passed at
    its layer (``gamma_max``; influence: the λ that passed, ``lambdas``), which caps the per-user
    recommendation's candidates.
    """
    rows = [c for c in calibration if c.get("condition", "plain") == condition]
    sums = ("gain", "tokens", "answer_nll", "answer_tokens", "unsteered_nll", "unsteered_tokens")
    pooled: dict[tuple, dict] = {}
    for c in rows:
        acc = pooled.setdefault((c["source"], c["layer"], c["gamma"]),
                                dict.fromkeys((*sums, "drift", "drift_reference", "drift_items"), 0.0) | {"guarded": True})
        for k in sums:
            acc[k] += c.get(k) or 0
        acc["guarded"] &= c.get("answer_tokens") is not None
        if c.get("drift") is not None:  # users without history to show have no reference: left out of the drift
            acc["drift"] += c["drift"]
            acc["drift_reference"] += c["drift_reference"]
            acc["drift_items"] += c["decoded"]
    alone = pooled.pop(("none", -1, 0.0), None)  # the history condition: the history's own gain
    floor = 0.0 if alone is None else alone["gain"] / max(alone["tokens"], 1)
    points: dict[str, list[dict]] = {}
    for (source, layer, gamma), acc in sorted(pooled.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        point = {"layer": int(layer), "gamma": float(gamma), "gain_per_token": acc["gain"] / max(acc["tokens"], 1),
                 "tokens": int(acc["tokens"])}
        if guard is not None and acc["guarded"]:
            point["perplexity_ratio"] = pooled_perplexity_ratio(acc)
            if acc["drift_items"]:
                point["content_drift"] = acc["drift"] / acc["drift_items"]
                point["drift_limit"] = guard.max_drift_ratio * acc["drift_reference"] / acc["drift_items"]
        points.setdefault(source, []).append(point)
    best: dict[str, dict] = {}
    for source, found in points.items():
        kept = [p for p in found if guard is None or guard.passes({"nll_increase": 0.0, **p})]
        if kept:
            pick = max(kept, key=lambda p: (p["gain_per_token"], -p["gamma"], -p["layer"]))
        elif source == "influence":  # none passed: the λ nearest the guards (λ 0 puts S in the prompt unfloored, so
            pick = min(found, key=lambda p: (_violation(p, guard), p["gamma"]))  # the smallest is not the mildest)
        else:  # none passed: the least steered, the smallest γ
            pick = max([p for p in found if p["gamma"] == found[0]["gamma"]],
                       key=lambda p: (p["gain_per_token"], -p["layer"]))
        choice = dict(pick)
        # no (layer, γ) of the grid raised held-out likelihood: the least harmful is kept, and flagged
        choice["improves"] = choice["gain_per_token"] > floor
        if "perplexity_ratio" in pick:
            choice["passes_guards"] = bool(kept)
            at_layer = [p["gamma"] for p in kept if p["layer"] == pick["layer"]]
            choice["gamma_max"] = float(max(at_layer, default=pick["gamma"]))
            if source == "influence":  # the λ the recommendation may offer: none when none passed
                choice["lambdas"] = sorted({p["gamma"] for p in kept})
        best[source] = choice
    if "influence" in best:
        inf = best.pop("influence")
        best["influence"] = {"lambda": inf.pop("gamma"), **{k: v for k, v in inf.items()
                                                            if k not in ("layer", "gamma_max")}}
    return best


def _violation(point: dict, guard: ScaleConfig) -> float:
    """How far a point is past the decoded guards: the larger of its perplexity and drift over their limits."""
    over = point["perplexity_ratio"] / guard.max_perplexity_ratio
    if "drift_limit" in point:
        over = max(over, point["content_drift"] / max(point["drift_limit"], 1e-12))
    return over


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

    def __init__(self, config: SteerXConfig, model: ModelConfig, composed: HistoryContextConfig | None = None,
                 guard: ScaleConfig | None = None):
        self.config = config
        self.composed = composed  # validation items are also scored on top of retrieved history, shown so
        self.guard = guard  # validation items' candidates are also decoded for the strengths' guards
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
                                               sources, self.layers, vc, user["histories"], self.composed,
                                               self.guard)
            rows.append(self._row(user, sources=sources, vectors=vectors.tolist(), n_items=len(items),
                                  calibration=calibration))
        return rows
