"""LoRA-SB — only an r×r matrix between frozen factors, initialised from the first full fine-tuning step.

Ponkshe, Singhal et al., "Initialization using Update Approximation is a Silver Bullet for Extreme Efficient
Low-Rank Fine-Tuning" (arXiv 2411.19557; code RaghavSinghal10/lora-sb @ 37b33d4: ``utils/gradient_utils.py``
``estimate_and_process_grads_torch``, ``utils/initialization_utils.py`` ``find_and_initialize_grad``)::

    ΔW = s · B R A,     B (out×r), A (r×in) frozen, R (r×r) trained:  r² per layer

:func:`lora_sb_init` sums the gradients of the full weights over a few batches (the loss normalised by each
batch's size, as the code), forms the first full step ΔW₁ = −lr · sign(ΣG) (the code's update approximation,
Adam's first step), and sets B R A to its best rank-r approximation from the SVD: B = U_r, R = diag(σ_r),
A = V_rᵀ. B and A are persistent buffers (they come from data, so adapter files carry them). Until it runs the
adapter is the identity (R = 0, A, B random orthonormal). ∂L/∂R = s · Bᵀ G Aᵀ by construction. Chosen where
the code leaves it: an exact SVD (the code's ``svd_lowrank`` with 10 iterations approximates it), scale s = α/r
with α = r by default, ``lr`` given by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, active_layers, register, weight_2d


@dataclass
class LoraSbConfig(AdapterConfig):
    """LoRA-SB: ΔW = s·B R A with B, A frozen and only the r×r R trained (r² per layer); initialise with
    :func:`pathopeft.adapters.lorasb.lora_sb_init` from a few batches."""

    adapter_type: ClassVar[str] = "lorasb"
    r: int = 8
    alpha: float | None = None


class LoraSbDelta(Delta):
    def __init__(self, base: nn.Module, config: LoraSbConfig) -> None:
        super().__init__(base, config)
        r = min(config.r, self.out_features, self.in_features)
        self.r = r
        self.scale = (config.alpha if config.alpha is not None else r) / r
        g = torch.Generator().manual_seed(0)
        self.register_buffer("B", torch.linalg.qr(torch.randn(self.out_features, r, generator=g))[0])
        self.register_buffer("A", torch.linalg.qr(torch.randn(self.in_features, r, generator=g))[0].T.contiguous())
        self.R = nn.Parameter(torch.zeros(r, r))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))  # saved: a resumed fit keeps its B, A

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.scale * (self.B @ self.R @ self.A)

    @torch.no_grad()
    def initialise(self, update: torch.Tensor) -> None:
        """B R A := the best rank-r approximation of ``update`` (out × in), divided by the scale."""
        U, S, Vh = torch.linalg.svd(update.float(), full_matrices=False)
        r = self.r
        self.B.copy_(U[:, :r])
        self.A.copy_(Vh[:r])
        self.R.copy_(torch.diag(S[:r]) / self.scale)
        self.initialised.fill_(True)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: LoraSbConfig) -> int:
        return min(config.r, out_features, in_features) ** 2


def lora_sb_init(
    model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor], lr: float
) -> int:
    """Initialise every LoRA-SB adapter of ``model`` from the gradients of its frozen weights over ``batches``.

    ``loss_fn(model, batch)`` returns the batch's mean loss (it is scaled by 1/batch size, as the official code
    does). Returns the number of batches used. The base weights are left frozen and unchanged.
    """
    layers = list(active_layers(model, LoraSbDelta).values())
    if not layers:
        raise ValueError("lora_sb_init: the model has no active LoRA-SB adapter")
    sums = [torch.zeros_like(weight_2d(m.base_layer), dtype=torch.float32) for m in layers]
    for m in layers:
        m.base_layer.weight.requires_grad_(True)
    was_disabled = [m.disabled for m in layers]
    n = 0
    try:
        for m in layers:
            m.disabled = True  # the gradient of the base model, as full fine-tuning would take its first step
        for batch in batches:
            size = len(batch[next(iter(batch))]) if isinstance(batch, dict) else len(batch[0])
            model.zero_grad(set_to_none=True)
            (loss_fn(model, batch) / size).backward()
            for s, m in zip(sums, layers, strict=True):
                s += m.base_layer.weight.grad.detach().reshape(s.shape).float()
            n += 1
    finally:
        for m, d in zip(layers, was_disabled, strict=True):
            m.disabled = d
            m.base_layer.weight.requires_grad_(False)
            m.base_layer.weight.grad = None
    if n == 0:
        raise ValueError("lora_sb_init: no batches")
    for s, m in zip(sums, layers, strict=True):
        m.deltas[m.active].initialise(-lr * torch.sign(s))
    return n


class LoraSbInit(pl.Callback):
    """Runs :func:`lora_sb_init` on the first ``batches`` training batches when training starts (once: a resumed
    fit finds its adapters initialised), with the optimiser's LR and the module's ``compute_loss(batch)`` (else
    its ``training_step``): the ``callback`` capability of the ``lorasb`` entry, so every pipeline does it."""

    def __init__(self, batches: int = 8) -> None:
        self.batches = batches

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        deltas = [m for m in pl_module.modules() if isinstance(m, LoraSbDelta)]
        if not deltas or all(bool(d.initialised) for d in deltas):
            return
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        data = (trainer.strategy.batch_to_device(b) for b in islice(iter(trainer.train_dataloader), self.batches))
        if hasattr(pl_module, "compute_loss"):

            def loss(m: nn.Module, b: Any) -> torch.Tensor:
                return pl_module.compute_loss(b)[0]
        else:

            def loss(m: nn.Module, b: Any) -> torch.Tensor:
                return pl_module.training_step(b, 0)

        n = lora_sb_init(pl_module, data, loss, lr)
        pl_module.print(f"LoRA-SB: {len(deltas)} adapters initialised from {n} batches (lr {lr:g})")


register("lorasb", LoraSbConfig, LoraSbDelta, conv=True, identity_at_init=True, callback=LoraSbInit)

__all__ = ["LoraSbConfig", "LoraSbDelta", "LoraSbInit", "lora_sb_init"]
