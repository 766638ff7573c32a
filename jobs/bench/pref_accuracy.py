"""Per-user preference accuracy on held-out pairs of real per-user data.

Launch: ``steerstore bench pref-accuracy`` (reads ``../shared/data``; writes ``./steerstore-out/pref-eval``).

Pairs are built per user as LongLaMP builds tasks. The prompt asks to continue the opening
(first sentence) of one of the user's texts; ``chosen`` is the user's own continuation,
``rejected`` the continuation of another user's text (seeded). Each user's pairs are split:
the first ``train_pairs`` go through the real refresh job (validate → CAA/BT → scale choice);
the next ``heldout_pairs`` are never seen by it. On the held-out pairs, a method "prefers the
user" when steering raises log p(chosen) more than log p(rejected). The unsteered reference is
the fraction of held-out pairs whose chosen response already has the higher per-token
likelihood.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steerstore.infra import storage
from steerstore.infra.cluster import RayConfig
from steerstore.infra.config import check, option
from steerstore.infra.reader import StoreReader
from steerstore.jobs import devdata, refresh
from steerstore.jobs.bench.common import write_figures
from steerstore.jobs.devdata import PROMPT, SOURCES
from steerstore.operators.bt import fit_bt
from steerstore.operators.runtime import ModelConfig, ModelRuntime
from steerstore.operators.scale import ScaleConfig, baseline, margins, unsteered_prefers_chosen


@dataclass
class PrefEvalConfig:
    data_dir: str = option("../shared/data", help="folder with blogs-dev.jsonl.gz and synthpai-dev.jsonl.gz")
    sources: list[str] = option(["blogs", "synthpai"], help="which data sets to use")
    users: int = option(12, help="users per source (the first N by id with enough items)")
    train_pairs: int = option(6, help="training pairs per user (the refresh job sees only these)")
    heldout_pairs: int = option(3, help="held-out pairs per user (evaluated only)")
    words: int = option(40, help="continuation length in words (chosen and rejected alike)")
    seed: int = option(0, help="seed for item order and the other user's continuation")
    out: str = option("./steerstore-out/pref-eval", help="folder for the inputs, the store and the results")
    json: str = option("docs/figures/bench-pref-accuracy.json", help="where the figures are written ('' = print only)")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})
    scale: ScaleConfig = dataclasses.field(default_factory=ScaleConfig, metadata={"help": "α choice (training)"})
    ray: RayConfig = dataclasses.field(default_factory=RayConfig, metadata={"help": "Ray connection"})

    def __post_init__(self) -> None:
        check(set(self.sources) <= set(SOURCES), f"sources must be among {sorted(SOURCES)}")
        check(self.users >= 2 and self.train_pairs >= 2 and self.heldout_pairs >= 1,
              "need >= 2 users, >= 2 training and >= 1 held-out pairs per user")


def build_pairs(config: PrefEvalConfig) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs) over all sources, deterministic for a seed."""
    rng = random.Random(config.seed)
    train, heldout = [], []
    need = config.train_pairs + config.heldout_pairs
    for source in config.sources:
        segments = devdata.segments(config.data_dir, source, need, config.words, rng)
        chosen_users = sorted(segments)[: config.users]
        for uid in chosen_users:
            others = [o for o in segments if o != uid]
            for k, (opening, continuation) in enumerate(segments[uid][:need]):
                other = rng.choice(others)
                rejected = rng.choice(segments[other])[1]
                pair = {"user_id": uid, "pair_id": f"{uid}-{k}", "prompt": PROMPT.format(opening=opening),
                        "chosen": continuation, "rejected": rejected, "weight": 1.0}
                (train if k < config.train_pairs else heldout).append(pair)
    return train, heldout


def main(config: PrefEvalConfig) -> dict:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = build_pairs(config)
    (out / "train_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in train))
    refresh_config = refresh.RefreshConfig(
        inputs=refresh.InputsConfig(preference_pairs=str(out / "train_pairs.jsonl")),
        output=refresh.OutputConfig(store=str(out / "store")), model=config.model, ray=config.ray,
        scale=config.scale)
    refresh_config.validate.max_tokens = 512
    summary = refresh.main(refresh_config)

    reader = StoreReader(str(out / "store"))
    users = sorted({p["user_id"] for p in heldout})
    caa = reader.vectors(users)
    bt = reader.bt(users)
    population = reader.population()
    evaluated = [p for p in heldout if p["user_id"] in caa and p["user_id"] in bt]
    runtime = ModelRuntime(config.model)
    layers = population.recommended_layers
    base = baseline(runtime, evaluated)
    reference = unsteered_prefers_chosen(runtime, evaluated, base)
    methods = {"population": lambda u: population, "caa": lambda u: caa[u], "bt": lambda u: bt[u]}
    results = {"unsteered (reference)": {"alpha": 0.0, "accuracy": float(reference.mean()),
                                         "per_user_accuracy": _per_user(evaluated, reference)}}
    for name, get in methods.items():
        alpha = get(users[0]).recommended_scale
        vectors = {l: np.stack([get(p["user_id"]).at([l])[l] for p in evaluated]) for l in layers}
        m, nll = margins(runtime, evaluated, vectors, alpha, base)
        results[name] = {"alpha": alpha, "accuracy": float((m > 0).mean()), "per_user_accuracy":
                         _per_user(evaluated, m > 0), "mean_margin": float(m.mean()),
                         "nll_increase": float(nll.mean())}
    figures = _store_figures(reader, len(caa))
    report = {"pairs": {"train": len(train), "heldout": len(evaluated)}, "users": len(users), "layers": layers,
              "methods": results, "store": figures, "refresh_stage_seconds": summary["stage_seconds"]}
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"\nheld-out pairs {len(evaluated)} of {len(users)} users; steering at layers {layers}")
    print(f"{'method':<24}{'alpha':>7}{'pair acc':>10}{'user acc':>10}{'ΔNLL/tok':>10}")
    for name, r in results.items():
        print(f"{name:<24}{r['alpha']:>7g}{r['accuracy']:>10.3f}{r['per_user_accuracy']:>10.3f}"
              f"{r.get('nll_increase', 0.0):>10.3f}")
    write_figures(report, config.json)
    return report


def _per_user(pairs: list[dict], hits: np.ndarray) -> float:
    """Mean over users of each user's accuracy (every user counts the same)."""
    by_user: dict[str, list[bool]] = {}
    for p, h in zip(pairs, hits):
        by_user.setdefault(p["user_id"], []).append(bool(h))
    return float(np.mean([np.mean(v) for v in by_user.values()]))


def _store_figures(reader: StoreReader, n_users: int) -> dict:
    """Bytes per user for full per-layer vectors vs BT coordinates, and BT fit time per user."""
    def parquet_bytes(table: str) -> int:
        return sum(len(storage.read_bytes(f)) for f in reader.store.table_files(reader.version, table))

    vectors = reader.store.read_table("vectors", reader.version).slice(0, 1).to_pylist()[0]
    basis = reader.bt_basis()
    k = int(basis.column("k")[0].as_py())
    raw_vector = len(vectors["layers"]) * vectors["hidden_size"] * 4
    coords = reader.store.read_table("bt_coords", reader.version)
    rng = np.random.default_rng(0)
    pairs = int(np.median(coords.column("n_pairs").to_numpy()))
    x = [rng.standard_normal((pairs, k)) for _ in range(200)]
    start = time.perf_counter()
    for xi in x:
        fit_bt(xi, None, np.zeros(k), 1.0)
    fit_ms = (time.perf_counter() - start) / len(x) * 1000
    return {
        "caa_vector_bytes_per_user_raw": raw_vector, "bt_theta_bytes_per_user_raw": k * 4,
        "caa_parquet_bytes_per_user": round(parquet_bytes("vectors") / max(n_users, 1)),
        "bt_parquet_bytes_per_user": round(parquet_bytes("bt_coords") / max(n_users, 1)),
        "bt_basis_bytes_per_version": parquet_bytes("bt_basis"),
        "bt_fit_ms_per_user": round(fit_ms, 3), "bt_fit_pairs_per_user": pairs, "k": k,
    }
