"""SALT — Singular Value Adaptation with Low-Rank Transformation.

Elsayed et al., "SALT: Singular Value Adaptation with Low-Rank Transformation", MICCAI 2025 (arXiv 2503.16055);
official code BioMedIA-MBZUAI/SALT @ 7314877 (``prompt_adapted_SAM2/modeling/Adapters/SALT.py``, ``SALTLinear``;
recipe ``backbones/hieradet.py`` L33–34, L103–104: ``ratio_salt`` 0.1, ``r_lora`` 256 on qkv and proj, and
the MLP's linears). Parity: ``tests/adapters/fixtures/salt_official.npz``.

With the frozen weight as a matrix W = U diag(s) Vᵀ (thin SVD, k = min(out, in); conv kernels viewed as
out × in·kh·kw)::

    Σ' = blockdiag( diag(α ⊙ s[:r] + β),  diag(s[r:]) + X Y )        X: (k−r)×r_lora, Y: r_lora×(k−r)
    W' = U · ReLU(Σ') · Vᵀ,          ΔW = W' − W = U (ReLU(Σ') − diag(s)) Vᵀ

Trainable: α, β ∈ R^r (init 1, 0) and X, Y: 2r + 2(k−r)·r_lora per layer. Bias frozen. r = max(1, ⌊0.1·k⌋)
unless given; r_lora = min(256, k − r). The official regulariser ‖Σ'top − Σtop‖_F + ‖XY‖_F (returned by
``SALTLinear.forward`` beside the output) is :func:`salt_regularizer`, weight ``reg_weight`` (0 as shipped).

Choices where paper and code differ (we follow the code unless said):

* ReLU is applied element-wise to the whole k×k Σ' (as in the paper's figure and the code), so negative
  off-diagonal entries of X·Y are clipped and get no gradient.
* Initialisation: the SAM2 path (Kaiming-uniform X, zero Y) is the default because it is an exact identity
  at init; ``init="normal"`` gives the SAM ViT-B path (N(0, 0.01²) for both, W' ≠ W at init).
* The SVD is taken lazily at the first use (forward or merge), so it sees weights loaded after wrapping, as
  in the code. The code keeps U, s, V as plain attributes; we keep them as non-persistent buffers (they
  follow ``.to(device)``; they are not saved: they are recomputed from the base weight, with singular vector
  signs fixed by a convention so a file saved on one machine loads on another).
* The paper's "3.9 % trainable" also trains norms and positional embeddings: set
  ``unfreeze=["norm", "pos_embed"]`` in the config for that.

``relu="singular_values"`` (our option, not in the paper or code) applies the ReLU to the diagonal of Σ'
only — it still keeps singular values non-negative, but leaves X·Y unclipped, so
ΔW = U_top·diag(δ)·V_topᵀ + (U_res X)(Y V_resᵀ) + U_res·diag(c)·V_resᵀ with c ≠ 0 only where a residual
singular value would turn negative: a low-rank product that runs as base(x) + x·Qᵀ·Pᵀ like LoRA.

Cost of the faithful ``relu="full"``: ΔW is rebuilt each step in factored pieces — U[:, :r]·diag(δ)·V[:, :r]ᵀ + U_res·M·V_resᵀ with the
(k−r)² block M — i.e. out·(k−r)·(k−r+in) flops, independent of batch size; the adapted layer then runs once
with W + ΔW. Merged, it costs exactly the base layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.adapters.core import Delta, signed_svd, weight_2d
from pathopeft.adapters.salt.config import SaltConfig


class SaltDelta(Delta):
    def __init__(self, base: nn.Module, config: SaltConfig) -> None:
        super().__init__(base, config)
        k = min(self.out_features, self.in_features)
        self.k = k
        self.r, rl = config.ranks(k)
        res = k - self.r
        self.alpha = nn.Parameter(torch.ones(self.r))
        self.beta = nn.Parameter(torch.zeros(self.r))
        self.X = nn.Parameter(torch.empty(res, rl))
        self.Y = nn.Parameter(torch.empty(rl, res))
        if config.init == "zero":
            nn.init.kaiming_uniform_(self.X)  # bound √(6/r_lora), as the code
            nn.init.zeros_(self.Y)
        else:
            nn.init.normal_(self.X, std=0.01)
            nn.init.normal_(self.Y, std=0.01)
        self.register_buffer("U", torch.empty(0), persistent=False)
        self.register_buffer("S", torch.empty(0), persistent=False)
        self.register_buffer("Vh", torch.empty(0), persistent=False)

    @torch.no_grad()
    def _ensure_svd(self, base: nn.Module) -> None:
        if self.S.numel():
            return
        self.U, self.S, self.Vh = signed_svd(weight_2d(base))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        if self.config.relu == "singular_values":
            p, q = self.factors(base)
            return p @ q
        self._ensure_svd(base)
        r = self.r
        s_top, s_res = self.S[:r], self.S[r:]
        d_top = F.relu(self.alpha * s_top + self.beta) - s_top  # (r,)
        sigma_res = torch.diag(s_res) + self.X @ self.Y
        m = F.relu(sigma_res) - torch.diag(s_res)  # (k−r)², ReLU on the whole block as in the official code
        top = (self.U[:, :r] * d_top) @ self.Vh[:r]
        return top + (self.U[:, r:] @ m) @ self.Vh[r:]

    def factors(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """P, Q with ΔW = P Q for ``relu="singular_values"`` (diagonal ReLU keeps the update low-rank)."""
        self._ensure_svd(base)
        r = self.r
        s_top, s_res = self.S[:r], self.S[r:]
        d_top = F.relu(self.alpha * s_top + self.beta) - s_top
        diag_xy = (self.X * self.Y.T).sum(dim=1)
        shifted = s_res + diag_xy
        corr = F.relu(shifted) - shifted  # > 0 only where a residual singular value would go negative
        nz = torch.nonzero(corr.detach() > 0).flatten()
        u_res, vh_res = self.U[:, r:], self.Vh[r:]
        p = torch.cat([self.U[:, :r] * d_top, u_res @ self.X, u_res[:, nz] * corr[nz]], dim=1)
        q = torch.cat([self.Vh[:r], self.Y @ vh_res, vh_res[nz]], dim=0)
        return p, q

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self.config.relu == "singular_values" and isinstance(base, nn.Linear):
            p, q = self.factors(base)
            return base(x) + F.linear(F.linear(x.to(q.dtype), q), p).to(x.dtype)
        return super().forward(x, base)

    def regularizer(self) -> torch.Tensor:
        """The official ``reg_loss``: ‖diag(α⊙s_top + β) − diag(s_top)‖_F + ‖X Y‖_F (``SALTLinear.forward``)."""
        if not self.S.numel():
            raise RuntimeError("SALT's regulariser needs the layer's SVD: run a forward pass first")
        s_top = self.S[: self.r]
        return torch.linalg.vector_norm(self.alpha * s_top + self.beta - s_top) + torch.linalg.matrix_norm(
            self.X @ self.Y
        )

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: SaltConfig) -> int:
        k = min(out_features, in_features)
        r, rl = config.ranks(k)
        return 2 * r + 2 * (k - r) * rl


def salt_regularizer(model: nn.Module) -> torch.Tensor:
    """Σ over SALT layers of the official regulariser (add ``reg_weight`` times it to the loss)."""
    terms = [m.regularizer() for m in model.modules() if isinstance(m, SaltDelta)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def salt_loss(model: nn.Module) -> torch.Tensor | None:
    """``reg_weight`` · the regulariser over the SALT layers whose config asks for it (None when none does):
    the ``regularizer`` capability training loops add to their loss."""
    terms = [
        m.config.reg_weight * m.regularizer()
        for m in model.modules()
        if isinstance(m, SaltDelta) and m.config.reg_weight and m.S.numel()
    ]
    return torch.stack(terms).sum() if terms else None
