"""DPS — Differential Preference Steering: each user's preference attention heads.

A head (l, k) (query head k of decoder block l) is scored by its Preference Contribution Score

    PCS(l, k) = mean NLL per token of the user's own history outputs with (l, k) ablated
                − the same without ablation,

where each history output is scored given its input and other items of the user's history as
context (``operators/history.py``). Only the user's training history is used — the items the
refresh job is given; evaluation targets never reach this stage.

Raw PCS is dominated by heads every text needs (measured on the default model: layer-1 heads
with PCS 0.2–0.6 nats for any user). ``pcs_baseline='population'`` therefore scores a head by
PCS_u(l,k) − mean PCS of (l,k) over a seeded sample of *other* users (the user itself is left
out of the mean when it is in the sample): a preference head matters for this user more than
for others. ``none`` keeps raw PCS.

Modes: ``exact`` ablates every head (batched and forked inside one forward per chunk, see
``ModelRuntime.ablation_nll``); ``fast`` ranks all heads by attribution patching (one forward
and one backward pass: ΔNLL ≈ −∂NLL/∂gate at gate = 1) and ablates exactly only the top
``candidates``. The stored score is always an exact PCS difference. Clusters are pseudo-users
whose history is a seeded sample of their members' items.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa

from steerstore.infra.config import check, option
from steerstore.operators.history import HistoryContextConfig, scoring_sequences
from steerstore.operators.runtime import Encoded, ModelConfig, ModelRuntime
from steerstore.operators.runtime.sources import DEFAULT_ENCODER
from steerstore.operators.validate import isolate_failures, require_columns
from steerstore.schemas.store import HEAD_STRUCT

SEQUENCE_STRUCT = pa.struct([("prompt", pa.string()), ("output", pa.string())])


@dataclass
class DPSConfig:
    enabled: bool = option(True, help="compute DPS preference heads (needs inputs.histories)")
    mode: Literal["exact", "fast"] = option(
        "fast", help="exact: ablate every head; fast: attribution ranks all heads, exact ablation of the top candidates")
    top_k: int = option(8, help="preference heads kept per user / cluster (those with a positive score)")
    candidates: int = option(16, help="fast mode: heads verified by exact ablation per user (bench dps-cut: 16 keeps 94% of the PCS of 32's top 8)")
    pcs_baseline: Literal["none", "population"] = option(
        "population", help="none: raw PCS; population: PCS minus the mean PCS of other users (a seeded sample)")
    baseline_users: int = option(16, help="users in the seeded sample behind the population PCS")
    per_user: bool = option(True, help="score heads per user (else users get their clusters' heads only)")
    verify: Literal["all", "departures"] = option(
        "all", help="per_user with clusters, fast mode: all = verify every user's candidate heads by exact ablation; "
                    "departures = only users whose attribution departs from their cluster's heads (the others "
                    "cost one forward and backward pass and are served their cluster's heads)")
    departure_overlap: float = option(
        0.5, help="verify=departures: a user whose attribution top-k holds at least this share of its cluster's "
                  "heads is served the cluster's heads; below it, the user is verified")
    clusters: int = option(8, help="k-means clusters of users by history embedding (0 = none)")
    cluster_items: int = option(16, help="history items (sampled from members) scored per cluster")
    cluster_sample_users: int = option(
        8192, help="users (seeded sample) whose embeddings k-means is fitted on and clusters' items are drawn from; "
                   "every user is routed")
    routing_temperature: float = option(0.05, help="softmax temperature of per-user routing over clusters")
    encoder: str = option(DEFAULT_ENCODER, help="sentence encoder for clustering: the packaged MiniLM or an HF folder/id")
    gamma: float = option(1.0, help="serving: contrast strength γ in (1+γ)·ℓ_full − γ·ℓ_masked")
    adaptive: bool = option(False, help="serving: scale γ by the normalised entropy of the full model's next-token distribution")
    plausibility: float = option(0.1, help="serving: only tokens with p ≥ β·max p are eligible (0 disables)")
    seed: int = option(0, help="seed of the baseline sample, cluster item sampling and k-means")
    history: HistoryContextConfig = dataclasses.field(
        default_factory=lambda: HistoryContextConfig(arrangement="conversation"),
        metadata={"help": "how history items become scoring sequences (conversation: bench dps-cut keeps 98% of "
                          "the PCS of per-item sequences with 2 context items, for 0.33x the work)"})

    def __post_init__(self) -> None:
        check(self.top_k >= 1, "dps.top_k must be >= 1")
        check(self.candidates >= self.top_k, "dps.candidates must be >= dps.top_k")
        check(self.baseline_users >= 1, "dps.baseline_users must be >= 1")
        check(self.clusters >= 0 and self.cluster_items >= 1, "dps.clusters >= 0 and dps.cluster_items >= 1")
        check(self.cluster_sample_users >= 1, "dps.cluster_sample_users must be >= 1")
        check(self.routing_temperature > 0, "dps.routing_temperature must be > 0")
        check(self.per_user or self.clusters > 0, "dps.per_user=false needs dps.clusters > 0 (users get their clusters' heads)")
        check(self.verify == "all" or (self.per_user and self.clusters > 0 and self.mode == "fast"),
              "dps.verify=departures needs dps.per_user=true, dps.clusters > 0 and dps.mode=fast")
        check(0 <= self.departure_overlap <= 1, "dps.departure_overlap must be in [0, 1]")
        check(self.gamma >= 0, "dps.gamma must be >= 0")
        check(0 <= self.plausibility < 1, "dps.plausibility must be in [0, 1)")

    def verifies(self, overlap: float | None) -> bool:
        """Whether a user with this cluster overlap (None: not compared) has its candidate heads verified."""
        return self.verify == "all" or overlap is None or overlap < self.departure_overlap


# one row per scored user or cluster, out of the DPSHeads actors
DPS_OUTPUT_SCHEMA = pa.schema([
    pa.field("user_id", pa.string()),  # the user, or "cluster:<c>"
    pa.field("status", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("heads", pa.list_(HEAD_STRUCT)),
    pa.field("mode", pa.string()),
    pa.field("pcs_baseline", pa.string()),
    pa.field("baseline_users", pa.int32()),
    pa.field("n_items", pa.int32()),
    pa.field("n_tokens", pa.int32()),
    pa.field("base_nll", pa.float32()),
    pa.field("pcs", pa.list_(pa.float32())),  # (layers × heads) when full scores are asked for
    pa.field("attribution", pa.list_(pa.float32())),
    pa.field("num_layers", pa.int32()),
    pa.field("num_heads", pa.int32()),
    pa.field("num_kv_heads", pa.int32()),
    pa.field("model_id", pa.string()),
    pa.field("model_fingerprint", pa.string()),
    # passed through from the input row when present
    pa.field("scope", pa.string()),  # user | cluster
    pa.field("cluster", pa.int32()),
    pa.field("routing", pa.list_(pa.float32())),
    pa.field("content_fingerprint", pa.string()),
    # verify=departures: the share of the cluster's heads among the user's attribution top-k (null: not compared)
    pa.field("cluster_overlap", pa.float32()),
])
_PASSTHROUGH = ("scope", "cluster", "routing", "content_fingerprint")


@dataclass
class PopulationPCS:
    """Sums of PCS and attribution over a seeded user sample, with each sampled user's own scores."""

    pcs_sum: np.ndarray  # (layers, heads)
    attribution_sum: np.ndarray
    users: int
    own: dict[str, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def from_rows(cls, rows: Sequence[dict], shape: tuple[int, int]) -> "PopulationPCS":
        own = {r["user_id"]: (np.asarray(r["pcs"], np.float64).reshape(shape),
                              np.asarray(r["attribution"], np.float64).reshape(shape)) for r in rows}
        if not own:
            raise ValueError("population PCS needs at least one scored user")
        return cls(sum(p for p, _ in own.values()), sum(a for _, a in own.values()), len(own), own)

    def for_user(self, user_id: str) -> tuple[np.ndarray, np.ndarray, int]:
        """Mean PCS and attribution of the sample without ``user_id`` itself, and how many users that is."""
        pcs, attr, n = self.pcs_sum, self.attribution_sum, self.users
        if user_id in self.own:
            own_pcs, own_attr = self.own[user_id]
            pcs, attr, n = pcs - own_pcs, attr - own_attr, n - 1
        if n == 0:
            return np.zeros_like(pcs), np.zeros_like(attr), 0
        return pcs / n, attr / n, n


def dps_user_rows(batch: pa.Table, history: HistoryContextConfig, centroids: np.ndarray | None = None,
                  temperature: float = 0.05) -> pa.Table:
    """User rows -> (user_id, scope, sequences, cluster, routing, content_fingerprint) for the DPS stages (CPU)."""
    from steerstore.operators.cluster import routing_weights

    require_columns("dps_user_rows", batch, ["user_id", "histories", "content_fingerprint"])
    sequences = [[{"prompt": p, "output": o} for p, o in scoring_sequences(h, history)]
                 for h in batch.column("histories").to_pylist()]
    clusters = routing = [None] * batch.num_rows
    if centroids is not None and batch.num_rows:
        emb = np.asarray(batch.column("embedding").to_pylist(), dtype=np.float32)
        labels, weights = routing_weights(emb, centroids, temperature)
        clusters, routing = labels.tolist(), weights.tolist()
    return pa.table({
        "user_id": batch.column("user_id"),
        "scope": pa.array(["user"] * batch.num_rows, pa.string()),
        "sequences": pa.array(sequences, pa.list_(SEQUENCE_STRUCT)),
        "cluster": pa.array(clusters, pa.int32()),
        "routing": pa.array(routing, pa.list_(pa.float32())),
        "content_fingerprint": batch.column("content_fingerprint"),
    })


def select_heads(scores: np.ndarray, pcs: np.ndarray, heads: Sequence[tuple[int, int]], top_k: int,
                 group: int) -> list[dict]:
    """The ``top_k`` heads by score among those with a positive score, best first."""
    order = sorted(range(len(heads)), key=lambda i: (-scores[i], heads[i]))
    return [{"layer": heads[i][0], "head": heads[i][1], "kv_head": heads[i][1] // group,
             "score": float(scores[i]), "pcs": float(pcs[i])}
            for i in order[:top_k] if scores[i] > 0]


class DPSHeads:
    """Rows (user_id, sequences) -> DPS_OUTPUT_SCHEMA rows: each user's or cluster's preference heads.

    Rows in == rows out. ``full=True`` (the population sample) scores every head exactly and
    returns the full PCS and attribution maps. With ``clusters`` (cluster -> {"heads": ...}) and
    ``verify=departures``, a user whose attribution top-k holds at least ``departure_overlap`` of
    the heads its clusters would serve it (mixed by its routing) is returned without heads of its
    own (served its clusters') and is not verified. A user that fails is returned quarantined with the error; the rest of the
    batch is unaffected.
    """

    def __init__(self, config: DPSConfig, model: ModelConfig, population: PopulationPCS | None = None,
                 full: bool = False, clusters: dict[int, dict] | None = None):
        self.config = config
        self.runtime = ModelRuntime.shared(model)
        self.population = population
        self.full = full
        self.clusters = clusters if config.verify == "departures" and not full else None
        rt = self.runtime
        if config.history.arrangement == "conversation":  # a chat template that cannot hold one fails here, not per user
            rt.encode_conversation([("Prompt: a", "First."), ("Prompt: b", "Second.")])
        self.all_heads = [(l, h) for l in range(rt.num_layers) for h in range(rt.num_heads)]
        self.group = max(1, rt.num_heads // rt.num_kv_heads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(type(self).__name__, batch, ["user_id", "sequences"])
        users = batch.select(["user_id", "sequences"] + [c for c in _PASSTHROUGH if c in batch.column_names]).to_pylist()
        rows = isolate_failures(users, self._score, lambda user, exc: self._row(
            user, status="quarantined", reason=f"dps failed: {type(exc).__name__}: {str(exc)[:300]}"))
        return pa.Table.from_pylist(rows, schema=DPS_OUTPUT_SCHEMA)

    def _row(self, user: dict, **values) -> dict:
        rt = self.runtime
        row = {"user_id": user["user_id"], "status": "ok", "reason": None, "heads": [],
               "mode": "exact" if self.full else self.config.mode,
               "pcs_baseline": "none" if self.full else self.config.pcs_baseline, "baseline_users": 0,
               "n_items": len(user["sequences"]), "n_tokens": 0, "base_nll": None, "pcs": None, "attribution": None,
               "num_layers": rt.num_layers, "num_heads": rt.num_heads, "num_kv_heads": rt.num_kv_heads,
               "model_id": rt.model_id, "model_fingerprint": rt.fingerprint,
               **{c: user.get(c) for c in _PASSTHROUGH}}
        row.update(values)
        return row

    def _encode(self, users: list[dict]) -> list[list[Encoded]]:
        """Each user's scoring sequences: one per item, or one conversation of all its items (arrangement)."""
        out = []
        for user in users:
            seqs = user["sequences"]
            if not seqs:
                raise ValueError(f"user {user['user_id']!r} has no history items to score")
            if self.config.history.arrangement == "conversation":
                enc = self._conversations([(s["prompt"], s["output"]) for s in seqs])
            else:
                enc = self.runtime.encode([s["prompt"] for s in seqs], [s["output"] for s in seqs])
            if any(end == start for e in enc for start, end in e.spans):
                raise ValueError(f"user {user['user_id']!r} has a history output with no tokens")
            out.append(enc)
        return out

    def _conversations(self, turns: list[tuple[str, str]]) -> list[Encoded]:
        """The turns as one conversation, or, when it would exceed ``model.max_backward_tokens`` (one backward
        micro-batch), as consecutive conversations that each fit (a turn longer than that is one on its own):
        the memory a user's attribution needs stays bounded however long its history is."""
        budget = self.runtime.config.max_backward_tokens
        whole = self.runtime.encode_conversation(turns)
        if len(whole.ids) <= budget:  # the usual case: one encoding
            return [whole]
        out: list[Encoded] = []
        group: list[tuple[str, str]] = []
        current: Encoded | None = None
        for turn in turns:
            longer = self.runtime.encode_conversation(group + [turn])
            if group and len(longer.ids) > budget:
                out.append(current)
                group, longer = [turn], self.runtime.encode_conversation([turn])
            else:
                group.append(turn)
            current = longer
        out.append(current)
        return out

    def _score(self, users: list[dict]) -> list[dict]:
        rt, cfg = self.runtime, self.config
        encoded = self._encode(users)
        flat = [e for enc in encoded for e in enc]
        groups = [u for u, enc in enumerate(encoded) for _ in enc]
        tokens = np.asarray([sum(e.scored for e in enc) for enc in encoded], dtype=np.float64)
        shape = (rt.num_layers, rt.num_heads)
        exact_all = self.full or cfg.mode == "exact"
        attribution = (rt.head_attribution(flat, groups, len(users)).numpy()
                       if self.full or cfg.mode == "fast" else None)
        if exact_all:  # every head, all users' items batched together
            base, ablated = rt.ablation_nll(flat, self.all_heads)
            base_u = np.bincount(groups, base.numpy(), len(users))
            ablated_u = np.stack([np.bincount(groups, a, len(users)) for a in ablated.numpy()], axis=1)
            pcs_all = (ablated_u - base_u[:, None]) / tokens[:, None]  # (users, heads)
        rows = []
        for u, user in enumerate(users):
            if self.population is not None and not self.full:
                pop_pcs, pop_attr, n_base = self.population.for_user(user["user_id"])
            else:
                pop_pcs, pop_attr, n_base = np.zeros(shape), np.zeros(shape), 0
            if exact_all:
                heads, pcs, nll = self.all_heads, pcs_all[u], base_u[u]
            else:
                estimate = (-attribution[u] - pop_attr).reshape(-1)  # ΔNLL ≈ −gradient
                overlap = self._cluster_overlap(user, estimate)
                if not cfg.verifies(overlap):  # agrees with its clusters: served their heads
                    rows.append(self._row(user, baseline_users=n_base, n_tokens=int(tokens[u]), cluster_overlap=overlap))
                    continue
                order = np.argsort(-estimate, kind="stable")[: cfg.candidates]
                heads = [self.all_heads[i] for i in sorted(order)]
                base, ablated = rt.ablation_nll(encoded[u], heads)
                nll = float(base.sum())
                pcs = (ablated.sum(dim=1).numpy() - nll) / tokens[u]
            baseline = np.asarray([pop_pcs[l, h] for l, h in heads])
            row = self._row(user, heads=select_heads(pcs - baseline, pcs, heads, cfg.top_k, self.group),
                            baseline_users=n_base, n_tokens=int(tokens[u]), base_nll=float(nll / tokens[u]),
                            cluster_overlap=None if exact_all else overlap)
            if self.full:
                row.update(pcs=pcs_all[u].astype(np.float32).tolist(),
                           attribution=(-attribution[u]).reshape(-1).astype(np.float32).tolist())
            rows.append(row)
        return rows


    def _cluster_overlap(self, user: dict, estimate: np.ndarray) -> float | None:
        """The share of the heads its clusters would serve the user (mixed by its routing) that are among its own
        top-k by attribution (None: no comparison)."""
        if self.clusters is None or not user.get("routing"):
            return None
        theirs = set(served_heads(user, self.clusters, self.config.top_k))
        if not theirs:
            return None
        mine = np.argsort(-estimate, kind="stable")[: self.config.top_k]
        return len({self.all_heads[i] for i in mine if estimate[i] > 0} & theirs) / len(theirs)


def cluster_heads(results: dict | None) -> dict[int, dict] | None:
    """The scored clusters' rows of ``DPSHeads`` (cluster -> row with its ``heads``), for ``verify=departures``."""
    if not results:
        return None
    return {int(c): {"heads": r["heads"] or []} for c, r in results.items() if r["status"] == "ok"}


def served_heads(user: dict, clusters: dict[int, dict], top_k: int) -> list[tuple[int, int]]:
    """The heads serving masks for a user without heads of its own: its clusters' mixed by its routing."""
    from steerstore.infra.artifacts import serving_heads

    return serving_heads({"heads": [], "routing": user.get("routing")}, clusters, top_k)


def cluster_sequences(rows: Sequence[dict], clusters: int, items: int, seed: int) -> dict[int, list[dict]]:
    """A seeded sample of up to ``items`` scoring sequences per cluster from its members' rows."""
    rng = np.random.default_rng(seed)
    pools: dict[int, list[dict]] = {c: [] for c in range(clusters)}
    for r in sorted(rows, key=lambda r: r["user_id"]):
        if r["cluster"] is not None:
            pools[int(r["cluster"])] += r["sequences"]
    out = {}
    for c, pool in pools.items():
        if pool:
            pick = rng.choice(len(pool), size=min(items, len(pool)), replace=False)
            out[c] = [pool[i] for i in sorted(pick)]
    return out


