"""Optimisers for full fine-tuning beside the adapters: low-rank gradient projection without an SVD.

DCT-AdamW, from Modoranu et al., "SVD-Free Low-Rank Adaptive Gradient Optimization for Large Language Models"
(arXiv 2505.17967; code IST-DASLab/ISTA-DASLab-Optimizers @ 4c98e6e: ``fft_low_rank/dct_adamw.py``,
``fft_projector.py``, ``utils/dct.py``). GaLore's projector is the top-r singular vectors of each gradient; here
it is r rows of a fixed orthonormal DCT-II matrix C (C[k, j] = √(2/n)·cos(πk(2j+1)/2n), row 0 × 1/√2), picked
by how much of the gradient they carry, so only r indices are stored per matrix and no SVD is ever taken::

    G (n×m), n ≥ m:  S = G Cᵀ (C: m×m), keep the r columns of S with the largest ℓ1 norm, P = S[:, idx] (n×r)
    n < m:           S = C G  (C: n×n), keep the r rows with the largest ℓ1 norm,       P = S[idx]    (r×m)

Adam's moments live in P's shape (the memory saving), the direction u = m̂/(√v̂ + ε) is mapped back with
C[idx] (u C[idx] or C[idx]ᵀ u) and applied with decoupled weight decay; no GaLore α (the code's is 1). The
indices are refreshed every ``update_gap`` steps (the code's default 1) and, as the code's default, the moments
are kept as they are across a refresh. One C per size is cached (the code builds one and shares it). 1-D
parameters and matrices with a side ≥ 32000 get plain AdamW, as the code; conv kernels are projected on their
out × in·kh·kw view (the code has only Linear layers).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


@functools.lru_cache(maxsize=16)
def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix (rows are the basis vectors): C Cᵀ = I."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    c = math.sqrt(2.0 / n) * torch.cos(math.pi * k * (2 * j + 1) / (2 * n))
    c[0] /= math.sqrt(2.0)
    return c.float()


def dct_project(g: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(projected gradient, chosen indices, right side?) of a 2-D gradient: the r DCT directions carrying the
    most ℓ1 mass on its shorter side."""
    n, m = g.shape
    right = n >= m
    c = dct_matrix(min(n, m)).to(g.device, g.dtype)
    s = g @ c.T if right else c @ g
    norms = s.abs().sum(0 if right else 1)
    idx = torch.topk(norms, min(rank, norms.numel())).indices.sort().values
    return (s[:, idx] if right else s[idx]), idx, right


def adam_direction(state: dict[str, Any], grad: torch.Tensor, betas: tuple[float, float], eps: float) -> torch.Tensor:
    """Fold ``grad`` into Adam's moments kept in ``state`` (created at the first call, float32) and return the
    bias-corrected direction m̂ / (√v̂ + ε); the step count lives in ``state["step"]``."""
    if "exp_avg" not in state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(grad, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(grad, dtype=torch.float32)
    b1, b2 = betas
    state["step"] += 1
    t, g = state["step"], grad.float()
    state["exp_avg"].lerp_(g, 1 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
    return state["exp_avg"] / (1 - b1**t) / ((state["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps)


class DctAdamW(torch.optim.Optimizer):
    """AdamW whose moments live in an r-dimensional DCT subspace of each matrix gradient (see the module)."""

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        rank: int = 64,
        update_gap: int = 1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_side: int = 32000,
    ) -> None:
        defaults = {"lr": lr, "rank": rank, "update_gap": update_gap, "betas": betas, "eps": eps,
                    "weight_decay": weight_decay, "max_side": max_side}  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                g = p.grad.float()
                low_rank = p.ndim >= 2 and max(p.shape[0], p[0].numel()) < group["max_side"]
                if low_rank:
                    g2 = g.reshape(p.shape[0], -1)
                    step = state.get("step", 0)
                    if "idx" not in state or step % group["update_gap"] == 0:
                        proj, state["idx"], state["right"] = dct_project(g2, group["rank"])
                        state["size"] = min(g2.shape)
                    else:
                        c = dct_matrix(state["size"]).to(g2.device)
                        proj = g2 @ c[state["idx"]].T if state["right"] else c[state["idx"]] @ g2
                    g = proj
                u = adam_direction(state, g, group["betas"], group["eps"])
                if low_rank:
                    c = dct_matrix(state["size"]).to(u.device)[state["idx"]]
                    u = (u @ c if state["right"] else c.T @ u).reshape(p.shape)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-group["lr"])
        return loss


__all__ = ["DctAdamW", "adam_direction", "dct_matrix", "dct_project"]
