"""CoMEL's official baselines as strategies: each one's defining property on a hand-computable case."""

from __future__ import annotations

import random

import torch

from pathopeft.mil.config import ContinualConfig
from pathopeft.mil.strategies.agem import project
from pathopeft.mil.strategies.derpp import logit_loss
from pathopeft.mil.strategies.erace import ERACE, BagReservoir
from pathopeft.mil.strategies.inflora import InfLoRALinear, design_down
from pathopeft.mil.strategies.lwf import kd_loss


def test_lwf_kd_is_the_official_sharpened_cross_entropy():
    s, t = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])
    p = lambda z: torch.softmax(z, -1) ** 0.5 / (torch.softmax(z, -1) ** 0.5).sum()
    assert torch.allclose(kd_loss(s, t, 2.0), -(p(t) * p(s).log()).sum())
    st = torch.tensor([[0.3, -0.2]], requires_grad=True)
    loss = kd_loss(st, st.detach().clone(), 2.0)  # student == teacher: the minimum, zero gradient
    loss.backward()
    assert torch.allclose(st.grad, torch.zeros(1, 2), atol=1e-6)


def test_derpp_logit_loss_is_zero_on_its_own_logits():
    z = torch.tensor([0.5, -1.0, 2.0])
    assert float(logit_loss(z, z.clone())) == 0.0
    assert torch.isclose(logit_loss(z, torch.zeros(3)), (z**2).mean())


def test_the_reservoir_fills_then_keeps_at_most_its_size():
    buf, rng = BagReservoir(2), random.Random(0)
    for i in range(10):
        buf.offer({"features": torch.zeros(1, 1), "coords": torch.zeros(1, 2), "label": 0, "slide_id": f"s{i}"}, rng)
    assert len(buf) == 2
    assert buf.seen == 10
    assert buf.state()["seen"] == 10


def test_agem_projection():
    g, ref = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])
    new = project(g, ref)
    assert float(new @ ref) >= -1e-7
    assert torch.allclose(new, torch.tensor([1.0, 0.0]))
    g2 = torch.tensor([1.0, 1.0])
    assert torch.equal(project(g2, ref), g2)  # already non-negative: unchanged


def test_inflora_down_is_orthogonal_to_earlier_and_frozen():
    torch.manual_seed(0)
    first = design_down(3, 8, [])
    second = design_down(3, 8, [first])
    assert torch.allclose(second @ first.T, torch.zeros(3, 3), atol=1e-5)
    assert torch.allclose(second.norm(dim=1), torch.ones(3))
    layer = InfLoRALinear(torch.nn.Linear(8, 4))
    layer.add(2)
    layer.ups[0].data.normal_()
    layer(torch.randn(5, 8)).sum().backward()
    assert layer.downs[0].grad is None
    assert layer.ups[0].grad is not None


def test_erace_is_asymmetric_current_bag_on_its_task_buffer_on_every_seen_class():
    cfg = ContinualConfig(manifest="m.csv", out_dir="o", strategy="erace")
    erace = ERACE(cfg, data=None)
    assert erace.train_classes(1) == cfg.task_classes(1)
    assert set(cfg.task_classes(1)) < set(cfg.seen_classes(1))  # the buffer's CE sees strictly more classes
