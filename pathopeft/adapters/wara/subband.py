"""Wavelet-subband LoRA (``wara-subband``): pathopeft's own design, not the paper's WaRA.

Kept beside :mod:`.layer` (the paper's Figure 1) because earlier results in ``benchmarks/RESULTS.md`` were
measured with it, and because it is a different, higher-rank construction worth having under its own name.

The weight update lives in the 2-D wavelet domain of the (out × in) *weight matrix* (the paper transforms the
layer input instead). Its coefficient matrix C is split into Mallat subbands s ∈ {LL_L, LH_j, HL_j, HH_j} and
each subband gets its *own* low-rank factors; the inverse DWT brings the update back::

    C[s] = B_s A_s          B_s: |rows(s)|×r (init 0),  A_s: r×|cols(s)| (Kaiming-uniform)
    ΔW   = (α/r) · IDWT2(C) = (α/r) · Σ_s (D_outᵀ[:, rows(s)] B_s)(A_s D_in[cols(s), :])

with D the orthogonal L-level DWT matrices (``wara.wavelets``; Haar by default, level 1: 4 subbands of
(out/2)×(in/2)). Trainable: r·Σ_s(|rows(s)| + |cols(s)|) = r·(2·out + 2·in) at level 1 — twice LoRA's count
at the same r, for an update of rank up to 4r. Rows and columns of a weight are neuron indices with no
spatial order, so this is, exactly, a 2×2-block low-rank update (each block rank r) conjugated by a fixed
orthogonal rotation; "multi-resolution" has no image-scale meaning here.

Odd sizes are zero-padded to a multiple of 2^level before the transform and cropped after. The layer runs
as base(x) + x·Qᵀ·Pᵀ like LoRA; Conv2d layers use the dense ΔW on PyTorch's (out × in·kh·kw) view, so on
convs the input-axis transform pairs neighbouring entries of that flattened view (kernel columns first).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.adapters.core import Delta, base_forward_with_weight
from pathopeft.adapters.wara.config import WaraSubbandConfig
from pathopeft.adapters.wara.wavelets import analysis_matrix, padded_length, subbands_2d


class WaraSubbandDelta(Delta):
    def __init__(self, base: nn.Module, config: WaraSubbandConfig) -> None:
        super().__init__(base, config)
        self.n_out = padded_length(self.out_features, config.level)
        self.n_in = padded_length(self.in_features, config.level)
        self.bands = subbands_2d(self.n_out, self.n_in, config.level)
        self.B = nn.ParameterList()
        self.A = nn.ParameterList()
        for _, rows, cols in self.bands:
            b = nn.Parameter(torch.zeros(rows.stop - rows.start, config.r))
            a = nn.Parameter(torch.empty(config.r, cols.stop - cols.start))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.B.append(b)
            self.A.append(a)
        self.scaling = config.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """P (out × S·r) and Q (S·r × in) with ΔW = P Q."""
        cfg: WaraSubbandConfig = self.config
        dev, dt = self.A[0].device, self.A[0].dtype
        d_out = analysis_matrix(self.n_out, cfg.wavelet, cfg.level, dev, dt)[:, : self.out_features]
        d_in = analysis_matrix(self.n_in, cfg.wavelet, cfg.level, dev, dt)[:, : self.in_features]
        p = torch.cat([d_out[rows].T @ b for (_, rows, _), b in zip(self.bands, self.B, strict=True)], dim=1)
        q = torch.cat([a @ d_in[cols] for (_, _, cols), a in zip(self.bands, self.A, strict=True)], dim=0)
        return p * self.scaling, q

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        p, q = self.factors()
        return p @ q

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if isinstance(base, nn.Linear):
            p, q = self.factors()
            return base(x) + F.linear(F.linear(x.to(q.dtype), q), p).to(x.dtype)
        w = base.weight + self.delta_weight(base).to(base.weight.dtype).view_as(base.weight)
        return base_forward_with_weight(base, x, w)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: WaraSubbandConfig) -> int:
        n_out, n_in = padded_length(out_features, config.level), padded_length(in_features, config.level)
        return sum(
            config.r * ((rows.stop - rows.start) + (cols.stop - cols.start))
            for _, rows, cols in subbands_2d(n_out, n_in, config.level)
        )
