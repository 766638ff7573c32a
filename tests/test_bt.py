"""Preference basis and Bradley-Terry ideal points on synthetic activations."""

import numpy as np
import pytest

from steerstore.infra.artifacts import compose
from steerstore.operators.bt import build_basis, features, fit_bt


def planted(users=40, pairs=60, layers=3, hidden=32, k=4, seed=0):
    """Users whose pair differences are generated from known coordinates in a known basis."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((hidden, k)))
    true_basis = np.stack([q.T for _ in range(layers)])  # same axes at every layer
    scales = np.array([1.0, 2.0, 3.0])[:layers]
    thetas = rng.standard_normal((users, k)) + np.array([2.0] + [0.0] * (k - 1))
    diffs, labels = [], []
    for u in range(users):
        # pair differences along random directions in the basis span; the user's θ decides which side wins
        z = rng.standard_normal((pairs, k))
        win = rng.random(pairs) < 1 / (1 + np.exp(-(z @ thetas[u])))
        z[~win] *= -1  # always store chosen − rejected
        d = np.einsum("pk,lkh->plh", z, true_basis) * scales[None, :, None]
        diffs.append(d + 0.01 * rng.standard_normal(d.shape))
        labels.append(z)
    return true_basis, scales, thetas, diffs


def test_the_basis_is_orthonormal_at_every_layer_and_starts_with_the_population_direction():
    rng = np.random.default_rng(1)
    means = rng.standard_normal((30, 3, 16))
    population = means.mean(axis=0)
    basis = build_basis(means, population, k=5)
    assert basis.shape == (3, 5, 16)
    for l in range(3):
        np.testing.assert_allclose(basis[l] @ basis[l].T, np.eye(5), atol=1e-5)
        np.testing.assert_allclose(basis[l, 0], population[l] / np.linalg.norm(population[l]), atol=1e-6)


def test_a_basis_is_complete_even_with_fewer_users_than_axes():
    rng = np.random.default_rng(2)
    means = rng.standard_normal((2, 2, 12))
    basis = build_basis(means, means.mean(0), k=6)
    for l in range(2):
        np.testing.assert_allclose(basis[l] @ basis[l].T, np.eye(6), atol=1e-5)


def test_bt_fitting_recovers_planted_coordinates():
    true_basis, scales, thetas, diffs = planted()
    errors = []
    for u, d in enumerate(diffs):
        x = features(d, true_basis.astype(np.float32), scales)
        fit = fit_bt(x, None, center=np.zeros(4), prior=1e-3)
        errors.append(np.linalg.norm(fit.theta - thetas[u]) / np.linalg.norm(thetas[u]))
        # train accuracy: the fraction of the user's pairs the fitted θ orders chosen-first (θ·x > 0)
        z = x @ fit.theta.astype(np.float64)
        assert np.abs(z).min() > 1e-4  # no pair on the boundary: float32 θ gives the same signs
        assert fit.train_accuracy == pytest.approx(np.count_nonzero(z > 0) / len(z), abs=1e-12)
        assert fit.train_accuracy > 0.6
        assert fit.log_likelihood == pytest.approx(-np.log1p(np.exp(-z)).sum(), rel=1e-5)
    # 60 pairs per user: the relative error of the MAP estimate stays well below 1
    assert np.median(errors) < 0.45, np.median(errors)


def test_the_prior_pulls_a_user_with_few_pairs_toward_the_population():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3))
    center = np.array([1.0, -1.0, 0.5])
    strong = fit_bt(x, None, center, prior=1e4).theta
    np.testing.assert_allclose(strong, center, atol=1e-3)
    weak = fit_bt(x, None, center, prior=1e-2).theta
    assert np.linalg.norm(weak - center) > 0.1


def test_pair_weights_act_like_repeated_pairs():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 3))
    w = np.array([1, 2, 1, 3, 1])
    weighted = fit_bt(x, w, np.zeros(3), prior=0.5).theta
    repeated = fit_bt(np.repeat(x, w, axis=0), None, np.zeros(3), prior=0.5).theta
    np.testing.assert_allclose(weighted, repeated, atol=1e-5)
    # the log-likelihood is weighted (Σ w log σ(θ·x)); the train accuracy counts each pair once, as documented
    fit = fit_bt(x, w, np.zeros(3), prior=0.5)
    z = x @ fit.theta.astype(np.float64)
    assert np.abs(z).min() > 1e-4
    assert fit.log_likelihood == pytest.approx(-(w * np.log1p(np.exp(-z))).sum(), rel=1e-5)
    hits = z > 0
    assert fit.train_accuracy == pytest.approx(hits.mean(), abs=1e-12)
    assert hits.mean() != pytest.approx((w * hits).sum() / w.sum()), hits  # the two definitions differ here


def test_composition_is_the_basis_combination_rescaled_to_the_population_norm():
    rng = np.random.default_rng(5)
    basis = build_basis(rng.standard_normal((10, 2, 8)), rng.standard_normal((2, 8)), k=3)
    theta = np.array([0.5, -2.0, 1.0], dtype=np.float32)
    norms = np.array([3.0, 7.0])
    v = compose(theta, basis, norms)
    for l in range(2):
        raw = basis[l].T @ theta
        np.testing.assert_allclose(v[l], raw / np.linalg.norm(raw) * norms[l], rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), norms, rtol=1e-5)


def test_a_zero_population_direction_is_refused():
    with pytest.raises(ValueError, match="population direction is zero"):
        build_basis(np.ones((3, 1, 4)), np.zeros((1, 4)), k=2)
