"""LoKU — forgetting a cohort with a LoRA: the inverted hinge loss and the Fisher-weighted LoRA initialisation.

Cha et al., "Towards Robust and Parameter-Efficient Knowledge Unlearning for LLMs" (arXiv 2408.10682; code
csm9493/efficient-llm-unlearning @ 272484a: ``TOFU/dataloader.py`` (IHL), ``measure_importance.py`` and
``forget.py`` (FILA)), translated from next tokens to classes: a bag's (or tile's) label plays the token.

* **Inverted hinge loss** on the forget set: IHL = 1 + p(y) − max_{v≠y} p(v) (softmax probabilities), averaged.
  It lowers the forgotten label while raising its strongest rival instead of pushing all mass anywhere, and is
  bounded: 2·p(y) ≤ IHL ≤ 1 + p(y), so within [0, 2] (the code's clamp at 0 never acts). Retained data keep the
  ordinary cross-entropy beside it (weight 1, as the code).
* **FILA**: for every LoRA layer, the importance of each weight for the forget set relative to the retain set,
  F = (F_forget / n_forget) / (1e-5 + F_retain / n_retain), from squared gradients of the mean loss accumulated per
  batch × its label count (:func:`fisher_diagonals`); per output row d = √(Σ_in F); the rank-r SVD of d·W
  (rows weighted) gives A = (V √S')ᵀ and B = diag(1/(d + 1e-5)) U √S' with S' = S / scale, and the base weight
  becomes W − scale·B A, so the output is unchanged at init and the adapter starts on the weights that matter
  for the forget set. The code uses ``svd_lowrank``; this uses the exact SVD (deterministic, same subspace).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def inverted_hinge_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 1 + p(y) − max_{v≠y} p(v) over rows of ``logits`` (N, C) with labels ``target`` (N,)."""
    p = logits.float().softmax(-1)
    p_y = p.gather(-1, target[:, None]).squeeze(-1)
    others = p.scatter(-1, target[:, None], float("-inf"))
    return (1 + p_y - others.max(-1).values).mean()


def _lora_layers(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {n: m for n, m in root.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A}


def fisher_diagonals(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], tuple[torch.Tensor, int]],
    adapter_name: str = "default",
) -> tuple[dict[str, torch.Tensor], int]:
    """Σ over ``batches`` of (∂ mean loss / ∂W)² × labels in the batch, for the base weight of every LoRA layer
    (the adapters switched off, as the importance is the base model's); ``loss_fn(model, batch)`` returns
    (mean loss, label count). Returns the sums and the total label count."""
    layers = _lora_layers(model, adapter_name)
    if not layers:
        raise ValueError("fisher_diagonals: the model has no LoRA layer")
    sums = {n: torch.zeros_like(m.base_layer.weight, dtype=torch.float32) for n, m in layers.items()}
    total = 0
    for m in layers.values():
        m.base_layer.weight.requires_grad_(True)
    try:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else torch.enable_grad():
            for batch in batches:
                model.zero_grad(set_to_none=True)
                loss, count = loss_fn(model, batch)
                loss.backward()
                for n, m in layers.items():
                    sums[n] += m.base_layer.weight.grad.detach().float().pow(2) * count
                total += count
    finally:
        for m in layers.values():
            m.base_layer.weight.requires_grad_(False)
            m.base_layer.weight.grad = None
    return sums, total


@torch.no_grad()
def fila_init(
    model: nn.Module,
    fisher_forget: tuple[dict[str, torch.Tensor], int],
    fisher_retain: tuple[dict[str, torch.Tensor], int],
    adapter_name: str = "default",
) -> None:
    """Set every LoRA layer of ``model`` (PEFT) to FILA's factors and its base weight to W − scale·B A."""
    (ff, nf), (fr, nr) = fisher_forget, fisher_retain
    for name, m in _lora_layers(model, adapter_name).items():
        w = m.base_layer.weight
        W = w.detach().float().reshape(w.shape[0], -1)
        imp = (ff[name] / max(nf, 1)) / (1e-5 + fr[name] / max(nr, 1))
        d = imp.reshape(W.shape).sum(1).sqrt()
        a, b = m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight
        r, s = a.shape[0], float(m.scaling[adapter_name])
        U, S, Vh = torch.linalg.svd(d[:, None] * W, full_matrices=False)
        k = min(r, S.numel())  # a layer narrower than r keeps its extra ranks at zero
        root = (S[:k] / s).sqrt()
        A, B = W.new_zeros(r, W.shape[1]), W.new_zeros(W.shape[0], r)
        A[:k] = root[:, None] * Vh[:k]
        B[:, :k] = (U[:, :k] * root) / (d + 1e-5)[:, None]
        a.copy_(A.reshape(a.shape).to(a.dtype))
        b.copy_(B.reshape(b.shape).to(b.dtype))
        w.copy_((W - s * B @ A).reshape(w.shape).to(w.dtype))


def unlearn_step_loss(
    forget_logits: torch.Tensor, forget_y: torch.Tensor, retain_logits: torch.Tensor, retain_y: torch.Tensor
) -> torch.Tensor:
    """LoKU's objective for one step: IHL on the forget batch + cross-entropy on the retain batch."""
    return inverted_hinge_loss(forget_logits, forget_y) + F.cross_entropy(retain_logits.float(), retain_y)


__all__ = ["fila_init", "fisher_diagonals", "inverted_hinge_loss", "unlearn_step_loss"]
