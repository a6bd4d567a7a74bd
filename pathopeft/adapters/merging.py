"""Merging LoRAs into one: LoRA-LEGO's rank-wise clustering, and the plain-LoRA export every merge ends in.

A LoRA here is its factors per layer, ``{layer name: (B, A)}`` with ΔW = B A (B: out×r, A: r×in; PEFT's scale
folded into B). :func:`peft_lora_factors` reads them from a PEFT model, :func:`lora_from_factors` writes any such
dict back as a PEFT LoRA (per-layer ranks), so a merged or pruned adapter is an ordinary LoRA file.

LoRA-LEGO (Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through
Rank-Wise Clustering", ICLR 2025, arXiv 2409.16167). Every rank of every LoRA is a unit (bᵢ, aᵢ) contributing
bᵢaᵢᵀ; the units of all LoRAs of a layer are pooled (stacking them is exactly summing the LoRAs, and their order
does not matter), clustered into k groups by k-means, and each cluster's centroid becomes one rank of the merged
rank-k LoRA; "parameter reweighting" rescales each centroid to its members' average norm (an average of
dissimilar vectors is shorter than they are). The paper's method section was not reachable here (abstract and
reviews only), so these details are our reading, stated for the test that pins them: units are clustered on
[a/‖a‖; b/‖b‖] after fixing each unit's sign (a's largest-magnitude entry positive; (b, a) and (−b, −a) are
the same unit), the centroid is the mean of the raw [a; b], rescaled to the members' mean L2 norm; the paper's
"output reweighting" is not applied. With k equal to the total rank every unit is its own cluster and the merge
is PEFT's ``add_weighted_adapter(combination_type="cat")`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def peft_lora_factors(model: nn.Module, adapter_name: str = "default") -> Factors:
    """(s·B, A) of every PEFT LoRA layer of ``model`` holding ``adapter_name`` (conv kernels on the out ×
    in·kh·kw view), keyed by the layer's name in the unwrapped base model."""
    from peft.tuners.lora import LoraLayer

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: Factors = {}
    for name, m in root.named_modules():
        if isinstance(m, LoraLayer) and adapter_name in m.lora_A:
            a = m.lora_A[adapter_name].weight.detach()
            b = m.lora_B[adapter_name].weight.detach()
            out[name] = (m.scaling[adapter_name] * b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1))
    return out


@torch.no_grad()
def lora_from_factors(base: nn.Module, factors: Factors, adapter_name: str = "default") -> nn.Module:
    """A PEFT LoRA on ``base`` (a plain model, modified in place) with ΔW = B A for every layer of ``factors``
    (per-layer ranks through ``rank_pattern``; scale 1 through ``alpha_pattern``). Empty factors: ``base``."""
    import peft

    factors = {n: f for n, f in factors.items() if f[0].shape[1] > 0}
    if not factors:
        return base
    ranks = {n: int(b.shape[1]) for n, (b, _) in factors.items()}
    cfg = peft.LoraConfig(
        r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=list(factors), lora_dropout=0.0,
        rank_pattern={f"^{n}$": k for n, k in ranks.items()}, alpha_pattern={f"^{n}$": k for n, k in ranks.items()},
    )  # fmt: skip
    model = peft.get_peft_model(base, cfg, adapter_name=adapter_name)
    for name, (B, A) in factors.items():
        layer = model.base_model.model.get_submodule(name)
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        a.copy_(A.reshape(a.shape))
        b.copy_(B.reshape(b.shape))
    return model


def _units(B: torch.Tensor, A: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Sign-fixed units [a; b] (one row each) and their clustering features [a/‖a‖; b/‖b‖]."""
    a, b = A.double().numpy(), B.T.double().numpy()  # (r, in), (r, out)
    sign = np.sign(a[np.arange(len(a)), np.abs(a).argmax(1)])
    sign[sign == 0] = 1
    a, b = a * sign[:, None], b * sign[:, None]
    raw = np.concatenate([a, b], 1)
    feats = np.concatenate([a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12),
                            b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)], 1)  # fmt: skip
    return raw, feats


def lego_merge(loras: Sequence[Factors], k: int, seed: int = 0) -> Factors:
    """LoRA-LEGO: pool every layer's rank-1 units from ``loras``, k-means them into ``k`` clusters, and return the
    rank-k LoRA of the norm-reweighted centroids (layers where the pool has ≤ k units keep every unit)."""
    from scipy.cluster.vq import kmeans2

    layers = dict.fromkeys(n for lora in loras for n in lora)
    merged: Factors = {}
    for name in layers:
        parts = [lora[name] for lora in loras if name in lora]
        raw, feats = (np.concatenate(x, 0) for x in zip(*(_units(B, A) for B, A in parts), strict=True))
        n_in = parts[0][1].shape[1]
        if len(raw) <= k:
            cents = raw
        else:
            _, labels = kmeans2(feats, k, minit="++", seed=seed)
            cents = []
            for c in range(k):
                members = raw[labels == c]
                if not len(members):
                    continue
                mean = members.mean(0)
                scale = np.linalg.norm(members, axis=1).mean() / max(np.linalg.norm(mean), 1e-12)
                cents.append(mean * scale)  # parameter reweighting: back to the members' average norm
            cents = np.stack(cents)
        cents_t = torch.from_numpy(cents).to(parts[0][1].dtype)
        merged[name] = (cents_t[:, n_in:].T.contiguous(), cents_t[:, :n_in].contiguous())
    return merged


def delta_weights(factors: Factors) -> dict[str, torch.Tensor]:
    """ΔW = B A per layer."""
    return {n: B @ A for n, (B, A) in factors.items()}


__all__ = ["Factors", "delta_weights", "lego_merge", "lora_from_factors", "peft_lora_factors"]
