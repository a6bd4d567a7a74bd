"""SNELLA's bi-level parameter competition: per-layer sparsity budgets that follow importance.

Level 1, across layers: each layer's score is the EMA-smoothed sensitivity of its factors,
Ī ← β₁Ī + (1−β₁)|θ·∇θ| and Ū ← β₂Ū + (1−β₂)|I − Ī|, score = mean(Ī·Ū) over a + mean(Ī·Ū) over b (as in the
official ``sparse_allocator.py``). The total number of kept ΔW entries decays cubically from the start
(1 − the config's ``sparsity``) to the end (1 − ``final_sparsity``) of all adaptable entries (AdaLoRA's
schedule, as the code), and is shared out in proportion to the scores, capped at each layer's size, leftovers
handed on. Level 2, within a layer: the layer's magnitude threshold keeps its share. A split qkv competes as
three layers (q, k, v), as the official separate adapters do.

Why a callback and not part of the module: the competition needs the gradients after ``backward`` and a
global step counter, which a layer's forward never sees. :class:`BudgetAllocator` is plain Python (call
``update_importance()`` after backward and ``step(t)`` after the optimizer); :class:`SnellaBudgetCallback`
wires it into a Lightning ``Trainer`` and is attached automatically by every Lightning module of this
library that trains an adapter (through the ``callback`` capability of SNELLA's ``ADAPTERS`` entry). The
official scripts step the schedule once per *epoch*; we step per optimizer step by default (``per_epoch=True``
restores theirs). The smoothed scores are callback state, so a resumed fit continues the same competition.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from pathopeft.adapters.snella.layer import SnellaDelta


class BudgetAllocator:
    """Per-part budgets for every trainable :class:`SnellaDelta` of ``model`` (a "unit" is one layer, or one of
    q, k, v on a split qkv). ``init_keep``/``target_keep`` default to the adapters' config (1 − sparsity,
    1 − final_sparsity)."""

    def __init__(
        self,
        model: nn.Module,
        total_steps: int,
        init_keep: float | None = None,
        target_keep: float | None = None,
        warmup_steps: int = 0,
        final_steps: int = 0,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ) -> None:
        self.deltas = [m for m in model.modules() if isinstance(m, SnellaDelta) and m.a.requires_grad]
        if not self.deltas:
            raise ValueError("BudgetAllocator: the model has no trainable SNELLA adapter")
        self.units = [(d, p) for d in self.deltas for p in range(d.parts)]
        self.sizes = [d.part_size for d, _ in self.units]
        cfg = self.deltas[0].config
        self.init_keep = init_keep if init_keep is not None else 1.0 - cfg.sparsity
        if target_keep is None:
            if cfg.final_sparsity is None:
                raise ValueError("BudgetAllocator: the SNELLA config has final_sparsity=None (fixed sparsity)")
            target_keep = 1.0 - cfg.final_sparsity
        self.target_keep = target_keep
        self.total_steps, self.warmup_steps, self.final_steps = total_steps, warmup_steps, final_steps
        self.beta1, self.beta2 = beta1, beta2
        self.ipt: dict[int, list[torch.Tensor]] = {}
        self.unc: dict[int, list[torch.Tensor]] = {}

    def keep_fraction(self, step: int) -> float:
        """Cubic decay init → target between warm-up and the last ``final_steps`` steps."""
        span = max(1, self.total_steps - self.warmup_steps - self.final_steps)
        t = min(max(step - self.warmup_steps, 0), span)
        frac = 1.0 - t / span
        return self.target_keep + (self.init_keep - self.target_keep) * frac**3

    @torch.no_grad()
    def update_importance(self) -> None:
        for i, d in enumerate(self.deltas):
            cur = [
                torch.nan_to_num((p * p.grad).abs(), nan=0.0) if p.grad is not None else torch.zeros_like(p)
                for p in (d.a, d.b)
            ]
            if i not in self.ipt:
                self.ipt[i] = [torch.zeros_like(c) for c in cur]
                self.unc[i] = [torch.zeros_like(c) for c in cur]
            for k, c in enumerate(cur):
                self.ipt[i][k].mul_(self.beta1).add_(c, alpha=1 - self.beta1)
                self.unc[i][k].mul_(self.beta2).add_((c - self.ipt[i][k]).abs(), alpha=1 - self.beta2)

    def scores(self) -> list[float]:
        """One score per unit: mean(Ī·Ū) over its a plus over its b."""
        if not self.ipt:
            return [1.0] * len(self.units)
        out = []
        for i, d in enumerate(self.deltas):
            per_part = sum(
                (ip * un).reshape(d.parts, -1).mean(1) for ip, un in zip(self.ipt[i], self.unc[i], strict=True)
            )
            out += [float(v) for v in per_part]
        return out

    def allocate(self, total_keep: int) -> list[int]:
        """Share ``total_keep`` entries in proportion to the scores, capped per unit, leftovers passed on."""
        scores = [max(s, 1e-30) for s in self.scores()]
        alloc = [0] * len(scores)
        open_ = set(range(len(scores)))
        left = total_keep
        while left > 0 and open_:
            z = sum(scores[i] for i in open_)
            given = 0
            for i in sorted(open_):
                want = round(left * scores[i] / z)
                take = min(want, self.sizes[i] - alloc[i])
                alloc[i] += take
                given += take
            for i in [i for i in open_ if alloc[i] >= self.sizes[i]]:
                open_.discard(i)
            left = total_keep - sum(alloc)
            if given == 0:  # rounding left crumbs: hand them to the best open units one by one
                for i in sorted(open_, key=lambda j: -scores[j])[:left]:
                    alloc[i] += 1
                break
        return alloc

    def step(self, step: int) -> list[float]:
        """Set every unit's sparsity for ``step``; returns the sparsities (for logging)."""
        total = int(self.keep_fraction(step) * sum(self.sizes))
        values = [
            min(max(1.0 - k / n, 0.0), 1.0 - 1.0 / n) for k, n in zip(self.allocate(total), self.sizes, strict=True)
        ]
        at = 0
        for d in self.deltas:
            d.sparsities = values[at : at + d.parts]
            at += d.parts
        return values

    def state_dict(self) -> dict[str, Any]:
        return {"ipt": self.ipt, "unc": self.unc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ipt, self.unc = state["ipt"], state["unc"]


class SnellaBudgetCallback(pl.Callback):
    """Runs :class:`BudgetAllocator` inside ``Trainer.fit`` (importance after backward, budget after step).

    Does nothing when the adapters' ``final_sparsity`` is None (fixed sparsity, SNELL's way)."""

    def __init__(self, per_epoch: bool = False, **allocator_kwargs: Any) -> None:
        self.per_epoch = per_epoch
        self.kwargs = allocator_kwargs
        self.allocator: BudgetAllocator | None = None
        self._pending: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        kwargs = dict(self.kwargs)
        total = kwargs.pop("total_steps", None)
        if total is None:
            total = trainer.max_epochs if self.per_epoch else trainer.estimated_stepping_batches
        deltas = [m for m in pl_module.modules() if isinstance(m, SnellaDelta) and m.a.requires_grad]
        if deltas and deltas[0].config.final_sparsity is None and "target_keep" not in kwargs:
            return
        self.allocator = BudgetAllocator(pl_module, total_steps=int(total), **kwargs)
        if self._pending is not None:
            self.allocator.load_state_dict(self._pending)
            self._pending = None

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.allocator is not None:
            self.allocator.update_importance()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.allocator is not None and not self.per_epoch:
            sp = self.allocator.step(trainer.global_step)
            pl_module.log("snella/mean_sparsity", sum(sp) / len(sp))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.allocator is not None and self.per_epoch:
            self.allocator.step(trainer.current_epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        return self.allocator.state_dict() if self.allocator is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending = state_dict
