"""Reversible Model Merging (RMM): a few basis LoRAs and per-task coefficients, from which every task's LoRA is
rebuilt on demand.

Alipour & Mohammadi Amiri, "Towards Reversible Model Merging For Low-rank Weights" (arXiv 2510.14163; no code
was found). Instead of collapsing n task LoRAs into one set of weights (which on low-rank factors loses most of
each task), RMM keeps K ≤ n basis "models" and n × K coefficients, and *reverts* to task i as the linear
combination Σₖ cᵢₖ · basisₖ. It is data-free and in closed form:

For one factor matrix of one layer (A: r × in, or B: out × r, PEFT's scale folded into B), stack the n tasks'
flattened factors as the columns of X (D × n). The K-dimensional subspace that minimises the total
reconstruction error Σᵢ ‖xᵢ − x̂ᵢ‖² is PCA's (uncentred): with XᵀX = V Λ Vᵀ (eigenvalues λ₁ ≥ … ≥ λₙ), the basis
is Φ = X V_K (K "models" of this factor) and task i's coefficients are the i-th row of V_K, so X̂ = X V_K V_Kᵀ
and the error is exactly Σ_{j>K} λⱼ. With K = n (or K ≥ rank X) every task is recovered exactly; storage is
K factor sets plus n·K numbers per factor matrix, instead of n factor sets.

Choices the paper's abstract and reviews leave open, fixed here: coefficients are per layer and per factor (A
and B each get their own, a review's "each task-vector position" read as each factor matrix), PCA is uncentred
(the task vectors are already differences from the base model), eigenvalues are those of the n × n Gram matrix
(cheap: n is the number of tasks), and every task must have the same rank on a layer (positions must align).
A reverted LoRA is an ordinary PEFT LoRA folder (``pathopeft adapters revert``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pathopeft.adapters.merging import Factors

_FILE, _META = "rmm.safetensors", "rmm.json"


@dataclass
class RMMBasis:
    """Per layer: the basis of each factor, (Φ_B: K × out × r, Φ_A: K × r × in), the coefficients (C_B, C_A:
    n × K each) and the Gram eigenvalues (λ_B, λ_A: n each, descending), plus the task names."""

    tasks: list[str]
    basis: dict[str, tuple[torch.Tensor, torch.Tensor]]
    coefficients: dict[str, tuple[torch.Tensor, torch.Tensor]]
    eigenvalues: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def k(self) -> int:
        return next(iter(self.basis.values()))[0].shape[0]


def _pca(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Φ = X V_K: D × K, V_K: n × K, all eigenvalues descending) of the uncentred PCA of X's columns."""
    x = x.double()
    lam, v = torch.linalg.eigh(x.T @ x)
    lam, v = lam.flip(0).clamp_min(0), v.flip(1)
    return x @ v[:, :k], v[:, :k], lam


def rmm_fit(loras: Sequence[Factors], k: int, tasks: Sequence[str] | None = None) -> RMMBasis:
    """RMM's basis and coefficients for the task LoRAs ``loras`` (``{layer: (B, A)}`` each) at basis size ``k``."""
    n = len(loras)
    names = list(tasks) if tasks is not None else [str(i) for i in range(n)]
    if not 1 <= k <= n:
        raise ValueError(f"RMM: basis size k must be in [1, {n}] for {n} task LoRAs, got {k}")
    if len(names) != n:
        raise ValueError(f"RMM: {n} LoRAs but {len(names)} task names")
    basis, coefs, eigs = {}, {}, {}
    for layer in loras[0]:
        per = [lora[layer] for lora in loras]
        if len({(B.shape, A.shape) for B, A in per}) != 1:
            raise ValueError(f"RMM: layer {layer!r} has different ranks or shapes across the task LoRAs")
        (b0, a0), out = per[0], []
        for j, shape in ((0, b0.shape), (1, a0.shape)):
            x = torch.stack([f[j].reshape(-1) for f in per], 1)  # D × n
            phi, v, lam = _pca(x, k)
            out.append((phi.T.reshape(k, *shape).to(b0.dtype), v.to(b0.dtype), lam))
        basis[layer] = (out[0][0], out[1][0])
        coefs[layer] = (out[0][1], out[1][1])
        eigs[layer] = (out[0][2], out[1][2])
    return RMMBasis(names, basis, coefs, eigs)


def rmm_revert(rmm: RMMBasis, task: int | str) -> Factors:
    """Task ``task``'s LoRA (index or name) rebuilt from the basis: Σₖ cᵢₖ Φₖ for B and for A of every layer."""
    i = rmm.tasks.index(task) if isinstance(task, str) and task in rmm.tasks else task
    if not isinstance(i, int) or not 0 <= i < len(rmm.tasks):
        raise ValueError(f"RMM: no task {task!r}; tasks are {rmm.tasks}")
    out: Factors = {}
    for layer, (pb, pa) in rmm.basis.items():
        cb, ca = rmm.coefficients[layer]
        out[layer] = (torch.einsum("k,k...->...", cb[i], pb), torch.einsum("k,k...->...", ca[i], pa))
    return out


def discarded_energy(rmm: RMMBasis) -> float:
    """Σ over layers and factors of the discarded eigenvalues Σ_{j>K} λⱼ = the total squared reconstruction error
    of the factors over all tasks (0 when K = n)."""
    return float(sum(lam[rmm.k :].sum() for pair in rmm.eigenvalues.values() for lam in pair))


# --- folders: ``pathopeft adapters merge --method rmm`` and ``pathopeft adapters revert`` ----------------------
def rmm_merge_dirs(dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], k: int) -> tuple[Path, dict]:
    """Fit RMM on saved PEFT LoRA folders (one base model) and write the basis folder ``out`` (``rmm.safetensors``
    + ``rmm.json``: task names = the folders' names, layouts, PEFT config, base fingerprint, energy kept);
    returns the folder and that metadata."""
    from pathopeft.adapters.merging import read_compatible_loras
    from pathopeft.adapters.serialization import AdapterLoadError, write_tensor_folder

    loaded, bases = read_compatible_loras(dirs)
    names = [Path(d).name for d in dirs]
    if len(set(names)) != len(names):
        names = [str(d) for d in dirs]
    try:
        rmm = rmm_fit([f for f, _, _ in loaded], k, names)
    except ValueError as e:
        raise AdapterLoadError(f"adapters merge --method rmm: {e}") from None
    tensors = {}
    for layer in rmm.basis:
        for j, tag in enumerate("BA"):
            tensors[f"{layer}.basis_{tag}"] = rmm.basis[layer][j].contiguous()
            tensors[f"{layer}.coef_{tag}"] = rmm.coefficients[layer][j].contiguous()
            tensors[f"{layer}.eig_{tag}"] = rmm.eigenvalues[layer][j].float().contiguous()
    total = sum(float(lam.sum()) for pair in rmm.eigenvalues.values() for lam in pair)
    meta = {"method": "rmm", "k": k, "tasks": rmm.tasks, "layers": list(rmm.basis),
            "shapes": {n: [list(s) for s in loaded[0][1][n]] for n in rmm.basis}, "peft_config": loaded[0][2],
            "base": bases[0], "energy_kept": 1.0 - discarded_energy(rmm) / total if total else 1.0}  # fmt: skip
    return write_tensor_folder(out, _FILE, tensors, _META, meta), meta


def read_rmm(directory: str | os.PathLike[str]) -> tuple[RMMBasis, dict]:
    """The basis and the metadata of an RMM folder; anything else is an AdapterLoadError naming the file."""
    from pathopeft.adapters.serialization import AdapterLoadError, read_method_folder

    d = Path(directory)
    meta, t = read_method_folder(d, _FILE, _META, "rmm", "an RMM basis")
    try:
        parts = {
            n: [(t[f"{n}.basis_{x}"], t[f"{n}.coef_{x}"], t[f"{n}.eig_{x}"]) for x in "BA"] for n in meta["layers"]
        }
    except KeyError as e:
        raise AdapterLoadError(f"{d / _FILE}: missing tensor {e.args[0]}") from None
    rmm = RMMBasis(
        list(meta["tasks"]),
        {n: (p[0][0], p[1][0]) for n, p in parts.items()},
        {n: (p[0][1], p[1][1]) for n, p in parts.items()},
        {n: (p[0][2], p[1][2]) for n, p in parts.items()},
    )
    return rmm, meta


def revert_dir(directory: str | os.PathLike[str], task: str, out: str | os.PathLike[str]) -> Path:
    """Write task ``task``'s reverted LoRA (a name of the RMM folder's tasks, or its index) as a PEFT LoRA folder."""
    from pathopeft.adapters.merging import write_peft_lora
    from pathopeft.adapters.serialization import AdapterLoadError

    rmm, meta = read_rmm(directory)
    key: int | str = int(task) if task not in rmm.tasks and task.isdigit() else task
    try:
        factors = rmm_revert(rmm, key)
    except ValueError as e:
        raise AdapterLoadError(f"{Path(directory) / _META}: {e}") from None
    shapes = {n: (tuple(a), tuple(b)) for n, (a, b) in meta["shapes"].items()}
    return write_peft_lora(out, factors, shapes, meta["peft_config"], meta.get("base"))


__all__ = ["RMMBasis", "discarded_energy", "read_rmm", "revert_dir", "rmm_fit", "rmm_merge_dirs", "rmm_revert"]
