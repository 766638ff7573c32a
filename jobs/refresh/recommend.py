"""The refresh's per-user recommendation (``operators/recommend.py``): the shard pass and the population's prior.

- **Held out.** The user pass takes each user's held-out item(s) out of every method's inputs
  (``held_out``) before any artifact is computed; they travel in the shard state.
- **Prior** (global statistics, after the methods' own): a seeded sample of users goes through the same
  per-shard passes as a pseudo-shard (held out, artifacts, then scored with no prior); each candidate's
  gains are pooled over them. The candidate with the best pooled gain per token in each condition is the
  population's choice (what users without held-out items get, and serving's fallback), in the manifest. The
  sample also decodes every DPS candidate (``recommend.decoded_guard``): a multiplier whose answers fail the
  strengths' guards is offered to no user and is not the population's choice.
- **Shard pass** (after the description pass): the shard's store rows (computed and carried) become each
  user's artifacts as serving sees them; each user with held-out items gets its candidates scored and the
  shrunk choice; each other user with artifacts the population's choice. A user whose fingerprint (its
  families' fingerprints, the prior and the settings) is the previous version's keeps its previous rows.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pyarrow as pa

from steerstore.infra import storage
from steerstore.infra.artifacts import compose, serving_heads
from steerstore.infra.config import to_dict
from steerstore.infra.reader import UserArtifacts, UserHeads, UserVectors
from steerstore.jobs.refresh.incremental import content_digest
from steerstore.jobs.refresh.tables import store_tables
from steerstore.operators import recommend as rec
from steerstore.operators.runtime import ModelRuntime

log = logging.getLogger("steerstore")


def held_out(users: pa.Table, config) -> tuple[pa.Table, dict[str, list[dict]]]:
    """``users`` with each user's held-out items taken out of its inputs, and those items per user."""
    if not config.recommend.enabled or users.num_rows == 0:
        return users, {}
    rows, held = [], {}
    for u in users.to_pylist():
        kept, items = rec.holdout(u, config.recommend, config.prepare.min_pairs)
        rows.append(kept)
        if items:
            held[u["user_id"]] = [{"item_id": h["item_id"], "input": h["input"], "output": h["output"]} for h in items]
    return pa.Table.from_pylist(rows, schema=users.schema), held


def strengths(config, g: dict, scale_curves: dict) -> dict[str, rec.Strengths]:
    """The store's strength per method in each condition the refresh calibrated (the candidates' 1× points)."""
    source = config.steerx.vectors.source
    lambdas = list(config.steerx.vectors.lambda_grid) if g.get("steerx_active") else []

    def style(chosen: dict) -> tuple[list[int], float] | None:
        pick = chosen.get(source)
        return None if not pick else ([int(pick["layer"])], float(pick["gamma"]))

    def style_max(chosen: dict) -> float | None:  # the largest γ whose decoded answers passed the guards (None: no cap)
        cap = (chosen.get(source) or {}).get("gamma_max")
        return None if cap is None else float(cap)

    def kept_lambdas(chosen: dict) -> list[float]:  # the λ whose decoded answers passed the guards
        passed = (chosen.get("influence") or {}).get("lambdas")
        # (the calibration's λ went through float32 Parquet columns: compared with a tolerance)
        return lambdas if passed is None else [lam for lam in lambdas if any(math.isclose(lam, p, rel_tol=1e-6)
                                                                            for p in passed)]

    def caps(curves: dict) -> dict[str, float]:  # per method: the largest α whose decoded answers passed the guards
        out = {}
        for m, found in curves.items():
            points = found.get("curve") if isinstance(found, dict) else None
            if not points or not all("perplexity_ratio" in c for c in points):
                continue  # the decoded guard was off: no cap
            kept = [c["alpha"] for c in points if config.scale.passes(c)]
            out[m] = float(max(kept, default=found["alpha"]))
        return out

    plain = g.get("steerx_recommended") or {}
    out = {"plain": rec.Strengths(dict(g["scales"]), style(plain), source, kept_lambdas(plain), caps(scale_curves),
                                  style_max(plain))}
    if config.scale.composed is not None:
        history = scale_curves.get("history") or {}
        alpha = {m: float(history[m]["alpha"]) if isinstance(history.get(m), dict) and "alpha" in history[m]
                 else float(g["scales"][m]) for m in g["scales"]}
        composed = g.get("steerx_recommended_history") or {}
        out["history"] = rec.Strengths(alpha, style(composed), source, kept_lambdas(composed), caps(history),
                                       style_max(composed))
    return out


def shard_artifacts(tables: dict[str, pa.Table | None], g: dict, config) -> dict[str, UserArtifacts]:
    """Each user's artifacts as serving would read them, from a shard's store rows (no store read)."""
    population = _population(g)
    arts: dict[str, UserArtifacts] = {}

    def art(uid: str) -> UserArtifacts:
        if uid not in arts:
            arts[uid] = UserArtifacts(uid, "found", population=population)
        return arts[uid]

    for r in _rows(tables.get("vectors")):
        vec = UserVectors(user_id=r["user_id"], layers=list(r["layers"]), vectors=np.asarray(r["vectors"], np.float32),
                          recommended_layers=list(r["recommended_layers"] or []),
                          recommended_scale=float(r["recommended_scale"] or 0.0), positions=r["positions"],
                          model_id=r["model_id"], model_fingerprint=r["model_fingerprint"], n_pairs=int(r["n_pairs"] or 0))
        if r["method"] == "caa":
            art(r["user_id"]).caa = vec
        else:
            art(r["user_id"]).style_vectors[r["source"]] = vec
    row = g.get("population_row")
    if g.get("basis") is not None and population is not None:
        norms = np.linalg.norm(np.asarray(g["population_mean"], dtype=np.float64), axis=-1)
        for r in _rows(tables.get("bt_coords")):
            if r.get("theta") is None:
                continue
            art(r["user_id"]).bt = UserVectors(
                user_id=r["user_id"], layers=list(row["layers"]),
                vectors=compose(np.asarray(r["theta"], np.float64), g["basis"], norms),
                recommended_layers=list(row["recommended_layers"]), recommended_scale=float(g["scales"]["bt"]),
                positions=row["positions"], model_id=row["model_id"], model_fingerprint=row["model_fingerprint"],
                n_pairs=0)
    clusters = {int(c): r for c, r in (g.get("dps_clusters") or {}).items() if r}
    for r in _rows(tables.get("dps_heads")):
        heads = serving_heads(r, clusters if not r["heads"] else {}, config.dps.top_k)
        art(r["user_id"]).dps = UserHeads(
            user_id=r["user_id"], heads=heads, source=r["source"] if heads else "none", gamma=float(r["gamma"]),
            adaptive=bool(r["adaptive"]), plausibility=float(r["plausibility"]), cluster=r["cluster"],
            routing=list(r["routing"] or []), mode=r["mode"], pcs_baseline=r["pcs_baseline"],
            model_fingerprint=r["model_fingerprint"])
    for r in _rows(tables.get("steerx_users")):
        art(r["user_id"]).steerx = r
    return arts


def _rows(table: pa.Table | None) -> list[dict]:
    return [] if table is None or not table.num_rows else table.to_pylist()


def _population(g: dict) -> UserVectors | None:
    row = g.get("population_row")
    if row is None:
        return None
    return UserVectors(user_id=None, layers=list(row["layers"]), vectors=np.asarray(row["vectors"], np.float32),
                       recommended_layers=list(row["recommended_layers"]),
                       recommended_scale=float(g["scales"]["population"]), positions=row["positions"],
                       model_id=row["model_id"], model_fingerprint=row["model_fingerprint"], n_pairs=int(row["n_pairs"]))


def _cases(state: dict, tables: dict, g: dict, config, users: list[str]) -> list[rec.UserCase]:
    arts = shard_artifacts(tables, g, config)
    held, train = state.get("held") or {}, state.get("train") or {}
    return [rec.UserCase(u, held[u], train.get(u, []), rec.candidates(arts[u], g["recommend_strengths"], config.recommend))
            for u in users if u in arts and u in held]


def evidence(runtime: ModelRuntime, state: dict, config, g: dict) -> list[dict]:
    """The sample phase: every held-out user's candidates and gains, for the population's prior."""
    tables, _, _ = store_tables(state, config, g)
    cases = _cases(state, tables, g, config, sorted(state.get("held") or {}))
    scored = rec.score(runtime, cases, config.scale.composed)
    guarded = (rec.decoded_guard(runtime, cases, config.scale.composed, config.scale)
               if config.scale.fluency_tokens else {})
    return [{"user_id": c.user_id, "candidates": [_meta(k) for k in c.candidates], "gains": scored[c.user_id][0],
             "tokens": scored[c.user_id][1], "guard": guarded.get(c.user_id) or {}}
            for c in cases if c.user_id in scored]


def _meta(c: rec.Candidate) -> dict:
    return {"key": c.key, "condition": c.condition, "method": c.method, "source": c.source,
            "multiplier": c.multiplier, "scale": c.scale}


def prior_from(evidence_rows: list[dict], guard=None) -> dict:
    """The population's gains per candidate key and its choice per condition, from the sample's evidence; with a
    ``guard`` (``ScaleConfig``) and decoded DPS answers in the evidence, their pooled figures (``guard``), and a
    DPS candidate that failed them is not the population's choice."""
    pooled = rec.pool([([c["key"] for c in e["candidates"]], e["gains"], e["tokens"]) for e in evidence_rows])
    meta: dict[str, rec.Candidate] = {}  # the first sampled user's strength per key (a DPS γ is the user's own)
    for c in (c for e in evidence_rows for c in e["candidates"]):
        meta.setdefault(c["key"], rec.Candidate(c["condition"], c["method"], c["source"], c["multiplier"], c["scale"]))
    per_token = rec.prior_per_token(pooled)
    figures = rec.guard_figures([e.get("guard") or {} for e in evidence_rows], guard) if guard is not None else {}
    eligible = {k: v for k, v in per_token.items() if figures.get(k, {}).get("passes", True)}
    return {"pooled": pooled, "per_token": per_token, "population": rec.population_choice(meta, eligible),
            "users": len(evidence_rows), "tokens": int(sum(e["tokens"] for e in evidence_rows)), "guard": figures}


def compute_prior(config, run, sampler, pool, gen, g: dict, public) -> None:
    """Global statistics: the population's prior and choice, from a pseudo-shard of sampled users."""
    g["recommend_strengths"] = strengths(config, g, g.get("scale_curves") or {})
    sample = sampler.sample("recommend")
    g["recommend"] = {"prior": {}, "population": {}, "users": 0, "tokens": 0, "sample": len(sample.users)}
    g["recommend_sample"] = list(sample.users)  # whose items the prior pools (forget drops statistics holding them)
    if sample.users:
        uri = storage.join(run.staging, "recommend", "sample.parquet")
        storage.write_parquet(uri, sampler.users_table(sample.users), config.storage)
        pool.call_all("set_globals", public(g))
        if gen is not pool:
            gen.call_all("set_globals", public(g))
        state = pool.first("user_pass", -1, uri, run.staging)
        if g["steerx_active"]:
            state = gen.first("describe_shard", state)
            if config.steerx.vectors.enabled:
                state = pool.first("description_pass", state)
        found = prior_from(pool.first("recommend_evidence", state), config.scale)
        g["recommend"].update(prior=found["per_token"], population=found["population"], users=found["users"],
                              tokens=found["tokens"], guard=found["guard"])
        _guard_dps(config, g, found["guard"])
    g["recommend"]["id"] = content_digest([g["recommend"], to_dict(config.recommend),
                                           {c: vars(s) for c, s in g["recommend_strengths"].items()}])
    if not g["recommend"]["population"]:
        log.warning("recommend: no sampled user had held-out items to score (recommend.min_items=%d); users without "
                    "their own choice get none", config.recommend.min_items)


def _guard_dps(config, g: dict, figures: dict[str, dict]) -> None:
    """Offer each condition's DPS candidates only at the multipliers that passed the decoded guard (and say when the
    store's own γ, the 1× candidate, did not: serving's default DPS strength then breaks the guards there)."""
    for condition, s in (g.get("recommend_strengths") or {}).items():
        kept = rec.passing_multipliers(figures, condition)
        if kept is None:
            if config.scale.fluency_tokens and "dps" in config.recommend.methods and g.get("dps_active"):
                log.info("recommend: no sampled user had DPS heads and a held-out item to decode %s; DPS candidates "
                         "there are offered unguarded", _where(condition))
            continue
        s.dps_multipliers = kept
        own = [f for f in figures.values() if f["condition"] == condition and math.isclose(f["multiplier"], 1.0)]
        if own and not own[0]["passes"]:
            log.warning("recommend: DPS at the store's γ (dps.gamma=%g) failed the decoded guards %s (%s); the "
                        "recommendation offers DPS there only at %s", config.dps.gamma, _where(condition),
                        "; ".join(_figure(f) for f in figures.values() if f["condition"] == condition),
                        ", ".join(f"{m:g}×" for m in kept) or "no strength")


def _where(condition: str) -> str:
    return "on the plain prompt" if condition == "plain" else "on top of retrieved history"


def _figure(f: dict) -> str:
    """One DPS guard figure for the log: its multiplier, perplexity ratio and drift against the limit."""
    ratio = "no tokens decoded" if f["perplexity_ratio"] is None else f"perplexity {f['perplexity_ratio']:.2f}×"
    drift = f", drift {f['content_drift']:.2f} (limit {f['drift_limit']:.2f})" if "content_drift" in f else ""
    return f"{f['multiplier']:g}×: {ratio}{drift}"


def shard_pass(runtime: ModelRuntime, state: dict, config, g: dict) -> dict:
    """The shard's ``recommended`` rows: carried when unchanged, else chosen (own items, shrunk) or the population's."""
    info = g.get("recommend")
    if not config.recommend.enabled or info is None:
        return state
    tables, _, _ = store_tables(state, config, g)
    stored = _stored_users(tables)
    before: dict[str, list[dict]] = {}
    for r in _rows(state.get("previous_recommended")):
        before.setdefault(r["user_id"], []).append(r)
    fps = state.get("fingerprints") or {}
    kept = set(_ids((state.get("carried") or {}).get("users")))  # absent users kept as they were
    model_fp = g["model"]["model_fingerprint"]
    rows, todo, fp_of = [], [], {}
    for u in sorted(stored):
        held = (state.get("held") or {}).get(u)  # the items it is chosen on (the families' fingerprints may not see them)
        fp = rec.fingerprint([sorted((fps.get(u) or {}).items()), info["id"], held])
        fp_of[u] = fp
        old = before.get(u)
        if old and (u in kept or all(r["fingerprint"] == fp for r in old)):
            rows += old
        elif u in (state.get("held") or {}):
            todo.append(u)
        elif info["population"]:
            rows += rec.population_rows(u, info["population"], fp, model_fp)
    if todo:
        cases = _cases(state, tables, g, config, todo)
        scored = rec.score(runtime, cases, config.scale.composed)
        for c in cases:
            gains, tokens = scored[c.user_id]
            choice = rec.choose(c.candidates, gains, tokens, info["prior"], config.recommend.prior_tokens)
            rows += rec.rows_for(c.user_id, choice, len(c.held), tokens, "user", fp_of[c.user_id], model_fp)
    state["recommended"] = rec.table(rows) if rows else None
    return state


def _stored_users(tables: dict) -> set[str]:
    """Users with at least one artifact in the shard's tables."""
    out: set[str] = set()
    for name in ("vectors", "bt_coords", "dps_heads", "steerx_users"):
        out |= {u for u in _ids(tables.get(name)) if u is not None}
    return out


def _ids(table: pa.Table | None) -> list:
    return [] if table is None or not table.num_rows else table.column("user_id").to_pylist()


__all__ = ["compute_prior", "evidence", "held_out", "shard_artifacts", "shard_pass", "strengths"]
