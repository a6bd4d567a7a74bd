"""SALT against its official code (BioMedIA-MBZUAI/SALT) and its defining spectral properties."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pathopeft.adapters.salt import SaltConfig, SaltDelta, salt_regularizer

FIXTURE = Path(__file__).parent / "fixtures" / "salt_official.npz"


def _with_svd(layer: nn.Linear, cfg: SaltConfig, u, s, vh) -> SaltDelta:
    d = SaltDelta(layer, cfg)
    d.U, d.S, d.Vh = (torch.as_tensor(a) for a in (u, s, vh))  # the decomposition the official layer used
    return d


def test_parity_with_the_official_salt_linear_forward_and_regulariser():
    f = np.load(FIXTURE)
    assert "BioMedIA-MBZUAI/SALT @ 7314877" in str(f["provenance"])
    layer = nn.Linear(12, 20)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(f["weight"]))
        layer.bias.copy_(torch.from_numpy(f["bias"]))
    d = _with_svd(layer, SaltConfig(top_ratio=0.25, r_lora=3), f["U"], f["S"], f["Vt"])
    assert d.r == int(f["rank"])  # the top count from the ratio, as the official int(k · ratio)
    with torch.no_grad():
        d.alpha.copy_(torch.from_numpy(f["alpha"]))
        d.beta.copy_(torch.from_numpy(f["beta"]))
        d.X.copy_(torch.from_numpy(f["X"]))
        d.Y.copy_(torch.from_numpy(f["Y"]))
    out = d(torch.from_numpy(f["x"]), layer)
    torch.testing.assert_close(out, torch.from_numpy(f["y"]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(salt_regularizer(d), torch.from_numpy(f["reg"]), atol=1e-4, rtol=1e-5)


def _layer(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(10, 16, bias=False)


def test_spectral_top_values_become_alpha_s_plus_beta_with_the_same_vectors():
    layer = _layer()
    d = SaltDelta(layer, SaltConfig(r=3, r_lora=2))
    with torch.no_grad():
        d.alpha.fill_(2.0)
        d.beta.fill_(0.5)
        d.Y.zero_()  # XY = 0: only the top block changes
    w = layer.weight.detach()
    w_new = w + d.delta_weight(layer)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    u2, s2, vh2 = torch.linalg.svd(w_new, full_matrices=False)
    expected = torch.sort(torch.cat([2 * s[:3] + 0.5, s[3:]]), descending=True).values
    torch.testing.assert_close(s2, expected, atol=1e-5, rtol=1e-5)
    for i in range(3):  # each top singular direction is kept (up to sign)
        assert abs(float(u2[:, i] @ u[:, i])) > 1 - 1e-5
        assert abs(float(vh2[i] @ vh[i])) > 1 - 1e-5


def test_the_residual_update_lies_in_the_residual_singular_subspaces():
    layer = _layer(1)
    d = SaltDelta(layer, SaltConfig(r=3, r_lora=2, init="normal"))
    with torch.no_grad():
        d.X.mul_(50)
        d.Y.mul_(50)
    delta = d.delta_weight(layer)
    u, _, vh = torch.linalg.svd(layer.weight.detach(), full_matrices=False)
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(u[:, :3].T @ delta, torch.zeros(3, 10), atol=1e-5, rtol=0)  # no top-left part
    torch.testing.assert_close(delta @ vh[:3].T, torch.zeros(16, 3), atol=1e-5, rtol=0)


def test_official_defaults_ratio_and_capped_residual_rank():
    cfg = SaltConfig()
    assert (cfg.top_ratio, cfg.r_lora, cfg.target_modules, cfg.reg_weight) == (0.1, 256, "attn+mlp", 0.0)
    assert cfg.ranks(768) == (76, 256)  # ViT-B qkv: ⌊0.1·768⌋ top values, rank 256 on the residual
    assert cfg.ranks(100) == (10, 90)  # residual rank capped at k − top
    assert SaltConfig(r=4).ranks(768) == (4, 256)  # an absolute count wins over the ratio
