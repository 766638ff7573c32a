"""Phase 2: the global statistics, from seeded user samples, before the per-user pass.

Computed on the model workers (each loads its model once for the whole run):

- CAA / BT: the population direction and the preference basis from the basis sample's mean
  differences, θ_pop from their pairs' features, and the recommended α per method from a seeded
  sample of their training pairs;
- DPS: the k-means clusters (sentence-encoder embeddings of a sample), the population PCS
  baseline (every head ablated for a small exact sample) and each cluster's heads;
- SteerX: the counterfactual pool (an exact sample's items) and the recommended style-vector
  layer and γ (leave-one-item-out calibration on an exact sample, which runs the whole SteerX
  chain for those users).

The sample users' results (CAA rows, the calibration users' SteerX rows) are written to the
staging folder per bucket, so the per-user pass reuses them instead of computing them again.
The statistics are saved with the run: a resumed run uses exactly the same ones.
"""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steerstore.infra import storage
from steerstore.infra.artifacts import compose
from steerstore.infra.config import to_dict
from steerstore.jobs.refresh.common import Timer
from steerstore.infra.lifecycle import forgotten_hashes
from steerstore.jobs.refresh.config import RefreshConfig
from steerstore.jobs.refresh.incremental import Previous, carry_plan, finish_plan, plan_globals
from steerstore.jobs.refresh.pool import Pool
from steerstore.jobs.refresh.recommend import compute_prior
from steerstore.jobs.refresh.run import Run
from steerstore.jobs.refresh.samples import Sample, choose, sample_plan
from steerstore.jobs.refresh.shards import Shards
from steerstore.jobs.refresh.tables import MODEL_FIELDS, dps_population_table
from steerstore.jobs.refresh.workers import ok_rows, read_rows
from steerstore.operators.bt import build_basis, feature_scales, in_sample, population_theta
from steerstore.operators.caa import vector_row
from steerstore.operators.cluster import kmeans, routing_weights
from steerstore.operators.dps import PopulationPCS, cluster_sequences, dps_user_rows
from steerstore.operators.history import retrieved_prompt
from steerstore.operators.style import choose_recommended

log = logging.getLogger("steerstore")


def compute_globals(config: RefreshConfig, run: Run, shards: Shards, pool: Pool, gen: Pool, model: dict,
                    estimated_users: int, history_methods: dict[str, bool], timer: Timer,
                    previous: Previous | None = None) -> dict:
    """The run's global statistics (saved in staging; a resumed run reads them back).

    With a ``previous`` version (incremental refresh), each family's statistics are reused as they
    were unless they are due (``incremental.plan_globals``); ``g["carry"]`` tells the workers where
    to find the rows of unchanged users.
    """
    saved = _load(run)
    if saved is not None:
        log.info("refresh: global statistics of the interrupted run reused")
        return saved
    sampler = Sampler(config, run, shards, sample_plan(config, estimated_users))
    g: dict = {"model": model, "dps_active": history_methods["dps"], "steerx_active": history_methods["steerx"],
               "smoothing_fingerprint": (gen.info if gen is not pool else model)["model_fingerprint"],
               "population_mean": None, "population_row": None, "basis": None, "feature_norms": None,
               "theta_pop": None, "n_sample": 0, "sample_fraction": 0.0, "caa_sample": [],
               "scales": {"population": config.caa.scale, "caa": config.caa.scale, "bt": config.bt.scale},
               "scale_curves": {}, "dps_centroids": None, "dps_population": None, "dps_model": None,
               "dps_clusters": None, "steerx_pool": [], "steerx_recommended": {}, "steerx_recommended_history": {},
               "steerx_calibration": [],
               "steerx_calibrated": [], "steerx_uncalibrated": None, "samples": {}}
    frozen, decisions = plan_globals(config, previous, g, {"caa": True, **history_methods})
    for family, values in frozen.items():
        g.update(values)
    if frozen:
        timer.lap("frozen statistics", ", ".join(f"{f} (from {decisions[f]['computed_in']}, run {decisions[f]['runs']})"
                                                 for f in frozen))
    if "caa" not in frozen and shards.eligible("bt"):
        _caa(config, run, sampler, pool, g, model)
        timer.lap("sample caa", f"population and basis from {g['n_sample']} users"
                  + (f"; α {g['scales']}" if g["scale_curves"] else ""))
    if g["dps_active"] and "dps" not in frozen and shards.eligible("dps_baseline"):
        _dps(config, sampler, pool, g, model)
        timer.lap("sample dps", f"{0 if g['dps_centroids'] is None else len(g['dps_centroids'])} clusters, baseline "
                                f"of {0 if g['dps_population'] is None else g['dps_population'].users} users")
    if g["steerx_active"] and "steerx" not in frozen and shards.eligible("steerx_pool"):
        _steerx(config, run, sampler, pool, gen, g)
        timer.lap("sample steerx", f"pool of {len(g['steerx_pool'])} items, calibration on "
                                   f"{len(g['steerx_calibrated'])} users")
    if config.recommend.enabled and (g["dps_active"] or g["steerx_active"] or g["population_mean"] is not None) \
            and config.inputs.histories:
        _recommend(config, run, sampler, pool, gen, g, previous, frozen, decisions)
        chosen = ", ".join(f"{c}: {p['method']}" + ("" if p["scale"] is None else f" at {p['scale']:g}")
                           + f" ({p['gain_per_token']:+.3f} nats/token)" for c, p in g["recommend"]["population"].items())
        timer.lap("sample recommend", f"population's choice from {g['recommend']['users']} users: {chosen or 'none'}")
    g["samples"] = {**((previous.state or {}).get("samples", {}) if frozen else {}),
                    **{k: {"users": len(s.users), "eligible": s.eligible, "fraction": s.fraction}
                       for k, s in sampler.chosen.items()}}
    g["globals"] = finish_plan(decisions, run.version, g)
    g["carry"] = carry_plan(config, previous, shards.buckets)
    if g["carry"] is not None and g["carry"]["absent"] == "keep":
        g["carry"]["forgotten"] = sorted(forgotten_hashes(run.store))
    storage.write_bytes(run.globals_uri, pickle.dumps(g), config.storage)
    return g


def _recommend(config: RefreshConfig, run: Run, sampler: "Sampler", pool: Pool, gen: Pool, g: dict,
               previous: Previous | None, frozen: dict, decisions: dict) -> None:
    """The per-user choice's prior: reused while every family's statistics are frozen and its settings hold."""
    old = (previous.state or {}) if previous is not None else {}
    settings = [to_dict(config.recommend), to_dict(config.scale)]
    # (a prior pooled before the DPS guard existed has no "guard": recomputed once when the guard is on)
    guarded = "guard" in (old.get("recommend") or {}) or not config.scale.fluency_tokens
    if frozen and set(frozen) == set(decisions) and old.get("recommend") and old.get("recommend_settings") == settings \
            and guarded:
        g.update(recommend=old["recommend"], recommend_strengths=old["recommend_strengths"],
                 recommend_sample=old.get("recommend_sample") or [])
    else:
        compute_prior(config, run, sampler, pool, gen, g, _public)
    g["recommend_settings"] = settings


def _load(run: Run) -> dict | None:
    try:
        return pickle.loads(storage.read_bytes(run.globals_uri, run.store.storage))
    except FileNotFoundError:
        return None


class Sampler:
    """Chooses samples from the shards' candidate files and hands out the sampled users' rows."""

    def __init__(self, config: RefreshConfig, run: Run, shards: Shards, plan: dict[str, float]):
        self.config, self.run, self.shards, self.plan = config, run, shards, plan
        self.chosen: dict[str, Sample] = {}
        self._index: dict[str, list[dict]] = {}  # "candidates" | "shards" -> (user_id, bucket, pairs, histories)

    def _rows(self, source: str) -> list[dict]:
        """user_id, bucket and list lengths of every candidate (or, as a fallback, of every user)."""
        if source not in self._index:
            uri = self.run.candidates_uri if source == "candidates" else self.run.shard_uri
            rows = []
            for b in self.shards.with_users:
                t = read_rows(uri(b), self.config)
                if source == "shards":
                    t = ok_rows(t)
                rows += [{"user_id": u, "bucket": b, "pairs": [None] * n_p, "histories": [None] * n_h}
                         for u, n_p, n_h in zip(t.column("user_id").to_pylist(),
                                                pc.list_value_length(t.column("pairs")).to_pylist(),
                                                pc.list_value_length(t.column("histories")).to_pylist())]
            self._index[source] = rows
        return self._index[source]

    def sample(self, kind: str) -> Sample:
        if kind not in self.chosen:
            eligible = self.shards.eligible(kind)
            try:
                s = choose(kind, self.config, self._rows("candidates"), eligible, self.plan)
            except ValueError as exc:
                log.info("refresh: %s; reading every shard for this sample", exc)
                s = choose(kind, self.config, self._rows("shards"), eligible, {})
            self.chosen[kind] = s
        return self.chosen[kind]

    def selection(self, users: list[str]) -> dict[int, tuple[str, list[str]]]:
        """bucket -> (file holding the users, their ids): what a worker reads to get these users' rows."""
        wanted = set(users)
        source = "candidates" if all(u in {r["user_id"] for r in self._rows("candidates")} for u in wanted) \
            else "shards"
        uri = self.run.candidates_uri if source == "candidates" else self.run.shard_uri
        out: dict[int, tuple[str, list[str]]] = {}
        for r in self._rows(source):
            if r["user_id"] in wanted:
                out.setdefault(r["bucket"], (uri(r["bucket"]), []))[1].append(r["user_id"])
        return out

    def users_table(self, users: list[str]) -> pa.Table:
        """The full rows of a few sampled users (read on the driver: only for small samples)."""
        parts = []
        for uri, ids in self.selection(users).values():
            t = read_rows(uri, self.config)
            parts.append(t.filter(pa.compute.is_in(t.column("user_id"), pa.array(ids, pa.string()))))
        return pa.concat_tables(parts).sort_by("user_id") if parts else pa.table({"user_id": pa.array([], pa.string())})


# ---- CAA and BT ---------------------------------------------------------------------------------

def _caa(config: RefreshConfig, run: Run, sampler: Sampler, pool: Pool, g: dict, model: dict) -> None:
    import ray

    sample = sampler.sample("bt")
    g["sample_fraction"] = sample.fraction
    # bucket b's sample users go to worker b mod n: each bucket's cache file is written by one worker;
    # the sample's mean differences go from the workers to one reduce task, never to the driver
    refs = pool.by_bucket_refs("caa_sample", sampler.selection(sample.users))
    reduced = ray.get(ray.remote(_reduce_caa_sample).options(num_cpus=1).remote(
        config.bt.k if config.bt.enabled else 0, *refs))
    if reduced is None:
        return
    population = reduced["population"]
    g.update(population_mean=population, n_sample=len(reduced["users"]), caa_sample=[u for u, _ in reduced["users"]],
             basis=reduced["basis"], feature_norms=reduced["feature_norms"])
    layers, recommended = config.caa.resolve_layers(model["num_layers"])
    g["population_row"] = vector_row(
        None, "population", population, reduced["n_pairs"], None, layers=layers, recommended=recommended,
        positions=config.caa.apply_positions, scale=config.caa.scale, hidden_size=model["hidden_size"],
        model_id=model["model_id"], model_fingerprint=model["model_fingerprint"])
    if config.bt.enabled:
        pooled = sorted((f for out in pool.call_all("sample_features", g["basis"], g["feature_norms"]) for f in out),
                        key=lambda f: f[0])
        x = np.concatenate([f[1] for f in pooled]).reshape(-1, config.bt.k)
        weights = np.concatenate([f[2] for f in pooled])
        g["theta_pop"] = population_theta(x, weights, config.bt)
    if config.scale.enabled:
        _scales(config, sampler, pool, g, reduced["users"], reduced["weight_sum"])
    g["population_row"]["recommended_scale"] = g["scales"]["population"]
    pool.call_all("cache_caa_sample", _public(g), run.staging)
    pool.call_all("drop_sample")


def _reduce_caa_sample(k: int, *outputs: list[dict]) -> dict | None:
    """The sample's population direction (Σ w·mean / Σ w), and with ``k`` the basis and feature scales."""
    means = sorted((r for out in outputs for r in out), key=lambda r: r["user_id"])
    if not means:
        return None
    w = np.asarray([r["weight_sum"] for r in means])
    stacked = np.stack([r["mean"] for r in means])  # (users, layers, hidden)
    population = (np.einsum("u,ulh->lh", w, stacked) / w.sum()).astype(np.float32)
    out = {"population": population, "n_pairs": int(sum(r["n_pairs"] for r in means)), "weight_sum": float(w.sum()),
           "users": [(r["user_id"], r["n_pairs"]) for r in means], "basis": None, "feature_norms": None}
    if k:
        out.update(basis=build_basis(stacked, population, k), feature_norms=feature_scales(stacked))
    return out


def population_without(population: np.ndarray, weight_sum: float, pair: dict) -> np.ndarray:
    """The population direction (Σ w·d / Σ w over the sample's pairs) without one pair (its weight and difference)."""
    rest = weight_sum - pair["weight"]
    if rest <= 0:
        return population
    return ((weight_sum * population.astype(np.float64) - pair["weight"] * pair["difference"]) / rest).astype(np.float32)


def _scales(config: RefreshConfig, sampler: Sampler, pool: Pool, g: dict, users: list[tuple[str, int]],
            weight_sum: float) -> None:
    """α per method, from a seeded sample of the basis-sample users' own training pairs."""
    candidates = [(u, j) for u, n in users for j in range(n)]
    rng = np.random.default_rng(config.scale.seed)
    picked = [candidates[i] for i in sorted(rng.choice(len(candidates), min(config.scale.sample_pairs,
                                                                           len(candidates)), replace=False))]
    users = sorted({u for u, _ in picked})
    rows = {r["user_id"]: r for r in sampler.users_table(users).to_pylist()}
    pairs = [rows[u]["pairs"][j] for u, j in picked]
    finals: dict = {}
    leave_out: dict[str, list[int]] = {}
    if config.scale.out_of_sample:  # each scored pair steered by its user's vector fitted without it
        for u, j in picked:
            leave_out.setdefault(u, []).append(j)
    for out in pool.call_all("sample_finals", users, g["population_mean"], g["theta_pop"], g["basis"],
                             g["feature_norms"], leave_out):
        finals.update(out)

    def fit(u: str, j: int) -> dict:
        return finals[u]["loo"][j] if config.scale.out_of_sample else finals[u]
    row = g["population_row"]
    layers, stored = list(row["recommended_layers"]), list(row["layers"])
    at = [stored.index(l) for l in layers]
    population = g["population_mean"]
    if config.scale.out_of_sample:  # the population direction without the scored pair, too
        own = [population_without(population, weight_sum, finals[u]["pair"][p]) for u, p in picked]
    else:
        own = [population] * len(picked)
    methods = {
        "population": {l: np.stack([o[j] for o in own]) for l, j in zip(layers, at)},
        "caa": {l: np.stack([fit(u, p)["vectors"][j] for u, p in picked]) for l, j in zip(layers, at)},
    }
    if g["theta_pop"] is not None:
        norms = np.linalg.norm(population, axis=-1).astype(np.float64)
        composed = [compose(fit(u, p)["theta"], g["basis"], norms) for u, p in picked]
        methods["bt"] = {l: np.stack([c[j] for c in composed]) for l, j in zip(layers, at)}
    composed = config.scale.composed
    keep, shown = _composed_pairs(composed, picked, rows, pairs) if composed is not None else ([], [])
    if config.scale.content_guard:  # the plain call measures what the history prompt does to the answers
        pairs = [dict(pair) for pair in pairs]
        for k, pair in zip(keep, shown):
            pairs[k]["history_prompt"] = pair["prompt"]
    result = pool.first("choose_scales", pairs, methods, row["positions"])
    g["scale_curves"] = {**result, "pairs": len(picked), "users": len(users),
                         "pairs_scored": "out of sample (leave-one-pair-out vectors, θ and population direction; "
                                         "θ_pop, the basis and the CAA shrinkage target still include the pair)"
                         if config.scale.out_of_sample
                         else "in sample (the vectors were fitted on these pairs)"}
    g["scales"].update({m: r["alpha"] for m, r in result.items() if m in g["scales"]})
    if composed is not None:
        reference = next((r["drift_reference"] for r in result.values() if "drift_reference" in r), None)
        g["scale_curves"]["history"] = _composed_scales(pool, composed, keep, shown, methods, row["positions"],
                                                        reference)


def _composed_pairs(composed, picked: list[tuple[str, int]], rows: dict, pairs: list[dict]) -> tuple[list[int],
                                                                                                      list[dict]]:
    """The composed condition's pairs: (indices kept, pairs) with each prompt after its user's top-k history items by
    BM25 (never the item the pair was made from: one with the pair's prompt); a user without items is left out."""
    keep, shown = [], []
    for k, ((u, _), pair) in enumerate(zip(picked, pairs)):
        train = [h for h in rows[u]["histories"] or [] if (h["output"] or "").strip() and h["input"] != pair["prompt"]]
        if train:
            keep.append(k)
            shown.append(dict(pair, prompt=retrieved_prompt(train, pair["prompt"], composed)))
    return keep, shown


def _composed_scales(pool: Pool, composed, keep: list[int], shown: list[dict], methods: dict, positions: str,
                     drift_reference: float | None) -> dict:
    """α per method in the composed condition: the same pairs and vectors on the history prompt (the content guard's
    reference is the plain condition's: what the history prompt does to the unsteered answers)."""
    if not keep:
        return {"skipped": "no sampled pair's user has history items to show"}
    subset = {m: {l: v[keep] for l, v in by_layer.items()} for m, by_layer in methods.items()}
    result = pool.first("choose_scales", shown, subset, positions, drift_reference)
    return {**result, "pairs": len(keep), "history_items": composed.context_items,
            "history_chars": composed.context_chars}


# ---- DPS ----------------------------------------------------------------------------------------

def _dps(config: RefreshConfig, sampler: Sampler, pool: Pool, g: dict, model: dict) -> None:
    dps = config.dps
    shape = (model["num_layers"], model["num_heads"])
    dps_model = {k: model[k] for k in MODEL_FIELDS}
    g["dps_model"] = dps_model
    pop_rows = []
    if dps.pcs_baseline == "population":
        sample = sampler.sample("dps_baseline")
        rows = dps_user_rows(sampler.users_table(sample.users), dps.history)
        scored = [r for out in pool.spread("dps_score", rows, full=True) for r in out.to_pylist()]
        pop_rows = sorted((r for r in scored if r["status"] == "ok"), key=lambda r: r["user_id"])
        if not pop_rows:
            reasons = sorted({r["reason"] for r in scored})[:3]
            raise RuntimeError(f"dps: none of the {len(scored)} users of the baseline sample could be scored "
                               f"({reasons}); fix those users or run with dps.pcs_baseline=none")
        g["dps_population"] = PopulationPCS.from_rows(pop_rows, shape)
    if dps.clusters:
        sample = sampler.sample("dps_clusters")
        embedded = pool.spread_selection("embed_sequences", sampler.selection(sample.users))
        table = pa.concat_tables(embedded).sort_by("user_id")
        emb = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
        centroids, _, _ = kmeans(emb, min(dps.clusters, len(emb)), seed=dps.seed)
        labels, _ = routing_weights(emb, centroids, dps.routing_temperature)
        counts = {int(c): int(n) for c, n in zip(*np.unique(labels, return_counts=True))}
        members = []
        for c, count in sorted(counts.items()):
            fraction = min(1.0, 4 * dps.cluster_items / count)
            members += [{"user_id": u, "cluster": int(lab), "sequences": seqs}
                        for u, lab, seqs in zip(table.column("user_id").to_pylist(), labels.tolist(),
                                                table.column("sequences").to_pylist())
                        if lab == c and in_sample(u, dps.seed + 1, fraction)]
        pseudo = [{"user_id": f"cluster:{c}", "scope": "cluster", "sequences": seqs, "cluster": c, "routing": None,
                   "content_fingerprint": None}
                  for c, seqs in cluster_sequences(members, len(centroids), dps.cluster_items, dps.seed).items()]
        g["dps_centroids"] = centroids
        g["dps_sample_counts"] = counts
        results = {}
        if pseudo:
            table = pa.Table.from_pylist(pseudo, schema=_PSEUDO_SCHEMA)
            scored = pool.first("dps_score_with", table, g["dps_population"])
            results = {int(r["cluster"]): r for r in scored.to_pylist()}
        g["dps_clusters"] = results
        if not dps.per_user and not any(r["status"] == "ok" for r in results.values()):
            raise RuntimeError("dps: no cluster could be scored, so users have no heads (dps.per_user=false)")
    g["dps_population_table"] = dps_population_table(g["dps_population"], dps_model)


_PSEUDO_SCHEMA = pa.schema([("user_id", pa.string()), ("scope", pa.string()),
                            ("sequences", pa.list_(pa.struct([("prompt", pa.string()), ("output", pa.string())]))),
                            ("cluster", pa.int32()), ("routing", pa.list_(pa.float32())),
                            ("content_fingerprint", pa.string())])


# ---- SteerX -------------------------------------------------------------------------------------

def _steerx(config: RefreshConfig, run: Run, sampler: Sampler, pool: Pool, gen: Pool, g: dict) -> None:
    sx = config.steerx
    if sx.counterfactual == "other_users":
        sample = sampler.sample("steerx_pool")
        for r in sampler.users_table(sample.users).to_pylist():
            g["steerx_pool"] += [{**h, "user_id": r["user_id"]} for h in r["histories"][-sx.history.max_items:]]
    pool.call_all("set_globals", _public(g))
    if not sx.vectors.enabled:
        return
    sample = sampler.sample("steerx_calibration")
    train, validation = validation_split(sampler.users_table(sample.users), sx.vectors.validation_items,
                                         config.prepare.min_histories)
    if train.num_rows == 0:
        g["steerx_uncalibrated"] = (f"no calibration user has {max(2, config.prepare.min_histories)} items to train "
                                    "on and 1 more to validate on")
        log.warning("steerx: %s; the style vectors' layer and γ and the influence λ are not chosen (serving uses "
                    "their defaults)", g["steerx_uncalibrated"])
        return
    # the calibration users' SteerX chain runs on their training items only; the user pass computes their
    # stored artifacts from all their items, like everyone else's
    state = pool.first("calibration_anchors", train)
    state = gen.first("describe_shard", state)
    styled = pool.first("calibration_styles", state, validation)
    curve = [c for r in styled.to_pylist() if r["status"] == "ok" for c in (r["calibration"] or [])]
    g["steerx_calibration"] = curve
    g["steerx_recommended"] = choose_recommended(curve, guard=config.scale)
    g["steerx_recommended_history"] = choose_recommended(curve, "history", config.scale)
    g["steerx_calibrated"] = sorted(styled.column("user_id").to_pylist())
    for condition, chosen in (("plain prompt", g["steerx_recommended"]),
                              ("history prompt", g["steerx_recommended_history"])):
        for source, choice in chosen.items():
            if choice.get("passes_guards") is False:
                log.warning("steerx %s on the %s: no %s passed the decoded fluency and content guards (scale.*); the "
                            "smallest is kept (perplexity ×%.2f, content drift %.2f against a limit of %s)", source,
                            condition, "λ" if source == "influence" else "layer and γ", choice["perplexity_ratio"],
                            choice.get("content_drift", float("nan")), choice.get("drift_limit", "none"))
    for source, choice in g["steerx_recommended"].items():
        if choice["improves"]:
            continue
        if source == "influence":
            log.warning("steerx influence decoding: no λ of steerx.vectors.lambda_grid raised the held-out likelihood "
                        "of the calibration users' responses over the plain prompt (best %+.3f nats/token at λ=%g)",
                        choice["gain_per_token"], choice["lambda"])
        else:
            log.warning("steerx %s vectors: no layer and γ of steerx.vectors.gamma_grid raised the held-out "
                        "likelihood of the calibration users' responses (best %+.3f nats/token at layer %d, γ=%g); "
                        "add smaller γ or other layers", source, choice["gain_per_token"], choice["layer"],
                        choice["gamma"])


def validation_split(users: pa.Table, validation_items: int, min_histories: int) -> tuple[pa.Table, dict]:
    """Calibration users' histories without their last ``validation_items`` (by the list's order, most recent
    last; fewer when that would leave fewer than ``max(2, min_histories)`` to train on, at least 1), and those
    held-out items per user; users without enough items on both sides are left out."""
    rows, held = [], {}
    train_min = max(2, min_histories)
    for r in users.to_pylist():
        usable = [h for h in r["histories"] if (h["output"] or "").strip()]
        n = min(validation_items, len(usable) - train_min)
        if n < 1:
            continue
        keep, held[r["user_id"]] = usable[:-n], usable[-n:]
        rows.append({**r, "histories": keep})
    return pa.Table.from_pylist(rows, schema=users.schema), held


def cache_uri(run: Run, kind: str, bucket: int) -> str:
    return storage.join(run.staging, "cache", kind, f"{bucket:05d}.pkl")


def _public(g: dict) -> dict:
    """What workers need of the statistics (no tables meant for the manifest)."""
    return {k: v for k, v in g.items() if k not in ("dps_population_table", "scale_curves", "steerx_calibration")}


__all__ = ["Sampler", "cache_uri", "compute_globals"]
