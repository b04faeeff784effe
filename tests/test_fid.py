"""dit_fast.fid.frechet_distance: closed-form cases, a non-commuting pair, singular covariances."""
import numpy as np
import pytest

from dit_fast.fid import frechet_distance


def _spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T + (0 if rank else np.eye(d))


def test_identical_gaussians_are_zero_apart():
    sigma = _spd(np.random.default_rng(0), 6)
    assert frechet_distance(np.ones(6), sigma, np.ones(6), sigma) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_covariances_closed_form():
    # ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2 for S1 = diag(a), S2 = diag(b).
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 1.0])
    mu1, mu2 = np.array([1.0, 2.0, 0.0]), np.array([0.0, 0.0, 3.0])
    want = 1 + 4 + 9 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)


def test_scaled_identity_against_a_full_covariance():
    # S1 = c I commutes with any S2: Tr((S1 S2)^1/2) = sqrt(c) * sum sqrt(eig(S2)).
    rng = np.random.default_rng(1)
    s2, c = _spd(rng, 5), 2.5
    eig = np.linalg.eigvalsh(s2)
    want = 5 * c + eig.sum() - 2 * np.sqrt(c) * np.sqrt(eig).sum()
    assert frechet_distance(np.zeros(5), c * np.eye(5), np.zeros(5), s2) == pytest.approx(want, rel=1e-10)


def test_one_dimension():
    # N(m1, v1) vs N(m2, v2): (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[1.0]]) == pytest.approx(9.0 + 1.0)


def test_non_commuting_pair_matches_the_matrix_square_root():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    s1, s2 = _spd(rng, 8), _spd(rng, 8)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    root = linalg.sqrtm(s1 @ s2).real
    want = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * root)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_singular_covariances_stay_finite_and_symmetric():
    rng = np.random.default_rng(3)
    s1, s2 = _spd(rng, 10, rank=3), _spd(rng, 10, rank=4)  # fewer samples than features
    d12 = frechet_distance(np.zeros(10), s1, np.zeros(10), s2)
    d21 = frechet_distance(np.zeros(10), s2, np.zeros(10), s1)
    assert np.isfinite(d12) and d12 > 0 and d12 == pytest.approx(d21, rel=1e-8)
    # sqrt of round-off-sized eigenvalues: zero up to ~1e-7 of the trace
    assert frechet_distance(np.zeros(10), s1, np.zeros(10), s1) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
