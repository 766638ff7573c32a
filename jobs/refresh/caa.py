"""The CAA / BT stage: the basis sample, per-user directions, the population direction, BT ideal points, α."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from steerstore.infra.artifacts import compose
from steerstore.jobs.refresh.common import Timer, min_list_length, model_actors, where
from steerstore.jobs.refresh.config import RefreshConfig
from steerstore.operators.bt import build_basis, feature_scales, finalize_users, in_sample, population_theta
from steerstore.operators.caa import CAAVectors, population_mean, population_partials, vector_row, vectors_array
from steerstore.operators.scale import choose_scales_task

log = logging.getLogger("steerstore")


def with_scale(batch: pa.Table, scale: float) -> pa.Table:
    idx = batch.schema.get_field_index("recommended_scale")
    return batch.set_column(idx, batch.schema.field(idx), pa.array([scale] * batch.num_rows, pa.float32()))


def choose_scales(config: RefreshConfig, users, final, population: dict, basis, theta_pop, sample_fraction: float):
    """Per method, the chosen α and its curve, from the training pairs of a seeded sample of stored users (one Ray task)."""
    import ray

    seed, fraction = config.bt.seed, (sample_fraction or min(1.0, config.bt.sample_users / max(final.count(), 1)))
    rows = {r["user_id"]: r for r in final.filter(lambda r: in_sample(r["user_id"], seed, fraction)).take_all()}
    user_pairs = users.filter(lambda r: r["user_id"] in rows).select_columns(["user_id", "pairs"]).take_all()
    candidates = [(u["user_id"], p) for u in sorted(user_pairs, key=lambda u: u["user_id"]) for p in u["pairs"]]
    rng = np.random.default_rng(config.scale.seed)
    picked = [candidates[i] for i in sorted(rng.choice(len(candidates), min(config.scale.sample_pairs,
                                                                             len(candidates)), replace=False))]
    layers = list(population["recommended_layers"])
    stored_layers = list(population["layers"])
    at = [stored_layers.index(l) for l in layers]
    pop = np.asarray(population["vectors"], dtype=np.float32)
    methods = {
        "population": {l: np.stack([pop[j]] * len(picked)) for l, j in zip(layers, at)},
        "caa": {l: np.stack([np.asarray(rows[u]["vectors"][j], dtype=np.float32) for u, _ in picked])
                for l, j in zip(layers, at)},
    }
    if theta_pop is not None:
        norms = np.asarray(population["norms"], dtype=np.float64)
        composed = {u: compose(np.asarray(rows[u]["theta"]), basis, norms) for u, _ in picked}
        methods["bt"] = {l: np.stack([composed[u][j] for u, _ in picked]) for l, j in zip(layers, at)}
    task = ray.remote(choose_scales_task).options(num_gpus=config.resources.gpus_per_actor,
                                                  num_cpus=config.resources.cpus_per_actor)
    result = ray.get(task.remote(config.model, [p for _, p in picked], methods, config.scale,
                                 population["positions"]))
    return {**result, "pairs": len(picked), "users": len({u for u, _ in picked})}


@dataclass
class CAAResult:
    """What the CAA / BT stage leaves for reconciliation and writing."""

    caa: object  # every CAA output row (ok and failed), materialized
    final: object  # stored users: shrunk vectors, BT θ, recommended α
    n_stored: int
    population: dict | None  # the population vectors row
    basis: np.ndarray | None
    feature_norms: np.ndarray | None
    theta_pop: np.ndarray | None
    n_sample: int  # users of the basis sample
    scales: dict[str, float]
    scale_curves: dict
    model_info: dict


def caa_stage(config: RefreshConfig, users, ok_users, timer: Timer) -> CAAResult:
    """Basis sample → per-user activations → population direction, shrinkage, BT fit → α per method."""
    import ray

    bt = config.bt if config.bt.enabled else None
    caa_users = ok_users.map_batches(min_list_length, fn_kwargs={"column": "pairs", "minimum": config.prepare.min_pairs},
                                     batch_format="pyarrow")
    caa_kwargs = {"config": config.caa, "model": config.model}
    actors = model_actors(config.resources, config.resources.caa_batch_size)

    # 1. basis sample: a seeded sample of users through the model, reduced to a preference basis
    basis = feature_norms = None
    sample_fraction, n_sample = 0.0, 0
    if bt is not None:
        n_ok = caa_users.count()
        sample_fraction = min(1.0, bt.sample_users / max(n_ok, 1))
        sample = caa_users.filter(lambda row: in_sample(row["user_id"], bt.seed, sample_fraction))
        sample_rows = where(sample.map_batches(CAAVectors, fn_constructor_kwargs=caa_kwargs, **actors),
                            "status", "ok").to_arrow_refs()
        sample_table = pa.concat_tables(ray.get(sample_rows)) if sample_rows else None
        if sample_table is not None and sample_table.num_rows:
            n_sample = sample_table.num_rows
            w = sample_table.column("weight_sum").to_numpy()
            means = vectors_array(sample_table)
            sample_population = np.einsum("u,ulh->lh", w, means) / w.sum()
            basis = build_basis(means, sample_population, bt.k)
            feature_norms = feature_scales(means)
        timer.lap("bt-basis", f"basis k={bt.k} from {n_sample} users")

    # 2. activations -> per-user weighted directions and BT features (model actors; errors -> quarantine)
    caa = caa_users.map_batches(
        CAAVectors, fn_constructor_kwargs={**caa_kwargs, "basis": basis, "population_norms": feature_norms},
        **actors).materialize()
    stored = where(caa, "status", "ok").materialize()
    n_stored = stored.count()
    timer.lap("caa", f"{n_stored} users with vectors")

    # 3. population direction (per-batch partial sums reduced on the driver: a few rows), θ_pop,
    #    then a CPU pass: shrink each user toward the population and fit their BT ideal point
    partials = stored.map_batches(population_partials, batch_format="pyarrow").to_arrow_refs()
    partials = pa.concat_tables(ray.get(partials)) if partials else None
    model_info: dict = {"name_or_path": config.model.name_or_path}
    population = theta_pop = None
    final = stored
    if n_stored:
        first = stored.take(1)[0]
        model_info.update(id=first["model_id"], fingerprint=first["model_fingerprint"],
                          hidden_size=first["hidden_size"])
        mean, n_pairs = population_mean(partials)
        population = vector_row(
            None, "population", mean, n_pairs, None, layers=list(first["layers"]),
            recommended=list(first["recommended_layers"]), positions=config.caa.apply_positions,
            scale=config.caa.scale, hidden_size=first["hidden_size"], model_id=first["model_id"],
            model_fingerprint=first["model_fingerprint"])
        if basis is not None:
            pooled = [r for r in stored.select_columns(["user_id", "bt_features", "bt_weights"])
                      .filter(lambda row: in_sample(row["user_id"], bt.seed, sample_fraction)).take_all()]
            x = np.asarray([f for r in pooled for f in r["bt_features"]], dtype=np.float64).reshape(-1, bt.k)
            w = np.asarray([v for r in pooled for v in r["bt_weights"]], dtype=np.float64)
            theta_pop = population_theta(x, w, bt)
        final = stored.map_batches(
            finalize_users, fn_kwargs={"population": mean, "kappa": config.caa.shrinkage, "theta_pop": theta_pop,
                                       "config": bt or config.bt}, batch_format="pyarrow").materialize()
    timer.lap("population", f"{population['n_pairs'] if population else 0} pairs; users shrunk"
              + ("; BT fitted" if theta_pop is not None else ""))

    # 4. recommended α per method, chosen on a seeded sample of the users' own training pairs
    scales = {"population": config.caa.scale, "caa": config.caa.scale, "bt": config.bt.scale}
    scale_curves: dict = {}
    if config.scale.enabled and population is not None:
        scale_curves = choose_scales(config, users, final, population, basis, theta_pop, sample_fraction)
        scales.update({m: r["alpha"] for m, r in scale_curves.items() if m in scales})
        final = final.map_batches(with_scale, fn_kwargs={"scale": scales["caa"]}, batch_format="pyarrow").materialize()
        population["recommended_scale"] = scales["population"]
        timer.lap("scale", ", ".join(f"{m} α={a:g}" for m, a in scales.items() if m in scale_curves))
    return CAAResult(caa=caa, final=final, n_stored=n_stored, population=population, basis=basis,
                     feature_norms=feature_norms, theta_pop=theta_pop, n_sample=n_sample, scales=scales,
                     scale_curves=scale_curves, model_info=model_info)
