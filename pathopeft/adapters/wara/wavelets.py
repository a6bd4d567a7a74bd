"""Orthogonal discrete wavelet transforms as matrices, differentiable and exactly invertible.

An L-level 1-D DWT with periodic extension ("periodization") of a length-n signal (n a multiple of 2^L) is an
orthogonal n×n matrix D: coefficients c = D x, reconstruction x = Dᵀ c. The 2-D transform of a matrix M is
D_rows · M · D_colsᵀ. As matrices the transforms are plain torch ops (autograd for free) with perfect
reconstruction up to float rounding, and the inverse transform of *low-rank factors* costs out·n·r, which is
what lets WaRA run in factored form.

Coefficient layout along one axis: [A_L | D_L | D_{L-1} | … | D_1] with |A_L| = |D_L| = n/2^L, |D_j| = n/2^j.
Filters: ``haar`` and ``db2`` built in; any other orthogonal wavelet name (``db4``, ``sym4``, ``coif1``, …) is
taken from PyWavelets when it is installed.
"""

from __future__ import annotations

import functools
import math

import torch

_SQ3 = math.sqrt(3.0)
_BUILTIN = {
    "haar": [1 / math.sqrt(2), 1 / math.sqrt(2)],
    "db1": [1 / math.sqrt(2), 1 / math.sqrt(2)],
    "db2": [
        (1 + _SQ3) / (4 * math.sqrt(2)),
        (3 + _SQ3) / (4 * math.sqrt(2)),
        (3 - _SQ3) / (4 * math.sqrt(2)),
        (1 - _SQ3) / (4 * math.sqrt(2)),
    ],
}


def lowpass_filter(wavelet: str) -> list[float]:
    """Low-pass taps of an orthogonal wavelet (sum √2, unit norm), in PyWavelets' ``rec_lo`` order: with the
    alignment of :func:`_one_level` the matrices equal PyWavelets' ``mode="periodization"`` transforms."""
    if wavelet in _BUILTIN:
        return list(_BUILTIN[wavelet])
    try:
        import pywt
    except ImportError as e:
        raise ValueError(f"wavelet {wavelet!r}: built in are {sorted(_BUILTIN)}; others need PyWavelets") from e
    try:
        w = pywt.Wavelet(wavelet)
    except ValueError as e:
        raise ValueError(f"wavelet {wavelet!r} is not a PyWavelets wavelet name ({e})") from None
    if not w.orthogonal:
        raise ValueError(f"wavelet {wavelet!r} is not orthogonal; WaRA needs an orthogonal wavelet")
    return list(w.rec_lo)  # the taps in the order the matrices below use (PyWavelets' own convention)


def padded_length(n: int, level: int) -> int:
    step = 2**level
    return math.ceil(n / step) * step


def _one_level(n: int, h: list[float]) -> torch.Tensor:
    taps = len(h)
    g = [(-1) ** k * h[taps - 1 - k] for k in range(taps)]
    m = torch.zeros(n, n, dtype=torch.float64)
    half = n // 2
    shift = taps // 2 - 1  # PyWavelets' "periodization" alignment (0 for Haar)
    for i in range(half):
        for k in range(taps):
            m[i, (2 * i + k - shift) % n] += h[k]
            m[half + i, (2 * i + k - shift) % n] += g[k]
    return m


@functools.lru_cache(maxsize=64)
def _analysis_matrix_f64(n: int, wavelet: str, level: int) -> torch.Tensor:
    if n % 2**level:
        raise ValueError(f"length {n} is not a multiple of 2^{level}; pad to {padded_length(n, level)}")
    h = lowpass_filter(wavelet)
    d = torch.eye(n, dtype=torch.float64)
    size = n
    for _ in range(level):
        step = torch.eye(n, dtype=torch.float64)
        step[:size, :size] = _one_level(size, h)
        d = step @ d
        size //= 2
    return d


@functools.lru_cache(maxsize=64)
def analysis_matrix(
    n: int,
    wavelet: str = "haar",
    level: int = 1,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The orthogonal L-level DWT matrix for length ``n`` (cached per size, device and dtype: a constant)."""
    return _analysis_matrix_f64(n, wavelet, level).to(device=device, dtype=dtype)


def band_slices(n: int, level: int) -> list[slice]:
    """[A_L, D_L, …, D_1] as slices of a length-``n`` coefficient axis."""
    a = n // 2**level
    out = [slice(0, a)]
    for j in range(level, 0, -1):
        lo, hi = n // 2**j, n // 2 ** (j - 1)
        out.append(slice(lo, hi))
    return out


def subbands_2d(n_rows: int, n_cols: int, level: int) -> list[tuple[str, slice, slice]]:
    """Mallat's 2-D subbands (LL_L, then LH_j, HL_j, HH_j for j = L … 1) as (name, row slice, col slice).

    They tile the coefficient matrix of :func:`dwt2`. (In the separable standard layout the LH_j block spans
    all coarser column bands; that is an orthogonal re-mixing of Mallat's LH_j, which leaves the set of
    low-rank blocks unchanged.)
    """
    out = [(f"LL{level}", slice(0, n_rows // 2**level), slice(0, n_cols // 2**level))]
    for j in range(level, 0, -1):
        r_a, r_d = slice(0, n_rows // 2**j), slice(n_rows // 2**j, n_rows // 2 ** (j - 1))
        c_a, c_d = slice(0, n_cols // 2**j), slice(n_cols // 2**j, n_cols // 2 ** (j - 1))
        out += [(f"LH{j}", r_d, c_a), (f"HL{j}", r_a, c_d), (f"HH{j}", r_d, c_d)]
    return out


def dwt2(x: torch.Tensor, wavelet: str = "haar", level: int = 1) -> torch.Tensor:
    """2-D DWT of a matrix whose sides are multiples of 2^level."""
    dr = analysis_matrix(x.shape[-2], wavelet, level, x.device, x.dtype)
    dc = analysis_matrix(x.shape[-1], wavelet, level, x.device, x.dtype)
    return dr @ x @ dc.T


def idwt2(c: torch.Tensor, wavelet: str = "haar", level: int = 1) -> torch.Tensor:
    """Inverse of :func:`dwt2`."""
    dr = analysis_matrix(c.shape[-2], wavelet, level, c.device, c.dtype)
    dc = analysis_matrix(c.shape[-1], wavelet, level, c.device, c.dtype)
    return dr.T @ c @ dc
