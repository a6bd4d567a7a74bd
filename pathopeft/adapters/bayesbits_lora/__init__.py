"""Bayesian-Bits rank gates on LoRA — learned per-layer ranks from nested stochastic gates with a sparsity prior.

Why this exists and what it is not: issue 16 asks for the rank gates of Bayesian-LoRA (Meo, Sycheva, Goyal,
Dauwels, arXiv 2406.13046, "... through Differentiable Bayesian Gates"; no public code). Only that paper's
abstract can be read from here, so its method cannot be matched, and this is *our* method under its own name:
the gate machinery of Bayesian Bits (van Baalen, Louizos et al., NeurIPS 2020, arXiv 2005.07093), which the
Bayesian-LoRA title names, applied to LoRA's ranks instead of to bit widths. Bayesian Bits gates a chain of
doublings (2 → 4 → 8 … bits) with a 0-bit pruning gate in front; here the chain doubles the rank::

    ranks are split into groups G₀ = {1}, G₁ = {2}, G₂ = {3, 4}, G₃ = {5 … 8}, …   (r a power of two)
    ΔW = s · B diag(g) A,   g on group j = Π_{k ≤ j} z_k,   s = α / r
    z_k ~ hard concrete(log α_k; β = 2/3, γ = −0.1, ζ = 1.1)          (Louizos et al. 2018, arXiv 1712.01312)

so a layer's rank is always one of {0, 1, 2, 4, …, r} and gate 0 switches its adapter off. Training samples the
gates (the reparameterised hard concrete: exact zeros and ones with non-zero probability, gradients to log α);
evaluation uses the deterministic gate 1[q(z_k ≠ 0) ≥ ``threshold``], Bayesian Bits' test-time rule. The prior
that switches gates off is the regulariser (``regularizer`` capability)::

    λ · Σ_layers Σ_j |G_j| (m + n) · Π_{k ≤ j} q(z_k ≠ 0)  /  Σ_layers r (m + n),
    q(z ≠ 0) = sigmoid(log α − β log(−γ / ζ))

the expected share of the adapters' LoRA parameters that stay on, the analogue of Bayesian Bits' expected bit
operations. :func:`prune_to_lora` drops every closed group and gives a plain PEFT LoRA with per-layer ranks and
the same output as the gated adapter in eval mode. Merging and export use the eval gates in either mode.

Choices that are ours: the doubling rank groups, λ's normalisation by the total parameter count, log α starting
at ``init_log_alpha`` = 3 (every gate open, q ≈ 0.99), the 0.5 threshold. The gates are trained by the model's
optimiser; with Adam log α moves about lr per step, so closing a gate from 3 takes ~(3 + 1.6)/lr steps.
The quantisation half of Bayesian-LoRA (gates on the adapters' bit widths) is left out on purpose: it lowers the
bit operations of an LLM's unmerged LoRA matmuls on low-bit hardware, while here the adapter is merged into W for
inference (it costs nothing there) and training runs in fp32/bf16, where a quantised adapter saves nothing.
Conv2d layers are adapted on the out × in·kh·kw view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, active_deltas, base_forward_with_weight, register

#: Hard concrete stretch and temperature (Louizos et al. 2018; Bayesian Bits uses the same).
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


@dataclass
class BayesBitsLoraConfig(AdapterConfig):
    """LoRA with Bayesian-Bits hard-concrete gates on doubling rank groups; a prior switches groups off."""

    adapter_type: ClassVar[str] = "bayesbits_lora"
    r: int = 8  # a power of two: the ranks a layer can end with are 0, 1, 2, 4 … r
    alpha: float | None = None  # None: alpha = r (scale 1)
    prior: float = 0.1  # λ of the expected-live-parameter-share term
    init_log_alpha: float = 3.0  # every gate open at the start
    threshold: float = 0.5  # eval: a gate is open iff q(z ≠ 0) ≥ threshold

    def __post_init__(self) -> None:
        if self.r < 1 or self.r & (self.r - 1):
            raise ValueError(f"bayesbits_lora needs r a power of two (its ranks double), got r={self.r}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"bayesbits_lora threshold must be in (0, 1), got {self.threshold}")


def rank_groups(r: int) -> list[int]:
    """Sizes of the doubling rank groups of rank r: 1, 1, 2, 4, … (sum r); [1] for r = 1."""
    return [1] + [2 ** (j - 1) for j in range(1, int(math.log2(r)) + 1)]


def open_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """q(z ≠ 0) of a hard concrete gate: the probability that its stretched sample is above 0."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def sample_gates(log_alpha: torch.Tensor) -> torch.Tensor:
    """One reparameterised hard concrete sample per gate (values in [0, 1], exact 0 and 1 possible)."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


class BayesBitsLoraDelta(Delta):
    """ΔW = s · B diag(g) A, g the nested (cumulative-product) group gates expanded to ranks."""

    def __init__(self, base: nn.Module, config: BayesBitsLoraConfig) -> None:
        super().__init__(base, config)
        r = config.r
        self.A = nn.Parameter(torch.empty(r, self.in_features))
        self.B = nn.Parameter(torch.zeros(self.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        sizes = rank_groups(r)
        self.log_alpha = nn.Parameter(torch.full((len(sizes),), float(config.init_log_alpha)))
        self.register_buffer("group_of_rank", torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)),
                             persistent=False)  # fmt: skip
        self.scale = (config.alpha if config.alpha is not None else r) / r

    def rank_gates(self, sample: bool = False) -> torch.Tensor:
        """Each rank's gate Π_{k ≤ j} z_k (j its group): sampled, or Bayesian Bits' deterministic test rule."""
        if sample:
            z = sample_gates(self.log_alpha)
        else:
            z = (open_probability(self.log_alpha) >= self.config.threshold).to(self.log_alpha.dtype)
        return torch.cumprod(z, 0)[self.group_of_rank]

    def gated_delta(self, sample: bool = False) -> torch.Tensor:
        return self.scale * ((self.B * self.rank_gates(sample)) @ self.A)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        """The deterministic ΔW: what eval, merging and export use, whatever the module's mode."""
        return self.gated_delta()

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if not self.training:
            return super().forward(x, base)
        dw = self.gated_delta(sample=True)  # a fresh gate sample per step
        return base_forward_with_weight(base, x, base.weight + dw.to(base.weight.dtype).view_as(base.weight))

    def expected_live_parameters(self) -> torch.Tensor:
        """Σ_j |G_j| (m + n) Π_{k ≤ j} q(z_k ≠ 0): the prior's cost of this layer, differentiable in log α."""
        sizes = torch.bincount(self.group_of_rank).to(self.log_alpha.dtype)
        live = torch.cumprod(open_probability(self.log_alpha), 0)
        return (sizes * live).sum() * (self.in_features + self.out_features)

    def live_ranks(self) -> int:
        """The rank this layer has in eval: the ranks of its open groups (0, 1, 2, 4 … r)."""
        with torch.no_grad():
            return int(self.rank_gates().sum())

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: AdapterConfig) -> int:
        return config.r * (out_features + in_features) + len(rank_groups(config.r))


def gated_deltas(model: nn.Module) -> dict[str, BayesBitsLoraDelta]:
    """The active Bayesian-Bits-gated deltas of ``model`` by layer name."""
    return active_deltas(model, BayesBitsLoraDelta)


def layer_ranks(model: nn.Module) -> dict[str, int]:
    """The eval-mode rank of every gated layer (the ``layer_ranks`` capability)."""
    return {n: d.live_ranks() for n, d in gated_deltas(model).items()}


def prior_loss(model: nn.Module) -> torch.Tensor | None:
    """λ × the expected share of LoRA parameters left on (the ``regularizer`` capability); None without gates."""
    deltas = list(gated_deltas(model).values())
    if not deltas or deltas[0].config.prior == 0:
        return None
    total = sum(d.config.r * (d.in_features + d.out_features) for d in deltas)
    return deltas[0].config.prior * sum(d.expected_live_parameters() for d in deltas) / total


def prune_to_lora(adapter_model: nn.Module) -> nn.Module:
    """A plain PEFT LoRA keeping each layer's open ranks (eval gates, scale folded into B): the gated adapter's
    eval output with its closed ranks gone. Layers with every gate closed get no adapter.
    ``adapter_model`` is unloaded (its base model is reused)."""
    from pathopeft.adapters.merging import prune_gated_to_lora

    return prune_gated_to_lora(adapter_model, BayesBitsLoraDelta)


register("bayesbits_lora", BayesBitsLoraConfig, BayesBitsLoraDelta, conv=True, identity_at_init=True,
         regularizer=prior_loss, layer_ranks=layer_ranks)  # fmt: skip

__all__ = ["BayesBitsLoraConfig", "BayesBitsLoraDelta", "layer_ranks", "open_probability", "prior_loss",
           "prune_to_lora", "rank_groups", "sample_gates"]  # fmt: skip
