"""Cheaper DPS head scoring against today's, on real users and the real default model.

Launch: ``steerstore bench dps-cut`` (reads ``../shared/data``). Each variant is a DPS setting
``candidates:context_items`` (heads verified by exact ablation after attribution; other history
items shown as context before each scored item; ``c``: the items as one conversation,
``dps.history.arrangement=conversation``). The first variant is the reference (the
settings the refresh used before the cut: 32 candidates, 2 context items). For every real user
and variant the real ``DPSHeads`` operator runs (fast mode, raw PCS: the population baseline
needs a full exact scoring of a sample and does not change which work a user costs), with the
model work counted by ``jobs.bench.cost.BlockCounter``, and the variant is compared with the
reference:

- ``top_k_overlap``: the share of the reference's top-K heads the variant also keeps;
- ``attribution_spearman``: Spearman rank correlation, over all heads, of the variant's
  attribution estimate with the reference's (1 where the scoring sequences are the same);
- ``pcs_captured``: the exact PCS on the reference's sequences (today's definition) of the
  variant's top-K heads, summed, over that of the reference's own top-K. 1.0 = heads as strong by today's definition;
  above 1 = the variant found heads the reference's candidate list missed.

Figures per variant: forward-token-equivalents per user (``FTE``: one token through every
block; a backward counts 2), seconds per user on this machine, ratios against the reference.

A variant ``d<candidates>:<context_items>`` is ``dps.verify=departures``: ``clusters`` k-means
clusters are fitted on the sentence embeddings of ``cluster_users`` *other* users of the source,
each cluster's heads are scored as the refresh scores a cluster (``cluster_items`` items sampled
from its members, fast mode), and each bench user, routed to its nearest cluster, is verified
only when its attribution top-k holds less than ``departure_overlap`` of that cluster's heads; an
agreeing user's heads are its cluster's (compared with the reference like any variant's heads).
The clusters' scoring is a fixed cost per night, reported apart (``cluster_fte``); the share of
users verified is ``verified_share``.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from steerstore.infra.config import check, option
from steerstore.jobs.bench.common import write_figures
from steerstore.jobs.bench.cost import BlockCounter
from steerstore.jobs.bench.dps import spearman
from steerstore.jobs.devdata import PROMPT
from steerstore.jobs.devdata import segments as dev_segments
from steerstore.operators.cluster import EmbedUsers, kmeans, routing_weights
from steerstore.operators.dps import (
    DPSConfig,
    DPSHeads,
    cluster_heads,
    cluster_sequences,
    dps_user_rows,
    served_heads,
)
from steerstore.operators.history import HistoryContextConfig
from steerstore.operators.runtime import ModelConfig, ModelRuntime

HISTORY_TYPE = pa.list_(pa.struct([("input", pa.string()), ("output", pa.string())]))


@dataclass
class BenchDPSCutConfig:
    data_dir: str = option("../shared/data", help="folder with the development data")
    source: str = option("blogs", help="blogs or synthpai")
    users: int = option(5, help="real users scored")
    items: int = option(6, help="history items scored per user (dps.history.max_items)")
    words: int = option(80, help="words per history output")
    top_k: int = option(8, help="dps.top_k: heads kept per user")
    variants: str = option("32:2,16:2,12:2,32:0,16:0,12:0,8:0",
                           help="comma-separated candidates:context_items (d<candidates>:<context>: verify "
                                "departures from the user's cluster only; <candidates>:c: the items as one "
                                "conversation); the first is the reference")
    clusters: int = option(2, help="departure variants: k-means clusters of the other users")
    cluster_users: int = option(12, help="departure variants: other users of the source the clusters are fitted on")
    cluster_items: int = option(8, help="departure variants: items sampled from a cluster's members and scored")
    departure_overlap: float = option(0.5, help="departure variants: dps.departure_overlap")
    seed: int = option(0, help="seed of the item order")
    json: str = option("docs/figures/bench-dps-cut.json", help="where the figures are written ('' = print only)")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})

    def __post_init__(self) -> None:
        check(self.users >= 1 and self.items >= 2 and self.top_k >= 1, "users >= 1, items >= 2, top_k >= 1")
        parse_variants(self.variants, self.top_k)


def parse_variants(text: str, top_k: int) -> list[tuple[int, int | str, bool]]:
    """``candidates:context_items`` parts -> (candidates, context_items or "c" (a conversation), departures)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        departures = part.startswith("d")
        try:
            first, second = part.removeprefix("d").split(":")
            candidates, context = int(first), (second if second == "c" else int(second))
        except ValueError:
            raise ValueError(f"variants: {part!r} is not [d]candidates:context_items (e.g. 16:0, d16:2, "
                             "16:c)") from None
        check(candidates >= top_k and (context == "c" or context >= 0),
              f"variants: {part!r} needs candidates >= top_k and context >= 0")
        out.append((candidates, context, departures))
    check(len(out) >= 1, "variants: give at least the reference")
    check(not out[0][2], "variants: the reference verifies every user (no d prefix)")
    return out


def _config(candidates: int, context: int | str, cfg: BenchDPSCutConfig, departures: bool = False) -> DPSConfig:
    conversation = context == "c"
    return DPSConfig(mode="fast", top_k=cfg.top_k, candidates=candidates, pcs_baseline="none",
                     clusters=cfg.clusters if departures else 0, verify="departures" if departures else "all",
                     departure_overlap=cfg.departure_overlap,
                     history=HistoryContextConfig(context_items=0 if conversation else context, max_items=cfg.items,
                                                  arrangement="conversation" if conversation else "items"))


def _clusters(rt: ModelRuntime, config: BenchDPSCutConfig, cfg: DPSConfig, others: pa.Table, users: pa.Table,
              model: ModelConfig) -> tuple[pa.Table, dict, float]:
    """Clusters of the other users (k-means on embeddings), each cluster's heads scored as the refresh scores
    them, and the bench users routed: (users with cluster and routing, cluster -> heads, FTE of the scoring)."""
    embed = EmbedUsers(cfg.encoder, max_items=config.items, keep_columns=True)
    emb_others, emb_users = embed(others), embed(users)
    x = np.asarray(emb_others.column("embedding").to_pylist(), dtype=np.float32)
    centroids, _, _ = kmeans(x, min(config.clusters, len(x)), seed=cfg.seed)
    labels, _ = routing_weights(x, centroids, cfg.routing_temperature)
    members = dps_user_rows(emb_others, cfg.history).to_pylist()
    for m, label in zip(members, labels.tolist()):
        m["cluster"] = int(label)
    pseudo = [{"user_id": f"cluster:{c}", "sequences": seqs, "cluster": c}
              for c, seqs in cluster_sequences(members, len(centroids), config.cluster_items, cfg.seed).items()]
    counter = BlockCounter(rt)
    with counter, counter.at("clusters"):
        scored = DPSHeads(dataclasses.replace(cfg, verify="all"), model)(pa.Table.from_pylist(pseudo)).to_pylist()
    check(all(r["status"] == "ok" for r in scored), f"a cluster could not be scored: {scored}")
    heads = cluster_heads({r["cluster"]: r for r in scored})
    routed = dps_user_rows(emb_users, cfg.history, centroids, cfg.routing_temperature)
    return routed, heads, counter.figures()["clusters"]["forward_token_equivalents"]


def _users_table(user_ids: list[str], segments: dict, items: int) -> pa.Table:
    return pa.table({
        "user_id": user_ids,
        "histories": pa.array([[{"input": PROMPT.format(opening=o), "output": c} for o, c in segments[u][:items]]
                               for u in user_ids], HISTORY_TYPE),
        "content_fingerprint": user_ids,
    })


def main(config: BenchDPSCutConfig) -> dict:
    variants = parse_variants(config.variants, config.top_k)
    rt = ModelRuntime.shared(config.model)
    segments = dev_segments(config.data_dir, config.source, config.items, config.words, random.Random(config.seed))
    user_ids = sorted(segments)[: config.users]
    check(len(user_ids) == config.users, f"only {len(user_ids)} users have {config.items} items")
    users = _users_table(user_ids, segments, config.items)
    heads_all = [(l, h) for l in range(rt.num_layers) for h in range(rt.num_heads)]
    per_variant: dict[str, list[dict]] = {}
    attributions: dict[tuple[str, int], np.ndarray] = {}  # (user, context_items): the attribution estimate
    cluster_figures: dict[str, dict] = {}
    for candidates, context, departures in variants:
        name = f"{'d' if departures else ''}{candidates}:{context}"
        cfg = _config(candidates, context, config, departures)
        if departures:
            others = sorted(segments)[config.users:config.users + config.cluster_users]
            check(len(others) >= config.clusters, f"only {len(others)} other users for {config.clusters} clusters")
            routed, cheads, cluster_fte = _clusters(rt, config, cfg, _users_table(others, segments, config.items),
                                                    users, config.model)
            cluster_figures[name] = {"clusters": len(cheads), "other_users": len(others), "cluster_fte": cluster_fte,
                                     "heads": {str(c): [[h["layer"], h["head"]] for h in r["heads"]]
                                               for c, r in cheads.items()}}
            op = DPSHeads(cfg, config.model, clusters=cheads)
        else:
            op = DPSHeads(cfg, config.model)
        rows = []
        for u, uid in enumerate(user_ids):
            user = routed.slice(u, 1) if departures else dps_user_rows(users.slice(u, 1), cfg.history)
            counter = BlockCounter(rt)
            start = time.perf_counter()
            with counter, counter.at("dps"):
                out = op(user).to_pylist()[0]
            seconds = time.perf_counter() - start
            check(out["status"] == "ok", f"{uid}: {out['reason']}")
            enc = op._encode([{"user_id": uid, "sequences": user.column("sequences")[0].as_py()}])[0]
            if (uid, context) not in attributions:
                attributions[uid, context] = -rt.head_attribution(enc, [0] * len(enc), 1)[0].reshape(-1).numpy()
            verified = cfg.verifies(out["cluster_overlap"])
            served = out["heads"] if verified else \
                [{"layer": l, "head": h, "pcs": None} for l, h in served_heads(out, cheads, config.top_k)]
            rows.append({"user": uid, "fte": counter.figures()["dps"]["forward_token_equivalents"],
                         "seconds": seconds, "heads": {(h["layer"], h["head"]): h["pcs"] for h in served},
                         "attribution": attributions[uid, context], "encoded": enc, "verified": verified,
                         "cluster_overlap": out["cluster_overlap"], "tokens": sum(len(e.ids) for e in enc)})
        per_variant[name] = rows

    ref_name = next(iter(per_variant))
    reference = {r["user"]: r for r in per_variant[ref_name]}
    figures: dict[str, dict] = {}
    for name, rows in per_variant.items():
        overlaps, rhos, captured = [], [], []
        for r in rows:
            ref = reference[r["user"]]
            ref_heads = ref["heads"]  # head -> exact PCS on the reference's sequences
            overlaps.append(len(set(r["heads"]) & set(ref_heads)) / max(1, len(ref_heads)))
            rhos.append(spearman(r["attribution"], ref["attribution"]))
            # the variant's heads scored exactly on the reference's sequences (today's definition)
            missing = sorted(set(r["heads"]) - set(ref_heads))
            pcs = dict(ref_heads)
            if missing:
                base, ablated = rt.ablation_nll(ref["encoded"], missing)
                tokens = sum(e.scored for e in ref["encoded"])
                pcs.update(zip(missing, ((ablated.sum(1) - base.sum()) / tokens).tolist()))
            ref_sum = sum(ref_heads.values())
            captured.append(sum(pcs[h] for h in r["heads"]) / ref_sum if ref_sum > 0 else float("nan"))
        ref_rows = per_variant[ref_name]
        fte = float(np.mean([r["fte"] for r in rows]))
        seconds = float(np.mean([r["seconds"] for r in rows]))
        figures[name] = {
            "candidates": int(name.removeprefix("d").split(":")[0]),
            "context_items": "conversation" if name.endswith(":c") else int(name.split(":")[1]),
            "fte_per_user": round(fte, 1),
            "fte_ratio_vs_reference": round(fte / np.mean([r["fte"] for r in ref_rows]), 3),
            "seconds_per_user": round(seconds, 2),
            "speedup_vs_reference": round(np.mean([r["seconds"] for r in ref_rows]) / seconds, 2),
            "tokens_per_user": round(float(np.mean([r["tokens"] for r in rows])), 1),
            "top_k_overlap": round(float(np.mean(overlaps)), 3),
            "top_k_overlap_per_user": [round(x, 3) for x in overlaps],
            "attribution_spearman": round(float(np.mean(rhos)), 3),
            "pcs_captured": round(float(np.nanmean(captured)), 3),
            "pcs_captured_per_user": [round(x, 3) for x in captured],
            "verified_share": round(float(np.mean([r["verified"] for r in rows])), 3),
            "cluster_overlap_per_user": [None if r["cluster_overlap"] is None else round(r["cluster_overlap"], 3)
                                         for r in rows],
            **cluster_figures.get(name, {}),
        }
    result = {"model": rt.model_id, "device": str(rt.device), "source": config.source, "users": user_ids,
              "items": config.items, "words": config.words, "top_k": config.top_k, "heads": len(heads_all),
              "reference": ref_name, "variants": figures}
    write_figures(result, config.json)
    return result
