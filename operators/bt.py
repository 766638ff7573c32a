"""Preference basis and Bradley-Terry (BT) ideal points.

Basis: per layer l, an orthonormal B_l (k × hidden) whose first axis is the population
direction p_l. The other axes come from one SVD of the users' mean differences, concatenated
over layers after removing p_l and dividing by ‖p_l‖. Axis j therefore means the same
preference direction at every layer, and a single θ (k floats per user) applies at all layers.

BT: a pair's feature is x = mean_l B_l d_l / s_l, with d_l = h_l(p ⊕ chosen) − h_l(p ⊕ rejected)
and s_l the RMS norm of the sample users' mean differences at layer l (so features are O(1);
dividing by ‖p_l‖ instead blows features up when users' preferences cancel in the population).
The model is P(chosen ≻ rejected) = σ(θ·x), fitted by Newton's method on the weighted negative
log-likelihood plus (λ/2)‖θ − θ_pop‖². Here θ_pop is the same fit on pooled pairs of many users
with a weak prior. The user's direction at layer l is B_lᵀθ rescaled to ‖p_l‖.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from steerstore.infra.config import check, option


@dataclass
class BTConfig:
    enabled: bool = option(True, help="fit the preference basis and per-user BT ideal points")
    k: int = option(8, help="basis size (axis 0 is the population direction)")
    sample_users: int = option(2048, help="users (seeded sample) the basis is fitted on")
    seed: int = option(0, help="seed of the basis sample")
    prior: float = option(1.0, help="L2 strength pulling each user's θ toward the population θ")
    population_prior: float = option(
        1.0, help="L2 strength (toward 0) of the pooled population fit; pooled pairs are often separable, "
                  "so a vanishing prior sends θ_pop to infinity and pins every user to it")
    newton_steps: int = option(50, help="most Newton iterations per fit")
    scale: float = option(2.0, help="recommended multiplier for composed BT vectors (they have the population norm)")

    def __post_init__(self) -> None:
        check(self.k >= 1, "bt.k must be >= 1")
        check(self.sample_users >= 2, "bt.sample_users must be >= 2")
        check(self.prior > 0 and self.population_prior > 0, "bt priors must be > 0")


def build_basis(user_means: np.ndarray, population: np.ndarray, k: int) -> np.ndarray:
    """Orthonormal per-layer bases (layers, k, hidden) from users' mean differences.

    ``user_means``: (users, layers, hidden); ``population``: (layers, hidden). With fewer
    independent directions than k, the remaining axes are filled deterministically (a seeded
    Gaussian made orthogonal) so every basis has exactly k orthonormal rows.
    """
    users, layers, hidden = user_means.shape
    if k > hidden:
        raise ValueError(f"bt.k={k} exceeds the hidden size {hidden}")
    norms = np.linalg.norm(population, axis=-1)  # (layers,)
    if np.any(norms == 0):
        raise ValueError("the population direction is zero at some layer: no basis can be built")
    axis0 = population / norms[:, None]  # (layers, hidden)
    scaled = user_means / norms[None, :, None]
    residual = scaled - np.einsum("ulh,lh->ul", scaled, axis0)[..., None] * axis0[None]
    joint = residual.reshape(users, layers * hidden).astype(np.float64)
    if users > 0 and k > 1:
        _, _, vt = np.linalg.svd(joint, full_matrices=False)  # rows: joint axes, strongest first
        joint_axes = vt[: k - 1].reshape(-1, layers, hidden)
    else:
        joint_axes = np.zeros((0, layers, hidden))
    rng = np.random.default_rng(0)
    basis = np.zeros((layers, k, hidden), dtype=np.float64)
    for l in range(layers):
        rows = [axis0[l].astype(np.float64)]
        candidates = [joint_axes[j, l] for j in range(joint_axes.shape[0])]
        while len(rows) < k:
            v = candidates.pop(0) if candidates else rng.standard_normal(hidden)
            for r in rows:  # Gram-Schmidt, twice for numerical safety
                v = v - (v @ r) * r
            for r in rows:
                v = v - (v @ r) * r
            n = np.linalg.norm(v)
            if n > 1e-8:
                rows.append(v / n)
        basis[l] = np.stack(rows)
    return basis.astype(np.float32)


def feature_scales(user_means: np.ndarray) -> np.ndarray:
    """s_l: RMS norm over users of their mean difference at each layer, (layers,)."""
    return np.sqrt((np.linalg.norm(user_means, axis=-1) ** 2).mean(axis=0)).astype(np.float64)


def features(diffs: np.ndarray, basis: np.ndarray, population_norms: np.ndarray) -> np.ndarray:
    """Per-pair BT features (pairs, k): mean over layers of B_l d_l / s_l (``population_norms`` = s)."""
    # (pairs, layers, hidden) x (layers, k, hidden) -> (pairs, layers, k)
    proj = np.einsum("plh,lkh->plk", diffs.astype(np.float64), basis.astype(np.float64))
    return (proj / population_norms[None, :, None]).mean(axis=1)


@dataclass
class BTFit:
    theta: np.ndarray  # (k,)
    train_accuracy: float  # fraction of the user's pairs with θ·x > 0
    log_likelihood: float  # Σ w log σ(θ·x) (weighted, without the prior)
    iterations: int


def fit_bt(x: np.ndarray, weights: np.ndarray | None, center: np.ndarray, prior: float,
           max_steps: int = 50, tol: float = 1e-8) -> BTFit:
    """MAP Bradley-Terry coordinates: min Σ w softplus(−θ·x) + (λ/2)‖θ − center‖² (Newton)."""
    x = np.asarray(x, dtype=np.float64)
    w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    center = np.asarray(center, dtype=np.float64)
    theta = center.copy()
    k = x.shape[1] if x.ndim == 2 else len(center)
    it = 0
    for it in range(1, max_steps + 1):
        z = x @ theta
        p = 0.5 * (1 + np.tanh(z / 2))  # σ(z), stable
        grad = -(w * (1 - p)) @ x + prior * (theta - center)
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + prior * np.eye(k)
        step = np.linalg.solve(hess, grad)
        theta = theta - step
        if float(np.abs(step).max()) < tol:
            break
    z = x @ theta
    loglik = float(-(w * np.logaddexp(0.0, -z)).sum())
    accuracy = float((z > 0).mean()) if len(z) else float("nan")
    return BTFit(theta.astype(np.float32), accuracy, loglik, it)


def sample_key(user_id: str, seed: int) -> float:
    """A user's seeded uniform draw in [0, 1): samples are the users with the smallest keys."""
    return int(hashlib.sha256(f"{seed}:{user_id}".encode()).hexdigest()[:12], 16) / 16**12


def in_sample(user_id: str, seed: int, fraction: float) -> bool:
    """Deterministic seeded sample membership: the same users for the same seed and fraction."""
    return sample_key(user_id, seed) < fraction


def population_theta(x: np.ndarray, weights: np.ndarray, config: BTConfig) -> np.ndarray:
    """θ_pop: the BT fit on pooled pairs of the basis sample (the centre of every user's prior)."""
    k = config.k
    if len(x) == 0:
        return np.zeros(k, dtype=np.float32)
    return fit_bt(x, weights, np.zeros(k), config.population_prior, config.newton_steps).theta


def finalize_users(batch: pa.Table, population: np.ndarray, kappa: float, theta_pop: np.ndarray | None,
                   config: BTConfig) -> pa.Table:
    """CAA output rows -> final rows: shrunk per-user vectors and (with θ_pop) BT ideal points."""
    from steerstore.operators.caa import shrink, vectors_array  # noqa: PLC0415
    from steerstore.schemas.store import VECTORS_SCHEMA  # noqa: PLC0415

    means = vectors_array(batch)
    rows = batch.to_pylist()
    for i, row in enumerate(rows):
        v = shrink(means[i], row["weight_sum"], population, kappa)
        row["vectors"] = v.tolist()
        row["norms"] = np.linalg.norm(v, axis=-1).tolist()
        if theta_pop is not None:
            fit = fit_bt(np.asarray(row["bt_features"], dtype=np.float64).reshape(-1, config.k),
                         np.asarray(row["bt_weights"], dtype=np.float64), theta_pop, config.prior,
                         config.newton_steps)
            row.update(theta=fit.theta.tolist(), train_accuracy=fit.train_accuracy,
                       log_likelihood=fit.log_likelihood, iterations=fit.iterations, prior=config.prior)
    return pa.Table.from_pylist(rows, schema=FINAL_SCHEMA if theta_pop is not None else VECTORS_SCHEMA)


def _final_schema() -> pa.Schema:
    from steerstore.schemas.store import BT_COORDS_SCHEMA, VECTORS_SCHEMA  # noqa: PLC0415

    extra = [f for f in BT_COORDS_SCHEMA if f.name not in VECTORS_SCHEMA.names]
    return pa.schema(list(VECTORS_SCHEMA) + extra)


FINAL_SCHEMA = _final_schema()
