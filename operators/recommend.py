"""The method and strength each user should get, chosen on the user's own held-out items.

**Held out.** A user with at least ``recommend.min_items`` usable history items has its most recent
``recommend.validation_items`` item(s) held out of every method's inputs (``holdout``): the SteerX and
DPS histories lose them, and the CAA/BT pairs made from them (same prompt, or the item's output as the
chosen text) are dropped, so the user's stored artifacts never saw them. Users with fewer items keep
everything and get the population's choice.

**Candidates**, per condition (``plain``: the item's input alone; ``history``: on top of the user's top-k
training items by BM25, as served with a request's history): ``none`` (in the history condition: the
history alone), and each method the user has an artifact for at ``recommend.multipliers`` × the store's
strength for that method in that condition (α for caa, bt and population; γ at the recommended layer for
the default style-vector source; γ of the user's DPS heads); influence decoding at each λ of
``steerx.vectors.lambda_grid``. A vector candidate above the largest α (γ) whose decoded answers passed
the strengths' guards, and a λ that failed them, are not offered.

**Score.** Each candidate's teacher-forced log-likelihood gain per token of the held-out outputs over the
plain prompt (the same measure the store's strengths were calibrated on; a strength that breaks fluency
lowers it, so the grid needs no separate guard beyond topping out at the largest multiplier of a strength
that passed its own fluency guard).

**DPS's γ is guarded where it is sampled.** The store's α (CAA, BT, population) and SteerX's γ and λ pass
decoded guards where they are chosen; DPS's γ is the configured one. So the population's sample also decodes
every DPS candidate as serving would (``decoded_guard``) and pools the answers' perplexity ratio and content drift
over its users (``guard_figures``, the same ``scale.*`` guards); a multiplier that fails them in a condition is
offered to no user there (``Strengths.dps_multipliers``) and cannot be the population's choice.

**Shrinkage.** With T held-out tokens and prior strength κ (``recommend.prior_tokens``), the ranked value
is ŝ(c) = w·g_user(c) + (1 − w)·g_pop(c), w = T / (T + κ), where g_pop is the population's gain per
token for the same candidate, pooled over a seeded sample of users scored the same way (the refresh's
global statistics). With little data a user gets the population's choice; with much, their own. The
chosen row stores every candidate's gain, prior and shrunk value: how it was chosen.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import pyarrow as pa

from steerstore.infra.config import check, option
from steerstore.infra.reader import UserArtifacts, UserVectors
from steerstore.operators.history import HistoryContextConfig, retrieved_prompt
from steerstore.operators.runtime import HeadContrast, ModelRuntime
from steerstore.operators.runtime.hooks import Head
from steerstore.operators.scale import ScaleConfig, content_drifts, pooled_perplexity_ratio
from steerstore.operators.serving import vector_steering
from steerstore.operators.style import style_prompt
from steerstore.schemas.store import RECOMMENDED_SCHEMA

CONDITIONS = ("plain", "history")
METHODS = ("caa", "bt", "population", "style_vector", "influence", "dps")


@dataclass
class RecommendConfig:
    enabled: bool = option(
        True, help="choose per user the method and strength to serve, on the user's own held-out item(s) (the "
                   "refresh holds them out of every method's inputs); false: no per-user choice")
    validation_items: int = option(1, help="per user: its most recent history item(s) held out and scored")
    min_items: int = option(
        4, help="users with fewer usable history items hold nothing out and get the population's choice")
    multipliers: list[float] = option(
        [0.5, 1.0, 2.0], help="candidate strengths: these multiples of the store's strength of each method")
    methods: list[str] = option(list(METHODS), help="methods considered (plus none)")
    prior_tokens: float = option(
        300.0, help="κ: a user's own gains weigh w = T / (T + κ) against the population's (T: their held-out tokens)")
    sample_users: int = option(16, help="users (seeded sample) the population's gains per candidate are pooled over")
    seed: int = option(0, help="seed of that sample")

    def __post_init__(self) -> None:
        check(self.validation_items >= 1, "recommend.validation_items must be >= 1")
        check(self.min_items >= self.validation_items + 1, "recommend.min_items must exceed validation_items")
        check(bool(self.multipliers) and all(m > 0 for m in self.multipliers), "recommend.multipliers must be > 0")
        bad = [m for m in self.methods if m not in METHODS]
        check(not bad, f"recommend.methods: unknown {bad}; methods: {', '.join(METHODS)}")
        check(self.prior_tokens >= 0, "recommend.prior_tokens must be >= 0")
        check(self.sample_users >= 1, "recommend.sample_users must be >= 1")

    def settings(self) -> list:
        """What the held-out split depends on (every family's artifacts do)."""
        return [self.enabled, self.validation_items, self.min_items]


# ---- the held-out split ---------------------------------------------------------------------------

def holdout(user: dict, config: RecommendConfig, min_pairs: int = 1) -> tuple[dict, list[dict]]:
    """(the user row without its held-out items and the pairs made from them, the held-out items).

    Histories are sorted by time (most recent last). Nothing is held out when the user has fewer than
    ``min_items`` usable items, or when dropping the items' pairs would leave fewer than ``min_pairs`` of a
    user that had enough (the pairs are then kept and the user gets no per-user choice).
    """
    if not config.enabled:
        return user, []
    histories = list(user.get("histories") or [])
    usable = [h for h in histories if (h["output"] or "").strip()]
    if len(usable) < config.min_items:
        return user, []
    held = usable[-config.validation_items:]
    ids = {h["item_id"] for h in held}
    prompts = {h["input"] for h in held}
    outputs = {h["output"] for h in held}
    pairs = list(user.get("pairs") or [])
    kept = [p for p in pairs if p["prompt"] not in prompts and p["chosen"] not in outputs]
    if len(pairs) >= min_pairs > len(kept):
        return user, []
    return {**user, "histories": [h for h in histories if h["item_id"] not in ids], "pairs": kept}, held


# ---- candidates -----------------------------------------------------------------------------------

@dataclass
class Candidate:
    condition: str
    method: str  # none | caa | bt | population | style_vector | influence | dps
    source: str | None = None
    multiplier: float | None = None  # of the store's strength (influence: None, the λ is the grid's)
    scale: float | None = None
    layers: list[int] | None = None
    vector: UserVectors | None = field(default=None, repr=False)
    context: str | None = field(default=None, repr=False)  # influence: the style description S
    heads: list[Head] | None = field(default=None, repr=False)  # dps
    adaptive: bool = False
    plausibility: float = 0.1  # dps: the stored plausibility floor β serving decodes with

    @property
    def key(self) -> str:
        """The candidate's identity across users (what the population's prior is pooled by)."""
        strength = self.scale if self.method == "influence" else self.multiplier
        return f"{self.condition}|{self.method}|{self.source or ''}|{'' if strength is None else f'{strength:g}'}"


@dataclass
class Strengths:
    """The store's strength per method in one condition (None: the method is not offered there)."""

    alpha: dict[str, float]  # caa | bt | population -> α
    style: tuple[list[int], float] | None  # the default source's (layers, γ)
    source: str  # the default style-vector source
    lambdas: list[float]  # influence λ candidates
    alpha_max: dict[str, float] = field(default_factory=dict)  # caa | bt | population -> the largest α that kept
    # fluency (scale's decoded and teacher-forced guards); a candidate above it is not offered (absent: no cap)
    style_max: float | None = None  # the largest γ of the style vector that passed the decoded guards (None: no cap)
    dps_multipliers: list[float] | None = None  # the multiples of a user's DPS γ whose contrast-decoded answers
    # passed the decoded guards on the population's sample (None: not guarded, every multiplier is offered)


def candidates(art: UserArtifacts, strengths: dict[str, Strengths], config: RecommendConfig) -> list[Candidate]:
    """Every candidate of one user, per condition of ``strengths`` (plain, and history when it is calibrated)."""
    out = []
    wanted = set(config.methods)
    for condition, s in strengths.items():
        out.append(Candidate(condition, "none"))
        for method, vec in (("caa", art.caa), ("bt", art.bt), ("population", art.population)):
            if method in wanted and vec is not None and s.alpha.get(method) is not None:
                cap = s.alpha_max.get(method, math.inf)
                out += [Candidate(condition, method, None, m, s.alpha[method] * m, list(vec.recommended_layers), vec)
                        for m in config.multipliers if s.alpha[method] * m <= cap * (1 + 1e-9)]
        style = art.style_vectors.get(s.source)
        if "style_vector" in wanted and style is not None and s.style is not None:
            layers, gamma = s.style
            if all(l in style.layers for l in layers):
                out += [Candidate(condition, "style_vector", s.source, m, gamma * m, list(layers), style)
                        for m in config.multipliers if s.style_max is None or gamma * m <= s.style_max * (1 + 1e-9)]
        context = ((art.steerx or {}).get("context") or "").strip()
        if "influence" in wanted and context and s.lambdas:
            out += [Candidate(condition, "influence", None, None, float(lam), context=context) for lam in s.lambdas]
        if "dps" in wanted and art.dps is not None and art.dps.heads:
            out += [Candidate(condition, "dps", None, m, art.dps.gamma * m, heads=list(art.dps.heads),
                              adaptive=art.dps.adaptive, plausibility=art.dps.plausibility)
                    for m in config.multipliers
                    if s.dps_multipliers is None or any(math.isclose(m, p, rel_tol=1e-6) for p in s.dps_multipliers)]
    return out


# ---- scoring --------------------------------------------------------------------------------------

SHARED_PREFIX = 16  # tokens a prompt's candidates must share before their prefix is run once


@dataclass
class UserCase:
    user_id: str
    held: list[dict]  # held-out items (input, output)
    train: list[dict]  # the user's items after holdout (what the history condition retrieves from)
    candidates: list[Candidate]


def score(runtime: ModelRuntime, cases: Sequence[UserCase],
          composed: HistoryContextConfig | None) -> dict[str, tuple[list[float], int]]:
    """Per user: each candidate's summed log-likelihood gain over the plain prompt, and the held-out token count.

    Every user's rows of one kind go through the model together: the plain and history prompts, the
    vector candidates (one steered batch), influence decoding and head contrast.
    """
    rows_in, rows_out, where = [], [], []  # per (user, item): prompt, output
    for u, case in enumerate(cases):
        for j, item in enumerate(case.held):
            rows_in.append(item["input"])
            rows_out.append(item["output"])
            where.append((u, j))
    if not rows_in:
        return {}
    first = {}
    for r, (u, j) in enumerate(where):
        first.setdefault(u, r)
    base, tokens = runtime.response_logprobs(rows_in, rows_out)
    prompts = {"plain": list(rows_in)}
    if composed is not None:
        prompts["history"] = [_history(cases[u].train, cases[u].held[j]["input"], composed) for u, j in where]
    gains = {u: [0.0] * len(c.candidates) for u, c in enumerate(cases)}

    def rows_of(u: int) -> range:
        return range(first[u], first[u] + len(cases[u].held))

    # none: 0 on the plain prompt; the history alone on the history prompt
    if "history" in prompts:
        alone, _ = runtime.response_logprobs(prompts["history"], rows_out)
        for u, c in enumerate(cases):
            for k, cand in enumerate(c.candidates):
                if cand.method == "none" and cand.condition == "history":
                    gains[u][k] = float(sum(alone[r] - base[r] for r in rows_of(u)))
    # vector candidates: one steered batch, a row per (candidate, item)
    vec_rows, vec_ref = [], []
    for u, c in enumerate(cases):
        for k, cand in enumerate(c.candidates):
            if cand.vector is not None and cand.condition in prompts:
                for r in rows_of(u):
                    vec_rows.append((r, cand))
                    vec_ref.append((u, k, r))
    if vec_rows:
        steer = vector_steering([(cand.vector, cand.scale, cand.layers) for _, cand in vec_rows])
        # every candidate of an item shows the same prompt: its unsteered prefix runs once per item
        lp, _ = runtime.response_logprobs([prompts[cand.condition][r] for r, cand in vec_rows],
                                          [rows_out[r] for r, _ in vec_rows], steer, min_shared=SHARED_PREFIX)
        for (u, k, r), value in zip(vec_ref, lp.tolist()):
            gains[u][k] += value - float(base[r])
    for condition in prompts:
        _two_branch(runtime, cases, condition, prompts[condition], rows_out, base, rows_of, gains)
    return {c.user_id: (gains[u], int(sum(int(tokens[r]) for r in rows_of(u)))) for u, c in enumerate(cases)}


def _history(train: list[dict], prompt: str, composed: HistoryContextConfig) -> str:
    usable = [h for h in train if (h["output"] or "").strip()]
    return retrieved_prompt(usable, prompt, composed) if usable else prompt


def _two_branch(runtime, cases, condition, prompts, outputs, base, rows_of, gains) -> None:
    """Influence and DPS candidates of ``condition``: per user and method, one call gives every strength (the
    strengths only change how the same two branches combine)."""
    for u, c in enumerate(cases):
        for method in ("influence", "dps"):
            cands = [(k, cand) for k, cand in enumerate(c.candidates)
                     if cand.method == method and cand.condition == condition]
            if not cands:
                continue
            rows, first = list(rows_of(u)), cands[0][1]
            shown, said, strengths = [prompts[r] for r in rows], [outputs[r] for r in rows], [x.scale for _, x in cands]
            if method == "influence":
                lp, _ = runtime.influence_logprobs(shown, [style_prompt(first.context, x) for x in shown], said,
                                                   strengths)
            else:
                lp, _ = runtime.contrast_logprobs(shown, said, [first.heads] * len(rows), strengths,
                                                  adaptive=first.adaptive)
            for n, (k, _) in enumerate(cands):
                gains[u][k] += float((lp[n] - base[rows]).sum())


# ---- the decoded guard on DPS's γ ----------------------------------------------------------------

def decoded_guard(runtime: ModelRuntime, cases: Sequence[UserCase], composed: HistoryContextConfig | None,
                  guard: ScaleConfig) -> dict[str, dict[str, dict]]:
    """Per user: per DPS candidate key, the decoded guard's sums on the user's held-out inputs.

    Every DPS candidate is decoded greedily for ``guard.fluency_tokens`` tokens as serving decodes it (differential
    preference decoding at the candidate's γ, with the user's heads, adaptivity and plausibility floor), in its
    condition's prompt (plain, or on top of retrieved history); so are the unsteered answers to the same prompts.
    The sums: the candidate answers' NLL and tokens under the unsteered model given the prompt (``answer_*``), the
    unsteered answers' own (``unsteered_*``), the items decoded, and, with the content guard
    (``guard.drift_guard``), the answers' summed content drift from the unsteered answers (``drift``) and the user's
    reference, the drift that showing the retrieved history causes to the plain prompt's unsteered answers
    (``drift_reference``, summed over the same items). The same guards as the strengths' α, γ and λ
    (``ScaleConfig``); ``guard_figures`` pools them over users.
    """
    tokens = guard.fluency_tokens
    plain_rows: list[tuple[int, int, str, str]] = []  # (user, item, condition, prompt) of the unsteered answers
    steered: list[tuple[int, int, Candidate]] = []  # (user, item, candidate)
    for u, case in enumerate(cases):
        dps = [c for c in case.candidates if c.method == "dps" and (c.condition == "plain" or composed is not None)]
        if not dps:
            continue
        for j, item in enumerate(case.held):
            plain_rows.append((u, j, "plain", item["input"]))
            if composed is not None:
                plain_rows.append((u, j, "history", _history(case.train, item["input"], composed)))
            steered += [(u, j, c) for c in dps]
    if not steered:
        return {}
    prompt_of = {(u, j, cond): p for u, j, cond, p in plain_rows}
    unsteered = dict(zip([(u, j, cond) for u, j, cond, _ in plain_rows],
                         runtime.generate([p for *_, p in plain_rows], tokens)))
    answers: list[str | None] = [None] * len(steered)
    for setting in sorted({(c.adaptive, c.plausibility) for _, _, c in steered}):  # one decode per serving setting
        idx = [i for i, (_, _, c) in enumerate(steered) if (c.adaptive, c.plausibility) == setting]
        contrast = HeadContrast([steered[i][2].heads for i in idx], gamma=[steered[i][2].scale for i in idx],
                                adaptive=setting[0], plausibility=setting[1])
        for i, text in zip(idx, runtime.generate([prompt_of[(u, j, c.condition)] for u, j, c in
                                                  (steered[i] for i in idx)], tokens, contrast=contrast)):
            answers[i] = text
    keys = [(u, j, c.condition) for u, j, c in steered]
    lp, n = runtime.response_logprobs([prompt_of[k] for k in keys], answers)
    lp0, n0 = runtime.response_logprobs([p for *_, p in plain_rows], [unsteered[(u, j, cond)] for u, j, cond, _ in
                                                                       plain_rows])
    own = {(u, j, cond): (-float(lp0[r]), int(n0[r])) for r, (u, j, cond, _) in enumerate(plain_rows)}
    drift: dict[int, float] = {}
    reference: dict[tuple[int, int], float] = {}
    if guard.drift_guard and composed is not None:
        shown = [(u, j) for u, j, cond, p in plain_rows if cond == "history" and p != prompt_of[(u, j, "plain")]]
        reference = dict(zip(shown, content_drifts([unsteered[(u, j, "history")] for u, j in shown],
                                                   [unsteered[(u, j, "plain")] for u, j in shown],
                                                   guard.drift_encoder).tolist()))
        # an item without history to show has no reference: its answers' drift is not needed
        rows = [i for i, (u, j, _) in enumerate(steered) if (u, j) in reference]
        drift = dict(zip(rows, content_drifts([answers[i] for i in rows], [unsteered[keys[i]] for i in rows],
                                              guard.drift_encoder).tolist()))
    out: dict[str, dict[str, dict]] = {}
    for i, (u, j, c) in enumerate(steered):
        acc = out.setdefault(cases[u].user_id, {}).setdefault(c.key, {
            "condition": c.condition, "multiplier": c.multiplier, "answer_nll": 0.0, "answer_tokens": 0,
            "unsteered_nll": 0.0, "unsteered_tokens": 0, "decoded": 0, "drift": None, "drift_reference": None,
            "drift_items": 0})
        nll0, count0 = own[(u, j, c.condition)]
        acc["answer_nll"] += -float(lp[i])
        acc["answer_tokens"] += int(n[i])
        acc["unsteered_nll"] += nll0
        acc["unsteered_tokens"] += count0
        acc["decoded"] += 1
        if i in drift:
            acc["drift"] = (acc["drift"] or 0.0) + float(drift[i])
            acc["drift_reference"] = (acc["drift_reference"] or 0.0) + float(reference[(u, j)])
            acc["drift_items"] += 1
    return out


def guard_figures(per_user: Sequence[dict[str, dict]], guard: ScaleConfig) -> dict[str, dict]:
    """Per DPS candidate key: the decoded guard pooled over users (``decoded_guard``'s sums): the answers'
    ``perplexity_ratio`` (their perplexity under the unsteered model over the unsteered answers'), their mean
    ``content_drift`` and its ``drift_limit`` (``max_drift_ratio`` × the pooled reference) when the content guard
    ran, and whether the key ``passes`` (``ScaleConfig.passes``)."""
    sums = ("answer_nll", "answer_tokens", "unsteered_nll", "unsteered_tokens", "decoded", "drift_items")
    pooled: dict[str, dict] = {}
    for found in per_user:
        for key, acc in (found or {}).items():
            into = pooled.setdefault(key, {"condition": acc["condition"], "multiplier": acc["multiplier"],
                                           **dict.fromkeys(sums, 0), "drift": 0.0, "drift_reference": 0.0})
            for k in sums:
                into[k] += acc[k]
            if acc["drift"] is not None:
                into["drift"] += acc["drift"]
                into["drift_reference"] += acc["drift_reference"]
    out = {}
    for key, acc in sorted(pooled.items()):
        point = {"condition": acc["condition"], "multiplier": acc["multiplier"],
                 "perplexity_ratio": pooled_perplexity_ratio(acc), "decoded": int(acc["decoded"])}
        if acc["drift_items"]:
            point["content_drift"] = acc["drift"] / acc["drift_items"]
            point["drift_limit"] = guard.max_drift_ratio * acc["drift_reference"] / acc["drift_items"]
        point["passes"] = guard.passes({"nll_increase": 0.0, **point})
        if not math.isfinite(point["perplexity_ratio"]):
            point["perplexity_ratio"] = None  # a side decoded no tokens (failed; the manifest stays strict JSON)
        out[key] = point
    return out


def passing_multipliers(figures: dict[str, dict], condition: str) -> list[float] | None:
    """The DPS multipliers of ``condition`` that passed the decoded guard (None: the guard did not run there)."""
    found = [f for f in figures.values() if f["condition"] == condition]
    return None if not found else sorted(float(f["multiplier"]) for f in found if f["passes"])


# ---- the choice -----------------------------------------------------------------------------------

def pool(scored: Sequence[tuple[Sequence[str], Sequence[float], int]]) -> dict[str, list[float]]:
    """The population's evidence: per candidate key, [Σ gain, Σ tokens] over the sample users' (keys, gains, tokens)."""
    out: dict[str, list[float]] = {}
    for keys, gains, tokens in scored:
        for key, gain in zip(keys, gains):
            acc = out.setdefault(key, [0.0, 0.0])
            acc[0] += gain
            acc[1] += tokens
    return out


def prior_per_token(prior: dict[str, list[float]]) -> dict[str, float]:
    return {k: g / t for k, (g, t) in prior.items() if t > 0}


def choose(cands: list[Candidate], gains: list[float], tokens: int, prior: dict[str, float],
           kappa: float) -> dict[str, tuple[Candidate, list[dict], float]]:
    """Per condition: the chosen candidate, every candidate's (gain, prior, shrunk) per token, and w.

    A candidate the population's sample never had (no prior) is ranked on the condition's ``none`` prior
    (0 on the plain prompt): a user's own evidence must then beat doing nothing. Ties go to none, then the
    smaller strength.
    """
    w = tokens / (tokens + kappa) if tokens + kappa > 0 else 0.0
    out = {}
    for condition in CONDITIONS:
        idx = [k for k, c in enumerate(cands) if c.condition == condition]
        if not idx:
            continue
        none_key = next((cands[k].key for k in idx if cands[k].method == "none"), None)
        table, best, best_value = [], None, None
        for k in idx:
            c = cands[k]
            own = gains[k] / tokens if tokens else 0.0
            p = prior.get(c.key, prior.get(none_key, 0.0) if c.method != "none" else 0.0)
            shrunk = w * own + (1 - w) * p
            table.append({"method": c.method, "source": c.source, "multiplier": c.multiplier, "scale": c.scale,
                          "gain": own, "prior": p, "shrunk": shrunk})
            rank = (round(shrunk, 9), c.method == "none", -(c.scale or 0.0))
            if best is None or rank > best_value:
                best, best_value = c, rank
        out[condition] = (best, table, w)
    return out


def population_choice(cands_by_key: dict[str, Candidate], prior: dict[str, float]) -> dict[str, dict]:
    """Per condition: the candidate with the best pooled gain per token (what users without held-out items get)."""
    out = {}
    for condition in CONDITIONS:
        keys = [k for k, c in cands_by_key.items() if c.condition == condition and k in prior]
        if not keys:
            continue
        best = max(keys, key=lambda k: (round(prior[k], 9), cands_by_key[k].method == "none",
                                        -(cands_by_key[k].scale or 0.0)))
        c = cands_by_key[best]
        out[condition] = {"method": c.method, "source": c.source, "multiplier": c.multiplier, "scale": c.scale,
                          "gain_per_token": prior[best], "key": best}
    return out


def fingerprint(parts) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def rows_for(user_id: str, choice: dict[str, tuple[Candidate, list[dict], float]], items: int, tokens: int,
             chosen_by: str, fp: str, model_fingerprint: str) -> list[dict]:
    """RECOMMENDED_SCHEMA rows of one user (one per condition)."""
    out = []
    for condition, (c, table, w) in choice.items():
        out.append({"user_id": user_id, "condition": condition, "method": c.method, "source": c.source,
                    "scale": c.scale, "layers": c.layers if c.vector is not None else None, "chosen_by": chosen_by,
                    "weight": w, "items": items, "tokens": tokens, "candidates": table, "fingerprint": fp,
                    "model_fingerprint": model_fingerprint})
    return out


def population_rows(user_id: str, population: dict[str, dict], fp: str, model_fingerprint: str) -> list[dict]:
    """Rows of a user without held-out items: the population's choice per condition."""
    return [{"user_id": user_id, "condition": condition, "method": p["method"], "source": p["source"],
             "scale": p["scale"], "layers": p.get("layers"), "chosen_by": "population", "weight": 0.0, "items": 0,
             "tokens": 0, "candidates": [], "fingerprint": fp, "model_fingerprint": model_fingerprint}
            for condition, p in population.items()]


def table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RECOMMENDED_SCHEMA)


__all__ = ["CONDITIONS", "Candidate", "RecommendConfig", "Strengths", "UserCase", "candidates", "choose",
           "decoded_guard", "guard_figures", "holdout", "passing_multipliers", "pool", "population_choice",
           "prior_per_token", "rows_for", "score", "table"]
