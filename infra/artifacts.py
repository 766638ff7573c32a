"""How stored rows become servable artifacts: pure functions of the store's contents, no model.

The store keeps compact forms — a BT ideal point θ per user with one basis per version, and DPS
heads per user or per cluster with each user's routing — and every reader (serving, export,
evaluation) expands them the same way, here.
"""

from __future__ import annotations

import numpy as np


def compose(theta: np.ndarray, basis: np.ndarray, population_norms: np.ndarray) -> np.ndarray:
    """A user's per-layer direction (layers, hidden): B_lᵀθ rescaled to the population norm ‖p_l‖.

    ``basis`` is (layers, k, hidden), ``theta`` (k,), ``population_norms`` (layers,).
    """
    raw = np.einsum("k,lkh->lh", np.asarray(theta, dtype=np.float64), basis.astype(np.float64))
    n = np.linalg.norm(raw, axis=-1, keepdims=True)
    n[n == 0] = 1.0
    return (raw / n * population_norms[:, None]).astype(np.float32)


def serving_heads(user_row: dict | None, clusters: dict[int, dict], top_k: int) -> list[tuple[int, int]]:
    """The heads DPS decoding masks for a user: their own, else their clusters' mixed by routing.

    Cluster mixing: a head's score is Σ_c routing_c · score_c(head); the ``top_k`` best positive.
    An unknown user (no row) gets nothing: decode unsteered.
    """
    if user_row is None:
        return []
    if user_row.get("heads"):
        return [(h["layer"], h["head"]) for h in user_row["heads"][:top_k]]
    mixed: dict[tuple[int, int], float] = {}
    for c, weight in enumerate(user_row.get("routing") or []):
        for h in (clusters.get(c) or {}).get("heads") or []:
            mixed[(h["layer"], h["head"])] = mixed.get((h["layer"], h["head"]), 0.0) + weight * h["score"]
    ranked = sorted(mixed.items(), key=lambda t: (-t[1], t[0]))
    return [head for head, score in ranked[:top_k] if score > 0]
