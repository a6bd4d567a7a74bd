"""SNELLA — kernelised sparse fine-tuning (and its predecessor SNELL).

Shen et al., "Expanding Sparse Tuning for Low Memory Usage" (SNELL, NeurIPS 2024) and "Kernelized Sparse
Fine-Tuning with Bi-level Parameter Competition for Vision Models" (SNELLA, arXiv 2510.24037); official code
ssfgunner/SNELL (class ``SNELLA`` in ``model/vision_transformer_timm.py``; parity fixture in the tests).

For a layer with m outputs and n inputs, two factor pairs a⁽ᵏ⁾ ∈ R^{m×r/2}, b⁽ᵏ⁾ ∈ R^{n×r/2} (k = 0, 1)::

    D[i, j]  = c · ‖a⁽⁰⁾_i − b⁽⁰⁾_j‖₂ − c · ‖a⁽¹⁾_i − b⁽¹⁾_j‖₂          (c = 0.1, fixed as in the code)
    K        = D                                   (SNELL, kernel="distance")
    K        = D + α · softmax(D / γ, dim=out) + β    (SNELLA, kernel="mixed"; α, γ, β learnable, init 1, 1, 0)
    ΔW       = K ⊙ 1[|K| > q_s(|K|)] (· |K| for kept_value="weighted")

with q_s the s-quantile of |K| in this layer (s = its sparsity, moved per layer by the budget allocator in
:mod:`.budget`). y = W x + b + DropPath(ΔW · Dropout(x)). Trainable: (m + n)·r (+3 for the mixed kernel). A
split qkv (``parts`` = 3) has three independent kernels (q, k, v: own factors, α/γ/β, softmax over their own
m/3 outputs, own sparsity), 3·(m/3 + n)·r = (m + 3n)·r (+9) parameters, as the official separate q, k, v.

Where code and papers differ we follow the code: kept entries are multiplied by their own detached magnitude
(w·|w|, ``kept_value="weighted"``; ``"plain"`` keeps w, the papers' description); the softmax term's axis is
the output axis; dropout 0.1 on the branch input (none on ``attn.proj``, as the code) and drop-path 0.1 on the
branch output. The threshold is the k-th smallest |K| (``torch.quantile`` in the code interpolates, so the two
can differ by one kept entry). ΔW is not zero at init (Kaiming-uniform factors; |ΔW| ≈ 1e-6 after the
weighting), so SNELLA does not claim identity at init.

Memory and time: the dense m×n kernel and its mask are never kept for backward, only x and the factors are
(``torch.utils.checkpoint``, as the code). In training with dropout or drop-path the branch form is used, as
the code (two matmuls forward, one more in the recompute); otherwise, and always in eval, the layer runs once
with W + ΔW inside the checkpoint (one matmul forward plus one in the recompute).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import DropPath
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
        parts, half = config.parts, config.r // 2
        if self.out_features % parts:
            raise ValueError(f"SNELLA: {self.out_features} outputs do not split into {parts} parts")
        shape_a = (2, self.out_features, half) if parts == 1 else (parts, 2, self.out_features // parts, half)
        shape_b = (2, self.in_features, half) if parts == 1 else (parts, 2, self.in_features, half)
        self.a = nn.Parameter(torch.empty(shape_a))
        self.b = nn.Parameter(torch.empty(shape_b))
        for p in (self.a, self.b):  # per part, the fan-in of the official (2, features, r/2) tensors
            for chunk in p.view(-1, *p.shape[-3:]):
                nn.init.kaiming_uniform_(chunk, a=math.sqrt(5))
        if config.kernel == "mixed":
            mix_shape = () if parts == 1 else (parts,)
            self.mix_alpha = nn.Parameter(torch.ones(mix_shape))
            self.mix_gamma = nn.Parameter(torch.ones(mix_shape))
            self.mix_beta = nn.Parameter(torch.zeros(mix_shape))
        # moved by the budget allocator during training; a buffer so adapter files and checkpoints keep it
        self.register_buffer("layer_sparsity", torch.full(() if parts == 1 else (parts,), float(config.sparsity)))
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.drop_path = DropPath(config.drop_path) if config.drop_path > 0 else nn.Identity()

    # --- sparsity, per part -------------------------------------------------------------------------------
    @property
    def parts(self) -> int:
        return self.config.parts

    @property
    def part_size(self) -> int:
        """ΔW entries per part (the unit the budget allocator shares out)."""
        return self.out_features // self.parts * self.in_features

    @property
    def sparsities(self) -> list[float]:
        return [float(v) for v in self.layer_sparsity.reshape(-1)]

    @sparsities.setter
    def sparsities(self, values: list[float]) -> None:
        self.layer_sparsity.copy_(torch.tensor(values, dtype=self.layer_sparsity.dtype).view_as(self.layer_sparsity))

    @property
    def sparsity(self) -> float:
        """The layer's mean sparsity (set: every part alike)."""
        return sum(self.sparsities) / self.parts

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        self.layer_sparsity.fill_(float(value))

    # --- the kernel ---------------------------------------------------------------------------------------
    def _delta(self, a: torch.Tensor, b: torch.Tensor, *mix: torch.Tensor) -> torch.Tensor:
        cfg: SnellaConfig = self.config
        a4, b4 = (a.unsqueeze(0), b.unsqueeze(0)) if cfg.parts == 1 else (a, b)
        dist = torch.cdist(a4, b4)  # (parts, 2, m/parts, n) Euclidean distances
        k = cfg.coef * (dist[:, 0] - dist[:, 1])
        if mix:
            alpha, gamma, beta = (t.reshape(-1, 1, 1) for t in mix)
            k = k + alpha * torch.softmax(k / gamma, dim=1) + beta
        weighted = cfg.kept_value == "weighted"
        kept = [sparsify(k[p], s, weighted) for p, s in enumerate(self.sparsities)]
        return torch.cat(kept, dim=0)  # (m, n): q, k, v stacked in the fused layer's order

    def _mix(self) -> tuple[torch.Tensor, ...]:
        return (self.mix_alpha, self.mix_gamma, self.mix_beta) if self.config.kernel == "mixed" else ()

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self._delta(self.a, self.b, *self._mix())

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        mix = self._mix()
        run = checkpoint if self._checkpointing() else (lambda f, *args, **_: f(*args))
        if self.training and (self.config.dropout > 0 or self.config.drop_path > 0):

            def branch(h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *mix: torch.Tensor) -> torch.Tensor:
                dw = self._delta(a, b, *mix).to(h.dtype).view_as(base.weight)
                if isinstance(base, nn.Conv2d):
                    return base._conv_forward(h, dw, None)  # its padding mode, stride, groups …
                return F.linear(h, dw)

            return base(x) + self.drop_path(run(branch, self.drop(x), self.a, self.b, *mix, use_reentrant=False))

        def merged(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *mix: torch.Tensor) -> torch.Tensor:
            w = base.weight + self._delta(a, b, *mix).to(base.weight.dtype).view_as(base.weight)
            return base_forward_with_weight(base, x, w)

        return run(merged, x, self.a, self.b, *mix, use_reentrant=False)

    def _checkpointing(self) -> bool:
        return self.config.checkpoint and torch.is_grad_enabled() and self.a.requires_grad

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: SnellaConfig) -> int:
        mix = 3 * config.parts if config.kernel == "mixed" else 0
        return (out_features + config.parts * in_features) * config.r + mix
