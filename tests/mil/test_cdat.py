"""The official CoMEL GDAT (``gdat``, the CDAT encoder of ``Hyun1A/CoMEL``): layout, agents, both attentions,
the 0.1·V residual on hand-computable cases, and numerical parity with the official module.

Parity fixture ``fixtures/cdat_official.npz`` was made outside the repository (no official code is in it):
the official ``continual/modules/cl_modules/cdatmil_owlora.py`` of ``Hyun1A/CoMEL`` @ 9fd66799 was copied to a
scratch folder with its sibling ``datten.py`` and ``lora.py``, and stubs for the unused imports (``rmsa``,
``nystrom_attention``; ``emb_position`` giving ``torch``, ``numpy`` and ``trunc_normal_``). There, with
``torch.manual_seed(0)``: ``CDATMIL(input_dim=12, mlp_dim=32, n_classes=3, n_layers=2, n_heads=4,
da_act='tanh', qkv_bias=False)``; ``patch_to_emb[0]`` replaced by ``Linear(12, 32)`` (L234 hard-codes 512
outputs, too large for a fixture); every state tensor perturbed by 0.1·N(0, 1) from ``Generator().manual_seed(1)``
(so zero biases and unit norms are exercised too) and stored as float32 (``state.<official name>``); the model
then cast to float64, put in eval mode, and run as ``forward(x[None], return_attn=True, return_inst=True)`` on
bags x (N, 12) drawn from the same generator, N = 7 (the one-region small-bag branch), 100 (one 16×16 region)
and 300 (four regions, 724 padding rows). Stored per N: ``x_N``, ``logits_N``, ``attention_N``,
``bag_feature_N``, ``instance_features_N``; ``provenance`` is a JSON string (repository, commit, file, class,
call, torch version).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pathopeft.mil.models import GDAT, create_mil_model
from pathopeft.mil.models.gdat import CDATAttention, cdat_agents, cdat_layout, official_to_gdat

FIXTURE = Path(__file__).parent / "fixtures" / "cdat_official.npz"


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, (2, 2)), (4, (2, 2)), (5, (4, 4)), (9, (4, 4)), (10, (16, 16)), (256, (16, 16)), (257, (32, 16)),
     (300, (32, 16)), (60000, (256, 16))],
)  # fmt: skip
def test_layout_is_the_official_padded_square(n: int, expected: tuple[int, int]) -> None:
    """side = ⌈√N⌉ up to a multiple of 16 (L100–103); N < 10: up to even, one region (L115–120)."""
    assert cdat_layout(n) == expected


def test_agents_are_the_means_over_regions_at_each_offset() -> None:
    side, region = cdat_layout(300)  # 32, 16: four regions, positions ≥ 300 are zero padding
    x = torch.zeros(side * side, 1)
    x[:300, 0] = torch.arange(300.0)  # token at row-major position p carries p
    agents = cdat_agents(x, side, region)
    assert agents.shape == (256, 1)
    # agent 0: positions 0, 16 (top regions) and 512, 528 (bottom regions, padding) → (0 + 16 + 0 + 0) / 4
    assert agents[0, 0] == 4.0
    # agent 17 = (row 1, col 1) in each region: positions 33, 49, 545, 561 → (33 + 49) / 4
    assert agents[17, 0] == (33 + 49) / 4
    full = torch.arange(1024.0)[:, None]  # no padding: agent j = mean of the four region copies
    expected = torch.stack([full.view(2, 16, 2, 16)[:, r, :, c].mean() for r in range(16) for c in range(16)])
    torch.testing.assert_close(cdat_agents(full, 32, 16)[:, 0], expected)


def reference_cdat_attention(attn: CDATAttention, x: torch.Tensor) -> torch.Tensor:
    """Written from the formulas: pad, agents, shared qkv, attention 1 and 2 with the per-head biases, + 0.1·V."""
    n, c = x.shape
    side, region = cdat_layout(n, attn.region)
    xp = torch.cat([x, torch.zeros(side * side - n, c)])
    agents = cdat_agents(xp, side, region)
    heads = attn.heads
    dh = c // heads
    w = attn.qkv.weight
    outs = []
    for hd in range(heads):
        sl = slice(hd * dh, (hd + 1) * dh)
        q, k, v = (
            xp @ w[sl].T,
            xp @ w[c + hd * dh : c + (hd + 1) * dh].T,
            xp @ w[2 * c + hd * dh : 2 * c + (hd + 1) * dh].T,
        )
        qa, ka = agents @ w[sl].T, agents @ w[c + hd * dh : c + (hd + 1) * dh].T
        a1 = torch.softmax(qa @ k.T / dh**0.5 + attn.agent_bias[hd], dim=-1)  # agents attend to instances
        agent_v = a1 @ v
        a2 = torch.softmax(q @ ka.T / dh**0.5 + attn.instance_bias[hd], dim=-1)  # instances attend to agents
        outs.append(a2 @ agent_v + 0.1 * v)
    return attn.proj(torch.cat(outs, dim=1)[:n])


def test_attention_is_the_two_softmax_formulas_with_biases_and_value_residual() -> None:
    torch.manual_seed(0)
    attn = CDATAttention(dim=4, heads=2, dropout=0.0, region=2).eval()  # N = 12: side 4, four 2×2 regions
    attn.agent_bias.copy_(torch.tensor([0.7, -1.3]))
    attn.instance_bias.copy_(torch.tensor([2.0, 0.5]))
    x = torch.randn(12, 4)
    with torch.no_grad():
        out = attn(x)
        torch.testing.assert_close(out, reference_cdat_attention(attn, x), atol=1e-6, rtol=1e-5)
        attn.agent_bias.zero_()
        attn.instance_bias.zero_()
        torch.testing.assert_close(attn(x), out, atol=1e-6, rtol=1e-5)  # a per-head constant cancels in softmax


def test_value_residual_is_one_tenth_of_v() -> None:
    """q = k = 0 makes both softmaxes uniform: out_i = mean over all 16 padded positions of v + 0.1·v_i."""
    attn = CDATAttention(dim=2, heads=1, dropout=0.0, region=2)
    with torch.no_grad():
        attn.qkv.weight.zero_()
        attn.qkv.weight[4:] = torch.eye(2)  # v = x
        attn.proj.weight.copy_(torch.eye(2))
        attn.proj.bias.zero_()
        x = torch.arange(24.0).view(12, 2)
        out = attn(x)
    torch.testing.assert_close(out, x.sum(0) / 16 + 0.1 * x)


def test_defaults_are_the_official_ones() -> None:
    model = GDAT(1024, 2)
    assert model.hidden_dim == 512
    assert len(model.layers) == 2
    assert isinstance(model.encoder[1], nn.ReLU)
    assert model.encoder[2].p == 0.25
    block = model.layers[0]
    assert block.attn.heads == 8
    assert block.attn.region == 16
    assert block.attn.qkv.bias is None
    assert block.mlp.fc1.out_features == 2048
    assert isinstance(block.mlp.act, nn.GELU)
    assert block.attn.drop.p == block.mlp.drop1.p == block.mlp.drop2.p == 0.1
    assert block.norm1.eps == block.norm2.eps == 1e-6
    pool = model.attention_net
    assert isinstance(pool[1], nn.Tanh)
    assert pool[0].out_features == 256
    assert pool[0].bias is None
    assert pool[2].bias is None
    assert create_mil_model("gdat", 1024, 2).hidden_dim == 512


def fixture_model() -> tuple[GDAT, dict]:
    data = np.load(FIXTURE)
    state = {k.removeprefix("state."): torch.from_numpy(data[k]) for k in data.files if k.startswith("state.")}
    model = GDAT(12, 3, hidden_dim=32, heads=4).eval()
    model.load_official_state_dict(state)
    return model.double(), data


def test_fixture_provenance_and_size() -> None:
    prov = json.loads(str(np.load(FIXTURE)["provenance"]))
    assert prov["repository"] == "Hyun1A/CoMEL"
    assert prov["commit"].startswith("9fd6679")
    assert prov["file"] == "continual/modules/cl_modules/cdatmil_owlora.py"
    assert FIXTURE.stat().st_size < 500_000


@pytest.mark.parametrize("n", [7, 100, 300])
def test_matches_the_official_cdatmil(n: int) -> None:
    model, data = fixture_model()
    with torch.no_grad():
        out = model(torch.from_numpy(data[f"x_{n}"]))
    fields = {"bag_logits": "logits", "attention": "attention", "bag_feature": "bag_feature"}
    fields["instance_features"] = "instance_features"
    for field, official in fields.items():
        expected = torch.from_numpy(data[f"{official}_{n}"])
        torch.testing.assert_close(getattr(out, field).double(), expected, atol=1e-5, rtol=0, msg=field)


def test_official_loader_drops_the_unused_v_proj_and_flattens_biases() -> None:
    data = np.load(FIXTURE)
    state = {k.removeprefix("state."): torch.from_numpy(data[k]) for k in data.files if k.startswith("state.")}
    assert any(".v_proj." in k for k in state)
    mapped = official_to_gdat(state)
    assert not any(".v_proj." in k for k in mapped)
    assert mapped["layers.0.attn.agent_bias"].shape == (4,)
    assert set(mapped) == set(GDAT(12, 3, hidden_dim=32, heads=4).state_dict())
