"""User clusters for DPS: group users by what they write, then route each user softly.

DPS clusters users by the text of their history, not by their preference pairs:

- each user's most recent history outputs are embedded with the offline sentence encoder
  (all-MiniLM-L6-v2 by default: mean pooling over the attention mask, then L2 normalisation,
  exactly as sentence-transformers does for that model) and averaged into one unit vector;
- the user vectors are clustered with seeded k-means (k-means++ init, Lloyd iterations, best
  of several restarts by inertia), deterministic for a given seed;
- each user gets soft routing weights over the clusters: a softmax of cosine similarity to the
  centroids divided by a temperature, so a user between two clusters draws on both.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import torch

from steerstore.operators.runtime.sources import DEFAULT_ENCODER, resolve_encoder_path
from steerstore.operators.validate import require_columns

log = logging.getLogger("steerstore")

EMBEDDING_SCHEMA = pa.schema([pa.field("user_id", pa.string()), pa.field("embedding", pa.list_(pa.float32()))])


class SentenceEncoder:
    """Texts -> L2-normalised mean-pooled sentence embeddings, float32 (n, dim)."""

    def __init__(self, name_or_path: str = DEFAULT_ENCODER, device: str = "cpu", batch_size: int = 64,
                 max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1 (got {batch_size}, {max_length})")
        path = resolve_encoder_path(name_or_path)
        self.device = torch.device(device)
        self.batch_size, self.max_length = batch_size, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` in length-sorted batches; rows come back in the input order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        for start in range(0, len(order), self.batch_size):
            rows = order[start: start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state  # (b, t, dim)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy()
        return out


def user_embedding(item_embeddings: np.ndarray) -> np.ndarray:
    """The mean of a user's item embeddings, L2-normalised: float32 (dim,)."""
    if len(item_embeddings) == 0:
        raise ValueError("user_embedding needs at least one item embedding")
    mean = np.asarray(item_embeddings, dtype=np.float64).mean(axis=0)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)


class EmbedUsers:
    """User rows (``user_id``, ``histories``) -> EMBEDDING_SCHEMA rows, one per user, in order.

    A ``map_batches`` callable class (``batch_format="pyarrow"``). Each user's ``max_items``
    most recent history outputs (the last in the list, which is sorted by time) are embedded;
    all users of a batch go through the encoder in one call. Users without histories must be
    filtered out beforehand: one here raises ``ValueError`` naming the user. With
    ``keep_columns`` the input batch comes back with the ``embedding`` column appended.
    """

    def __init__(self, encoder: str = DEFAULT_ENCODER, batch_size: int = 64, max_items: int = 32,
                 keep_columns: bool = False, device: str = "cpu"):
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1 (got {max_items})")
        self.encoder = SentenceEncoder(encoder, device=device, batch_size=batch_size)
        self.max_items = max_items
        self.keep_columns = keep_columns

    def __call__(self, batch: pa.Table) -> pa.Table:
        require_columns(type(self).__name__, batch, ["user_id", "histories"])
        users = batch.column("user_id").to_pylist()
        texts: list[list[str]] = []
        for user_id, histories in zip(users, batch.column("histories").to_pylist()):
            if not histories:
                raise ValueError(f"user {user_id!r} has no histories to embed")
            texts.append([h["output"] or "" for h in histories[-self.max_items:]])
        flat = self.encoder.encode([t for items in texts for t in items])
        bounds = np.cumsum([len(items) for items in texts])[:-1]
        embeddings = [user_embedding(part) for part in np.split(flat, bounds)] if texts else []
        column = pa.array([e.tolist() for e in embeddings], type=pa.list_(pa.float32()))
        if self.keep_columns:
            return batch.append_column(EMBEDDING_SCHEMA.field("embedding"), column)
        return pa.Table.from_arrays([pa.array(users, type=pa.string()), column], schema=EMBEDDING_SCHEMA)


def kmeans(x: np.ndarray, k: int, seed: int = 0, n_init: int = 4, max_iter: int = 100,
           tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, float]:
    """Seeded k-means: (centroids float32 (k, d), labels int64 (n,), inertia).

    k-means++ init, Lloyd iterations until the centroids move less than ``tol`` (squared), best
    of ``n_init`` restarts by inertia. ``k`` above the number of distinct points is lowered to it
    (with a warning). An emptied cluster is re-seeded with the point farthest from its centroid.
    """
    x = np.asarray(x, dtype=np.float64)
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1 (got {k})")
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty 2-D array of points (got shape {x.shape})")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"kmeans needs n_init >= 1 and max_iter >= 1 (got {n_init}, {max_iter})")
    distinct = len(np.unique(x, axis=0))
    if k > distinct:
        log.warning("kmeans: k=%d exceeds the %d distinct points; using k=%d", k, distinct, distinct)
        k = distinct
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for _ in range(n_init):
        centroids, labels, inertia = _lloyd(x, _kmeans_pp(x, k, rng), max_iter, tol)
        if best is None or inertia < best[2]:
            best = (centroids, labels, inertia)
    assert best is not None
    return best[0].astype(np.float32), best[1].astype(np.int64), float(best[2])


def _sq_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (n, k), clipped at 0 against rounding."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++: each next centroid drawn with probability ∝ squared distance to the nearest one."""
    centroids = [x[rng.integers(len(x))]]
    closest = _sq_distances(x, centroids[0][None, :])[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        # all points already coincide with a centroid only if k > distinct points (excluded above)
        index = rng.choice(len(x), p=closest / total) if total > 0 else int(rng.integers(len(x)))
        centroids.append(x[index])
        closest = np.minimum(closest, _sq_distances(x, x[index][None, :])[:, 0])
    return np.stack(centroids)


def _lloyd(x: np.ndarray, centroids: np.ndarray, max_iter: int,
           tol: float) -> tuple[np.ndarray, np.ndarray, float]:
    k = len(centroids)
    for _ in range(max_iter):
        dist = _sq_distances(x, centroids)
        labels = dist.argmin(axis=1)
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
        point_dist = dist[np.arange(len(x)), labels]
        for empty in np.flatnonzero(counts == 0):
            farthest = int(point_dist.argmax())
            new[empty] = x[farthest]
            point_dist[farthest] = -1.0  # a second empty cluster takes the next farthest point
        shift = ((new - centroids) ** 2).sum()
        centroids = new
        if shift <= tol:
            break
    dist = _sq_distances(x, centroids)
    labels = dist.argmin(axis=1)
    return centroids, labels, float(dist[np.arange(len(x)), labels].sum())


def routing_weights(x: np.ndarray, centroids: np.ndarray,
                    temperature: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Soft cluster membership of L2-normalised embeddings: (labels int64 (n,), weights float32 (n, k)).

    weights = softmax over clusters of cos(x, centroid) / temperature (centroids are normalised
    here, as k-means means are not unit length); each row sums to 1, labels are the argmax.
    """
    if temperature <= 0:
        raise ValueError(f"routing temperature must be > 0 (got {temperature})")
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(centroids, dtype=np.float64)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    logits = (x @ c.T) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.argmax(axis=1).astype(np.int64), weights.astype(np.float32)
