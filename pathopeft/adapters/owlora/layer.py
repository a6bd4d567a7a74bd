"""OWLoRA — Orthogonal Weighted LoRA, CoMEL's rehearsal-free continual adapter.

Lee et al., "Continual Multiple Instance Learning with Enhanced Localization for Histopathological Whole
Slide Image Analysis" (CoMEL), arXiv 2507.02395, 2025. Only the abstract is public: OWLoRA keeps each task's
low-rank adapter orthogonal to the earlier tasks' (in the spirit of O-LoRA, Wang et al. 2023, and InfLoRA,
Liang & Li 2024) and weights the tasks. The exact form is ours (assumptions, all in config):

    ΔW = (α/r) · Σ_{s ≤ t} w_s · B_s · Ã_s,        Ã_s = A_s (I − Q_s Q_sᵀ)

* one pair (A_s: r×in Kaiming, B_s: out×r zero) and one weight w_s (init 1) per task s; only the current
  task's A, B, w train, earlier tasks' are frozen (they never change again);
* Q_s (in×k, orthonormal) spans what task s must not touch: the row spaces of all earlier adapters
  (O-LoRA's constraint, here exact instead of a penalty) and, with ``protect_inputs``, the principal
  directions of the layer's inputs on earlier tasks' data (InfLoRA/GPM: then ΔW_s x ≈ 0 on old inputs, so
  the old tasks' outputs of this layer stay as they were) — :func:`collect_inputs` /
  :func:`next_task` gather them between tasks;
* orthogonality therefore holds by construction (``Ã_s Ã_{s'}ᵀ = 0`` for s' < s) and is measured in tests.

For task-incremental inference one can restrict the sum to one task (``active_tasks``); class-incremental
inference uses all of them (no task id needed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.adapters.core import Delta, base_forward_with_weight
from pathopeft.adapters.owlora.config import OwloraConfig


class OwloraDelta(Delta):
    def __init__(self, base: nn.Module, config: OwloraConfig) -> None:
        super().__init__(base, config)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.w = nn.ParameterList()
        self.active_tasks: list[int] | None = None  # None = all (class-incremental)
        self._input_cov: torch.Tensor | None = None
        self._n_inputs = 0
        self.add_task(torch.zeros(self.in_features, 0))

    @property
    def n_tasks(self) -> int:
        return len(self.A)

    def add_task(self, protected: torch.Tensor) -> None:
        """Freeze the current task and start a new one restricted to the complement of ``protected``."""
        for p in (*self.A, *self.B, *self.w):
            p.requires_grad_(False)
        dev = self.A[0].device if len(self.A) else None
        a = torch.empty(self.config.r, self.in_features, device=dev)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.A.append(nn.Parameter(a))
        self.B.append(nn.Parameter(torch.zeros(self.out_features, self.config.r, device=dev)))
        self.w.append(nn.Parameter(torch.ones((), device=dev), requires_grad=self.config.weighted))
        self.register_buffer(f"Q{len(self.A) - 1}", protected.to(a))  # saved in the adapter file

    def requires_grad_(self, requires_grad: bool = True) -> OwloraDelta:
        """Only the current task can train; earlier tasks' adapters stay frozen whatever the caller asks."""
        for p in (*self.A[:-1], *self.B[:-1], *self.w[:-1]):
            p.requires_grad_(False)
        for p in (self.A[-1], self.B[-1]):
            p.requires_grad_(requires_grad)
        self.w[-1].requires_grad_(requires_grad and self.config.weighted)
        return self

    def before_load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Grow to the saved number of tasks, with the saved protected bases, before values are copied."""
        n = len({k.split(".")[1] for k in tensors if k.startswith("A.")})
        while self.n_tasks < n:
            self.add_task(tensors[f"Q{self.n_tasks}"])
        for s in range(n):
            if self._q(s).shape != tensors[f"Q{s}"].shape:
                self.register_buffer(f"Q{s}", tensors[f"Q{s}"].to(self.A[0]))

    def _q(self, s: int) -> torch.Tensor:
        return getattr(self, f"Q{s}")

    def projected_A(self, s: int) -> torch.Tensor:
        a, q = self.A[s], self._q(s)
        return a - (a @ q) @ q.T if q.numel() else a

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        tasks = list(range(self.n_tasks) if self.active_tasks is None else self.active_tasks)
        if not tasks:  # no adapter selected (task-incremental inference of the base model's task)
            a = self.A[0]
            return a.new_zeros(self.out_features, 0), a.new_zeros(0, self.in_features)
        scale = self.config.scaling
        p = torch.cat([self.B[s] * (self.w[s] * scale) for s in tasks], dim=1)
        q = torch.cat([self.projected_A(s) for s in tasks], dim=0)
        return p, q

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        p, q = self.factors()
        return p @ q

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        if self._input_cov is not None:
            self._accumulate(x)
        if isinstance(base, nn.Linear):
            p, q = self.factors()
            return base(x) + F.linear(F.linear(x.to(q.dtype), q), p).to(x.dtype)
        return base_forward_with_weight(base, x, base.weight + self.delta_weight(base).view_as(base.weight))

    # --- subspace bookkeeping between tasks ------------------------------------------------------------------
    def start_collecting(self) -> None:
        self._input_cov = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        self._n_inputs = 0

    @torch.no_grad()
    def _accumulate(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        self._input_cov += flat.T @ flat
        self._n_inputs += flat.shape[0]

    @torch.no_grad()
    def protected_basis(self, include_current: bool = True) -> torch.Tensor:
        """Orthonormal basis (in × k) of the adapters' row spaces plus, if collected, the old input subspace.

        Empty when ``orthogonal=False`` (plain LoRA per task)."""
        cfg: OwloraConfig = self.config
        if not cfg.orthogonal:
            self._input_cov = None
            return torch.zeros(self.in_features, 0)
        last = self.n_tasks if include_current else self.n_tasks - 1
        cols = [self.projected_A(s).detach().T for s in range(last)]
        cols.append(self._q(self.n_tasks - 1))
        if self._input_cov is not None and cfg.protect_inputs and self._n_inputs:
            evals, evecs = torch.linalg.eigh(self._input_cov)
            evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
            frac = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-12)
            k = int(torch.searchsorted(frac, torch.tensor(cfg.energy, dtype=frac.dtype)).item()) + 1
            k = min(k, int(cfg.max_protected * self.in_features))
            cols.append(evecs[:, :k].to(cols[0]))
        self._input_cov = None
        m = torch.cat(cols, dim=1).double()
        if m.shape[1] == 0:
            return m.float()
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        keep = s > s.max() * 1e-6
        return u[:, keep].float()

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: OwloraConfig) -> int:
        return config.r * (in_features + out_features) + 1


def owlora_deltas(model: nn.Module) -> list[OwloraDelta]:
    return [m for m in model.modules() if isinstance(m, OwloraDelta)]


@torch.no_grad()
def collect_inputs(model: nn.Module, batches: Iterable, forward) -> None:
    """Run ``forward(batch)`` over ``batches`` recording every OWLoRA layer's input covariance."""
    deltas = owlora_deltas(model)
    for d in deltas:
        d.start_collecting()
    for b in batches:
        forward(b)


def next_task(model: nn.Module) -> None:
    """Freeze the current task's adapters and open the next task in the protected complement."""
    for d in owlora_deltas(model):
        d.add_task(d.protected_basis())


def protect_current(model: nn.Module) -> None:
    """Restrict the *current* task's adapters to the complement of the inputs collected so far.

    Used once before the first adapter task, when the earlier task trained the base model itself."""
    for d in owlora_deltas(model):
        q = d.protected_basis(include_current=False)
        d.register_buffer(f"Q{d.n_tasks - 1}", q.to(d.A[-1]))


def set_active_tasks(model: nn.Module, tasks: list[int] | None) -> None:
    """Task-incremental inference: only ``tasks``' adapters; ``None``: all (class-incremental)."""
    for d in owlora_deltas(model):
        d.active_tasks = tasks


@torch.no_grad()
def max_overlap(model: nn.Module) -> float:
    """Largest |cos| between rows of the current task's Ã and any earlier task's Ã (0 = orthogonal)."""
    worst = 0.0
    for d in owlora_deltas(model):
        t = d.n_tasks - 1
        cur = F.normalize(d.projected_A(t), dim=1)
        for s in range(t):
            old = d.projected_A(s)
            if old.abs().max() == 0:
                continue
            worst = max(worst, float((cur @ F.normalize(old, dim=1).T).abs().max()))
    return worst
