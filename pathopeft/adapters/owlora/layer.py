"""OWLoRA — Orthogonal Weighted LoRA, CoMEL's rehearsal-free continual adapter, as the official code builds it.

Lee et al., "Continual Multiple Instance Learning with Enhanced Localization for Histopathological Whole
Slide Image Analysis" (CoMEL, ICCV 2025); official code github Hyun1A/CoMEL @ 9fd6679 (read, not copied):
``continual/modules/cl_modules/lora.py`` (``LoRAWeightedLinearLayer`` L66–124, ``LoRACompatibleIncrementalLinear``
L356–382), ``cdatmil_owlora.py`` (wrapping L281–311, ``expand_lora`` L315–328, ``save_initial_basis``
L332–361) and ``continual/main/continual_instance/cdatmil_ppl_owlora_trainer.py`` (optimizer L85–95,
projection L285–313, penalty L369–388, ``after_task`` L393–398). Parity: ``tests/adapters/fixtures/
owlora_official.npz``.

* At creation (officially after task 0) each adapted weight is replaced by its SVD truncation: the fewest
  singular values whose energy exceeds ``truncate_energy`` (0.99), at least one (:func:`truncation_rank`).
* One LoRA per task: ``ΔW = Σ_t B_t · diag(s_t) · A_t`` (``y = base(x) + B_t(s_t ⊙ A_t x)``), A_t ~ N(0, 1/r²),
  B_t = 0, s_t = 1 (**per-rank** scales: the "weighted"), rank 16, 48 on ``qkv`` (:meth:`OwloraConfig.for_layer`);
  :func:`next_task` freezes the current one and opens the next; earlier tasks' factors never change.
* :func:`project_gradients`, after every backward: ∇A_t ← ∇A_t − Σ_{k<t} ∇A_t A_kᵀA_k and
  ∇B_t ← ∇B_t − Σ_{k<t} B_kB_kᵀ ∇B_t (true projections once the earlier factors are orthonormal, which
  :func:`orthonormality_penalty` ``Σ_layers (‖A_tA_tᵀ − I‖² + ‖B_tᵀB_t − I‖²) / r²`` drives them to).
* What differs, on purpose: the official ``save_initial_basis`` appends a random LoRA (its A at the random
  init, never set from the SVD) that forward skips but the projection uses, so task 1's A-gradient is
  "projected" against noise; here there is no such layer: task 1 is unprojected and every later task is
  projected against the real earlier tasks' factors only. ``protect_inputs`` (off by default) is pathopeft's
  InfLoRA/GPM-style addition: A_t acts as A_t(I − Q_tQ_tᵀ) with Q_t the earlier tasks' principal input
  directions (:func:`collect_inputs` before :func:`next_task`).

Under Adam the projected gradient does not give an exactly orthogonal update, and A_t starts random, so the
official orthogonality is approximate; :func:`max_overlap` measures it. Task-incremental inference may restrict
the sum to some tasks (:func:`set_active_tasks`); class-incremental inference uses all of them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.adapters.core import Delta, base_forward_with_weight, weight_2d
from pathopeft.adapters.owlora.config import OwloraConfig


def truncation_rank(s: torch.Tensor, energy: float) -> int:
    """The official rank rule (``save_initial_basis`` L343–350): the first d in 0..len−1 with the energy of
    the top d singular values above ``energy`` (else len − 1), at least 1."""
    total = (s**2).sum()
    d = 0
    for d in range(len(s)):
        if (s[:d] ** 2).sum() / total > energy:
            break
    return max(d, 1)


@torch.no_grad()
def truncate_weight(base: nn.Module, energy: float) -> int:
    """Replace ``base``'s weight by its SVD truncation to ``energy``; returns the kept rank."""
    w = weight_2d(base)
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    k = truncation_rank(s, energy)
    base.weight.copy_(((u[:, :k] * s[:k]) @ vh[:k]).to(w.dtype).view_as(base.weight))
    return k


class OwloraDelta(Delta):
    def __init__(self, base: nn.Module, config: OwloraConfig) -> None:
        super().__init__(base, config)
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.s = nn.ParameterList()
        self.active_tasks: list[int] | None = None  # None = all (class-incremental)
        self._input_cov: torch.Tensor | None = None
        self._n_inputs = 0
        if config.truncate_energy is not None:
            self.register_buffer("kept_rank", torch.tensor(truncate_weight(base, config.truncate_energy)))
        self.add_task(torch.zeros(self.in_features, 0))

    @property
    def n_tasks(self) -> int:
        return len(self.A)

    def add_task(self, protected: torch.Tensor) -> None:
        """Freeze the current task and open a new LoRA (A ~ N(0, 1/r²), B = 0, s = 1), optionally restricted to
        the complement of ``protected`` (``protect_inputs``)."""
        for p in (*self.A, *self.B, *self.s):
            p.requires_grad_(False)
        dev = self.A[0].device if len(self.A) else None
        r = self.config.r
        self.A.append(nn.Parameter(torch.randn(r, self.in_features, device=dev) / r))
        self.B.append(nn.Parameter(torch.zeros(self.out_features, r, device=dev)))
        self.s.append(nn.Parameter(torch.ones(r, device=dev), requires_grad=self.config.weighted))
        self.register_buffer(f"Q{len(self.A) - 1}", protected.to(self.A[-1]))  # saved in the adapter file

    def requires_grad_(self, requires_grad: bool = True) -> OwloraDelta:
        """Only the current task can train; earlier tasks' adapters stay frozen whatever the caller asks."""
        for p in (*self.A[:-1], *self.B[:-1], *self.s[:-1]):
            p.requires_grad_(False)
        for p in (self.A[-1], self.B[-1]):
            p.requires_grad_(requires_grad)
        self.s[-1].requires_grad_(requires_grad and self.config.weighted)
        return self

    def before_load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Grow to the saved number of tasks, with the saved protected bases, before values are copied."""
        n = len({k.split(".")[1] for k in tensors if k.startswith("A.")})
        while self.n_tasks < n:
            self.add_task(tensors[f"Q{self.n_tasks}"])
        for t in range(n):
            if self._q(t).shape != tensors[f"Q{t}"].shape:
                self.register_buffer(f"Q{t}", tensors[f"Q{t}"].to(self.A[0]))

    def _q(self, t: int) -> torch.Tensor:
        return getattr(self, f"Q{t}")

    def projected_A(self, t: int) -> torch.Tensor:
        a, q = self.A[t], self._q(t)
        return a - (a @ q) @ q.T if q.numel() else a

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        tasks = list(range(self.n_tasks) if self.active_tasks is None else self.active_tasks)
        if not tasks:  # no adapter selected (task-incremental inference of the base model's task)
            a = self.A[0]
            return a.new_zeros(self.out_features, 0), a.new_zeros(0, self.in_features)
        scale = self.config.scaling
        p = torch.cat([self.B[t] * (self.s[t] * scale) for t in tasks], dim=1)
        q = torch.cat([self.projected_A(t) for t in tasks], dim=0)
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

    # --- CoMEL's orthogonality: projection and penalty of the current task's factors -------------------------
    @torch.no_grad()
    def project_gradients(self) -> None:
        """Trainer L285–313: both factors' gradients minus their components along every earlier task's."""
        if self.config.projection == "none" or self.n_tasks < 2:
            return
        a, b = self.A[-1], self.B[-1]
        if a.grad is not None:
            a.grad -= sum(a.grad @ (ak.T @ ak) for ak in self.A[:-1])
        if b.grad is not None:
            b.grad -= sum((bk @ bk.T) @ b.grad for bk in self.B[:-1])

    def orthonormality_penalty(self) -> torch.Tensor:
        """Trainer L369–388: (‖AAᵀ − I‖² + ‖BᵀB − I‖²) / r² of the current task's factors."""
        a, b = self.A[-1], self.B[-1]
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        return (((a @ a.T - eye) ** 2).sum() + ((b.T @ b - eye) ** 2).sum()) / a.shape[0] ** 2

    # --- pathopeft's input protection (protect_inputs) between tasks ----------------------------------------
    def start_collecting(self) -> None:
        self._input_cov = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        self._n_inputs = 0

    @torch.no_grad()
    def _accumulate(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double().cpu()
        self._input_cov += flat.T @ flat
        self._n_inputs += flat.shape[0]

    @torch.no_grad()
    def protected_basis(self) -> torch.Tensor:
        """Orthonormal basis (in × k) of the earlier tasks' principal input directions (``protect_inputs``),
        together with those already protected; empty without ``protect_inputs``."""
        cfg: OwloraConfig = self.config
        cov, self._input_cov = self._input_cov, None
        if not cfg.protect_inputs:
            return torch.zeros(self.in_features, 0)
        cols = [self._q(self.n_tasks - 1).cpu().double()]
        if cov is not None and self._n_inputs:
            evals, evecs = torch.linalg.eigh(cov)
            evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
            frac = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-12)
            k = int(torch.searchsorted(frac, torch.tensor(cfg.energy, dtype=frac.dtype)).item()) + 1
            cols.append(evecs[:, : min(k, int(cfg.max_protected * self.in_features))])
        m = torch.cat(cols, dim=1)
        if m.shape[1] == 0:
            return m.float()
        u, s, _ = torch.linalg.svd(m, full_matrices=False)
        return u[:, s > s.max() * 1e-6].float()

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: OwloraConfig) -> int:
        return config.r * (in_features + out_features) + (config.r if config.weighted else 0)


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
    """Freeze the current task's adapters and open the next task's (official ``expand_lora``)."""
    for d in owlora_deltas(model):
        d.add_task(d.protected_basis())


def protect_current(model: nn.Module) -> None:
    """``protect_inputs`` only: restrict the *current* task's adapters to the complement of the inputs
    collected so far (once, before the first adapter task, when the earlier task trained the base itself)."""
    for d in owlora_deltas(model):
        d.register_buffer(f"Q{d.n_tasks - 1}", d.protected_basis().to(d.A[-1]))


def project_gradients(model: nn.Module) -> None:
    """CoMEL's gradient projection on every OWLoRA layer (call after ``backward``, before the step)."""
    for d in owlora_deltas(model):
        d.project_gradients()


def orthonormality_penalty(model: nn.Module) -> torch.Tensor:
    """CoMEL's penalty summed over the OWLoRA layers (add ``ortho_weight`` times it to the loss)."""
    return torch.stack([d.orthonormality_penalty() for d in owlora_deltas(model)]).sum()


def set_active_tasks(model: nn.Module, tasks: list[int] | None) -> None:
    """Task-incremental inference: only ``tasks``' adapters; ``None``: all (class-incremental)."""
    for d in owlora_deltas(model):
        d.active_tasks = tasks


@torch.no_grad()
def max_overlap(model: nn.Module) -> float:
    """Largest |cos| between a row of the current task's A (a column of its B) and any earlier task's
    (0 = orthogonal on both sides)."""
    worst = 0.0
    for d in owlora_deltas(model):
        t = d.n_tasks - 1
        for cur, old in (
            (d.projected_A(t), [d.projected_A(k) for k in range(t)]),
            (d.B[t].T, [d.B[k].T for k in range(t)]),
        ):
            if cur.abs().max() == 0:
                continue
            cur = F.normalize(cur, dim=1)
            for o in old:
                if o.abs().max() > 0:
                    worst = max(worst, float((cur @ F.normalize(o, dim=1).T).abs().max()))
    return worst
