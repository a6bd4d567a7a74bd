"""LoKU (issue 17): the inverted hinge loss's bounds and direction, FILA's initialisation, and unlearning a class."""

from __future__ import annotations

import torch
from torch import nn

from pathopeft.adapters.loku import fila_init, fisher_diagonals, inverted_hinge_loss, unlearn_step_loss


def test_inverted_hinge_loss_is_bounded_and_lowers_the_label_while_raising_its_rival():
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(256, 5, generator=g)
    y = torch.randint(0, 5, (256,), generator=g)
    per = torch.stack([inverted_hinge_loss(logits[i : i + 1], y[i : i + 1]) for i in range(256)])
    p = logits.softmax(-1)
    p_y = p[torch.arange(256), y]
    assert (per >= 0).all()
    assert (per <= 2).all()
    assert (per >= 2 * p_y - 1e-6).all()
    assert (per <= 1 + p_y + 1e-6).all()
    x = torch.tensor([[2.0, 1.0, -1.0]], requires_grad=True)
    inverted_hinge_loss(x, torch.tensor([0])).backward()
    assert x.grad[0, 0] > 0  # gradient descent lowers the forgotten label's logit
    assert x.grad[0, 1] < 0  # and raises the runner-up's


def _blobs(n: int = 90):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    y = torch.arange(n) % 3
    return centres[y] + 0.7 * torch.randn(n, 4, generator=g), y


def _trained_classifier():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = _blobs()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def _acc(net, x, y):
    with torch.no_grad():
        return float((net(x).argmax(-1) == y).float().mean())


def _fisher(model, x, y):
    batches = [(x[i : i + 10], y[i : i + 10]) for i in range(0, len(x), 10)]
    return fisher_diagonals(model, batches, lambda m, b: (nn.functional.cross_entropy(m(b[0]), b[1]), len(b[1])))


def test_fila_leaves_the_output_unchanged_and_starts_from_the_fisher_weighted_principal_part():
    import peft

    net = _trained_classifier()
    x, y = _blobs()
    before = net(x).detach()
    w0 = net[0].weight.detach().clone()
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    forget = y == 2
    fila_init(model, _fisher(model, x[forget], y[forget]), _fisher(model, x[~forget], y[~forget]))
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)
    layer = model.base_model.model[0]
    ba = 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight  # scale alpha / r = 2
    torch.testing.assert_close(layer.base_layer.weight + ba, w0, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(ba) == 2


def test_loku_unlearns_one_class_to_chance_and_keeps_the_others():
    import peft

    net = _trained_classifier()
    x, y = _blobs()
    forget = y == 2
    assert _acc(net, x[forget], y[forget]) > 0.95
    model = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    fila_init(model, _fisher(model, x[forget], y[forget]), _fisher(model, x[~forget], y[~forget]))
    retained_before = _acc(model, x[~forget], y[~forget])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(150):
        opt.zero_grad()
        unlearn_step_loss(model(x[forget]), y[forget], model(x[~forget]), y[~forget]).backward()
        opt.step()
    assert _acc(model, x[forget], y[forget]) <= 1 / 3  # at or below chance on the forgotten class
    assert _acc(model, x[~forget], y[~forget]) >= retained_before - 0.05  # retained within 5 points
