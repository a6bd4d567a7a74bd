"""DCT-AdamW (issue 16): the projector's defining properties and the optimiser's state size."""

from __future__ import annotations

import torch
from torch import nn

from pathopeft.optim import DctAdamW, dct_matrix, dct_project


def test_dct_basis_is_orthonormal():
    for n in (5, 16, 33):
        c = dct_matrix(n).double()
        torch.testing.assert_close(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-6, rtol=0)
    c = dct_matrix(8)  # row k is cos(pi k (2j + 1) / 16), row 0 constant
    torch.testing.assert_close(c[0], torch.full((8,), 8**-0.5))


def test_a_gradient_in_a_dct_subspace_is_projected_exactly_as_the_svd_projector_would():
    g = torch.Generator().manual_seed(0)
    c = dct_matrix(12)
    true_idx = torch.tensor([1, 4, 7])
    grad = torch.randn(40, 3, generator=g) @ c[true_idx]  # 40 x 12, rows in span of three DCT directions
    proj, idx, right = dct_project(grad, 3)
    assert right
    assert torch.equal(idx, true_idx)
    back = proj @ c[idx]
    _, _, vh = torch.linalg.svd(grad, full_matrices=False)
    svd_back = grad @ vh[:3].T @ vh[:3]  # GaLore's projector on the same side
    torch.testing.assert_close(back, grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(back, svd_back, atol=1e-5, rtol=0)
    wide = grad.T  # 12 x 40: the shorter side is now the rows, projected from the left
    proj, idx, right = dct_project(wide, 3)
    assert not right
    assert torch.equal(idx, true_idx)
    torch.testing.assert_close(c[idx].T @ proj, wide, atol=1e-5, rtol=0)


def test_dct_adamw_keeps_rank_sized_moments_and_trains():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Conv1d(1, 1, 1), nn.Flatten(), nn.Linear(24, 4))
    opt = DctAdamW(net.parameters(), lr=3e-3, rank=4)
    x, y = torch.randn(64, 32), torch.randn(64, 4)

    def f(x):
        return net[4](net[3](net[2](net[1](net[0](x))[:, None])))

    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = nn.functional.mse_loss(f(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    first = opt.state[net[0].weight]
    assert first["exp_avg"].shape == (4, 32)  # a 24 x 32 gradient: 4 of the 24-point DCT directions, r x m
    assert first["idx"].numel() == 4
    assert opt.state[net[0].bias]["exp_avg"].shape == (24,)  # vectors: plain AdamW
