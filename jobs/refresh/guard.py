"""What a refresh may publish: per-user vector checks, and the publish guard that keeps a bad night off serving.

- **Vectors**: a user's vector that is not finite, or whose norm at some layer is more than
  ``publish.max_norm_ratio`` times the population direction's, is not stored; that user's method
  is quarantined with the reason (``vector_problems``, run by the model workers).
- **The guard** (``refusals``), before ``LATEST`` moves: the new version is compared with the
  version ``LATEST`` names now. It refuses a version with fewer than ``publish.min_users`` users
  stored, users stored or any method's users falling by more than the configured share, the share
  of input users quarantined rising by more than the configured amount, or a population direction
  that is not finite. A refused version stays unpublished (its shards kept, so the same command
  with ``--publish.force`` resumes it and publishes without recomputing), the reasons go to
  the run report ``<store>/reports/<version>.json``, and the job exits with status 3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steerstore.infra.config import check, option


@dataclass
class PublishConfig:
    """Limits a new version must meet before ``LATEST`` moves to it (compared with the current version)."""

    force: bool = option(False, help="publish even when a limit below refuses (after reading the run report)")
    min_users: int = option(1, help="refuse a version that stores fewer users than this")
    max_users_drop: float = option(
        0.2, help="refuse when the users stored fall by more than this share of the current version's")
    max_method_drop: float = option(
        0.3, help="refuse when any method's users (caa, bt, dps, steerx) fall by more than this share")
    max_quarantine_rise: float = option(
        0.1, help="refuse when the share of input users quarantined rises by more than this (0.1 = 10 points)")
    max_norm_ratio: float = option(
        100.0, help="a user's CAA/BT vector whose norm at a layer exceeds this many times the larger of the "
                    "population direction's and the median user's (in the batch) is not stored (the user's method "
                    "is quarantined)")

    def __post_init__(self) -> None:
        check(self.min_users >= 0, "publish.min_users must be >= 0")
        for name in ("max_users_drop", "max_method_drop", "max_quarantine_rise"):
            check(0.0 <= getattr(self, name) <= 1.0, f"publish.{name} must be within [0, 1]")
        check(self.max_norm_ratio > 1.0, "publish.max_norm_ratio must be > 1")


class PublishRefused(RuntimeError):
    """The guard refused the new version: it stays unpublished and ``LATEST`` does not move."""

    def __init__(self, version: str, reasons: list[str], report_uri: str):
        self.version, self.reasons, self.report_uri = version, reasons, report_uri
        super().__init__(f"version {version} was not published: " + "; ".join(reasons)
                         + f". The run report is {report_uri}. If the change is intended, rerun the same command "
                           "with --publish.force: it publishes this version without recomputing it")

    def __reduce__(self):
        return (type(self), (self.version, self.reasons, self.report_uri))


def _values(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The leaf values of a (nested) list column as float64, and the row each value belongs to."""
    rows = None
    while pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        parents = pc.list_parent_indices(col).to_numpy()
        rows = parents if rows is None else rows[parents]
        col = pc.list_flatten(col)
    values = col.to_numpy(zero_copy_only=False).astype(np.float64)
    return values, (np.zeros(len(values), dtype=np.int64) if rows is None else rows)


def vector_problems(table: pa.Table, reference_norms: np.ndarray | None, max_ratio: float,
                    method: str) -> dict[str, str]:
    """Users of ``table`` (``user_id``, ``vectors``: nested lists of floats) whose vector is not finite or out of range.

    ``reference_norms``: the population direction's norm per layer, in the order of the rows' layers
    (``vectors`` then holds one list per layer); None: only finiteness is checked. Works on the
    Arrow buffers, not Python lists.
    """
    if table.num_rows == 0:
        return {}
    col = table.column("vectors").combine_chunks()
    users = table.column("user_id").to_pylist()
    values, rows = _values(col)
    with np.errstate(over="ignore", invalid="ignore"):
        bad = ~np.isfinite(values)
    problems = {users[i]: f"{method}: vector is not finite (an input weight or activation overflowed)"
                for i in np.unique(rows[bad])}
    if reference_norms is None or not len(reference_norms):
        return problems
    layers = pc.list_flatten(col)
    layer_row = pc.list_parent_indices(col).to_numpy()
    value_layer = pc.list_parent_indices(layers).to_numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt(np.bincount(value_layer, weights=np.where(bad, 0.0, values) ** 2, minlength=len(layers)))
    offsets = col.offsets.to_numpy()
    position = np.arange(len(layers)) - (offsets[layer_row] - offsets[0])
    ref = np.asarray(reference_norms, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        ratio = np.where(position < len(ref), norms / np.maximum(ref[np.minimum(position, len(ref) - 1)], 1e-30), 0.0)
    for j in np.flatnonzero(ratio > max_ratio):
        problems.setdefault(users[layer_row[j]],
                            f"{method}: vector norm {norms[j]:.3g} at its layer {int(position[j])} is {ratio[j]:.3g}x "
                            f"the population direction's (publish.max_norm_ratio={max_ratio:g})")
    return problems


def _share(summary: dict) -> float:
    return summary.get("users_quarantined", 0) / max(1, summary.get("users_in", 0))


def refusals(summary: dict, previous: dict | None, config: PublishConfig, population_finite: bool = True) -> list[str]:
    """Why the new version (its run summary) must not replace ``previous`` (the current version's summary)."""
    reasons = []
    if not population_finite:
        reasons.append("the population direction is not finite")
    if summary["users_stored"] < config.min_users:
        reasons.append(f"it stores {summary['users_stored']} users (publish.min_users={config.min_users}; "
                       f"{summary['users_in']} users in the inputs, {summary['input_rows']} input rows)")
    if previous:
        before, now = previous.get("users_stored", 0), summary["users_stored"]
        if before and now < before * (1 - config.max_users_drop):
            reasons.append(f"users stored fell from {before} to {now} (more than publish.max_users_drop="
                           f"{config.max_users_drop:g})")
        for method, n_before in sorted((previous.get("users_by_method") or {}).items()):
            n_now = summary["users_by_method"].get(method, 0)
            if n_before and n_now < n_before * (1 - config.max_method_drop):
                reasons.append(f"{method} users fell from {n_before} to {n_now} (more than publish.max_method_drop="
                               f"{config.max_method_drop:g})")
        if previous.get("users_in") and _share(summary) > _share(previous) + config.max_quarantine_rise:
            reasons.append(f"the share of users quarantined rose from {_share(previous):.1%} to {_share(summary):.1%} "
                           f"(more than publish.max_quarantine_rise={config.max_quarantine_rise:g})")
    return reasons
