"""Orthogonal Adaptation — per-task LoRAs with frozen, mutually orthogonal down-projections, merged by summing.

Po et al., "Orthogonal Adaptation for Modular Customization of Diffusion Models" (CVPR 2024, arXiv 2312.02432,
§3.4–3.5). Task i's update is ΔWᵢ = Bᵢ Aᵢ (PEFT's naming: A the r×in down-projection, B the out×r
up-projection) with Aᵢ **frozen**: r rows of one shared orthogonal matrix O (in×in, one per input size, rebuilt
from a seed), and only Bᵢ trained (B zero at init). Because AᵢAⱼᵀ = 0, task j's adapter is blind to inputs in
task i's subspace (the paper's crosstalk AⱼᵀBⱼ Xᵢ vanishes there), so independently trained adapters can be
merged by summation, θ + Σᵢ λᵢ ΔWᵢ (the paper uses λ = 0.6 for every concept; :func:`merge_tasks`).

Chosen here: task i takes the *disjoint* block of rows [i·r, (i+1)·r) of O, which makes AᵢAⱼᵀ = 0 exact (the paper
samples r random columns per concept, where overlaps are unlikely but possible; ``rows="random"`` does that);
O is the Q of a QR factorisation of a seeded Gaussian (the paper does not say how it draws O). No α/r scale.
Conv2d layers: O spans the in·kh·kw input of the unfolded kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pathopeft.adapters.core import AdaptedLayer, AdapterConfig, Delta, register


@dataclass
class OrthoAdaptConfig(AdapterConfig):
    """Orthogonal Adaptation: a frozen block of a shared orthogonal basis as A (task ``task``), only B trained."""

    adapter_type: ClassVar[str] = "orthoadapt"
    r: int = 8
    task: int = 0
    seed: int = 0
    rows: str = "block"  # "block": rows [task·r, (task+1)·r) of O (exactly orthogonal); "random": r random rows

    def __post_init__(self) -> None:
        if self.rows not in ("block", "random"):
            raise ValueError(f"orthoadapt rows must be 'block' or 'random', not {self.rows!r}")


@functools.lru_cache(maxsize=32)
def shared_basis(size: int, seed: int) -> torch.Tensor:
    """The shared orthogonal matrix O (size × size) of one input size: every task's A is a set of its rows."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + size)
    q, r = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # signs fixed: a unique Q for the seed


def task_rows(size: int, r: int, task: int, seed: int, rows: str = "block") -> torch.Tensor:
    """Indices of O's rows that task ``task`` uses as its frozen A."""
    if rows == "random":
        g = torch.Generator().manual_seed(seed * 7919 + task * 104729 + size)
        return torch.randperm(size, generator=g)[:r]
    if (task + 1) * r > size:
        raise ValueError(f"orthoadapt: task {task} at rank {r} needs {(task + 1) * r} orthogonal directions, "
                         f"a layer with input size {size} has {size}")  # fmt: skip
    return torch.arange(task * r, (task + 1) * r)


class OrthoAdaptDelta(Delta):
    def __init__(self, base: nn.Module, config: OrthoAdaptConfig) -> None:
        super().__init__(base, config)
        idx = task_rows(self.in_features, config.r, config.task, config.seed, config.rows)
        self.register_buffer("A", shared_basis(self.in_features, config.seed)[idx].clone(), persistent=False)
        self.B = nn.Parameter(torch.zeros(self.out_features, config.r))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.B @ self.A.to(self.B.dtype)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: OrthoAdaptConfig) -> int:
        return out_features * config.r


@torch.no_grad()
def merge_tasks(model: nn.Module, names: Sequence[str], weights: Sequence[float] | float = 1.0) -> nn.Module:
    """θ + Σᵢ λᵢ ΔWᵢ over the named adapters of an :class:`~pathopeft.adapters.core.AdapterModel`: the plain base
    model with the weighted sum folded into its weights (``weights`` one λ for all, or one per name)."""
    lams = [float(weights)] * len(names) if isinstance(weights, (int, float)) else [float(w) for w in weights]
    if len(lams) != len(names):
        raise ValueError(f"merge_tasks: {len(names)} adapters but {len(lams)} weights")
    for layer in model.modules():
        if not isinstance(layer, AdaptedLayer):
            continue
        w = layer.base_layer.weight
        for name, lam in zip(names, lams, strict=True):
            if name in layer.deltas:
                w.add_(lam * layer.deltas[name].delta_weight(layer.base_layer).to(w.dtype).view_as(w))
        layer.deltas.clear()
        layer.active = None
    return model.unload() if hasattr(model, "unload") else model


@dataclass
class OrthoAdaptTasksConfig(AdapterConfig):
    """Orthogonal Adaptation for a stream of ``tasks`` tasks in one adapter: task t's frozen A is block t of O,
    one B per task; the forward sums the active tasks' B_t A_t (all of them: the merged model)."""

    adapter_type: ClassVar[str] = "orthoadapt-tasks"
    r: int = 8
    tasks: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.tasks < 1:
            raise ValueError(f"orthoadapt-tasks needs at least one task, got {self.tasks}")


class OrthoAdaptTasksDelta(Delta):
    """Every task's adapter of :class:`OrthoAdaptDelta` in one layer, so a continual run can train one task's B
    alone (``training_task``) on the base and evaluate the sum (``active_tasks = None``): Σ_t B_t A_t, exactly
    the sum of the separately trained adapters (no extra cost once merged)."""

    def __init__(self, base: nn.Module, config: OrthoAdaptTasksConfig) -> None:
        super().__init__(base, config)
        r = config.r
        idx = task_rows(self.in_features, r, config.tasks - 1, config.seed)  # checks that every task fits
        rows = shared_basis(self.in_features, config.seed)[: int(idx[-1]) + 1]
        self.register_buffer("A", rows.reshape(config.tasks, r, -1).clone(), persistent=False)
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(self.out_features, r)) for _ in range(config.tasks)])
        self.active_tasks: list[int] | None = None

    def training_task(self, t: int) -> None:
        """Train task ``t``'s B alone, with only its adapter in the forward (the paper's independent training)."""
        for k, b in enumerate(self.B):
            b.requires_grad_(k == t)
        self.active_tasks = [t]

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        tasks = range(len(self.B)) if self.active_tasks is None else self.active_tasks
        out = self.B[0].new_zeros(self.out_features, self.in_features)
        for t in tasks:
            out = out + self.B[t] @ self.A[t].to(self.B[t].dtype)
        return out

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: OrthoAdaptTasksConfig) -> int:
        return config.tasks * out_features * config.r


def task_deltas(model: nn.Module) -> list[OrthoAdaptTasksDelta]:
    return [m for m in model.modules() if isinstance(m, OrthoAdaptTasksDelta)]


register("orthoadapt", OrthoAdaptConfig, OrthoAdaptDelta, conv=True, identity_at_init=True)
register("orthoadapt-tasks", OrthoAdaptTasksConfig, OrthoAdaptTasksDelta, conv=True, identity_at_init=True)

__all__ = [
    "OrthoAdaptConfig",
    "OrthoAdaptDelta",
    "OrthoAdaptTasksConfig",
    "OrthoAdaptTasksDelta",
    "merge_tasks",
    "shared_basis",
    "task_deltas",
    "task_rows",
]
