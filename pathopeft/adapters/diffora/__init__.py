"""DiffoRA — which layers get an adapter is itself learned: a relaxed module-selection matrix, then a top-k cut.

Jiang, Wang, Yuan, "DiffoRA: Enabling Parameter-Efficient Fine-Tuning via Differential Module Selection"
(arXiv 2502.08905; no public code). Only the abstract and the introduction could be read from here, so this
module implements the method as the abstract defines it — a Differential Adaptation Matrix (DAM) deciding which
module is fine-tuned, built by continuous relaxation and then discretisation, with weight sharing — and states
every choice it had to make. Each target layer i holds one rank-r LoRA (A Kaiming-uniform, B zero: identity at
init) and its row α_i of the DAM, one logit per candidate c in ``candidates`` (ranks; 0 = no adapter). The
candidates share the LoRA's weights (candidate c is its first c ranks), which is the weight sharing::

    relaxed (search):   ΔW_i = Σ_c softmax(α_i)_c · s · B[:, :c] A[:c],      s = α / r
    discrete (after):   ΔW_i = s · B[:, :c_i] A[:c_i]   for the k kept layers,   0 for the others

Discretisation (:func:`discretise`, run by the :class:`DifforaSearch` callback after ``search_fraction`` of the
steps) keeps the k = round(``keep_fraction`` · layers) layers with the largest probability of carrying an
adapter (1 − softmax(α_i)₀), each at its most probable non-zero candidate, with the supernet's weights as they
are; the other layers' adapters are zeroed and frozen, and α is frozen. Choices made here, not read from the
paper: α is trained by the same optimiser and loss as the adapter weights (first-order, one level; DARTS trains it
on held-out data), α starts at zero (uniform), the budget is a share of layers, and the default candidates are
{0, r} (pure module selection). The chosen candidate per layer is a persistent buffer, so a saved adapter reloads
discretised. Conv2d layers are adapted on the out × in·kh·kw view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, active_deltas, planned_steps, register

#: ``chosen`` while the layer is still relaxed (searching).
SEARCHING = -1


@dataclass
class DifforaConfig(AdapterConfig):
    """DiffoRA: learned module selection (a softmax over candidate ranks per layer), then the top-k layers kept."""

    adapter_type: ClassVar[str] = "diffora"
    r: int = 8
    alpha: float | None = None  # None: alpha = r (scale 1)
    candidates: list[int] = field(default_factory=list)  # ranks a layer may take, 0 = none; []: [0, r]
    keep_fraction: float = 0.5  # share of target layers that keep an adapter after discretisation
    search_fraction: float = 0.5  # share of the training steps in the relaxed phase

    def __post_init__(self) -> None:
        cands = self.candidates or [0, self.r]
        if 0 not in cands or any(c < 0 or c > self.r for c in cands) or len(set(cands)) != len(cands):
            raise ValueError(f"diffora candidates must be distinct ranks in [0, r={self.r}] including 0, got {cands}")
        if not 0 < self.keep_fraction <= 1 or not 0 <= self.search_fraction <= 1:
            raise ValueError("diffora keep_fraction must be in (0, 1] and search_fraction in [0, 1]")


class DifforaDelta(Delta):
    def __init__(self, base: nn.Module, config: DifforaConfig) -> None:
        super().__init__(base, config)
        r = config.r
        self.candidates = sorted(config.candidates or [0, r])
        self.scale = (config.alpha if config.alpha is not None else r) / r
        self.A = nn.Parameter(torch.empty(r, self.in_features))
        self.B = nn.Parameter(torch.zeros(self.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.logits = nn.Parameter(torch.zeros(len(self.candidates)))  # this layer's row of the DAM
        self.register_buffer("chosen", torch.tensor(SEARCHING))  # SEARCHING, else the kept rank (0: pruned)

    @property
    def searching(self) -> bool:
        return int(self.chosen) == SEARCHING

    def candidate_delta(self, c: int) -> torch.Tensor:
        """ΔW of candidate rank ``c``: the first c ranks of the shared LoRA."""
        return self.scale * (self.B[:, :c] @ self.A[:c])

    def adapter_probability(self) -> torch.Tensor:
        """1 − softmax(α)₀: how much this layer wants an adapter (what the top-k cut ranks)."""
        return 1 - torch.softmax(self.logits, 0)[self.candidates.index(0)]

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        if not self.searching:
            return self.candidate_delta(int(self.chosen))
        p = torch.softmax(self.logits, 0)
        # Σ_c p_c · B[:, :c] A[:c] = B diag(w) A with w_j = Σ_{c > j} p_c: one matmul for every candidate
        cum = torch.zeros(self.config.r, dtype=p.dtype, device=p.device)
        for pc, c in zip(p, self.candidates, strict=True):
            cum = cum + pc * (torch.arange(self.config.r, device=p.device) < c)
        return self.scale * ((self.B * cum) @ self.A)

    @torch.no_grad()
    def settle(self, rank: int) -> None:
        """Leave the search at candidate ``rank``: ranks beyond it (all, for 0) are zeroed and frozen with α."""
        self.chosen.fill_(rank)
        self.B[:, rank:] = 0
        self.A[rank:] = 0
        self.logits.requires_grad_(False)
        if rank == 0:
            self.A.requires_grad_(False)
            self.B.requires_grad_(False)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: DifforaConfig) -> int:
        return config.r * (out_features + in_features) + len(config.candidates or [0, config.r])


def diffora_deltas(model: nn.Module) -> dict[str, DifforaDelta]:
    """The active DiffoRA deltas of ``model`` by layer name."""
    return active_deltas(model, DifforaDelta)


@torch.no_grad()
def discretise(model: nn.Module, keep_fraction: float | None = None) -> dict[str, int]:
    """Cut the relaxed DAM to a discrete one: the top-k layers by adapter probability keep their most probable
    non-zero candidate, the rest are pruned. Returns the rank chosen per layer (0: no adapter)."""
    deltas = diffora_deltas(model)
    if not deltas:
        return {}
    share = keep_fraction if keep_fraction is not None else next(iter(deltas.values())).config.keep_fraction
    k = max(1, round(share * len(deltas)))
    ranked = sorted(deltas, key=lambda n: float(deltas[n].adapter_probability()), reverse=True)
    chosen = {}
    for i, name in enumerate(ranked):
        d = deltas[name]
        if i < k:
            nonzero = [(float(p), c) for p, c in zip(torch.softmax(d.logits, 0), d.candidates, strict=True) if c]
            rank = max(nonzero)[1]
        else:
            rank = 0
        d.settle(rank)
        chosen[name] = rank
    return chosen


def chosen_ranks(model: nn.Module) -> dict[str, int]:
    """Rank per layer after discretisation (``SEARCHING`` = -1 while the search runs)."""
    return {n: int(d.chosen) for n, d in diffora_deltas(model).items()}


def layer_ranks(model: nn.Module) -> dict[str, int]:
    """The ``layer_ranks`` capability: the chosen rank per layer, r while the search still runs."""
    return {n: d.config.r if d.searching else int(d.chosen) for n, d in diffora_deltas(model).items()}


class DifforaSearch(pl.Callback):
    """Ends the relaxed search after ``search_fraction`` of the steps by :func:`discretise`: the ``callback``
    capability of ``diffora``, so every Lightning fit through the library runs it."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        first = next(iter(diffora_deltas(pl_module).values()), None)
        if (
            first is not None
            and first.searching
            and trainer.global_step >= int(first.config.search_fraction * planned_steps(trainer))
        ):
            discretise(pl_module)


register("diffora", DifforaConfig, DifforaDelta, conv=True, identity_at_init=True, callback=DifforaSearch,
         layer_ranks=layer_ranks)  # fmt: skip

__all__ = ["DifforaConfig", "DifforaDelta", "DifforaSearch", "chosen_ranks", "diffora_deltas", "discretise",
           "layer_ranks"]  # fmt: skip
