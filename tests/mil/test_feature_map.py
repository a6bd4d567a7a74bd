"""The λ-orthogonal feature map (issue 17): λ = 0 is least squares, λ → ∞ an isometry (Procrustes)."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from pathopeft.mil.feature_map import fit_feature_map, orthogonality_error, procrustes


def _pair(n: int = 300, d: int = 6):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(n, d, generator=g)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    skew = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)  # a non-orthogonal change of the encoder
    new = (old @ q) @ skew + 0.05 * torch.randn(n, d, generator=g) + 0.5
    return new, old


def test_lambda_zero_is_the_least_squares_fit():
    new, old = _pair()
    t, b = fit_feature_map(new, old, lam=0.0)
    x = np.concatenate([new.numpy(), np.ones((len(new), 1))], 1).astype(np.float64)
    ref = np.linalg.lstsq(x, old.numpy().astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(t.numpy(), ref[:-1], atol=1e-4)
    np.testing.assert_allclose(b.numpy(), ref[-1], atol=1e-4)


def test_large_lambda_gives_an_orthogonal_map_and_lambda_trades_fit_for_orthogonality():
    new, old = _pair()
    errors, fits = [], []
    for lam in (0.0, 0.1, 10.0, 1e5):
        t, b = fit_feature_map(new, old, lam=lam)
        errors.append(orthogonality_error(t))
        fits.append(float((new @ t + b - old).pow(2).sum(1).mean()))
    assert errors[-1] < 1e-2  # TᵀT = I in the limit
    assert all(a >= c - 1e-6 for a, c in itertools.pairwise(errors))  # more λ, more orthogonal
    assert all(a <= c + 1e-6 for a, c in itertools.pairwise(fits))  # and a worse fit
    tp, _bp = procrustes(new, old)
    t, b = fit_feature_map(new, old, lam=1e5)
    torch.testing.assert_close(t, tp, atol=2e-2, rtol=0)  # the limit is orthogonal Procrustes
    assert orthogonality_error(tp) < 1e-5
