"""OWLoRA as the official CoMEL code builds it: parity with its layers, and each defining property pinned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pathopeft import adapters
from pathopeft.adapters.owlora import (
    OwloraConfig,
    max_overlap,
    next_task,
    orthonormality_penalty,
    owlora_deltas,
    project_gradients,
    set_active_tasks,
)
from pathopeft.adapters.owlora.layer import truncation_rank

FIXTURE = Path(__file__).parent / "fixtures" / "owlora_official.npz"


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Fc(nn.Module):
    def __init__(self, w: np.ndarray, b: np.ndarray) -> None:
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(w))
            self.fc.bias.copy_(torch.from_numpy(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _official():
    """pathopeft's OWLoRA loaded with the fixture's weights: base W, two tasks' (A, B, s)."""
    f = np.load(FIXTURE)
    model = adapters.create("owlora", Fc(f["w0"], f["bias"]), rank=f["down"].shape[1], targets=["fc"])
    next_task(model)
    d = owlora_deltas(model)[0]
    with torch.no_grad():
        for t in range(2):
            d.A[t].copy_(torch.from_numpy(f["down"][t]))
            d.B[t].copy_(torch.from_numpy(f["up"][t]))
            d.s[t].copy_(torch.from_numpy(f["scales"][t]))
    return f, model, d


def test_parity_with_the_official_layers_truncation_forward_projection_penalty():
    f, model, d = _official()
    assert "Hyun1A/CoMEL @ 9fd6679" in str(f["provenance"])
    torch.testing.assert_close(model.fc.base_layer.weight, torch.from_numpy(f["w_trunc"]), atol=1e-5, rtol=1e-5)
    assert int(d.kept_rank) == int(f["kept"])
    x = torch.from_numpy(f["x"])
    out = model(x)
    torch.testing.assert_close(out, torch.from_numpy(f["y"]), atol=1e-5, rtol=1e-5)
    (out**2).sum().backward()
    torch.testing.assert_close(d.A[1].grad, torch.from_numpy(f["grad_down"]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(d.B[1].grad, torch.from_numpy(f["grad_up"]), atol=1e-4, rtol=1e-5)
    project_gradients(model)
    torch.testing.assert_close(d.A[1].grad, torch.from_numpy(f["proj_down"]), atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(d.B[1].grad, torch.from_numpy(f["proj_up"]), atol=1e-3, rtol=1e-5)
    # the official loop also projects against its random "initial basis" LoRA: we do not, and it matters
    assert not np.allclose(f["proj_down"], f["proj_down_official_loop"], atol=1e-3)
    torch.testing.assert_close(orthonormality_penalty(model), torch.from_numpy(f["penalty"]), atol=1e-3, rtol=1e-5)


def test_truncation_keeps_the_fewest_singular_values_above_99_percent_energy():
    s = torch.tensor([10.0, 1.0, 0.5, 0.1])  # energies 100, 1, .25, .01 of 101.26: top 1 = 98.8 %, top 2 = 99.8 %
    assert truncation_rank(s, 0.99) == 2
    assert truncation_rank(torch.tensor([1.0, 0.0]), 0.99) == 1
    torch.manual_seed(0)
    u, v = torch.linalg.qr(torch.randn(6, 5))[0], torch.linalg.qr(torch.randn(5, 5))[0]
    w = u @ torch.diag(torch.tensor([5.0, 2.0, 0.01, 0.01, 0.01])) @ v.T  # 99 % of the energy in 2 values
    lin = nn.Linear(5, 6)
    with torch.no_grad():
        lin.weight.copy_(w)
    model = adapters.create("owlora", nn.Sequential(lin), rank=2, targets=["0"])
    assert torch.linalg.matrix_rank(model.base_model[0].base_layer.weight.detach()) == 2


def test_rank_is_per_layer_48_on_qkv_and_scales_are_per_rank():
    assert OwloraConfig().for_layer("layers.0.attn.qkv").r == 48
    assert OwloraConfig().for_layer("layers.0.attn.proj").r == 16
    torch.manual_seed(0)
    model = adapters.create("owlora", Mlp(), rank=3, targets=["fc1", "fc2"])
    d = owlora_deltas(model)[0]
    assert d.s[0].shape == (3,)
    x = torch.randn(7, 16)
    with torch.no_grad():
        d.B[0].normal_()
        d.s[0].copy_(torch.tensor([1.0, 0.0, 0.0]))
    only_first = d(x, model.fc1.base_layer) - model.fc1.base_layer(x)  # only rank 1 of 3 contributes
    expected = (x @ d.A[0][:1].T) @ d.B[0][:, :1].T
    torch.testing.assert_close(only_first, expected, atol=1e-5, rtol=1e-5)


def test_projected_gradients_are_orthogonal_to_orthonormal_earlier_factors():
    torch.manual_seed(0)
    model = adapters.create("owlora", Mlp(), rank=2, targets=["fc1"], truncate_energy=None)
    d = owlora_deltas(model)[0]
    with torch.no_grad():  # earlier task's factors orthonormal (what the penalty drives them to)
        d.A[0].copy_(torch.linalg.qr(torch.randn(16, 2))[0].T)
        d.B[0].copy_(torch.linalg.qr(torch.randn(32, 2))[0])
    next_task(model)
    with torch.no_grad():
        d.B[1].normal_()
    model(torch.randn(9, 16)).pow(2).sum().backward()
    assert (d.A[1].grad @ d.A[0].T).abs().max() > 1e-3  # before: not orthogonal
    project_gradients(model)
    torch.testing.assert_close(d.A[1].grad @ d.A[0].T, torch.zeros(2, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.B[0].T @ d.B[1].grad, torch.zeros(2, 2), atol=1e-5, rtol=0)


def test_plain_sgd_keeps_a_task_that_starts_orthogonal_orthogonal():
    """With the projection, SGD updates stay in the complement: both factors end orthogonal to the earlier ones."""
    torch.manual_seed(0)
    model = adapters.create("owlora", Mlp(), rank=2, targets=["fc1"], truncate_energy=None)
    d = owlora_deltas(model)[0]
    with torch.no_grad():
        q = torch.linalg.qr(torch.randn(16, 4))[0].T
        d.A[0].copy_(q[:2])
        d.B[0].copy_(torch.linalg.qr(torch.randn(32, 2))[0])
    next_task(model)
    with torch.no_grad():
        d.A[1].copy_(q[2:])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    for _ in range(30):
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) + orthonormality_penalty(model)).backward()
        project_gradients(model)
        opt.step()
    assert d.B[1].abs().max() > 1e-2  # it trained
    assert max_overlap(model) < 1e-4


def test_earlier_tasks_never_change_and_their_outputs_stay():
    torch.manual_seed(0)
    model = adapters.create("owlora", Mlp(), rank=2, targets=["fc1", "fc2"])
    x = torch.randn(16, 16)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    next_task(model)
    old = {n: p.detach().clone() for n, p in model.named_parameters() if any(f".{k}.0" in n for k in "ABs")}
    assert old
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in old)
    set_active_tasks(model, [0])
    before = model(x).detach()
    set_active_tasks(model, None)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        (model(x) - 1).pow(2).mean().backward()
        project_gradients(model)
        opt.step()
    assert all(torch.equal(p, old[n]) for n, p in model.named_parameters() if n in old)
    set_active_tasks(model, [0])
    torch.testing.assert_close(model(x), before)  # the earlier task's function is untouched
    set_active_tasks(model, None)
    assert not torch.allclose(model(x), before)  # while the new task did learn


def test_round_trip_rebuilds_every_task(tmp_path):
    torch.manual_seed(0)
    model = adapters.create("owlora", Mlp(), rank=2, targets=["fc1", "fc2"])
    next_task(model)
    for d in owlora_deltas(model):
        with torch.no_grad():
            d.B[1].normal_()
    x = torch.randn(5, 16)
    both = model(x).detach()
    adapters.save(model, tmp_path / "owl")
    torch.manual_seed(0)
    loaded = adapters.load(Mlp(), tmp_path / "owl")
    assert {d.n_tasks for d in owlora_deltas(loaded)} == {2}
    torch.testing.assert_close(loaded(x), both, atol=1e-5, rtol=1e-4)
