"""BPPL — Bag Prototypes-based Pseudo-Labeling (CoMEL's localization part).

CoMEL (Lee et al., arXiv 2507.02395) trains an instance classifier from slide labels only, with pseudo-labels
derived from bag prototypes. What is known: positive/negative prototypes are attention-weighted and
reversed-attention-weighted sums of instance features; instances are labelled by cosine similarity to
them and only confident ones are kept. Our concrete form (assumptions, all exposed in :class:`BPPLConfig`):

    p⁺ = Σ_i a_i h_i,        p⁻ = Σ_i ã_i h_i,   ã = softmax(−log a) ∝ 1/a  (reversed attention)
    d_i = cos(h_i, p⁺) − cos(h_i, p⁻)
    positive bag:  ŷ_i = bag class if d_i ≥ τ⁺;  benign if d_i ≤ −τ⁻;  otherwise ignored
    negative bag:  ŷ_i = benign for every instance (the standard MIL assumption, exact here)

Prototypes and the pseudo-labels are computed without gradient (stop-gradient, so the instance loss cannot
pull the prototypes), and only the ``keep`` most confident fraction of a positive bag's instances on each
side is used. The instance classifier is trained with cross-entropy on the kept instances; its softmax
gives per-tile scores (tumour probability = 1 − p(benign)) for heatmaps and localization metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class BPPLConfig:
    margin_pos: float = 0.0  # τ⁺: d_i must reach this to be called tumour
    margin_neg: float = 0.0  # τ⁻: d_i must fall below −τ⁻ to be called benign
    keep: float = 0.3  # most confident fraction kept on each side in a positive bag
    weight: float = 0.5  # λ of the instance loss next to the bag loss
    warmup_epochs: int = 1  # no instance loss until attention has had time to form


@torch.no_grad()
def prototypes(h: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p⁺, p⁻): attention-weighted and reversed-attention-weighted mean instance features."""
    a = attention.clamp_min(1e-12)
    rev = torch.softmax(-torch.log(a), dim=0)
    return (a[:, None] * h).sum(0), (rev[:, None] * h).sum(0)


@torch.no_grad()
def pseudo_labels(
    h: torch.Tensor, attention: torch.Tensor, bag_class: int, benign_class: int, cfg: BPPLConfig
) -> torch.Tensor:
    """Per-instance labels in {bag_class, benign_class, IGNORE} (see the module docstring)."""
    n = h.shape[0]
    labels = torch.full((n,), IGNORE, dtype=torch.long, device=h.device)
    if bag_class == benign_class:
        labels[:] = benign_class
        return labels
    p_pos, p_neg = prototypes(h, attention)
    d = F.cosine_similarity(h, p_pos[None], dim=1) - F.cosine_similarity(h, p_neg[None], dim=1)
    k = max(1, round(cfg.keep * n))
    order = torch.argsort(d, descending=True)
    top, bottom = order[:k], order[-k:] if n > 1 else order[:0]
    labels[top[d[top] >= cfg.margin_pos]] = bag_class
    labels[bottom[d[bottom] <= -cfg.margin_neg]] = benign_class
    return labels


def instance_loss(instance_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over confidently pseudo-labelled instances (0 when none is kept)."""
    if (labels != IGNORE).any():
        return F.cross_entropy(instance_logits, labels, ignore_index=IGNORE)
    return instance_logits.sum() * 0.0


def tumour_scores(instance_logits: torch.Tensor, benign_class: int = 0) -> torch.Tensor:
    """Per-tile tumour probability = 1 − p(benign)."""
    return 1.0 - torch.softmax(instance_logits.float(), dim=-1)[:, benign_class]
