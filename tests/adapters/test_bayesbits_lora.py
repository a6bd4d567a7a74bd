"""Defining properties of the Bayesian-Bits rank gates on LoRA (``bayesbits_lora``, issue 16's Bayesian-LoRA row)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pathopeft import adapters
from pathopeft.adapters.bayesbits_lora import (
    BayesBitsLoraDelta,
    layer_ranks,
    open_probability,
    prior_loss,
    prune_to_lora,
    rank_groups,
    sample_gates,
)
from tests.adapters.test_zoo import _delta, _mlp


def _with_b(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BayesBitsLoraDelta):
                m.B.normal_(0, 0.3)
    return model


def test_rank_groups_double_so_a_layer_ends_at_0_1_2_4_or_r_and_r_must_be_a_power_of_two():
    assert rank_groups(1) == [1]
    assert rank_groups(2) == [1, 1]
    assert rank_groups(8) == [1, 1, 2, 4]
    assert sum(rank_groups(32)) == 32
    with pytest.raises(ValueError, match="power of two"):
        adapters.create("bayesbits_lora", _mlp(), rank=6, targets=["0"])


def test_hard_concrete_samples_are_open_with_the_closed_form_probability_and_hit_exact_0_and_1():
    torch.manual_seed(0)
    for log_alpha in (-1.0, 0.0, 2.0):
        z = sample_gates(torch.full((200_000,), log_alpha))
        q = float(open_probability(torch.tensor(log_alpha)))
        # q(z ≠ 0) = sigmoid(log α − β log(−γ/ζ)) with β = 2/3, γ = −0.1, ζ = 1.1 (Louizos et al. 2018)
        assert q == pytest.approx(1 / (1 + math.exp(-(log_alpha - (2 / 3) * math.log(0.1 / 1.1)))))
        assert float((z > 0).float().mean()) == pytest.approx(q, abs=0.005)
        assert (z == 0).any()
        assert (z == 1).any()
        assert z.min() >= 0
        assert z.max() <= 1


def test_gates_are_nested_closing_a_group_closes_every_larger_rank_and_eval_is_deterministic():
    model = _with_b(adapters.create("bayesbits_lora", _mlp(), rank=8, targets=["0", "2"])).eval()
    delta, base = _delta(model)
    assert sorted(layer_ranks(model).values()) == [8, 8]
    with torch.no_grad():
        delta.log_alpha[2] = -10.0  # group {3, 4} closed → ranks 3 … 8 off, rank 2 left
    torch.testing.assert_close(delta.delta_weight(base), delta.B[:, :2] @ delta.A[:2])
    assert sorted(layer_ranks(model).values()) == [2, 8]
    with torch.no_grad():
        delta.log_alpha[0] = -10.0  # the first gate is the pruning gate: no adapter at all
    assert not delta.delta_weight(base).any()
    assert sorted(layer_ranks(model).values()) == [0, 8]
    x = torch.randn(5, 24)
    torch.testing.assert_close(model(x), model(x))  # eval gates do not sample


def test_training_samples_the_gates_and_their_log_alpha_gets_gradients_through_the_relaxation():
    model = _with_b(adapters.create("bayesbits_lora", _mlp(), rank=4, targets=["0"], init_log_alpha=0.0)).train()
    delta, _ = _delta(model)
    x = torch.randn(16, 24)
    torch.manual_seed(1)
    outs = [model(x) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])  # stochastic gates in training
    model.zero_grad()
    model(x).pow(2).sum().backward()
    assert delta.log_alpha.grad is not None
    assert delta.log_alpha.grad.abs().sum() > 0


def test_prior_is_lambda_times_the_expected_live_parameter_share_and_pushes_every_gate_shut():
    model = adapters.create("bayesbits_lora", _mlp(), rank=4, targets=["0", "2"], prior=0.3)
    assert adapters.ADAPTERS.entry("bayesbits_lora").caps["regularizer"] is prior_loss
    deltas = [m for m in model.modules() if isinstance(m, BayesBitsLoraDelta)]
    with torch.no_grad():
        for d, vals in zip(deltas, ([1.0, -0.5, 2.0], [0.0, 3.0, -1.0]), strict=True):
            d.log_alpha.copy_(torch.tensor(vals))
    expected, total = 0.0, 0.0
    for d in deltas:
        q = [float(open_probability(torch.tensor(v))) for v in d.log_alpha.tolist()]
        live = [q[0], q[0] * q[1], q[0] * q[1] * q[2]]
        expected += sum(s * p for s, p in zip([1, 1, 2], live, strict=True)) * (d.in_features + d.out_features)
        total += 4 * (d.in_features + d.out_features)
    loss = prior_loss(model)
    assert float(loss.detach()) == pytest.approx(0.3 * expected / total, rel=1e-6)
    loss.backward()
    for d in deltas:
        assert (d.log_alpha.grad > 0).all()  # lowering any log α lowers the prior


def test_the_prior_closes_ranks_during_training_and_pruning_gives_a_smaller_lora_with_the_same_output():
    model = _with_b(
        adapters.create("bayesbits_lora", _mlp(), rank=8, targets=["0", "2"], prior=1.0, init_log_alpha=1.0)
    )
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, target = torch.randn(32, 24), torch.randn(32, 10)
    torch.manual_seed(0)
    model.train()
    for _ in range(150):
        opt.zero_grad()
        (nn.functional.mse_loss(model(x), target) + prior_loss(model)).backward()
        opt.step()
    model.eval()
    ranks = layer_ranks(model)
    assert sum(ranks.values()) < 16
    assert set(ranks.values()) <= {0, 1, 2, 4, 8}
    xq = torch.randn(6, 24)
    expected = model(xq)
    lora = prune_to_lora(model)
    torch.testing.assert_close(lora(xq), expected, atol=1e-5, rtol=1e-5)
    n_lora = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    assert n_lora == sum(r * w for r, w in zip(ranks.values(), (24 + 16, 16 + 10), strict=True))


def test_collapsed_gates_prune_conv_layers_with_unchanged_output():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    model = _with_b(adapters.create("bayesbits_lora", net, rank=4, targets=["0", "2"])).eval()
    deltas = [m for m in model.modules() if isinstance(m, BayesBitsLoraDelta)]
    with torch.no_grad():
        deltas[0].log_alpha[1] = -5.0  # layer 0 at rank 1
        deltas[1].log_alpha[0] = -5.0  # layer 2 off
    x = torch.randn(2, 3, 12, 12)
    expected = model(x)
    pruned = prune_to_lora(model)
    torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for n, p in pruned.named_parameters() if "lora_" in n) == 1 * (8 + 3 * 9)
