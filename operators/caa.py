"""Per-user contrastive activation addition (CAA) and the population direction.

Per layer l, a pair's difference is d = h_l(prompt ⊕ chosen) − h_l(prompt ⊕ rejected), with h
the block output averaged over the response tokens (``position='mean'``) or taken at the last
response token (``'last'``). Each pair has a weight w (its ``weight`` field, 1 when absent):
how strongly the choice was made, e.g. a rating gap. A user's weights are scaled to mean 1
(``pair_weights``), so a user weighs in by their number of pairs, never by the scale of their weights.

- population p = Σ w d / Σ w over all pairs of all users, a reduce of per-batch partial sums
  (never a collect of all users);
- a user's dislike-weighted direction, shrunk toward the population:
  v = (Σ_user w d + κ p) / (Σ_user w + κ). κ (``caa.shrinkage``) acts as κ pseudo-pairs of
  population evidence, so a user with few pairs stays near p and one with many pairs is
  dominated by their own choices. κ = 0 gives the plain weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa

from steerstore.infra.config import check, option
from steerstore.operators.runtime import ModelConfig, ModelRuntime, Position, SteerPositions
from steerstore.operators.validate import isolate_failures, require_columns
from steerstore.schemas.store import VECTORS_SCHEMA

CAA_OUTPUT_SCHEMA = pa.schema(list(VECTORS_SCHEMA) + [
    pa.field("status", pa.string()), pa.field("reason", pa.string()),
    pa.field("weight_sum", pa.float64()),  # Σ w over the user's pairs
    pa.field("bt_features", pa.list_(pa.list_(pa.float32()))),  # (pairs, k) when a basis is given
    pa.field("bt_weights", pa.list_(pa.float32())),  # (pairs,)
])
Direction = Literal["mean_difference", "margin_gradient"]
PARTIALS_SCHEMA = pa.schema([("n", pa.int64()), ("weight", pa.float64()), ("layers", pa.list_(pa.int32())),
                             ("sums", pa.list_(pa.list_(pa.float64())))])


@dataclass
class CAAConfig:
    layers: list[int] = option(
        [], help="layers to compute and store (layer i = output of block i); empty = every layer from 30% to 55% of depth")
    recommended_layers: list[int] = option(
        [], help="layers the vector is applied at by default; empty = the one layer at 40% of depth")
    scale: float = option(
        2.0, help="recommended multiplier stored with each vector (on SmolLM2-135M: 2 steers clearly, 4 breaks fluency)")
    shrinkage: float = option(
        2.0, help="κ: pseudo-pairs of population direction mixed into each user's direction (0 = none)")
    position: Position = option("mean", help="activation per response: mean over its tokens, or its last token")
    apply_positions: SteerPositions = option(
        "response", help="where serving adds the vector: response (last prompt token onwards) or all positions")
    direction: Direction = option(
        "mean_difference", help="what each pair contributes: its activation difference (mean_difference, CAA) or "
                                "margin_gradient: the gradient of its mean log p(chosen) − mean log p(rejected) with "
                                "respect to the served vector, scaled to the activation difference's norm (a backward "
                                "pass per sequence; see docs/methods/caa-bt.md)")

    def __post_init__(self) -> None:
        check(all(l >= 0 for l in self.layers), "caa.layers must be >= 0")
        check(self.shrinkage >= 0, "caa.shrinkage must be >= 0")
        check(self.direction == "mean_difference" or self.apply_positions == "response",
              "caa.direction=margin_gradient is the gradient of a vector served from the response on: it needs "
              "caa.apply_positions=response")
        check(set(self.recommended_layers) <= set(self.layers) or not self.layers,
              "caa.recommended_layers must be a subset of caa.layers")

    def resolve_layers(self, num_layers: int) -> tuple[list[int], list[int]]:
        """(stored layers, recommended layers) for a model with ``num_layers`` blocks."""
        layers = sorted(set(self.layers)) or list(range(round(0.30 * num_layers), round(0.55 * num_layers) + 1))
        recommended = sorted(set(self.recommended_layers)) or [round(0.40 * num_layers)]
        bad = [l for l in layers + recommended if l >= num_layers]
        if bad:
            raise ValueError(f"caa layers {bad} do not exist: the model has layers 0..{num_layers - 1}")
        if not set(recommended) <= set(layers):
            raise ValueError(f"caa.recommended_layers {recommended} are not among the stored layers {layers}")
        return layers, recommended


def pair_differences(runtime: ModelRuntime, pairs: list[dict], layers: list[int],
                     position: Position, direction: Direction = "mean_difference") -> np.ndarray:
    """What each pair says about the preferred direction: float32 (pairs, len(layers), hidden).

    ``mean_difference`` (CAA): h(prompt ⊕ chosen) − h(prompt ⊕ rejected). ``margin_gradient``: the gradient of
    the pair's margin, mean log p(chosen) − mean log p(rejected) per token, with respect to a vector added at the
    layer from the response on (``margin_gradients``), rescaled per layer to the norm of the activation difference
    (so strengths keep CAA's scale). Everything downstream (user means, shrinkage, the population, BT) is the same.
    """
    if direction == "mean_difference":
        prompts = [p["prompt"] for p in pairs]
        acts = runtime.activations(prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                                   layers, position)
        return (acts[: len(pairs)] - acts[len(pairs):]).numpy()
    g, d = margin_gradients(runtime, pairs, layers, capture=position)  # one forward pass gives both
    return scaled_to(g, d)


def scaled_to(g: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``g`` rescaled along its last axis to the norms of ``d`` (float32)."""
    scale = np.linalg.norm(d, axis=-1, keepdims=True) / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)
    return (g * scale).astype(np.float32)


def margin_gradients(runtime: ModelRuntime, pairs: list[dict], layers: list[int], capture: Position | None = None
                     ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Per pair and layer: ∂[mean log p(chosen) − mean log p(rejected)]/∂v, v added at the layer from the response
    on (as a vector applied at ``response`` positions is served): float32 (pairs, len(layers), hidden).

    With ``capture`` (the activation position), also the pairs' activation differences h(prompt ⊕ chosen) −
    h(prompt ⊕ rejected) from the same forward pass: (gradients, differences)."""
    prompts, n = [p["prompt"] for p in pairs], len(pairs)
    found = runtime.steering_gradients(prompts + prompts, [p["chosen"] for p in pairs]
                                       + [p["rejected"] for p in pairs], layers, capture=capture)
    g, acts = found if capture is not None else (found, None)
    g[:n] -= g[n:]  # in place: no third copy of the (2·pairs, layers, hidden) tensors
    if acts is None:
        return g[:n].numpy()
    acts[:n] -= acts[n:]
    return g[:n].numpy(), acts[:n].numpy()


def pair_weights(pairs: list[dict]) -> np.ndarray:
    """Each pair's weight (1 when absent), scaled so the user's weights have mean 1.

    Weights say which of a user's own pairs count more; after scaling a user counts in the
    population (and against the shrinkage prior) by their number of pairs, whatever the scale of
    their weights: one user's weight of 1e6 cannot become the population direction.
    """
    w = np.asarray([1.0 if p.get("weight") is None else float(p["weight"]) for p in pairs], dtype=np.float64)
    total = w.sum()
    return w * (len(w) / total) if total > 0 and np.isfinite(total) else w


class CAAVectors:
    """User rows (USER_ROW_SCHEMA, status ok) -> one CAA_OUTPUT_SCHEMA row per user.

    The row's ``vectors`` are the user's weighted mean difference (shrinkage comes later, once
    the population is known). With a ``basis`` (layers, k, hidden) and ``population_norms``,
    each pair's BT features are returned too, so the pairs never need another model pass.

    Rows in == rows out. All pairs of a batch go through the model together (length-bucketed
    micro-batches); if that fails, each user is retried alone and a user that still fails is
    returned with ``status='quarantined'`` and the error, so one bad user never sinks a batch.
    """

    def __init__(self, config: CAAConfig, model: ModelConfig, basis: np.ndarray | None = None,
                 population_norms: np.ndarray | None = None):
        self.config = config
        self.runtime = ModelRuntime.shared(model)
        self.layers, self.recommended = config.resolve_layers(self.runtime.num_layers)
        self.basis, self.population_norms = basis, population_norms

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(type(self).__name__, batch, ["user_id", "pairs", "content_fingerprint"])
        users = batch.select(["user_id", "pairs", "content_fingerprint"]).to_pylist()
        rows = isolate_failures(users, self._compute, self._failed)
        return pa.Table.from_pylist(rows, schema=CAA_OUTPUT_SCHEMA)

    def _compute(self, users: list[dict]) -> list[dict]:
        pairs = [p for u in users for p in u["pairs"]]
        diffs = pair_differences(self.runtime, pairs, self.layers, self.config.position, self.config.direction)
        rows, start = [], 0
        for user in users:
            n = len(user["pairs"])
            if n == 0:
                raise ValueError(f"user {user['user_id']!r} has no pairs")
            rows.append(self.row_from(user, diffs[start: start + n], pair_weights(user["pairs"])))
            start += n
        return rows

    def row_from(self, user: dict, d: np.ndarray, w: np.ndarray) -> dict:
        """The output row of one user from their pair differences ``d`` (pairs, layers, hidden) and weights."""
        if w.sum() <= 0:
            raise ValueError(f"user {user['user_id']!r}: all pair weights are 0")
        mean = np.einsum("n,nlh->lh", w, d) / w.sum()
        row = self._row(user["user_id"], "user", mean, len(w), user["content_fingerprint"])
        row["weight_sum"] = float(w.sum())
        if self.basis is not None:
            from steerstore.operators.bt import features  # noqa: PLC0415

            row["bt_features"] = features(d, self.basis, self.population_norms).astype(np.float32).tolist()
            row["bt_weights"] = w.astype(np.float32).tolist()
        return row

    def _row(self, user_id, scope, mean: np.ndarray, n: int, fingerprint) -> dict:
        row = vector_row(user_id, scope, mean, n, fingerprint, layers=self.layers, recommended=self.recommended,
                         positions=self.config.apply_positions, scale=self.config.scale,
                         hidden_size=self.runtime.hidden_size, model_id=self.runtime.model_id,
                         model_fingerprint=self.runtime.fingerprint)
        return {**row, "status": "ok", "reason": None}

    def _failed(self, user: dict, exc: Exception) -> dict:
        row = self._row(user["user_id"], "user", np.zeros((0, self.runtime.hidden_size)), len(user["pairs"]),
                        user["content_fingerprint"])
        row.update(layers=[], vectors=[], norms=[], status="quarantined", weight_sum=0.0,
                   reason=f"caa failed: {type(exc).__name__}: {str(exc)[:300]}")
        return row


def vectors_array(table: pa.Table) -> np.ndarray:
    """The ``vectors`` column as float32 (rows, layers, hidden), without Python lists."""
    col = table.column("vectors").combine_chunks()
    rows = table.num_rows
    if rows == 0:
        return np.zeros((0, 0, 0), dtype=np.float32)
    n_layers = len(col[0])
    flat = col.flatten().flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(rows, n_layers, -1)


def population_partials(batch: pa.Table) -> pa.Table:
    """One row per batch: pairs, Σ w, and per-layer Σ w d (= weight_sum × user mean), float64."""
    require_columns("population_partials", batch, ["vectors", "n_pairs", "layers", "weight_sum"])
    if batch.num_rows == 0:
        return pa.Table.from_pylist([], schema=PARTIALS_SCHEMA)
    weights = batch.column("weight_sum").to_numpy().astype(np.float64)
    sums = (vectors_array(batch).astype(np.float64) * weights[:, None, None]).sum(axis=0)
    return pa.Table.from_pylist([{"n": int(pa.compute.sum(batch.column("n_pairs")).as_py()),
                                  "weight": float(weights.sum()), "layers": batch.column("layers")[0].as_py(),
                                  "sums": sums.tolist()}], schema=PARTIALS_SCHEMA)


def population_mean(partials: pa.Table) -> tuple[np.ndarray, int]:
    """Combine partial sums into the population direction Σ w d / Σ w: (layers, hidden) float32, pairs."""
    total = int(pa.compute.sum(partials.column("n")).as_py() or 0)
    weight = float(pa.compute.sum(partials.column("weight")).as_py() or 0.0)
    if total == 0 or weight <= 0:
        raise ValueError("no weighted pairs: cannot compute a population direction")
    sums = np.stack([np.asarray(s, dtype=np.float64) for s in partials.column("sums").to_pylist()]).sum(axis=0)
    return (sums / weight).astype(np.float32), total


def shrink(user_mean: np.ndarray, weight_sum: float, population: np.ndarray, kappa: float) -> np.ndarray:
    """(Σ w d + κ p) / (Σ w + κ): the user's weighted mean shrunk toward the population."""
    return ((user_mean * weight_sum + kappa * population) / (weight_sum + kappa)).astype(np.float32)


def vector_row(user_id: str | None, scope: str, mean: np.ndarray, n: int, fingerprint: str | None, *,
               layers: list[int], recommended: list[int], positions: str, scale: float, hidden_size: int,
               model_id: str, model_fingerprint: str, method: str = "caa", source: str = "pairs") -> dict:
    """A VECTORS_SCHEMA row (CAA or SteerX): per-layer vectors plus the conventions needed to apply them."""
    return {
        "user_id": user_id, "scope": scope, "method": method, "source": source, "layers": layers,
        "vectors": mean.astype(np.float32).tolist(), "norms": np.linalg.norm(mean, axis=-1).tolist(),
        "hidden_size": hidden_size, "hook": "block_output", "operation": "add",
        "positions": positions, "recommended_layers": recommended,
        "recommended_scale": scale, "n_pairs": n, "content_fingerprint": fingerprint,
        "model_id": model_id, "model_fingerprint": model_fingerprint,
    }
