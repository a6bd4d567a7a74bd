"""SoRA — a LoRA whose ranks are switched off by a gate trained with a proximal (soft-threshold) step.

Ding et al., "Sparse Low-rank Adaptation of Pre-trained Language Models" (arXiv 2311.11696; code
TsinghuaC3I/SoRA @ c275ac2: ``src/lora.py``, ``src/sparse_optimizer.py``, ``src/trainer.py``, ``run_glue.py``)::

    y = W₀x + s · B (g ⊙ A x),   s = α / r,   ΔW = s · B diag(g) A

A (r×in) Kaiming-uniform, B (out×r) zero (identity at init), gate g ∈ Rʳ drawn from N(0, 1). After every
optimiser step the gate is soft-thresholded, g ← sign(g)·max(|g| − ξ, 0) (the threshold is ξ itself, not lr·ξ,
as in the code), so ranks reach exact zeros; the loss also carries the code's L1 term λ·Σ|g| / (number of gate
entries) (``l1``, the ``regularizer`` capability). ξ follows the code's sparsifying schedule
(``run_glue_sora_schedule_dense.sh``): a dense phase (ξ = 0), then ``levels`` equal phases with
ξ = ξ_max·k/levels, k = 1 … levels (its linspace(0, 7e-4, 7)). :func:`prune_to_lora` removes the zero-gate
ranks and folds g into B, giving a smaller plain PEFT LoRA (per-layer ranks) with identical output.

Differences from the code, chosen here and kept small:
* the code zeroes every |g| < ξ *after* shifting, so values in [ξ, 2ξ) also vanish (a discontinuous threshold);
  this is the paper's soft threshold;
* the code updates the gate with a second Adam (eps 1e-6, no weight decay, its own warm-up); here the gate is
  a 1-D parameter in the module's optimiser, which puts it in the no-decay group;
* the code's phases are extra training runs after the main one; here they divide one run (``dense_fraction``
  of the steps dense, the rest split into ``levels`` phases).
Conv2d layers are adapted on the out × in·kh·kw view. CoDyRA (:mod:`pathopeft.adapters.codyra`) uses the same
gated layer with its own scale and schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, active_deltas, planned_steps, register


@dataclass
class SoraConfig(AdapterConfig):
    """SoRA: LoRA with a gate between A and B, soft-thresholded after each step so ranks drop to exact zero."""

    adapter_type: ClassVar[str] = "sora"
    r: int = 8
    alpha: float | None = None  # None: alpha = r (the code: alpha 16 at r 8)
    xi_max: float = 7e-4  # the last phase's threshold (run_glue_sora_schedule_dense.sh)
    levels: int = 6  # thresholded phases after the dense one
    dense_fraction: float = 0.5  # share of the steps with ξ = 0
    l1: float = 1e-3  # λ of the L1 term λ·Σ|g| / #gate entries (--sparse_lambda)


class GatedLoraDelta(Delta):
    """ΔW = s · B diag(g) A with a soft-thresholded gate g (SoRA's layer; CoDyRA's with s = 1)."""

    def __init__(self, base: nn.Module, config: AdapterConfig) -> None:
        super().__init__(base, config)
        r = config.r
        self.A = nn.Parameter(torch.empty(r, self.in_features))
        self.B = nn.Parameter(torch.zeros(self.out_features, r))
        self.gate = nn.Parameter(torch.randn(r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if hasattr(config, "alpha"):  # SoRA: alpha / r (alpha None: r); CoDyRA's config has no alpha: scale 1
            self.scale = (config.alpha if config.alpha is not None else r) / r
        else:
            self.scale = 1.0

    def rank_gates(self) -> torch.Tensor:
        """The gate of each rank (what pruning keeps where non-zero)."""
        return self.gate

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.scale * ((self.B * self.gate) @ self.A)

    @torch.no_grad()
    def threshold(self, xi: float) -> None:
        """The proximal step of the L1 penalty: g ← sign(g)·max(|g| − ξ, 0)."""
        if xi > 0:
            self.gate.copy_(torch.sign(self.gate) * (self.gate.abs() - xi).clamp_min(0))

    def live_ranks(self) -> int:
        return int((self.gate != 0).sum())

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: AdapterConfig) -> int:
        return config.r * (out_features + in_features + 1)


def gated_deltas(model: nn.Module) -> dict[str, GatedLoraDelta]:
    """The active gated deltas of ``model`` by layer name."""
    return active_deltas(model, GatedLoraDelta)


def live_ranks(model: nn.Module) -> int:
    """How many ranks of the model's gated adapters have a non-zero gate."""
    return sum(d.live_ranks() for d in gated_deltas(model).values())


def layer_ranks(model: nn.Module) -> dict[str, int]:
    """Live (non-zero-gate) ranks per gated layer: the ``layer_ranks`` capability of ``sora`` and ``codyra``."""
    return {n: d.live_ranks() for n, d in gated_deltas(model).items()}


def phase_threshold(step: int, total: int, xi_max: float, levels: int, dense_fraction: float) -> float:
    """ξ at ``step`` of ``total``: 0 for the dense share, then ``levels`` equal phases up to ``xi_max``."""
    dense = int(dense_fraction * total)
    if step < dense or levels < 1:
        return 0.0
    seg = max(1, math.ceil((total - dense) / levels))
    return xi_max * min(levels, (step - dense) // seg + 1) / levels


class GateThreshold(pl.Callback):
    """Soft-thresholds every gate after each optimiser step with the config's phase schedule: the ``callback``
    capability of ``sora`` and ``codyra``, so every Lightning fit through the library runs it."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        total = planned_steps(trainer)
        for d in gated_deltas(pl_module).values():
            c = d.config
            d.threshold(phase_threshold(trainer.global_step, total, c.xi_max, c.levels, c.dense_fraction))


def sora_loss(model: nn.Module) -> torch.Tensor | None:
    """SoRA's L1 term λ·Σ|g| / #gate entries (the ``regularizer`` capability); None without SoRA gates."""
    deltas = [d for d in gated_deltas(model).values() if isinstance(d.config, SoraConfig)]
    if not deltas or deltas[0].config.l1 == 0:
        return None
    total = sum(d.gate.abs().sum() for d in deltas)
    return deltas[0].config.l1 * total / sum(d.gate.numel() for d in deltas)


def prune_to_lora(adapter_model: nn.Module) -> nn.Module:
    """A plain PEFT LoRA with each layer's zero-gate ranks removed and g folded into B (per-layer ranks, the scale
    folded in): the same outputs as the gated adapter. Layers with no live rank get no adapter.
    ``adapter_model`` is unloaded (its base model is reused)."""
    from pathopeft.adapters.merging import prune_gated_to_lora

    return prune_gated_to_lora(adapter_model, GatedLoraDelta)


register("sora", SoraConfig, GatedLoraDelta, conv=True, identity_at_init=True, callback=GateThreshold,
         regularizer=sora_loss, layer_ranks=layer_ranks)  # fmt: skip

__all__ = ["GateThreshold", "GatedLoraDelta", "SoraConfig", "layer_ranks", "live_ranks", "phase_threshold", "prune_to_lora",
           "sora_loss"]  # fmt: skip
