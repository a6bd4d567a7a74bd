"""AdaLoRA from PEFT as a registry entry, so ``seg fit`` / ``seg compare`` run it as the rank-allocation baseline.

Zhang et al., "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (arXiv 2303.10512).
The method is PEFT's (``peft.AdaLoraConfig``: SVD-shaped layers P Λ Q, the sensitivity-based importance with its
EMA and uncertainty terms, the cubic budget schedule, masking); this module only supplies what PEFT leaves to
a training loop:

* the ``callback``: PEFT's ``update_and_allocate(step)`` after every optimiser step, while the gradients exist
  (PEFT's docstring asks for it between ``backward`` and ``zero_grad``; Lightning zeroes them before the next
  step's forward, so the end of the batch is that place);
* the ``regularizer``: PEFT adds its orthogonality term Σ‖PPᵀ − I‖_F + ‖QᵀQ − I‖_F (mean over factors, times
  ``orth_reg_weight``) only to a Hugging Face output's ``.loss``; a segmentation model returns a tensor, so the
  same term is computed here;
* ``layer_ranks``: the ranks each layer keeps (non-zero entries of Λ), for the per-layer rank plots.

``rank`` is the final average rank (``target_r``); ``init_r`` defaults to 1.5 × rank, the paper's b(0) = 1.5 b(T).
PEFT's schedule is defined by ``total_step`` (the run's optimiser steps); ``tinit`` and ``tfinal`` default to 10 %
and 20 % of it and ``deltaT`` to 10 (the paper's GLUE runs: a few hundred warm-up steps, a final phase,
reallocation every 10–100 steps; here scaled to short runs). Without ``total_step`` the config holds a placeholder
and the callback sets the Lightning run's own length at fit start (PEFT's ``set_total_step``), so ``seg fit`` and
``seg compare`` need no extra option.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from pathopeft.adapters.core import ADAPTERS, AdapterMethod, planned_steps

#: Attribute of an ``AdaLoraConfig`` built without ``total_step``: the schedule steps the user fixed ({} if none);
#: :class:`AdaLoraAllocate` then sets the run's length at fit start.
AUTO_SCHEDULE = "_pathopeft_auto_schedule"
PLACEHOLDER_STEPS = 1000


def schedule(total: int, fixed: dict[str, int]) -> dict[str, int]:
    """``tinit`` / ``tfinal`` for a run of ``total`` steps: the user's, else 10 % and 20 % of it."""
    return {
        "tinit": fixed.get("tinit", max(1, int(0.1 * total))),
        "tfinal": fixed.get("tfinal", max(1, int(0.2 * total))),
    }


def adalora_config(targets: list[str], rank: int | None, alpha: float | None, **kw: Any) -> Any:
    import peft

    total = kw.pop("total_step", None)
    if total is not None and total <= 0:
        raise ValueError(f"adapter method 'adalora': total_step must be > 0, got {total}")
    fixed = {k: kw.pop(k) for k in ("tinit", "tfinal") if k in kw}
    r = rank or 8
    kw.setdefault("init_r", max(r + 1, round(1.5 * r)))
    kw.setdefault("deltaT", 10)
    config = peft.AdaLoraConfig(
        target_r=r, lora_alpha=alpha if alpha is not None else r, total_step=total or PLACEHOLDER_STEPS,
        target_modules=targets, **schedule(total or PLACEHOLDER_STEPS, fixed), **kw,
    )  # fmt: skip
    if total is None:
        setattr(config, AUTO_SCHEDULE, fixed)
    return config


def _peft_model(model: nn.Module) -> nn.Module | None:
    """The ``AdaLoraModel`` inside ``model`` (a SegModule, SegModel or the PeftModel itself), if any."""
    import peft

    for m in model.modules():
        if isinstance(m, peft.AdaLoraModel):
            return m
    return None


class AdaLoraAllocate(pl.Callback):
    """PEFT's ``update_and_allocate`` after each optimiser step (step numbers from 0, as PEFT's example loop);
    at fit start, the run's length as ``total_step`` when the config was built without one."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = _peft_model(pl_module)
        if m is None:
            return
        config = m.peft_config[m.trainable_adapter_name]
        fixed = getattr(config, AUTO_SCHEDULE, None)
        if fixed is None:
            return
        total = planned_steps(trainer)
        for k, v in schedule(total, fixed).items():
            setattr(config, k, v)
        if config.tinit >= total - config.tfinal:
            raise ValueError(f"adalora: tinit {config.tinit} + tfinal {config.tfinal} leave no allocation phase in "
                             f"a run of {total} steps")  # fmt: skip
        m.rankallocator.set_total_step(total)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        m = _peft_model(pl_module)
        if m is not None:
            m.update_and_allocate(trainer.global_step - 1)


def adalora_orth_loss(model: nn.Module) -> torch.Tensor | None:
    """PEFT's AdaLoRA orthogonality term for a model whose output is a tensor (see the module docstring)."""
    m = _peft_model(model)
    if m is None:
        return None
    name = m.trainable_adapter_name
    weight = m.peft_config[name].orth_reg_weight
    terms = []
    for n, p in m.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n and p.requires_grad:
            cov = p.flatten(1) @ p.flatten(1).T if "lora_A" in n else p.flatten(1).T @ p.flatten(1)
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(len(cov), device=cov.device, dtype=cov.dtype)))
    return weight * torch.stack(terms).mean() if terms and weight else None


def adalora_layer_ranks(model: nn.Module) -> dict[str, int]:
    """Ranks each AdaLoRA layer keeps: PEFT's ``rank_pattern`` once its allocator has masked ranks, else every
    initial rank (``init_r``: before the first allocation nothing is pruned)."""
    m = _peft_model(model)
    if m is None:
        return {}
    name = m.trainable_adapter_name
    suffix = f".lora_E.{name}"
    pattern = m.peft_config[name].rank_pattern or {}
    return {n.removesuffix(suffix): int(sum(pattern[n])) if n in pattern else int(p.numel())
            for n, p in m.model.named_parameters() if n.endswith(suffix)}  # fmt: skip


ADAPTERS.add(
    "adalora",
    AdapterMethod(peft_config=adalora_config, doc="AdaLoRA from PEFT (SVD-shaped LoRA, importance-based budget)"),
    backend="peft",
    conv=True,
    identity_at_init=True,
    callback=AdaLoraAllocate,
    regularizer=adalora_orth_loss,
    layer_ranks=adalora_layer_ranks,
)

__all__ = ["AdaLoraAllocate", "adalora_config", "adalora_layer_ranks", "adalora_orth_loss"]
