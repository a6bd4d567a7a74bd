"""SNELLA — kernelised sparse fine-tuning (and its predecessor SNELL).

Shen et al., "Expanding Sparse Tuning for Low Memory Usage" (SNELL, NeurIPS 2024) and "Kernelized Sparse
Fine-Tuning with Bi-level Parameter Competition for Vision Models" (SNELLA, 2025); official code
ssfgunner/SNELL (SNELLA was added to it in late 2025).

For a layer with m outputs and n inputs, two factor pairs a⁽ᵏ⁾ ∈ R^{m×r/2}, b⁽ᵏ⁾ ∈ R^{n×r/2} (k = 0, 1)::

    D[i, j]  = c · ‖a⁽⁰⁾_i − b⁽⁰⁾_j‖₂ − c · ‖a⁽¹⁾_i − b⁽¹⁾_j‖₂          (c = 0.1, fixed as in the code)
    K        = D                                   (SNELL, kernel="distance")
    K        = D + α · softmax(D / γ, dim=out) + β    (SNELLA, kernel="mixed"; α, γ, β learnable, init 1, 1, 0)
    ΔW       = K ⊙ 1[|K| > q_s(|K|)] (· |K| for kept_value="weighted")

with q_s the s-quantile of |K| in this layer (s = ``sparsity``, moved per layer by the budget allocator in
:mod:`.budget`). y = W x + b + ΔW x. Trainable: (m + n)·r (+3 for the mixed kernel).

Where code and papers differ (we follow the code unless said): kept entries are multiplied by their own
detached magnitude (w·|w|, ``kept_value="weighted"``) rather than kept as they are (``"plain"``); the
softmax term's axis is the output axis; the code puts dropout 0.1 and drop-path 0.1 on the branch (ours:
``dropout`` option, default 0, no drop-path); ΔW is not zero at init (Kaiming-uniform factors; |ΔW| ≈ 1e-6
after the weighting), so SNELLA does not claim identity at init.

Memory and time: the code runs ΔW x as a parallel branch under ``torch.utils.checkpoint`` (two matmuls
forward, one more in the recompute). We run the layer once with W + ΔW inside the checkpoint instead: the
dense m×n kernel, mask and W + ΔW are still not kept for backward (only x and the factors are), at one
matmul forward plus one in the recompute. With ``dropout > 0`` the branch form is used (dropout applies to
the branch input only, as in the code).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pathopeft.adapters.core import Delta, base_forward_with_weight
from pathopeft.adapters.snella.config import SnellaConfig


def sparsify(k: torch.Tensor, sparsity: float, weighted: bool) -> torch.Tensor:
    """Zero the smallest ``sparsity`` fraction of |k| (threshold detached); optionally weight by |k|."""
    mag = k.detach().abs()
    n_zero = int(sparsity * mag.numel())
    if n_zero > 0:
        thr = mag.flatten().kthvalue(n_zero).values
        k = k * (mag > thr)
    return k * mag if weighted else k


class SnellaDelta(Delta):
    def __init__(self, base: nn.Module, config: SnellaConfig) -> None:
        super().__init__(base, config)
        half = config.r // 2
        self.a = nn.Parameter(torch.empty(2, self.out_features, half))
        self.b = nn.Parameter(torch.empty(2, self.in_features, half))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.b, a=math.sqrt(5))
        if config.kernel == "mixed":
            self.mix_alpha = nn.Parameter(torch.ones(()))
            self.mix_gamma = nn.Parameter(torch.ones(()))
            self.mix_beta = nn.Parameter(torch.zeros(()))
        # moved by the budget allocator during training; a buffer so adapter files and checkpoints keep it
        self.register_buffer("layer_sparsity", torch.tensor(float(config.sparsity)))
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def sparsity(self) -> float:
        return float(self.layer_sparsity)

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        self.layer_sparsity.fill_(float(value))

    def _delta(self, a: torch.Tensor, b: torch.Tensor, *mix: torch.Tensor) -> torch.Tensor:
        cfg: SnellaConfig = self.config
        dist = torch.cdist(a, b)  # (2, m, n) Euclidean distances
        k = cfg.coef * (dist[0] - dist[1])
        if mix:
            alpha, gamma, beta = mix
            k = k + alpha * torch.softmax(k / gamma, dim=0) + beta
        return sparsify(k, self.sparsity, cfg.kept_value == "weighted")

    def _mix(self) -> tuple[torch.Tensor, ...]:
        return (self.mix_alpha, self.mix_gamma, self.mix_beta) if self.config.kernel == "mixed" else ()

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self._delta(self.a, self.b, *self._mix())

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        mix = self._mix()
        if self.config.dropout > 0:  # dropout on the branch input only (as the code): two matmuls
            h = self.drop(x)

            def branch(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *mix: torch.Tensor) -> torch.Tensor:
                dw = self._delta(a, b, *mix).to(h.dtype).view_as(base.weight)
                if isinstance(base, nn.Conv2d):
                    return F.conv2d(h, dw, None, base.stride, base.padding, base.dilation, base.groups)
                return F.linear(h, dw)

            run = checkpoint if self._checkpointing() else (lambda f, *args, **_: f(*args))
            return base(x) + run(branch, h, self.a, self.b, *mix, use_reentrant=False)

        def merged(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *mix: torch.Tensor) -> torch.Tensor:
            w = base.weight + self._delta(a, b, *mix).to(base.weight.dtype).view_as(base.weight)
            return base_forward_with_weight(base, x, w)

        if self._checkpointing():
            return checkpoint(merged, x, self.a, self.b, *mix, use_reentrant=False)
        return merged(x, self.a, self.b, *mix)

    def _checkpointing(self) -> bool:
        return self.config.checkpoint and torch.is_grad_enabled() and self.a.requires_grad

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: SnellaConfig) -> int:
        return (out_features + in_features) * config.r + (3 if config.kernel == "mixed" else 0)
