"""Keeping extracted features usable after the encoder changes: an affine map between feature spaces with a
λ-weighted orthogonality penalty.

Why: a fine-tuned encoder (an adapter merged into it) gives features in a new space; thousands of slides' old
feature files and the MIL models trained on them need not be thrown away if a map T, b takes new features to the
old space (``x_new T + b ≈ x_old``) — or back — well enough. The map is fitted on tiles both encoders saw::

    min_{T, b}  mean ‖X_new T + b − X_old‖²  +  λ ‖TᵀT − I‖²_F

λ = 0 is the least-squares fit (closed form); λ → ∞ forces T orthogonal (an isometry, so distances and the
geometry MIL attention relies on are kept), whose optimum is orthogonal Procrustes on the centred features
(closed form, :func:`procrustes`); in between the penalised problem is solved by L-BFGS from the least-squares
fit. This is the objective issue 17 names after λ-orthogonality (miccunifi/lambda_orthogonality); that code and
the paper's method section were not reachable here, so whether the paper weights, thresholds or squares the
term differently is not checked — results are of this objective.
"""

from __future__ import annotations

import torch


def least_squares(new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """λ = 0: (T, b) minimising ‖new T + b − old‖² (float64 internally)."""
    x = torch.cat([new.double(), torch.ones(len(new), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(x, old.double(), driver="gelsd").solution
    return sol[:-1].float(), sol[-1].float()


def procrustes(new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """λ → ∞: the orthogonal T (and b) closest to mapping ``new`` onto ``old`` (equal dimensions)."""
    if new.shape[1] != old.shape[1]:
        raise ValueError(f"an orthogonal map needs equal dimensions, got {new.shape[1]} and {old.shape[1]}")
    mn, mo = new.double().mean(0), old.double().mean(0)
    u, _, vh = torch.linalg.svd((new.double() - mn).T @ (old.double() - mo))
    t = u @ vh
    return t.float(), (mo - mn @ t).float()


def fit_feature_map(
    new: torch.Tensor, old: torch.Tensor, lam: float, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, b) minimising mean ‖new T + b − old‖² + λ‖TᵀT − I‖²_F (see the module)."""
    t0, b0 = least_squares(new, old)
    if lam == 0:
        return t0, b0
    if new.shape[1] != old.shape[1]:
        raise ValueError(f"the orthogonality term needs equal dimensions, got {new.shape[1]} and {old.shape[1]}")
    x, y = new.double(), old.double()
    t = t0.double().contiguous().clone().requires_grad_(True)
    b = b0.double().clone().requires_grad_(True)
    eye = torch.eye(t.shape[1], dtype=torch.float64)
    opt = torch.optim.LBFGS([t, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-14)  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (x @ t + b - y).pow(2).sum(1).mean() + lam * (t.T @ t - eye).pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return t.detach().float(), b.detach().float()


def orthogonality_error(t: torch.Tensor) -> float:
    """‖TᵀT − I‖_F."""
    return float(torch.linalg.norm(t.T @ t - torch.eye(t.shape[1], dtype=t.dtype)))


__all__ = ["fit_feature_map", "least_squares", "orthogonality_error", "procrustes"]
