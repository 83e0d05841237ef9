"""Fréchet distance between image sets in pooled EfficientNet-Lite0 features.

This is the Fréchet Inception Distance of Heusel et al. 2017 ("GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium", NeurIPS) with the Inception-v3 backbone swapped
for EfficientNet-Lite0 (:mod:`saminv.models.efficientnet`), because no Inception weights are
available offline. Numbers are therefore comparable only with other numbers computed by this
module, never with published FID values.
"""

from __future__ import annotations

import numpy as np


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray, sigma_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """Exact ``Tr sqrtm(S_a S_b)`` without a general (non-symmetric) matrix square root.

    For any factorisation ``S_a = L L^T``, the non-zero eigenvalues of ``S_a S_b`` are those of the
    symmetric PSD matrix ``L^T S_b L``, so the trace of the principal square root is the sum of the
    square roots of its eigenvalues. ``L`` is the centred data ``X^T / sqrt(N - 1)`` of the smaller
    set when ``N <= D`` (cheap, exact for rank-deficient covariances), otherwise the symmetric square
    root of ``S_a`` from ``eigh``.
    """
    if b.shape[0] < a.shape[0]:
        a, b, sigma_a, sigma_b = b, a, sigma_b, sigma_a
    n, d = a.shape
    if n <= d:
        factor = (a - a.mean(axis=0)).T / np.sqrt(n - 1)
    else:
        w, v = np.linalg.eigh(sigma_a)
        factor = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = factor.T @ sigma_b @ factor
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def _trace_sqrtm_scipy(sigma_a: np.ndarray, sigma_b: np.ndarray, eps: float) -> float:
    """``Tr sqrtm(S_a S_b)`` the way the reference FID code does it (scipy.linalg.sqrtm)."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma_a @ sigma_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma_a.shape[0]) * eps
        covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, method: str = "eigh", eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017).

    ``feats_a`` [Na, D], ``feats_b`` [Nb, D] (any real dtype, computed in float64; N >= 2 each).
    Returns ``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b))`` with unbiased (N - 1)
    covariances. Can be slightly negative (~ -1e-9 relative) for identical sets from rounding.

    ``method``:
      * ``"eigh"`` (default): exact trace from a symmetric eigenproblem (``_trace_sqrt_product``);
        far faster than ``sqrtm`` at D = 1280 (0.2 s vs ~50 s for N = 40 on a busy 2-core CPU),
        needs no eps offset for singular covariances and has no imaginary parts.
      * ``"sqrtm"``: the reference-FID recipe, ``scipy.linalg.sqrtm(S_a S_b)``; if the result is not
        finite (singular product), ``eps * I`` is added to both covariances and it is retried; a
        negligible imaginary part is dropped, a large one raises ValueError.
    Both agree to numerical precision (tested).
    """
    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature arrays must be [N, D] with equal D, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("need at least two samples per set to estimate a covariance")
    sigma_a = np.atleast_2d(np.cov(a, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(b, rowvar=False))
    diff = a.mean(axis=0) - b.mean(axis=0)
    if method == "eigh":
        tr_covmean = _trace_sqrt_product(a, b, sigma_a, sigma_b)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrtm_scipy(sigma_a, sigma_b, eps)
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm', got {method!r}")
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean)
