"""LoRA-Pro — LoRA trained so that its equivalent full-weight step follows full fine-tuning's Adam step.

Wang et al., "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?" (arXiv 2407.18242; code mrflogs/LoRA-Pro @
fe26027, inside its patched DeepSpeed ZeRO optimiser ``stage_1_and_2.py``: ``lorapro_full_adjustment``, ``step``
and ``solve_sylvester``). With W = W₀ + s·B A (PEFT's LoRA), a LoRA step (g_A, g_B) moves W by
s(B g_A + g_B A). Given the full gradient G, only seen through g_A^raw = s BᵀG and g_B^raw = s G Aᵀ, the
adjusted gradients

    g_A = (1/s²)(BᵀB)⁻¹ g_A^raw + X A,
    g_B = (1/s²)(I − B(BᵀB)⁻¹Bᵀ) g_B^raw (AAᵀ)⁻¹ − B X,      (BᵀB) X + X (AAᵀ) = −(1/s²)(BᵀB)⁻¹ g_A^raw Aᵀ

make s(B g_A + g_B A) the orthogonal projection of G onto {B X + Y A}, the closest any LoRA step can come to G
(X does not change it; the Sylvester X makes (g_A, g_B) the minimum-norm solution). The optimiser keeps Adam
moments of that m×n equivalent gradient per layer (as the code: 2·m·n floats per adapted layer), turns them into
Adam's full-weight direction, pulls it back to pseudo-gradients s Bᵀ(·), s(·)Aᵀ, projects those again and
takes a plain step on A and B (the code's outer optimiser is SGD). The other trainable parameters (decoder,
norms) get ordinary AdamW.

Chosen where the code has quirks: the bias correction starts at step 1 (the code's first step is corrected as
step 2), the second moment stays in float32 (the code casts to bf16), s is the layer's own scale (the code
hard-codes 2), (BᵀB)⁻¹ and (AAᵀ)⁻¹ are pinv of the matrix + 1e-8·I as in the code, the Sylvester equation is
solved through the eigendecompositions of the two symmetric r×r matrices (the code uses the general eig), and
weight decay is decoupled (the code uses none: the default 0). Conv2d LoRA (A: r×in×kh×kw, B: out×r×1×1) is
handled on the out × in·kh·kw view.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pathopeft.optim import adam_direction

DAMPING = 1e-8  # added to BᵀB and AAᵀ before the pseudo-inverse, as the code


def _inverses(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    BtB, AAt = B.T @ B, A @ A.T
    return BtB, AAt, torch.linalg.pinv(BtB + DAMPING * eye), torch.linalg.pinv(AAt + DAMPING * eye)


def solve_sylvester_sym(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with P X + X Q = C for symmetric P, Q (both PSD here), through their eigendecompositions."""
    p, U = torch.linalg.eigh(P)
    q, V = torch.linalg.eigh(Q)
    denom = p[:, None] + q[None, :]
    ok = denom.abs() > 1e-12  # both eigenvalues zero (B = 0 and a rank-deficient A): that direction stays 0
    core = torch.where(ok, (U.T @ C @ V) / torch.where(ok, denom, 1.0), 0.0)
    return U @ core @ V.T


def project(
    A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's adjusted (g_A, g_B) from LoRA gradients (A: r×n, B: m×r, grad_A = s BᵀG, grad_B = s G Aᵀ):
    s(B g_A + g_B A) is the least-squares projection of G onto {B X + Y A}; the Sylvester X gives the
    minimum-norm pair."""
    BtB, AAt, BtB_inv, AAt_inv = _inverses(A, B)
    s2 = scale * scale
    gA = BtB_inv @ grad_A / s2
    gB = (grad_B - B @ (BtB_inv @ (B.T @ grad_B))) @ AAt_inv / s2
    X = solve_sylvester_sym(BtB, AAt, -(BtB_inv @ grad_A @ A.T) / s2)
    return gA + X @ A, gB - B @ X


def equivalent_gradient(A: torch.Tensor, B: torch.Tensor, gA: torch.Tensor, gB: torch.Tensor, scale: float):
    """The full-weight change s(B g_A + g_B A) that a LoRA step (g_A, g_B) makes (per unit learning rate)."""
    return scale * (B @ gA + gB @ A)


class LoraProAdamW(torch.optim.Optimizer):
    """LoRA-Pro for every (A, B, scale) of ``pairs``; AdamW for the ``others``. One LR for both, as the code."""

    def __init__(
        self,
        pairs: list[tuple[nn.Parameter, nn.Parameter, float]],
        others: Iterable[nn.Parameter] = (),
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        groups: list[dict[str, Any]] = []
        if pairs:
            groups.append({"params": [p for a, b, _ in pairs for p in (a, b)], "scales": [s for _, _, s in pairs],
                           "lorapro": True})  # fmt: skip
        others = [p for p in others if p.requires_grad]
        if others:
            groups.append({"params": others, "lorapro": False})
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["lorapro"]:
                params = group["params"]
                for (a, b), s in zip(zip(params[0::2], params[1::2], strict=True), group["scales"], strict=True):
                    self._lorapro_step(a, b, float(s), group)
            else:
                for p in group["params"]:
                    if p.grad is not None:
                        self._adamw_step(p, p.grad, group)
        return loss

    def _adamw_step(self, p: nn.Parameter, grad: torch.Tensor, group: dict[str, Any]) -> None:
        direction = adam_direction(self.state[p], grad, group["betas"], group["eps"])
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction.to(p.dtype), alpha=-group["lr"])

    def _lorapro_step(self, a: nn.Parameter, b: nn.Parameter, s: float, group: dict[str, Any]) -> None:
        if a.grad is None or b.grad is None:
            return
        A, B = a.detach().reshape(a.shape[0], -1).float(), b.detach().reshape(b.shape[0], -1).float()
        gA_raw, gB_raw = a.grad.reshape(A.shape).float(), b.grad.reshape(B.shape).float()
        try:
            eq = equivalent_gradient(A, B, *project(A, B, gA_raw, gB_raw, s), s)  # the full-weight gradient estimate
            direction = adam_direction(self.state[a], eq, group["betas"], group["eps"])  # on the m×n gradient
            gA, gB = project(A, B, s * B.T @ direction, s * direction @ A.T, s)
        except torch.linalg.LinAlgError as err:  # pinv's SVD meets NaN/inf once training has diverged
            if torch.isfinite(A).all() and torch.isfinite(B).all() and torch.isfinite(a.grad).all():
                raise
            raise FloatingPointError(
                f"LoRA-Pro: non-finite LoRA weights or gradients ({tuple(b.shape[:2])} × {tuple(a.shape[:2])} layer) "
                "— training diverged; lower the learning rate"
            ) from err
        for p, g in ((a, gA), (b, gB)):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(g.reshape(p.shape).to(p.dtype), alpha=-group["lr"])


def lora_pairs(model: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter, float]]:
    """(A, B, scale) of every active, trainable PEFT LoRA layer of ``model`` (Linear and Conv2d)."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for m in model.modules():
        if isinstance(m, LoraLayer):
            for name in m.active_adapters:
                if name in m.lora_A and m.lora_A[name].weight.requires_grad:
                    pairs.append((m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name])))
    return pairs


def lora_pro_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0) -> LoraProAdamW:
    """The ``optimizer`` capability of ``lorapro``: LoRA-Pro on the model's LoRA pairs, AdamW (no decay on
    vectors) on its other trainable parameters."""
    pairs = lora_pairs(model)
    if not pairs:
        raise ValueError("LoRA-Pro: the model has no trainable PEFT LoRA layer")
    in_pairs = {id(p) for a, b, _ in pairs for p in (a, b)}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in in_pairs]
    opt = LoraProAdamW(pairs, [p for p in others if p.ndim >= 2], lr=lr, weight_decay=weight_decay)
    vectors = [p for p in others if p.ndim < 2]
    if vectors:
        opt.add_param_group({"params": vectors, "lorapro": False, "weight_decay": 0.0})
    return opt


__all__ = ["LoraProAdamW", "equivalent_gradient", "lora_pairs", "lora_pro_optimizer", "project",
           "solve_sylvester_sym"]  # fmt: skip
