"""SORSA — trainable principal singular vectors and values, kept orthonormal by a regulariser.

Cao, "SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of Large Language Models"
(arXiv 2409.00055; code Gunale0926/SORSA @ 809cca0, ``sorsalib/src/sorsa/layer.py``: ``sorsa_init``,
``forward``, ``calc_ortho``; ``run.py``: γ = 4e-4). With W = U diag(s) Vᵀ (thin SVD, conv kernels as
out × in·kh·kw)::

    W = W_res + B diag(S) A,   B = U_r (out×r), S = s_r, A = V_rᵀ (r×in) trained;  W_res = W − U_r diag(s_r) V_rᵀ frozen
    ΔW = B diag(S) A − U_r diag(s_r) V_rᵀ          (0 at init)
    L_reg = mean over the adapted matrices of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F      (``calc_ortho``; norms, not squares)

Trainable: r·(out + in) + r per layer. The code backpropagates (γ / lr)·L_reg beside the task loss, so the
orthonormality step is γ whatever the learning rate; here the ``regularizer`` capability adds
``reg_weight · L_reg`` to the loss: set ``reg_weight = γ / lr`` (default 0.4 = 4e-4 / 1e-3). The initial
factors are recomputed from the base weight (:func:`~pathopeft.adapters.core.signed_svd`), not saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register, signed_svd, weight_2d


@dataclass
class SorsaConfig(AdapterConfig):
    """SORSA: the top-``r`` singular vectors and values trained, an orthonormality regulariser (reg_weight)."""

    adapter_type: ClassVar[str] = "sorsa"
    r: int = 8
    reg_weight: float = 0.4  # γ / lr of the official code (γ 4e-4) at lr 1e-3


class SorsaDelta(Delta):
    def __init__(self, base: nn.Module, config: SorsaConfig) -> None:
        super().__init__(base, config)
        self.r = min(config.r, self.out_features, self.in_features)
        U, S, Vh = signed_svd(weight_2d(base))
        r = self.r
        self.B = nn.Parameter(U[:, :r].clone())
        self.S = nn.Parameter(S[:r].clone())
        self.A = nn.Parameter(Vh[:r].clone())
        # the initial principal part, from the same SVD as the factors (not saved: rebuilt from the base weight)
        self.register_buffer("W_p0", (U[:, :r] * S[:r]) @ Vh[:r], persistent=False)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return (self.B * self.S) @ self.A - self.W_p0

    def orthonormality(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖A Aᵀ − I‖_F, ‖Bᵀ B − I‖_F)."""
        eye = torch.eye(self.r, device=self.A.device, dtype=self.A.dtype)
        return torch.linalg.matrix_norm(self.A @ self.A.T - eye), torch.linalg.matrix_norm(self.B.T @ self.B - eye)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: SorsaConfig) -> int:
        r = min(config.r, out_features, in_features)
        return r * (out_features + in_features) + r


def sorsa_regularizer(model: nn.Module) -> torch.Tensor | None:
    """The official ``calc_ortho``: the mean of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F over every SORSA matrix."""
    terms = [t for m in model.modules() if isinstance(m, SorsaDelta) for t in m.orthonormality()]
    return torch.stack(terms).mean() if terms else None


def sorsa_loss(model: nn.Module) -> torch.Tensor | None:
    """``reg_weight`` · :func:`sorsa_regularizer` (the ``regularizer`` capability training adds to its loss)."""
    deltas = [m for m in model.modules() if isinstance(m, SorsaDelta)]
    if not deltas or not deltas[0].config.reg_weight:
        return None
    return deltas[0].config.reg_weight * sorsa_regularizer(model)


register("sorsa", SorsaConfig, SorsaDelta, conv=True, identity_at_init=True, regularizer=sorsa_loss)

__all__ = ["SorsaConfig", "SorsaDelta", "sorsa_loss", "sorsa_regularizer"]
