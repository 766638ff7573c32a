"""Prepare: all valid records of one user -> one user row (CPU, before any GPU stage).

Here the checks that need a user's rows together run: duplicate ids and too few rows. The row
carries the user's pairs and histories as lists, a content fingerprint (for incremental
refresh and provenance) and a hash bucket.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa

from steerstore.infra.config import check, option
from steerstore.operators.validate import require_columns
from steerstore.schemas.store import USER_ROW_SCHEMA, user_bucket

_PAIR_FIELDS = ("pair_id", "prompt", "chosen", "rejected", "weight")
_HISTORY_FIELDS = ("item_id", "input", "output", "timestamp")


@dataclass
class PrepareConfig:
    min_pairs: int = option(2, help="users with fewer valid preference pairs get no pair-based artifacts (CAA, BT)")
    min_histories: int = option(
        2, help="users with fewer valid history items get no history-based artifacts (DPS); a user with neither is quarantined")
    buckets: int = option(64, help="number of hash buckets users are spread over (bucket column)")

    def __post_init__(self) -> None:
        check(self.min_pairs >= 1, "prepare.min_pairs must be >= 1")
        check(self.min_histories >= 1, "prepare.min_histories must be >= 1")
        check(self.buckets >= 1, "prepare.buckets must be >= 1")


def _dedupe(records: list[dict], fields: tuple[str, ...], id_name: str):
    """Keep one copy of identical duplicates; drop every copy of conflicting ones."""
    by_id: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_id[r["record_id"]].append(r)
    kept, dropped = [], []
    for rid in sorted(by_id):
        copies = by_id[rid]
        contents = {json.dumps([c[f if f != id_name else "record_id"] for f in fields], default=str) for c in copies}
        if len(contents) == 1:
            kept.append(copies[0])
            reason = f"duplicate {id_name} {rid!r} (identical copy; one kept)"
            dropped += [(c, reason) for c in copies[1:]]
        else:
            reason = f"duplicate {id_name} {rid!r} with conflicting content ({len(copies)} rows)"
            dropped += [(c, reason) for c in copies]
    return kept, dropped


class PrepareUsers:
    """map_groups function: all records of one user (valid or not) -> one USER_ROW_SCHEMA row.

    A user is ``ok`` when some method can use them: at least ``min_pairs`` valid pairs, or
    (when a history method runs, ``history_methods``) at least ``min_histories`` history items.
    """

    def __init__(self, config: PrepareConfig, history_methods: bool = False):
        self.config = config
        self.history_methods = history_methods

    def __call__(self, group: pa.Table) -> pa.Table:
        require_columns(type(self).__name__, group, ["user_id", "kind", "record_id", "status"])
        records = group.to_pylist()
        user_id = records[0]["user_id"]
        # rows quarantined by validation count towards the user's input but are not used
        pairs_in = [r for r in records if r["kind"] == "preference_pairs"]
        hist_in = [r for r in records if r["kind"] == "histories"]
        pairs, dropped_pairs = _dedupe([r for r in pairs_in if r["status"] == "ok"], _PAIR_FIELDS, "pair_id")
        hists, dropped_hists = _dedupe([r for r in hist_in if r["status"] == "ok"], _HISTORY_FIELDS, "item_id")
        pairs_out = [{f: (p["record_id"] if f == "pair_id" else p[f]) for f in _PAIR_FIELDS} for p in pairs]
        hist_out = [{f: (h["record_id"] if f == "item_id" else h[f]) for f in _HISTORY_FIELDS} for h in hists]
        hist_out.sort(key=lambda h: (h["timestamp"] is None, h["timestamp"] or 0, h["item_id"]))
        fingerprint = hashlib.sha256(
            json.dumps([pairs_out, hist_out], default=str, sort_keys=True).encode()).hexdigest()[:32]
        status, reason = "ok", None
        enough_histories = self.history_methods and len(hist_out) >= self.config.min_histories
        if len(pairs_out) < self.config.min_pairs and not enough_histories:
            status = "quarantined"
            reason = (f"user has {len(pairs_out)} valid preference pair(s); CAA needs at least "
                      f"{self.config.min_pairs} (prepare.min_pairs)")
            if self.history_methods:
                reason += (f", and {len(hist_out)} valid history item(s); DPS and SteerX need at least "
                           f"{self.config.min_histories} (prepare.min_histories)")
        dropped = [{"kind": r["kind"], "source": r["source"], "record_id": r["record_id"], "reason": why,
                    "raw": r["raw"]} for r, why in dropped_pairs + dropped_hists]
        row = {
            "user_id": user_id, "status": status, "reason": reason, "pairs": pairs_out, "histories": hist_out,
            "n_pairs_in": len(pairs_in), "n_histories_in": len(hist_in), "dropped": dropped,
            "content_fingerprint": "sha256:" + fingerprint,
            "bucket": user_bucket(user_id, self.config.buckets),
        }
        return pa.Table.from_pylist([row], schema=USER_ROW_SCHEMA)


def prepare_user_group(group: pa.Table, config: PrepareConfig, history_methods: bool = False) -> pa.Table:
    """Function form of PrepareUsers for ``map_groups`` (which needs a named function)."""
    return PrepareUsers(config, history_methods)(group)
