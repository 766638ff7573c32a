"""Rows of the store's tables, built per shard (CPU): the one place that knows each table's columns.

The model workers return operator rows; these functions turn them into ``vectors``, ``users``,
``quarantine``, ``dps_heads``, ``steerx_users`` and ``steerx_token_effects`` rows, and the
version-wide ``bt_basis``, ``dps_clusters`` and ``dps_population`` rows from the global statistics.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from steerstore.operators.bt import BTConfig
from steerstore.operators.caa import vector_row
from steerstore.operators.dps import DPS_OUTPUT_SCHEMA, DPSConfig, PopulationPCS
from steerstore.operators.smoothing import PROMPT_VERSION as SMOOTHING_PROMPT_VERSION
from steerstore.operators.smoothing import user_context
from steerstore.operators.steerx import SteerXConfig
from steerstore.operators.style import STYLE_TEMPLATE
from steerstore.schemas.store import (
    BT_BASIS_SCHEMA,
    BT_COORDS_SCHEMA,
    DPS_CLUSTERS_SCHEMA,
    DPS_HEADS_SCHEMA,
    DPS_POPULATION_SCHEMA,
    QUARANTINE_SCHEMA,
    STEERX_TOKEN_EFFECTS_SCHEMA,
    STEERX_USERS_SCHEMA,
    USERS_SCHEMA,
    VECTORS_SCHEMA,
    conform,
)

MODEL_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "model_id", "model_fingerprint")


def cluster_only_rows(batch: pa.Table, model: dict) -> pa.Table:
    """dps.per_user=false: users carry their routing only; their heads are their clusters'."""
    n = batch.num_rows
    out = {name: pa.nulls(n, field.type) for name, field in zip(DPS_OUTPUT_SCHEMA.names, DPS_OUTPUT_SCHEMA)}
    out.update({k: pa.array([model[k]] * n, DPS_OUTPUT_SCHEMA.field(k).type) for k in MODEL_FIELDS})
    out.update(user_id=batch["user_id"], scope=batch["scope"], status=pa.array(["ok"] * n), cluster=batch["cluster"],
               routing=batch["routing"], content_fingerprint=batch["content_fingerprint"],
               heads=pa.array([[]] * n, DPS_OUTPUT_SCHEMA.field("heads").type))
    return pa.table(out, schema=DPS_OUTPUT_SCHEMA)


def dps_heads_rows(batch: pa.Table, config: DPSConfig, clusters: bool) -> pa.Table:
    rows = []
    for r in batch.to_pylist():
        source = "user" if r["heads"] else ("cluster" if clusters else "none")
        rows.append({**r, "source": source, "gamma": config.gamma, "adaptive": config.adaptive,
                     "plausibility": config.plausibility})
    return conform(pa.Table.from_pylist(rows), DPS_HEADS_SCHEMA) if rows else DPS_HEADS_SCHEMA.empty_table()


def dps_clusters_table(centroids, results: dict, counts: dict, dps: DPSConfig, model: dict | None) -> pa.Table | None:
    if centroids is None or model is None:
        return None
    rows = []
    for c, centroid in enumerate(centroids):
        r = results.get(c) or {}
        rows.append({"cluster": c, "centroid": centroid.tolist(), "heads": r.get("heads") or [],
                     "n_users": counts.get(c, 0), "n_items": r.get("n_items", 0), "n_tokens": r.get("n_tokens", 0),
                     "mode": dps.mode, "pcs_baseline": dps.pcs_baseline, "encoder": dps.encoder,
                     "routing_temperature": dps.routing_temperature,
                     **{k: model[k] for k in MODEL_FIELDS}})
    return pa.Table.from_pylist(rows, schema=DPS_CLUSTERS_SCHEMA)


def dps_population_table(population: PopulationPCS | None, model: dict | None) -> pa.Table | None:
    if population is None or model is None:
        return None
    layers, heads = population.pcs_sum.shape
    per_user = np.stack([p for p, _ in population.own.values()])  # (users, layers, heads)
    group = max(1, model["num_heads"] // model["num_kv_heads"])
    rows = [{"layer": l, "head": h, "kv_head": h // group, "pcs_mean": float(per_user[:, l, h].mean()),
             "pcs_std": float(per_user[:, l, h].std()), "n_users": population.users,
             "attribution_mean": float(population.attribution_sum[l, h] / population.users),
             **{k: model[k] for k in MODEL_FIELDS}}
            for l in range(layers) for h in range(heads)]
    return pa.Table.from_pylist(rows, schema=DPS_POPULATION_SCHEMA)


def style_inputs(batch: pa.Table, validation: dict[str, list[dict]] | None = None) -> pa.Table:
    """The style-vector stage's input rows; ``validation``: the calibration users' held-out items."""
    ids = batch.column("user_id").to_pylist()
    descriptions = batch.column("descriptions") if "descriptions" in batch.column_names else \
        pa.array([[] for _ in ids], STEERX_USERS_SCHEMA.field("descriptions").type)
    held = [None if validation is None else validation.get(u) for u in ids]
    return pa.table({"user_id": batch.column("user_id"), "histories": batch.column("histories"),
                     "descriptions": descriptions, "validation": pa.array(held, batch.schema.field("histories").type)})


def steerx_vector_rows(batch: pa.Table, config: SteerXConfig, recommended: dict[str, dict]) -> pa.Table:
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


def steerx_user_rows(batch: pa.Table, config: SteerXConfig) -> pa.Table:
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


def steerx_effect_rows(batch: pa.Table) -> pa.Table:
    rows = [{"user_id": r["user_id"], "item_id": e["item_id"], "tokens": e["tokens"], "delta": e["delta"],
             "model_fingerprint": r["model_fingerprint"]}
            for r in batch.select(["user_id", "token_effects", "model_fingerprint"]).to_pylist()
            for e in (r["token_effects"] or [])]
    return pa.Table.from_pylist(rows, schema=STEERX_TOKEN_EFFECTS_SCHEMA)


def _user_methods(u: dict, failed: dict[str, dict[str, str]], eligibility: dict) -> tuple[list[str], list[str]]:
    """Methods with artifacts for a prepared user, and the reasons of the methods that failed."""
    methods, reasons = [], []
    if u["status"] == "ok" and len(u["pairs"]) >= eligibility["min_pairs"]:
        if u["user_id"] in failed["caa"]:
            reasons.append(failed["caa"][u["user_id"]])
        else:
            methods += ["caa"] + (["bt"] if eligibility["bt"] else [])
    if u["status"] == "ok" and eligibility["dps"] and len(u["histories"]) >= eligibility["min_histories"]:
        if u["user_id"] in failed["dps"]:
            reasons.append(failed["dps"][u["user_id"]])
        else:
            methods.append("dps")
    if u["status"] == "ok" and eligibility["steerx"] and len(u["histories"]) >= eligibility["min_histories"]:
        if u["user_id"] in failed["steerx"]:
            reasons.append(failed["steerx"][u["user_id"]])
        else:
            methods.append("steerx")
    return methods, reasons


def users_rows(batch: pa.Table, failed: dict[str, dict[str, str]], eligibility: dict,
               fingerprints: dict[str, dict[str, str]] | None = None) -> pa.Table:
    """One ``users`` row per user of the batch; ``fingerprints``: user -> {family: fingerprint} (kept for the
    families the user has stored: what the next incremental refresh compares)."""
    fingerprints = fingerprints or {}
    rows = []
    for u in batch.to_pylist():
        methods, reasons = _user_methods(u, failed, eligibility)
        if u["status"] != "ok":
            status, reason = "quarantined", u["reason"]
        elif methods:
            status, reason = "stored", ("; ".join(reasons) or None)
        else:
            status, reason = "quarantined", "; ".join(reasons) or "no method could use this user's rows"
        rows.append({
            "user_id": u["user_id"], "status": status, "reason": reason, "methods": methods,
            "n_pairs_in": u["n_pairs_in"], "n_pairs_valid": len(u["pairs"]),
            "n_pairs_used": len(u["pairs"]) if "caa" in methods else 0, "n_histories_in": u["n_histories_in"],
            "n_histories_valid": len(u["histories"]), "content_fingerprint": u["content_fingerprint"],
            "fingerprints": sorted((f, fp) for f, fp in fingerprints.get(u["user_id"], {}).items() if f in methods),
        })
    return pa.Table.from_pylist(rows, schema=USERS_SCHEMA)


def user_quarantine(batch: pa.Table, failed: dict[str, dict[str, str]]) -> pa.Table:
    rows = []
    for u in batch.to_pylist():
        for d in u["dropped"]:
            rows.append({"input": d["kind"], "source": d["source"], "user_id": u["user_id"],
                         "record_id": d["record_id"], "stage": "prepare", "reason": d["reason"], "raw": d["raw"]})
        if u["status"] != "ok":
            rows.append({"input": "user", "source": None, "user_id": u["user_id"], "record_id": None,
                         "stage": "prepare", "reason": u["reason"], "raw": None})
        else:
            for stage, reasons in failed.items():
                if u["user_id"] in reasons:
                    rows.append({"input": "user", "source": None, "user_id": u["user_id"], "record_id": None,
                                 "stage": stage, "reason": reasons[u["user_id"]], "raw": None})
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def print_summary(summary: dict, store_uri: str) -> None:
    s = summary
    print(f"published {store_uri} version {s['version']}\n"
          f"  users: {s['users_in']} in = {s['users_stored']} stored + {s['users_quarantined']} quarantined\n"
          f"  rows:  {s['input_rows']} in = {s['rows_kept']} kept + {s['rows_quarantined']} quarantined "
          f"({s['rows_without_user']} without a user id)\n"
          "  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s["stage_seconds"].items()), flush=True)


def basis_rows(basis: np.ndarray, population_norms: np.ndarray, feature_norms: np.ndarray, theta_pop: np.ndarray,
                population: dict, bt: BTConfig, n_sample: int, scale: float) -> pa.Table:
    rows = [{
        "layer": layer, "axes": basis[j].tolist(), "population_norm": float(population_norms[j]),
        "feature_norm": float(feature_norms[j]), "population_theta": np.asarray(theta_pop).tolist(), "k": bt.k,
        "hidden_size": population["hidden_size"], "hook": population["hook"], "operation": population["operation"],
        "positions": population["positions"], "recommended_layers": population["recommended_layers"],
        "recommended_scale": scale, "sample_users": n_sample, "model_id": population["model_id"],
        "model_fingerprint": population["model_fingerprint"],
    } for j, layer in enumerate(population["layers"])]
    return pa.Table.from_pylist(rows, schema=BT_BASIS_SCHEMA)


def concat(parts: list) -> pa.Table | None:
    """The non-empty tables of ``parts``, in the first one's columns and types (None when all are empty)."""
    parts = [p for p in parts if p is not None and p.num_rows]
    if not parts:
        return None
    schema = parts[0].schema
    return pa.concat_tables([p.select(schema.names).cast(schema) for p in parts])


def conformed(table: pa.Table | None, schema: pa.Schema) -> pa.Table | None:
    return None if table is None or not table.num_rows else conform(table, schema)


def store_tables(state: dict, config, g: dict) -> tuple[dict[str, pa.Table | None], pa.Table | None, dict]:
    """A shard state's rows of the per-user store tables (computed and carried), the SteerX users with every
    artifact, and the eligibility rules. Users whose description got no vectors are marked failed."""
    users, failed, sx = state["users"], state["failed"], config.steerx
    eligibility = {"min_pairs": config.prepare.min_pairs, "min_histories": config.prepare.min_histories,
                   "dps": g["dps_active"], "steerx": g["steerx_active"], "bt": g["theta_pop"] is not None}
    described = state.get("described")
    styles = state.get("styles")
    steerx_ok = described
    if sx.vectors.enabled and described is not None:
        done = set() if styles is None else set(styles.column("user_id").to_pylist())
        steerx_ok = described.filter(pa.array([u in done for u in described.column("user_id").to_pylist()], pa.bool_()))
        for u in described.column("user_id").to_pylist():  # anchors and description but no vectors: quarantined
            if u not in done and u not in failed["steerx"]:
                failed["steerx"][u] = "steerx style vectors: not computed"
    caa = state.get("caa")
    carried = state.get("carried") or {}  # the previous version's rows of unchanged users (incremental refresh)
    tables: dict[str, pa.Table | None] = {
        "vectors": concat([None if caa is None else conform(caa, VECTORS_SCHEMA),
                           None if styles is None else steerx_vector_rows(styles, sx, g["steerx_recommended"]),
                           conformed(carried.get("vectors"), VECTORS_SCHEMA)]),
        "users": concat([users_rows(users, failed, eligibility, state.get("fingerprints")),
                         conformed(carried.get("users"), USERS_SCHEMA)]),
        "bt_coords": concat([conformed(caa, BT_COORDS_SCHEMA), conformed(carried.get("bt_coords"), BT_COORDS_SCHEMA)])
        if eligibility["bt"] else None,
        "dps_heads": concat([conformed(state.get("dps"), DPS_HEADS_SCHEMA),
                             conformed(carried.get("dps_heads"), DPS_HEADS_SCHEMA)]),
        "steerx_users": concat([None if steerx_ok is None or not steerx_ok.num_rows else steerx_user_rows(steerx_ok, sx),
                                conformed(carried.get("steerx_users"), STEERX_USERS_SCHEMA)]),
    }
    return tables, steerx_ok, eligibility
