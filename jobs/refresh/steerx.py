"""The SteerX stage: leave-one-out anchors, the smoothing LLM's descriptions, style vectors."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from steerstore.jobs.refresh.common import (
    Timer,
    exact_sample,
    failed_users,
    history_users,
    inner_join,
    model_actors,
    where,
)
from steerstore.jobs.refresh.config import RefreshConfig
from steerstore.jobs.refresh.smoothing import hf_engine, smooth, vllm_engine
from steerstore.operators.caa import vector_row
from steerstore.operators.runtime import TextEncoder
from steerstore.operators.smoothing import PROMPT_VERSION as SMOOTHING_PROMPT_VERSION
from steerstore.operators.smoothing import resolve_model, special_strings, user_context
from steerstore.operators.steerx import (
    STYLE_TEMPLATE,
    SteerXAnchors,
    SteerXConfig,
    SteerXStyleVectors,
    choose_recommended,
)
from steerstore.schemas.store import STEERX_TOKEN_EFFECTS_SCHEMA, STEERX_USERS_SCHEMA, VECTORS_SCHEMA, conform

log = logging.getLogger("steerstore")


def steerx_stage(config: RefreshConfig, ok_users, timer: "Timer") -> dict | None:
    """SteerX per user with enough history items: anchors, descriptions, style vectors (stages 1–4).

    A user failing any stage is quarantined for SteerX with that stage's reason; the stored
    users have every artifact the configuration asks for.
    """
    sx, res = config.steerx, config.resources
    users = history_users(ok_users, config).materialize()
    n_users = users.count()
    if n_users == 0:
        return None
    pool = []
    if sx.counterfactual == "other_users":
        sample = exact_sample(users, sx.pool_users, sx.seed + 2, n_users).select_columns(["user_id", "histories"])
        for r in sorted(sample.take_all(), key=lambda r: r["user_id"]):
            pool += [{**h, "user_id": r["user_id"]} for h in r["histories"][-sx.history.max_items:]]
    actors = model_actors(res, res.caa_batch_size)
    scored = users.map_batches(SteerXAnchors, fn_constructor_kwargs={"config": sx, "model": config.model, "pool": pool},
                               **actors).materialize()
    failed = failed_users(scored)
    ok = where(scored, "status", "ok").materialize()
    timer.lap("steerx anchors", f"{ok.count()} users with anchors, {len(failed)} failed, pool of {len(pool)} items")

    if sx.smoothing.enabled and ok.count():
        smoothing_model = resolve_model(sx.smoothing, config.model)
        engine = (vllm_engine(smoothing_model, sx.smoothing) if sx.smoothing.engine == "vllm"
                  else hf_engine(smoothing_model, sx.smoothing, actors))
        specials = special_strings(TextEncoder.load(smoothing_model).tokenizer)
        smoothed = smooth(ok.select_columns(["user_id", "anchors", "histories"]), sx.smoothing, engine,
                          specials, res.prepare_partitions).materialize()
        failed.update(failed_users(smoothed))
        described = where(smoothed, "status", "ok").drop_columns(["status", "reason"])
        ok = inner_join(ok, described, res.prepare_partitions)
        timer.lap("steerx smoothing", f"{ok.count()} users described ({sx.smoothing.engine}), "
                                      f"{len(failed)} failed so far")

    vectors, recommended, curve = None, {}, []
    if sx.vectors.enabled and ok.count():
        n_ok = ok.count()
        calibrate = None if n_ok <= sx.vectors.calibration_users else {  # None: every user calibrates
            r["user_id"] for r in exact_sample(ok, sx.vectors.calibration_users, sx.vectors.seed + 3, n_ok)
            .select_columns(["user_id"]).take_all()}
        inputs = ok.map_batches(_style_inputs, fn_kwargs={"calibrate": calibrate}, batch_format="pyarrow")
        styled = inputs.map_batches(SteerXStyleVectors, fn_constructor_kwargs={"config": sx, "model": config.model},
                                    **actors).materialize()
        failed.update(failed_users(styled))
        styled = where(styled, "status", "ok").materialize()
        curve = [c for r in styled.filter(lambda r: r["calibration"] is not None)
                 .select_columns(["calibration"]).take_all() for c in r["calibration"]]
        recommended = choose_recommended(curve)
        for source, choice in recommended.items():
            if not choice["improves"]:
                log.warning("steerx %s vectors: no layer and γ of steerx.vectors.gamma_grid raised the held-out "
                            "likelihood of the calibration users' responses (best %+.3f nats/token at layer %d, "
                            "γ=%g); add smaller γ or other layers", source, choice["gain_per_token"],
                            choice["layer"], choice["gamma"])
        vectors = styled.map_batches(_steerx_vector_rows, fn_kwargs={"config": sx, "recommended": recommended},
                                     batch_format="pyarrow").materialize()
        keep = styled.select_columns(["user_id"])
        ok = inner_join(ok, keep, res.prepare_partitions)
        timer.lap("steerx vectors", f"{ok.count()} users, " + ", ".join(
            f"{s}: layer {r['layer']} γ={r['gamma']:g} ({r['gain_per_token']:+.3f} nats/token)"
            for s, r in recommended.items()))

    user_rows = ok.map_batches(_steerx_user_rows, fn_kwargs={"config": sx}, batch_format="pyarrow").materialize()
    n_stored = user_rows.count()
    model = user_rows.take(1)[0] if n_stored else None
    return {"users": user_rows, "vectors": vectors, "n_vectors": vectors.count() if vectors is not None else 0,
            "effects": ok.map_batches(_steerx_effect_rows, batch_format="pyarrow"),
            "n_stored": n_stored, "failed": failed, "model": model,
            "recommended": recommended, "calibration": curve}


def _style_inputs(batch: pa.Table, calibrate: set[str] | None) -> pa.Table:
    ids = batch.column("user_id").to_pylist()
    descriptions = batch.column("descriptions") if "descriptions" in batch.column_names else \
        pa.array([[] for _ in ids], STEERX_USERS_SCHEMA.field("descriptions").type)
    return pa.table({"user_id": batch.column("user_id"), "histories": batch.column("histories"),
                     "descriptions": descriptions,
                     "calibrate": pa.array([calibrate is None or u in calibrate for u in ids], pa.bool_())})


def _steerx_vector_rows(batch: pa.Table, config: SteerXConfig, recommended: dict[str, dict]) -> pa.Table:
    """One ``vectors`` row per user and source (method steerx) with the recommended layer and γ."""
    rows = []
    for r in batch.select(["user_id", "layers", "sources", "vectors", "n_items", "model_id", "model_fingerprint",
                           "hidden_size"]).to_pylist():
        for source, vecs in zip(r["sources"], r["vectors"]):
            rec = recommended.get(source)
            rows.append(vector_row(
                r["user_id"], "user", np.asarray(vecs, dtype=np.float32), r["n_items"], None, layers=r["layers"],
                recommended=[rec["layer"]] if rec else [r["layers"][len(r["layers"]) // 2]],
                positions=config.vectors.apply_positions, scale=rec["gamma"] if rec else 1.0,
                hidden_size=r["hidden_size"], model_id=r["model_id"], model_fingerprint=r["model_fingerprint"],
                method="steerx", source=source))
    return pa.Table.from_pylist(rows, schema=VECTORS_SCHEMA)


def _steerx_user_rows(batch: pa.Table, config: SteerXConfig) -> pa.Table:
    n = batch.num_rows
    sm = config.smoothing
    described = "descriptions" in batch.column_names
    descriptions = batch.column("descriptions").to_pylist() if described else [[]] * n
    settings = {"counterfactual": config.counterfactual, "anchor_mode": config.anchor_mode, "tau": config.tau,
                "percentile": config.percentile, "min_anchors": config.min_anchors,
                "context_items": config.history.context_items, "selection": config.history.selection,
                "granularity": sm.granularity if described else None,
                "smoothing_engine": sm.engine if described else None,
                "smoothing_prompt": SMOOTHING_PROMPT_VERSION if described else None,
                "style_template": STYLE_TEMPLATE, "vector_source": config.vectors.source if config.vectors.enabled else None}
    out = batch.select(["user_id", "anchors", "n_items", "n_tokens", "content_fingerprint", "model_id",
                        "model_fingerprint"])
    for name, value in settings.items():
        out = out.append_column(name, pa.array([value] * n, STEERX_USERS_SCHEMA.field(name).type))
    for name in ("smoothing_model_id", "smoothing_model_fingerprint"):
        out = out.append_column(name, batch.column(name) if name in batch.column_names
                                else pa.nulls(n, pa.string()))
    out = out.append_column("descriptions", pa.array(descriptions, STEERX_USERS_SCHEMA.field("descriptions").type))
    out = out.append_column("context", pa.array([user_context(d) or None for d in descriptions], pa.string()))
    return conform(out, STEERX_USERS_SCHEMA)


def _steerx_effect_rows(batch: pa.Table) -> pa.Table:
    rows = [{"user_id": r["user_id"], "item_id": e["item_id"], "tokens": e["tokens"], "delta": e["delta"],
             "model_fingerprint": r["model_fingerprint"]}
            for r in batch.select(["user_id", "token_effects", "model_fingerprint"]).to_pylist()
            for e in (r["token_effects"] or [])]
    return pa.Table.from_pylist(rows, schema=STEERX_TOKEN_EFFECTS_SCHEMA)
