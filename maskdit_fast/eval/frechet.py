"""Fréchet distance between two Gaussians, the core of FID, sFID and the MNIST Fréchet metric.

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr( (S1^1/2 S2 S1^1/2)^1/2 )

The trace of the matrix square root is computed from eigenvalues of symmetric matrices only
(`numpy.linalg.eigh`), never from a general `sqrtm`: S1^1/2 comes from the eigendecomposition of S1,
M = S1^1/2 S2 S1^1/2 is symmetric positive semi-definite, and tr(M^1/2) is the sum of the square
roots of its eigenvalues. Eigenvalues that rounding pushes slightly below zero (rank-deficient
covariances, e.g. fewer samples than feature dimensions) are clamped to zero, so the result is
always finite and never complex, unlike `scipy.linalg.sqrtm`, which can return complex or NaN
values for near-singular inputs.
"""

import numpy as np


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a set of feature vectors, in float64.

    Args:
        features: (N, F) array, one feature vector per row; N >= 2.

    Returns:
        mu (F,) and sigma (F, F), the unbiased (ddof=1) covariance, as in ADM's evaluator.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected an (N, F) array with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    Args:
        mu1, mu2: (F,) means.
        sigma1, sigma2: (F, F) symmetric positive semi-definite covariances.

    Returns:
        The distance as a Python float >= 0, computed in float64. Identical statistics give
        exactly 0.0 (the eigenvalue route alone would leave a rounding residue of ~1e-12).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    dim = len(mu1)
    if mu1.shape != (dim,) or mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    if np.array_equal(mu1, mu2) and np.array_equal(sigma1, sigma2):
        return 0.0

    sqrt_sigma1 = _sqrtm_psd(sigma1)
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()

    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))


def _sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a (F, F) positive semi-definite matrix (negative eigenvalues clamped)."""
    eigenvalues, eigenvectors = np.linalg.eigh((sigma + sigma.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T
