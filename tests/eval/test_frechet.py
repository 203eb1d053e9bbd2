import numpy as np
import pytest
import scipy.linalg

from maskdit_fast.eval.frechet import feature_statistics, frechet_distance


def _random_gaussian(rng: np.random.Generator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    a = rng.standard_normal((dim, dim))
    return rng.standard_normal(dim), a @ a.T / dim + 0.1 * np.eye(dim)


def _scipy_reference(mu1, sigma1, mu2, sigma2) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [1, 2, 7, 64, 300])
def test_matches_scipy_sqrtm(dim: int) -> None:
    rng = np.random.default_rng(dim)
    (mu1, sigma1), (mu2, sigma2) = _random_gaussian(rng, dim), _random_gaussian(rng, dim)
    expected = _scipy_reference(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_float32_inputs_are_computed_in_float64() -> None:
    rng = np.random.default_rng(0)
    (mu1, sigma1), (mu2, sigma2) = _random_gaussian(rng, 32), _random_gaussian(rng, 32)
    single = frechet_distance(*(x.astype(np.float32) for x in (mu1, sigma1, mu2, sigma2)))
    expected = _scipy_reference(*(x.astype(np.float32).astype(np.float64) for x in (mu1, sigma1, mu2, sigma2)))
    assert single == pytest.approx(expected, rel=1e-9)


def test_identical_sets_give_exactly_zero() -> None:
    features = np.random.default_rng(0).standard_normal((500, 64)).astype(np.float32)
    assert frechet_distance(*feature_statistics(features), *feature_statistics(features.copy())) == 0.0


def test_rank_deficient_covariances_are_finite_and_exact() -> None:
    """Commuting PSD covariances with zero and tiny eigenvalues: d = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2."""
    rng = np.random.default_rng(1)
    dim = 50
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a = rng.uniform(0.5, 2.0, dim) * (rng.uniform(size=dim) > 0.3)  # ~30% exact zeros
    b = rng.uniform(0.5, 2.0, dim) * (rng.uniform(size=dim) > 0.3)
    a[:3] = 1e-18  # tiny eigenvalues that rounding turns negative after the rotation
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    distance = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert np.isfinite(distance)
    assert distance == pytest.approx(expected, rel=1e-8)


def test_fewer_samples_than_dimensions_gives_no_nan() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((10, 256)), rng.standard_normal((12, 256)) + 0.1
    forward = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    backward = frechet_distance(*feature_statistics(y), *feature_statistics(x))
    assert np.isfinite(forward) and forward > 0
    assert forward == pytest.approx(backward, rel=1e-8)
    # nearly identical rank-deficient sets: non-negative, small, finite
    nearly = frechet_distance(*feature_statistics(x), *feature_statistics(x + 1e-9))
    assert 0.0 <= nearly < 1e-6


def test_feature_statistics_shapes_and_values() -> None:
    features = np.random.default_rng(3).standard_normal((100, 5)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    assert mu.dtype == sigma.dtype == np.float64
    assert mu.shape == (5,) and sigma.shape == (5, 5)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError):
        feature_statistics(features[:1])


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
