"""The seeded user samples behind the global statistics, chosen before the per-user pass.

Every sample is a function of user ids and a seed (``sample_key``), never of the order users
arrive in, so a rerun, a resume and a run on more workers draw the same users. Two kinds:

- *fraction* samples (BT basis and α choice, the k-means fit): users with key < size / eligible;
- *exact* samples (DPS population baseline, SteerX counterfactual pool and calibration): the
  ``size`` eligible users with the smallest keys.

Phase 1 writes every user that may enter some sample (key below a generous bound computed from
the estimated user count) to a small candidates file per shard; the sample phase reads only
those. When too few candidates turn out eligible, the sample phase reads the shards themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from steerstore.jobs.refresh.config import RefreshConfig
from steerstore.operators.bt import sample_key

MARGIN = 4.0  # candidates cover a sample while at least 1/MARGIN of all users are eligible for it


@dataclass(frozen=True)
class SampleKind:
    seed: Callable[[RefreshConfig], int]
    size: Callable[[RefreshConfig], int]
    exact: bool
    needs: str  # "pairs" | "histories" | "held_out": what makes a user eligible
    active: Callable[[RefreshConfig], bool]

    def eligible(self, config: RefreshConfig, user: dict) -> bool:
        if self.needs == "pairs":
            return len(user["pairs"] or []) >= config.prepare.min_pairs
        if self.needs == "held_out":  # enough items that some are held out (recommend.min_items)
            return len(user["histories"] or []) >= max(config.recommend.min_items, config.prepare.min_histories)
        return len(user["histories"] or []) >= config.prepare.min_histories


SAMPLE_KINDS: dict[str, SampleKind] = {
    "bt": SampleKind(lambda c: c.bt.seed, lambda c: c.bt.sample_users, False, "pairs",
                     lambda c: c.bt.enabled or c.scale.enabled),
    "dps_baseline": SampleKind(lambda c: c.dps.seed, lambda c: c.dps.baseline_users, True, "histories",
                               lambda c: c.dps.enabled and c.dps.pcs_baseline == "population"),
    "dps_clusters": SampleKind(lambda c: c.dps.seed, lambda c: c.dps.cluster_sample_users, False, "histories",
                               lambda c: c.dps.enabled and c.dps.clusters > 0),
    "steerx_pool": SampleKind(lambda c: c.steerx.seed + 2, lambda c: c.steerx.pool_users, True, "histories",
                              lambda c: c.steerx.enabled and c.steerx.counterfactual == "other_users"),
    "steerx_calibration": SampleKind(lambda c: c.steerx.vectors.seed + 3,
                                     lambda c: c.steerx.vectors.calibration_users, True, "histories",
                                     lambda c: c.steerx.enabled and c.steerx.vectors.enabled),
    # the users whose held-out items give the population's gain per candidate (the per-user choice's prior)
    "recommend": SampleKind(lambda c: c.recommend.seed + 5, lambda c: c.recommend.sample_users, True, "held_out",
                            lambda c: c.recommend.enabled),
}


def sample_plan(config: RefreshConfig, estimated_users: int) -> dict[str, float]:
    """Per active sample kind, the key bound under which a user is written as a candidate."""
    users = max(estimated_users, 1)
    return {kind: min(1.0, MARGIN * spec.size(config) / users)
            for kind, spec in SAMPLE_KINDS.items() if spec.active(config)}


def candidate_mask(users: pa.Table, config: RefreshConfig, plan: dict[str, float]) -> list[bool]:
    """Which of ``users`` (ok user rows) may enter a sample under ``plan``."""
    rows = users.select(["user_id", "pairs", "histories"]).to_pylist()
    return [any(SAMPLE_KINDS[k].eligible(config, r) and sample_key(r["user_id"], SAMPLE_KINDS[k].seed(config)) < bound
                for k, bound in plan.items()) for r in rows]


@dataclass
class Sample:
    kind: str
    users: list[str]  # sorted ids
    fraction: float  # fraction samples: the key bound; exact samples: 1.0 when all eligible users are in it
    eligible: int


def choose(kind: str, config: RefreshConfig, candidates: list[dict], eligible: int, plan: dict[str, float]) -> Sample:
    """The sample of ``kind`` from candidate rows (user_id, pairs, histories); ValueError when they cannot cover it."""
    spec = SAMPLE_KINDS[kind]
    seed, size = spec.seed(config), spec.size(config)
    keyed = sorted((sample_key(r["user_id"], seed), r["user_id"]) for r in candidates if spec.eligible(config, r))
    bound = plan.get(kind, 1.0)
    if spec.exact:
        chosen = [u for _, u in keyed[:size]]
        if len(chosen) < min(size, eligible) and bound < 1.0:
            raise ValueError(f"{kind}: {len(chosen)} candidates for a sample of {min(size, eligible)}")
        return Sample(kind, sorted(chosen), 1.0, eligible)
    fraction = min(1.0, size / max(eligible, 1))
    if fraction > bound:
        raise ValueError(f"{kind}: candidates cover keys below {bound:.4f}, the sample needs {fraction:.4f}")
    return Sample(kind, sorted(u for k, u in keyed if k < fraction), fraction, eligible)
