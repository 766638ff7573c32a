"""Reconciliation: one ``users`` row per input user, a quarantine row per rejected row or user, the summary."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from steerstore.jobs.refresh.caa import CAAResult
from steerstore.jobs.refresh.common import failed_users, value_counts, where
from steerstore.jobs.refresh.config import ReconciliationError
from steerstore.schemas.store import QUARANTINE_SCHEMA, USERS_SCHEMA

log = logging.getLogger("steerstore")


def print_summary(summary: dict, store_uri: str) -> None:
    s = summary
    print(f"published {store_uri} version {s['version']}\n"
          f"  users: {s['users_in']} in = {s['users_stored']} stored + {s['users_quarantined']} quarantined\n"
          f"  rows:  {s['input_rows']} in = {s['rows_kept']} kept + {s['rows_quarantined']} quarantined "
          f"({s['rows_without_user']} without a user id)\n"
          "  stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in s["stage_seconds"].items()), flush=True)


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


def users_rows(batch: pa.Table, failed: dict[str, dict[str, str]], eligibility: dict) -> pa.Table:
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
        })
    return pa.Table.from_pylist(rows, schema=USERS_SCHEMA)


def record_quarantine(batch: pa.Table) -> pa.Table:
    rows = [{"input": r["kind"], "source": r["source"], "user_id": r["user_id"], "record_id": r["record_id"],
             "stage": "validate", "reason": r["reason"], "raw": r["raw"]} for r in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


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


@dataclass
class Reconciled:
    users: object  # the users table (one row per input user), materialized
    quarantine: object  # every rejected row and user, materialized
    summary: dict
    method_counts: dict[str, int]


def reconcile(version: str, records, attributed, users, caa: CAAResult, dps_out: dict | None,
              steerx_out: dict | None, eligibility: dict) -> Reconciled:
    """The users and quarantine tables and the run summary; ReconciliationError unless nothing was lost."""
    failed = {"caa": failed_users(caa.caa),
              "dps": dps_out["failed"] if dps_out else {},
              "steerx": steerx_out["failed"] if steerx_out else {}}
    users_table = users.map_batches(users_rows, fn_kwargs={"failed": failed, "eligibility": eligibility},
                                    batch_format="pyarrow")
    quarantine = where(records, "status", "ok", equal=False).map_batches(record_quarantine, batch_format="pyarrow")
    quarantine = quarantine.union(users.map_batches(user_quarantine, fn_kwargs={"failed": failed},
                                                    batch_format="pyarrow"))
    users_table = users_table.materialize()
    quarantine = quarantine.materialize()
    n_records, n_users = records.count(), users.count()
    status_counts = value_counts(users_table, "status")
    method_counts = value_counts(users_table.map_batches(
        lambda b: pa.table({"method": pc.list_flatten(b["methods"])}), batch_format="pyarrow"), "method") \
        if n_users else {}
    n_dps = dps_out["n_stored"] if dps_out else 0
    n_steerx = steerx_out["n_stored"] if steerx_out else 0
    quarantine_by_input = value_counts(quarantine, "input")
    kept = sum(int(users_table.sum(c) or 0) for c in ("n_pairs_valid", "n_histories_valid")) if n_users else 0
    summary = {
        "version": version,
        "input_rows": n_records,
        "input_rows_by_kind": value_counts(records, "kind"),
        "rows_kept": kept,  # valid rows in user rows (of stored or quarantined users)
        "rows_quarantined": sum(c for k, c in quarantine_by_input.items() if k != "user"),
        "rows_without_user": n_records - attributed.count(),
        "users_in": n_users,
        "users_stored": status_counts.get("stored", 0),
        "users_quarantined": status_counts.get("quarantined", 0),
        "users_by_method": method_counts,
        "quarantine_rows": sum(quarantine_by_input.values()),
    }
    # nothing lost: every row is kept or quarantined, every user stored or quarantined
    if (summary["rows_kept"] + summary["rows_quarantined"] != n_records
            or summary["users_stored"] + summary["users_quarantined"] != n_users
            or method_counts.get("caa", 0) != caa.n_stored or method_counts.get("dps", 0) != n_dps
            or method_counts.get("steerx", 0) != n_steerx):
        raise ReconciliationError(f"inputs do not reconcile, nothing published: {summary}")
    return Reconciled(users_table, quarantine, summary, method_counts)
