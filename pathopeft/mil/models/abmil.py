"""Gated-attention ABMIL (Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018).

The simplest strong MIL baseline and the reference the other models are compared with: instances are
embedded independently, scored by a small gated-attention network and averaged with those scores, so the
bag prediction is permutation invariant and the attention is directly a heatmap. Cost O(N·H).
"""

from __future__ import annotations

import torch
from torch import nn

from pathopeft.mil.models.base import MILModel, MILOutput, check_bag, register_mil_model


class GatedAttention(nn.Module):
    """Scores s_k = wᵀ(tanh(V h_k) ⊙ sigm(U h_k)) (Ilse et al. eq. 9); softmax over instances is left to the caller.

    The sigmoid gate lets the score be non-linear in h without tanh's near-linearity around 0 (the paper's
    motivation for the gated over the plain eq. 8 form). Shared by ABMIL and GDAT's pooling."""

    def __init__(self, dim: int, attn_dim: int = 128) -> None:
        super().__init__()
        self.tanh_branch = nn.Linear(dim, attn_dim)  # V
        self.sigmoid_branch = nn.Linear(dim, attn_dim)  # U
        self.score = nn.Linear(attn_dim, 1)  # w

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, dim) → (N,) unnormalised scores."""
        return self.score(torch.tanh(self.tanh_branch(h)) * torch.sigmoid(self.sigmoid_branch(h))).squeeze(-1)


@register_mil_model("abmil")
class ABMIL(MILModel):
    """Gated-attention MIL pooling.

    h_k = Dropout(ReLU(W x_k + b))                               (instance embedding, H = ``hidden_dim``)
    a_k = exp(s_k) / Σ_j exp(s_j),  s_k as in :class:`GatedAttention` (Ilse et al. eq. 9)
    z   = Σ_k a_k h_k                                             (eq. 7, the MIL pooling)
    ŷ   = ``classifier``(z)                                       (an ``nn.Linear(H, C)``)

    Args:
        in_dim: instance feature size D.
        n_classes: bag classes C.
        hidden_dim: instance embedding size H.
        attn_dim: hidden size L of the attention network (128 in the paper).
        dropout: after the instance embedding (0.25 is common in CLAM-style pipelines).

    ``coords`` is accepted and ignored: ABMIL is permutation invariant by construction.
    """

    def __init__(
        self, in_dim: int, n_classes: int, hidden_dim: int = 256, attn_dim: int = 128, dropout: float = 0.25
    ) -> None:
        super().__init__(in_dim, n_classes, hidden_dim)
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_net = GatedAttention(hidden_dim, attn_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        x = check_bag(x, coords, self.in_dim)
        h = self.encoder(x)
        a = torch.softmax(self.attention_net(h), dim=0)
        z = a @ h
        return MILOutput(bag_logits=self.classifier(z), attention=a, instance_features=h, bag_feature=z)
