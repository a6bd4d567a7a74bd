"""WaRA — Wavelet Low Rank Adaptation, as the paper's Figure 1 draws it.

Heidari et al., "WaRA: Wavelet Low Rank Adaptation", arXiv 2506.24092 (v1, June 2025). The official code
(moeinheidari7829/WaRA) could not be read from here and the text gives no equations, so this follows the
Figure 1 caption: the input embedding X ∈ R^{d1×k} (features × tokens) is decomposed by a 2-D DWT into
{C_LL, C_LH, C_HL, C_HH}, one low-rank pair A_w ∈ R^{r×d1/2}, B_w ∈ R^{d2/2×r} is applied to the
coefficients, and the inverse DWT gives the update X̂ = W⁻¹(B_w A_w C) ∈ R^{d2×k}.

Exact weight-space form (any orthogonal, periodised wavelet; D_n the one-level DWT matrix of length n, split
into its low-pass rows D_n^L and high-pass rows D_n^H). The same B A multiplies every subband from the left,
so the coefficients become blockdiag(BA, BA)·C, and the token-axis transform cancels (D_kᵀ D_k = I)::

    X̂ = D_{d2}ᵀ · blockdiag(BA, BA) · D_{d1} X D_kᵀ · D_k = ΔW X
    ΔW = (α/r) · D_{d2}ᵀ blockdiag(BA, BA) D_{d1} = (α/r) · (D_{d2}^Lᵀ B A D_{d1}^L + D_{d2}^Hᵀ B A D_{d1}^H)

So WaRA is input-independent and merges into W; its own 2-D DWT coefficient matrix has LL = HH = (α/r)·BA
and LH = HL = 0 (for Haar: every 2×2 block of ΔW is [[p, q], [q, p]]). Rank ≤ 2r with r·(d1 + d2)/2
trainable parameters: half of LoRA's at the same r, so rank 2r here costs what LoRA's rank r does. Odd sizes
are zero-padded to even before the transform and cropped after. Init as LoRA (B = 0, A Kaiming-uniform), so
the adapted model equals the base model before training. Linear layers run factored: base(x) + x Qᵀ Pᵀ with
P = [D^Lᵀ B, D^Hᵀ B] (d2 × 2r) and Q = [A D^L; A D^H] (2r × d1).

Conv2d (pathopeft's extension; the paper adapts ViT linears): the "input embedding" is the im2col patch
vector, ordered tap-major (kh, kw, in-channel), so the wavelet's input axis runs over *input channels*
(channel 2m with 2m + 1 at the same kernel tap, for an even channel count) and its output axis over output
channels; ΔW is built in that order and permuted back to PyTorch's (out, in, kh, kw) layout. A 1×1 conv is
exactly the Linear case.

Not implemented: v2's (March 2026) spatial-grid form and Tiny-WaRA. With a linear shared adapter the v2 form
IDWT(BA · DWT_spatial(X)) equals BA·X, plain LoRA, so it would need details the abstract does not give.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.adapters.core import Delta
from pathopeft.adapters.wara.config import WaraConfig
from pathopeft.adapters.wara.wavelets import analysis_matrix, padded_length


class WaraDelta(Delta):
    def __init__(self, base: nn.Module, config: WaraConfig) -> None:
        super().__init__(base, config)
        self.n_out = padded_length(self.out_features, 1)
        self.n_in = padded_length(self.in_features, 1)
        self.kernel = tuple(base.weight.shape[2:]) if isinstance(base, nn.Conv2d) else None
        self.B = nn.Parameter(torch.zeros(self.n_out // 2, config.r))
        self.A = nn.Parameter(torch.empty(config.r, self.n_in // 2))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling = config.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P (out × 2r) and Q (2r × in, tap-major on convs) with ΔW = P Q."""
        cfg: WaraConfig = self.config
        dev, dt = self.A.device, self.A.dtype
        d_out = analysis_matrix(self.n_out, cfg.wavelet, 1, dev, dt)[:, : self.out_features]
        d_in = analysis_matrix(self.n_in, cfg.wavelet, 1, dev, dt)[:, : self.in_features]
        h_out, h_in = self.n_out // 2, self.n_in // 2
        p = torch.cat([d_out[:h_out].T @ self.B, d_out[h_out:].T @ self.B], dim=1)
        q = torch.cat([self.A @ d_in[:h_in], self.A @ d_in[h_in:]], dim=0)
        return p * self.scaling, q

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        p, q = self.factors()
        dw = p @ q
        if self.kernel is None:
            return dw
        kh, kw = self.kernel
        return dw.view(self.out_features, kh, kw, -1).permute(0, 3, 1, 2).reshape(self.out_features, -1)

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if isinstance(base, nn.Linear):
            p, q = self.factors()
            return base(x) + F.linear(F.linear(x.to(q.dtype), q), p).to(x.dtype)
        return super().forward(x, base)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: WaraConfig) -> int:
        return config.r * (padded_length(out_features, 1) + padded_length(in_features, 1)) // 2
