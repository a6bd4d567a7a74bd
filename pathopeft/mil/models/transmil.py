"""TransMIL (Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for Whole Slide
Image Classification", NeurIPS 2021), with our own Nyström attention (Xiong et al., "Nyströmformer", AAAI 2021).

Pipeline (paper §3.3–3.4, "TPT" module): fc → [cls; instances padded to a square] → TransLayer → PPEG →
TransLayer → LayerNorm → cls token → ``classifier``. Self-attention between all N instances is what TransMIL
adds over ABMIL (correlated instances); Nyström attention makes it O(N·m) for m landmarks instead of O(N²),
so a bag of 10^5 instances runs on a CPU (no N×N tensor is ever built).

What we simplified or chose (against the reference implementation):

* landmarks are the means of m *contiguous, near-equal* segments of the sequence (segment sizes ⌊n/m⌋ or
  ⌈n/m⌉, by index arithmetic), instead of front-padding the sequence with zero tokens to a multiple of m; so
  no fake tokens take part in the softmaxes;
* when the sequence is not longer than the number of landmarks, exact softmax attention is used (it is then
  both cheaper and exact; the Nyström formula would only approximate it);
* the Moore–Penrose iteration (Razavi et al. 2014, as in Nyströmformer) is initialised per matrix
  (‖A‖₁‖A‖_∞ of each head's m×m kernel) rather than with one maximum over the whole batch;
* the value residual is a per-head depthwise convolution along the sequence (Nyströmformer's "conv
  skip", kernel 33), kept on by default as in TransMIL, ``value_residual=False`` turns it off;
* hidden size defaults to 256 (the zoo's common H) instead of the paper's 512; heads stay 8 and landmarks
  256 (the paper's ``dim // 2``), as the task specifies;
* no dropout after the input fc (the reference has none either); attention-output dropout is ``dropout``.

``attention`` (the heatmap): in the last TransLayer, the softmax of the cls token's query against the keys
of the N real instances (padding copies excluded, i.e. the softmax renormalised over real instances), per
head, then averaged over heads: O(N·heads), non-negative, sums to 1. It is a read-out of one attention row,
not the Nyström approximation actually used for the cls output, which mixes keys through the landmarks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pathopeft.mil.models.base import MILModel, MILOutput, check_bag, register_mil_model


def moore_penrose_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Iterative pseudo-inverse of a batch of square matrices (Razavi et al. 2014; Nyströmformer eq. 12).

    Z₀ = Aᵀ / (‖A‖₁ ‖A‖_∞);  Z ← ¼ Z (13I − AZ(15I − AZ(7I − AZ))). Converges to A⁺ at a cubic rate with
    only matmuls, which keeps it differentiable and GPU-friendly (no SVD)."""
    norm_1 = a.abs().sum(dim=-2).amax(dim=-1, keepdim=True)  # max column sum
    norm_inf = a.abs().sum(dim=-1).amax(dim=-1, keepdim=True)  # max row sum
    z = a.transpose(-1, -2) / (norm_1 * norm_inf).unsqueeze(-1)
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def segment_means(t: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Means of ``n_segments`` contiguous, near-equal segments along dim -2 of ``t`` (..., n, d) → (..., m, d)."""
    n = t.shape[-2]
    seg = torch.arange(n, device=t.device) * n_segments // n
    counts = torch.bincount(seg, minlength=n_segments).to(t.dtype)
    sums = t.new_zeros(*t.shape[:-2], n_segments, t.shape[-1]).index_add(t.dim() - 2, seg, t)
    return sums / counts.unsqueeze(-1)


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nyström approximation softmax(QKᵀ) ≈ F̃ Ã⁺ B̃ (Nyströmformer eq. 14).

    F̃ = softmax(Q K̃ᵀ) (n×m), Ã = softmax(Q̃ K̃ᵀ) (m×m), B̃ = softmax(Q̃ Kᵀ) (m×n), with Q̃, K̃ the landmark
    (segment-mean) queries and keys; evaluated right to left, F̃ (Ã⁺ (B̃ V)), so memory is O(n·m)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
        value_residual: bool = True,
        residual_kernel: int = 33,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if landmarks < 1:
            raise ValueError(f"landmarks must be ≥ 1, got {landmarks}")
        self.heads, self.dim_head = heads, dim // heads
        self.landmarks, self.pinv_iterations = landmarks, pinv_iterations
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.value_conv = (
            nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False)
            if value_residual
            else None
        )

    def forward(self, x: torch.Tensor, cls_keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (B, n, dim) → (B, n, dim); with ``cls_keys = k`` also the cls-token attention (B, k) over
        tokens 1..k (softmax per head restricted to those keys, mean over heads)."""
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)  # (B, h, n, d)
        q = q * self.dim_head**-0.5
        if n <= self.landmarks:
            out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            q_l, k_l = segment_means(q, self.landmarks), segment_means(k, self.landmarks)
            kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (B, h, n, m)
            kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (B, h, m, m)
            kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (B, h, m, n)
            out = kernel_1 @ (moore_penrose_pinv(kernel_2, self.pinv_iterations) @ (kernel_3 @ v))
        if self.value_conv is not None:
            out = out + self.value_conv(v)
        out = self.out(out.transpose(1, 2).reshape(b, n, dim))
        cls_attn = None
        if cls_keys is not None:
            scores = q[:, :, :1] @ k[:, :, 1 : 1 + cls_keys].transpose(-1, -2)  # (B, h, 1, k)
            cls_attn = torch.softmax(scores.float(), dim=-1).mean(dim=1)[:, 0]
        return out, cls_attn


class TransLayer(nn.Module):
    """Pre-norm residual Nyström self-attention, x + MSA(LN(x)) (TransMIL's layer has no MLP)."""

    def __init__(self, dim: int, **attn_kwargs: Any) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, **attn_kwargs)

    def forward(self, x: torch.Tensor, cls_keys: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, cls_attn = self.attn(self.norm(x), cls_keys)
        return x + out, cls_attn


class PPEG(nn.Module):
    """Pyramid Position Encoding Generator (TransMIL §3.4): the instance tokens, laid out row-major on the
    square grid, plus depthwise 7×7, 5×5 and 3×3 convolutions of themselves; the cls token passes through.

    The conditional position encoding comes from the token neighbourhood in the sequence order, not from
    the slide coordinates (as in the paper)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.proj5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.proj3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, dim = x.shape
        cls, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, dim, side, side)
        grid = grid + self.proj7(grid) + self.proj5(grid) + self.proj3(grid)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


@register_mil_model("transmil")
class TransMIL(MILModel):
    """TransMIL: correlated MIL through Nyström self-attention between instances and a cls token.

    Args:
        in_dim: instance feature size D.
        n_classes: bag classes C.
        hidden_dim: token size H (divisible by ``heads``).
        heads: attention heads (8).
        landmarks: Nyström landmarks m (256); sequences of ≤ m tokens use exact attention.
        pinv_iterations: Moore–Penrose iterations (6).
        dropout: dropout on each attention output.
        value_residual: the depthwise-conv skip on the values (Nyströmformer), on by default.

    ``coords`` is accepted and ignored (the paper's PPEG works on the sequence order, not coordinates).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        heads: int = 8,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
        value_residual: bool = True,
    ) -> None:
        super().__init__(in_dim, n_classes, hidden_dim)
        attn_kw = {
            "heads": heads,
            "landmarks": landmarks,
            "pinv_iterations": pinv_iterations,
            "dropout": dropout,
            "value_residual": value_residual,
        }
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.zeros(1, hidden_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.layer1 = TransLayer(hidden_dim, **attn_kw)
        self.ppeg = PPEG(hidden_dim)
        self.layer2 = TransLayer(hidden_dim, **attn_kw)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        x = check_bag(x, coords, self.in_dim)
        n = x.shape[0]
        h = self.fc(x)
        side = math.isqrt(n - 1) + 1  # ceil(sqrt(n)), exact in integers
        pad = side * side - n  # < 2·side ≤ n + 1, and repeated cyclically anyway
        if pad:
            h = torch.cat([h, h[torch.arange(pad, device=h.device) % n]])  # repeat the first instances
        seq = torch.cat([self.cls_token.to(h.dtype), h])[None]  # (1, 1 + side², H)
        seq, _ = self.layer1(seq)
        seq = self.ppeg(seq, side)
        seq, cls_attn = self.layer2(seq, cls_keys=n)
        seq = self.norm(seq)[0]
        bag_feature = seq[0]
        return MILOutput(
            bag_logits=self.classifier(bag_feature),
            attention=cls_attn[0],
            instance_features=seq[1 : 1 + n],
            bag_feature=bag_feature,
        )
