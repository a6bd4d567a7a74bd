"""OWLoRA across tasks: orthogonality (measured), frozen earlier tasks, protected old inputs, files."""

from __future__ import annotations

import torch
from torch import nn

from pathopeft import adapters
from pathopeft.adapters.owlora import collect_inputs, max_overlap, next_task, owlora_deltas, set_active_tasks


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 60) -> None:
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _tasks(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # task 0 lives in the first 8 input dimensions, task 1 in the last 8: the adapter can serve both
    x0 = torch.cat([torch.randn(64, 8, generator=g), torch.zeros(64, 8)], dim=1)
    x1 = torch.cat([torch.zeros(64, 8), torch.randn(64, 8, generator=g)], dim=1)
    return (x0, (x0[:, 0] > 0).long()), (x1, 2 + (x1[:, 8] > 0).long())


def _two_tasks(protect_inputs: bool = True, **kw):
    torch.manual_seed(0)
    model = adapters.create("owlora", Mlp(), rank=2, targets=["fc1", "fc2"], protect_inputs=protect_inputs, **kw)
    (x0, y0), (x1, y1) = _tasks()
    _fit(model, x0, y0)
    collect_inputs(model, [x0], model)
    next_task(model)
    return model, (x0, y0), (x1, y1)


def test_new_task_is_orthogonal_and_old_task_is_frozen():
    model, (_x0, _), (x1, y1) = _two_tasks()
    old = {n: p.detach().clone() for n, p in model.named_parameters() if ".A.0" in n or ".B.0" in n or ".w.0" in n}
    assert old
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in old)
    _fit(model, x1, y1)
    for n, p in model.named_parameters():
        if n in old:
            assert torch.equal(p, old[n]), f"{n} of the earlier task changed"
    assert max_overlap(model) < 1e-5  # rows of task 1's Ã are orthogonal to task 0's


def test_protecting_old_inputs_keeps_old_task_outputs():
    """With the old input subspace protected, task 1's adapter barely moves task 0's outputs."""
    drift = {}
    for protect in (True, False):
        model, (x0, _), (x1, y1) = _two_tasks(protect_inputs=protect, energy=1.0, max_protected=0.95)
        before = model(x0).detach()
        _fit(model, x1, y1)
        drift[protect] = ((model(x0) - before).norm() / before.norm()).item()
    assert drift[True] < 0.02
    assert drift[False] > 10 * drift[True]


def test_task_incremental_selection_and_round_trip(tmp_path):
    model, (_x0, _), (x1, y1) = _two_tasks()
    _fit(model, x1, y1)
    both = model(x1).detach()
    set_active_tasks(model, [0])
    only_first = model(x1).detach()
    assert not torch.allclose(only_first, both)
    set_active_tasks(model, None)
    adapters.save(model, tmp_path / "owl")
    torch.manual_seed(0)
    loaded = adapters.load(Mlp(), tmp_path / "owl")
    assert {d.n_tasks for d in owlora_deltas(loaded)} == {2}
    torch.testing.assert_close(loaded(x1), both, atol=1e-5, rtol=1e-4)


def test_weights_are_per_task_and_trainable_only_for_the_current_task():
    model, _, (x1, y1) = _two_tasks()
    d = owlora_deltas(model)[0]
    assert d.n_tasks == 2
    assert not d.w[0].requires_grad
    assert d.w[1].requires_grad
    w0 = d.w[0].item()
    _fit(model, x1, y1, steps=20)
    assert d.w[1].item() != 1.0
    assert d.w[0].item() == w0
