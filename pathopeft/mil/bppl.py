"""BPPL — Bag Prototypes-based Pseudo-Labeling (CoMEL's localization part), as in the official code.

CoMEL (Lee et al., ICCV 2025, arXiv 2507.02395; code github.com/Hyun1A/CoMEL @ 9fd6679, read for its
behaviour, not copied): ``continual/main/continual_instance/cdatmil_ppl_owlora_trainer.py``
``train_loop`` L170–236 and L352, hyperparameters from ``cdatmil_ppl_ft_trainer.py`` L41–44. With a the MIL
attention (softmax over the N instances), h_i the instance features that the attention pools and y the bag
label (variant ``"comel"``, the default):

    instance score      s_i = (a_i − min a) / (max a + 1e-10)       (L173–176; the denominator is max a, as
                                                                      in the code, not max a − min a)
    prototypes          p⁺ = Σ a_i h_i  (the bag feature),  p⁻ = Σ (1 − a_i) h_i / Σ_j (1 − a_j)   (L214–215)
    pseudo-label        q_i = softmax([cos(h_i, p⁻), cos(h_i, p⁺)] / T);  ŷ_i = argmax q_i, c_i = max q_i
    kept                bag is tumour AND correctly predicted AND p(ŷ_bag) > τ₁ AND c_i > τ₂       (L203–228)
    loss                (n_kept / N) · NLL(log([1 − s, s] + 1e-10)[kept], ŷ[kept]);  0 otherwise  (L230–236)
    τ₂ (end of epoch)   τ₂ = ½ (1 + τ · mean over the epoch's bags of p(ŷ_bag)·[ŷ_bag = y])          (L352)

So BPPL trains the attention itself (there is no instance head) and localization is read from s. No gradient
reaches the prototypes or the pseudo-labels: in the code the labels are an argmax and the gate a comparison,
so computing them under ``no_grad`` is the same function with the same gradient.

Variant ``"legacy"`` keeps pathopeft's own earlier form (not CoMEL's; documented here so it stays an explicit
choice): p⁻ ∝ Σ h_i / a_i, the ``keep`` most confident fraction on each side by d_i = cos(h_i, p⁺) − cos(h_i, p⁻)
with margins, every instance of a negative bag benign, and a separate instance head (``MILNet.instance_head``)
trained with cross-entropy; tile scores then come from that head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
VARIANTS = ("comel", "legacy")


@dataclass
class BPPLConfig:
    variant: str = "comel"  # "comel" (official CoMEL BPPL) | "legacy" (pathopeft's earlier instance-head form)
    temperature: float = 1.0  # T of the pseudo-label softmax (official self.T)
    tau1: float = 0.95  # bag-confidence gate τ₁ (official self.tau1)
    tau: float = 0.5  # τ of the τ₂ update (official self.tau)
    tau2_init: float = 0.5  # τ₂ before the first epoch ends (official self.tau2 = self.tau)
    weight: float = 1.0  # λ of the instance loss (official --seg_coef 1.0 in run_cdatmil_ppl_owlora.sh)
    warmup_epochs: int = 0  # no instance loss before this epoch (official --train_patch_epoch=0)
    # legacy variant only
    margin_pos: float = 0.0  # τ⁺: d_i must reach this to be called tumour
    margin_neg: float = 0.0  # τ⁻: d_i must fall below −τ⁻ to be called benign
    keep: float = 0.3  # most confident fraction kept on each side in a positive bag

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"bppl.variant must be one of {VARIANTS}, got {self.variant!r}")


# --- the official CoMEL BPPL ------------------------------------------------------------------------------------
def attention_scores(attention: torch.Tensor) -> torch.Tensor:
    """Instance tumour score s = (a − min a) / (max a + 1e-10), the official formula (differentiable)."""
    return (attention - attention.min()) / (attention.max() + 1e-10)


@torch.no_grad()
def comel_pseudo_labels(
    h: torch.Tensor, attention: torch.Tensor, bag_feature: torch.Tensor | None = None, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŷ, c): per-instance pseudo-label (1 = tumour side p⁺, 0 = p⁻) and its confidence max softmax(cos/T).

    ``bag_feature`` is p⁺ (the code uses the model's pooled bag feature); ``None`` computes Σ a_i h_i.
    """
    h, a = h.float(), attention.float()
    p_pos = (a[:, None] * h).sum(0) if bag_feature is None else bag_feature.float().reshape(-1)
    rev = (1 - a) / (1 - a).sum()
    p_neg = (rev[:, None] * h).sum(0)
    h_n = h / h.norm(dim=1, keepdim=True)
    protos = torch.stack([p_neg / p_neg.norm(), p_pos / p_pos.norm()])
    conf, label = torch.softmax(h_n @ protos.T / temperature, dim=1).max(dim=1)
    return label, conf


def comel_instance_loss(
    attention: torch.Tensor,
    h: torch.Tensor,
    bag_logits: torch.Tensor,
    label: int,
    is_tumour: bool,
    tau2: float,
    cfg: BPPLConfig,
    bag_feature: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """(loss, n_kept) of one bag; the loss reaches the model through ``attention`` only.

    ``bag_logits`` are the logits the bag loss sees (the bag confidence is their softmax maximum). A negative
    or misclassified bag gives an exact zero (still attached to the graph, so backward works).
    """
    zero = attention.sum() * 0.0
    with torch.no_grad():
        bag_conf, bag_pred = torch.softmax(bag_logits.detach().float().reshape(-1), dim=0).max(dim=0)
    if not (is_tumour and int(bag_pred) == int(label)):
        return zero, 0
    pl, conf = comel_pseudo_labels(h, attention, bag_feature, cfg.temperature)
    kept = (bag_conf > cfg.tau1) & (conf > tau2)
    n_kept = int(kept.sum())
    if n_kept == 0:
        return zero, 0
    s = attention_scores(attention)
    log_p = torch.log(torch.stack([1 - s, s], dim=1)[kept] + 1e-10)
    return (n_kept / attention.shape[0]) * F.nll_loss(log_p, pl[kept]), n_kept


@torch.no_grad()
def bag_quality(bag_logits: torch.Tensor, label: int) -> float:
    """p(ŷ_bag)·[ŷ_bag = y]: one bag's term of the τ₂ update (official ``quality``)."""
    conf, pred = torch.softmax(bag_logits.detach().float().reshape(-1), dim=0).max(dim=0)
    return float(conf) * float(int(pred) == int(label))


def next_tau2(tau: float, quality_sum: float, n_bags: int) -> float:
    """τ₂ for the next epoch: ½ (1 + τ · mean quality), in [½, ½(1 + τ)] (official L352)."""
    return 0.5 * (1.0 + tau * quality_sum / max(n_bags, 1))


# --- pathopeft's earlier form (variant "legacy") ----------------------------------------------------------------
@torch.no_grad()
def prototypes(h: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Legacy (p⁺, p⁻): attention-weighted and softmax(−log a) ∝ 1/a weighted mean instance features."""
    a = attention.clamp_min(1e-12)
    rev = torch.softmax(-torch.log(a), dim=0)
    return (a[:, None] * h).sum(0), (rev[:, None] * h).sum(0)


@torch.no_grad()
def pseudo_labels(
    h: torch.Tensor, attention: torch.Tensor, bag_class: int, benign_class: int, cfg: BPPLConfig
) -> torch.Tensor:
    """Legacy per-instance labels in {bag_class, benign_class, IGNORE} (see the module docstring)."""
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
    """Legacy cross-entropy over confidently pseudo-labelled instances (0 when none is kept)."""
    if (labels != IGNORE).any():
        return F.cross_entropy(instance_logits, labels, ignore_index=IGNORE)
    return instance_logits.sum() * 0.0


def tumour_scores(instance_logits: torch.Tensor, benign_class: int = 0) -> torch.Tensor:
    """Legacy per-tile tumour probability from the instance head = 1 − p(benign)."""
    return 1.0 - torch.softmax(instance_logits.float(), dim=-1)[:, benign_class]
