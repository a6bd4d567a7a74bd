"""LoCA — n learnable DCT coefficients at learnable frequency locations.

Du et al., "LoCA: Location-Aware Cosine Adaptation for Parameter-Efficient Fine-Tuning", ICLR 2025 (arXiv
2502.06820; code TL-UESTC/LoCA, ``peft/src/peft/tuners/loca/{dct_utils.py, layer.py}``, read as vendored)::

    ΔW = α · C_outᵀ S C_in,     S ∈ R^{out×in}: zero except S[r_k, c_k] += a_k,  k = 1…n

C_N is the orthonormal DCT-II (C[k, j] = √(2/N) cos(π(2j+1)k / 2N), row 0 divided by √2), so ‖ΔW‖_F = α‖S‖_F.
Coefficients a start at 0 (ΔW = 0 at init); locations are a 2×n parameter p ~ U[0, 1], mapped each forward
to r = round(clamp(p₀, 0, 0.999)·(out − 1)), c likewise (rounding is straight-through). With K = α C_out G C_inᵀ
(G = ∂L/∂ΔW), the coefficient gradient is K[r, c] and the location gradient the paper's central difference
clamp(½·a·(K[r+1, c] − K[r−1, c]), −1, 1) (neighbours clamped at the edges; columns alike), chained through
the ×(out − 1) scaling. Schedule, per training forward as the code counts: step 0 trains coefficients only;
until ``location_steps`` (B_s) a 30-step cycle trains coefficients for 10 steps (B_a) and locations for 20 (B_l);
after B_s the locations are frozen. Trainable: n coefficients + 2n locations (until B_s) per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register


def dct_matrix(n: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix (n × n): C Cᵀ = I."""
    k = torch.arange(n, device=device, dtype=dtype)[:, None]
    j = torch.arange(n, device=device, dtype=dtype)[None, :]
    c = math.sqrt(2.0 / n) * torch.cos(math.pi * (2 * j + 1) * k / (2 * n))
    c[0] /= math.sqrt(2.0)
    return c


@dataclass
class LocaConfig(AdapterConfig):
    """LoCA: ``n`` DCT coefficients at learnable locations (alpha · C_outᵀ S C_in), locations learned for
    ``location_steps`` forwards in 10/20-step alternation, then frozen."""

    adapter_type: ClassVar[str] = "loca"
    r: int = 8  # unused (the size is n); kept so create(..., rank=...) works
    n: int = 1000
    alpha: float = 1.0
    location_steps: int = 300  # B_s (the paper: about 10 % of the training steps)
    coef_steps: int = 10  # B_a
    loc_steps: int = 20  # B_l


class _LocaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, p, c_out, c_in, alpha, train_coef, train_loc):
        out, inp = c_out.shape[0], c_in.shape[0]
        q = p.nan_to_num(0.0).clamp(0, 0.999)  # a diverged (NaN) location must give NaN outputs, not a bad index
        rows = torch.round(q[0] * (out - 1)).long()
        cols = torch.round(q[1] * (inp - 1)).long()
        s = torch.zeros(out, inp, dtype=a.dtype, device=a.device)
        s.index_put_((rows, cols), a, accumulate=True)
        ctx.save_for_backward(a, p, c_out, c_in, rows, cols)
        ctx.alpha, ctx.train_coef, ctx.train_loc = alpha, train_coef, train_loc
        return alpha * c_out.T @ s @ c_in

    @staticmethod
    def backward(ctx, g):
        a, p, c_out, c_in, rows, cols = ctx.saved_tensors
        out, inp = c_out.shape[0], c_in.shape[0]
        k = ctx.alpha * c_out @ g @ c_in.T
        grad_a = k[rows, cols] if ctx.train_coef else torch.zeros_like(a)
        grad_p = torch.zeros_like(p)
        if ctx.train_loc:
            up, down = (rows + 1).clamp(max=out - 1), (rows - 1).clamp(min=0)
            right, left = (cols + 1).clamp(max=inp - 1), (cols - 1).clamp(min=0)
            g_row = (0.5 * a * (k[up, cols] - k[down, cols])).clamp(-1, 1)
            g_col = (0.5 * a * (k[rows, right] - k[rows, left])).clamp(-1, 1)
            inside = (p >= 0) & (p <= 0.999)
            grad_p = torch.stack([g_row * (out - 1), g_col * (inp - 1)]) * inside
        return grad_a, grad_p, None, None, None, None, None


class LocaDelta(Delta):
    def __init__(self, base: nn.Module, config: LocaConfig) -> None:
        super().__init__(base, config)
        self.coef = nn.Parameter(torch.zeros(config.n))
        self.loc = nn.Parameter(torch.rand(2, config.n))
        self.register_buffer("C_out", dct_matrix(self.out_features), persistent=False)
        self.register_buffer("C_in", dct_matrix(self.in_features), persistent=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # saved: a resumed run keeps its phase

    def phase(self) -> tuple[bool, bool]:
        """(train coefficients, train locations) at the current forward count."""
        cfg, it = self.config, int(self.step)
        if it == 0 or it >= cfg.location_steps:
            return True, False
        in_cycle = it % (cfg.coef_steps + cfg.loc_steps)
        return (True, False) if in_cycle < cfg.coef_steps else (False, True)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        coef, loc = self.phase() if self.training else (True, False)
        return _LocaFn.apply(self.coef, self.loc, self.C_out, self.C_in, self.config.alpha, coef, loc)

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        out = super().forward(x, base)
        if self.training and torch.is_grad_enabled():
            self.step += 1
        return out

    def locations(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.loc.detach().clamp(0, 0.999)
        return torch.round(q[0] * (self.out_features - 1)).long(), torch.round(q[1] * (self.in_features - 1)).long()

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: LocaConfig) -> int:
        return 3 * config.n


register("loca", LocaConfig, LocaDelta, conv=True, identity_at_init=True)

__all__ = ["LocaConfig", "LocaDelta", "dct_matrix"]
