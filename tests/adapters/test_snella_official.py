"""SNELLA against the official code (ssfgunner/SNELL) and its defining properties.

The fixture ``fixtures/snella_official.npz`` holds seeded inputs and the outputs of the official ``SNELLA``
module (``pathIntegrals``, ``sparsify``, ``forward`` and gradients) and ``Allocator``, made by running them
unmodified in a scratch directory outside this repository (provenance inside the file). The official matrices
are (in × out); ours are (out × in).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pathopeft import adapters
from pathopeft.adapters.snella import BudgetAllocator, SnellaConfig, SnellaDelta

FIXTURE = Path(__file__).parent / "fixtures" / "snella_official.npz"


@pytest.fixture(scope="module")
def official() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _plain(out_f: int, in_f: int, r: int, **kw) -> tuple[nn.Linear, SnellaDelta]:
    layer = nn.Linear(in_f, out_f)
    cfg = SnellaConfig(r=r, dropout=0.0, drop_path=0.0, **kw)
    return layer, SnellaDelta(layer, cfg)


def _loaded(official: dict, sparsity: float, kept_value: str = "weighted") -> tuple[nn.Linear, SnellaDelta]:
    layer, d = _plain(12, 20, 8, sparsity=sparsity, kept_value=kept_value)
    with torch.no_grad():
        d.a.copy_(_t(official["out_qs"]))
        d.b.copy_(_t(official["in_qs"]))
        d.mix_alpha.fill_(float(official["mix"][0]))
        d.mix_gamma.fill_(float(official["mix"][1]))
        d.mix_beta.fill_(float(official["mix"][2]))
    return layer, d


def test_fixture_names_its_source(official):
    assert "ssfgunner/SNELL" in str(official["provenance"])


def test_kernel_matches_official_path_integrals(official):
    layer, d = _loaded(official, 0.0, kept_value="plain")
    torch.testing.assert_close(d.delta_weight(layer), _t(official["path_integrals"]).T)


@pytest.mark.parametrize("thr", [0.0, 0.5, 0.9])
def test_sparse_update_forward_and_gradients_match_official(official, thr):
    """Same ΔW (K·|K| kept), branch output and gradients; the official torch.quantile threshold may drop one
    more entry than our k-th-value threshold (at 0 it drops the smallest), so allow ±1 kept entry."""
    tag = f"t{int(thr * 100):02d}"
    layer, d = _loaded(official, thr)
    theirs = _t(official[f"{tag}_sparse"]).T
    ours = d.delta_weight(layer)
    assert abs(int((ours != 0).sum()) - int((theirs != 0).sum())) <= 1
    both = (ours != 0) & (theirs != 0)
    torch.testing.assert_close(ours[both], theirs[both])
    if int((ours != 0).sum()) != int((theirs != 0).sum()):
        return  # one entry apart: outputs and gradients differ by that entry's share
    x = _t(official["x"])
    y = x @ ours.T
    torch.testing.assert_close(y, _t(official[f"{tag}_y"]), atol=1e-6, rtol=1e-5)
    (y**2).sum().backward()
    torch.testing.assert_close(d.a.grad, _t(official[f"{tag}_grad_out"]), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(d.b.grad, _t(official[f"{tag}_grad_in"]), atol=1e-6, rtol=1e-4)
    mix_grads = torch.stack([d.mix_alpha.grad, d.mix_gamma.grad, d.mix_beta.grad])
    torch.testing.assert_close(mix_grads, _t(official[f"{tag}_grad_mix"]), atol=1e-6, rtol=1e-4)


def test_split_qkv_equals_three_official_modules(official):
    """parts = 3: q, k and v are the official separate modules (own factors, softmax over d, own sparsity)."""
    layer = nn.Linear(8, 24)
    d = SnellaDelta(layer, SnellaConfig(r=4, sparsity=0.25, parts=3, dropout=0.0, drop_path=0.0))
    with torch.no_grad():
        d.a.copy_(_t(official["qkv_out_qs"]))
        d.b.copy_(_t(official["qkv_in_qs"]))
    theirs = torch.cat([_t(w).T for w in official["qkv_sparse"]], dim=0)
    ours = d.delta_weight(layer)
    for p in range(3):
        o, t = ours[8 * p : 8 * (p + 1)], theirs[8 * p : 8 * (p + 1)]
        assert abs(int((o != 0).sum()) - int((t != 0).sum())) <= 1
        torch.testing.assert_close(o[(o != 0) & (t != 0)], t[(o != 0) & (t != 0)])


def test_budget_allocation_matches_official_allocator(official):
    """Three importance updates with the same gradients, then the allocation at step 4 of 10 (dense start,
    final sparsity 0.3): the per-layer sparsities of the official Allocator, up to rounding of 2 entries."""
    net = nn.Sequential(nn.Linear(16, 10), nn.Linear(6, 14))
    model = adapters.create("snella", net, rank=4, targets=["0", "1"], sparsity=0.0, dropout=0.0, drop_path=0.0)
    deltas = [m for m in model.modules() if isinstance(m, SnellaDelta)]
    with torch.no_grad():
        for d, name in zip(deltas, ("l0", "l1"), strict=True):
            d.a.copy_(_t(official[f"alloc_{name}_out_qs"]))
            d.b.copy_(_t(official[f"alloc_{name}_in_qs"]))
    step, total, volume = (int(v) for v in official["alloc_step_total_volume"])
    alloc = BudgetAllocator(model, total_steps=total)
    assert alloc.target_keep == pytest.approx(0.7)  # final sparsity 0.3 from the config
    for i in range(3):
        for d, name in zip(deltas, ("l0", "l1"), strict=True):
            d.a.grad = _t(official[f"alloc_{name}_g{i}_out"])
            d.b.grad = _t(official[f"alloc_{name}_g{i}_in"])
        alloc.update_importance()
    assert int(alloc.keep_fraction(step) * sum(alloc.sizes)) == volume
    ours = alloc.step(step)
    for s, t, n in zip(ours, official["alloc_sparsity"], alloc.sizes, strict=True):
        assert abs(s - float(t)) * n <= 2


# --- defining properties -----------------------------------------------------------------------------------
def test_kernel_formula_by_hand():
    """ΔW_ij = K_ij·|K_ij| with K = 0.1(‖a0_i − b0_j‖ − ‖a1_i − b1_j‖) + α·softmax_i(K/γ) + β, on a 3×2 case."""
    layer, d = _plain(3, 2, 2, sparsity=0.0)
    with torch.no_grad():
        d.a.copy_(torch.tensor([[[1.0], [0.0], [2.0]], [[0.5], [-1.0], [0.0]]]))
        d.b.copy_(torch.tensor([[[0.0], [3.0]], [[1.0], [0.0]]]))
        d.mix_alpha.fill_(0.5)
        d.mix_gamma.fill_(2.0)
        d.mix_beta.fill_(0.1)
    a, b = d.a.detach(), d.b.detach()
    dist = [[0.1 * (abs(a[0, i, 0] - b[0, j, 0]) - abs(a[1, i, 0] - b[1, j, 0])) for j in range(2)] for i in range(3)]
    expected = torch.zeros(3, 2)
    for j in range(2):
        z = sum(torch.exp(dist[k][j] / 2.0) for k in range(3))
        for i in range(3):
            kij = dist[i][j] + 0.5 * torch.exp(dist[i][j] / 2.0) / z + 0.1
            expected[i, j] = kij * abs(kij)
    torch.testing.assert_close(d.delta_weight(layer), expected)


def test_distance_kernel_update_is_full_rank():
    """The kernel's point: ΔW reaches rank min(m, n) with rank-r factors (LoRA stops at r)."""
    torch.manual_seed(0)
    layer, d = _plain(24, 20, 8, sparsity=0.0, kernel="distance", kept_value="plain")
    dw = d.delta_weight(layer).double()
    assert torch.linalg.matrix_rank(dw) == min(dw.shape)  # 20, beyond the factors' rank 8


def test_defaults_are_the_released_recipe():
    cfg = SnellaConfig()
    assert (cfg.r, cfg.sparsity, cfg.final_sparsity, cfg.dropout, cfg.drop_path) == (32, 0.0, 0.3, 0.1, 0.1)
    assert cfg.split_qkv
    assert cfg.target_modules == "attn+mlp"
    assert cfg.for_layer("blocks.0.attn.qkv").parts == 3
    assert cfg.for_layer("blocks.0.attn.proj").dropout == 0.0  # the official proj branch has no input dropout
    assert SnellaConfig(split_qkv=False).for_layer("blocks.0.attn.qkv").parts == 1


def test_a_vit_gets_q_k_v_split_by_default():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=0)
    model = adapters.create("snella", vit, rank=4)
    qkv = model.get_submodule("blocks.0.attn.qkv").deltas["default"]
    assert qkv.parts == 3
    assert len(qkv.sparsities) == 3
    names = {n.split(".deltas")[0].removeprefix("base_model.") for n, _ in model.named_parameters() if ".deltas." in n}
    assert names == {f"blocks.0.{s}" for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    fused = adapters.create("snella", timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1), rank=4,
                            split_qkv=False)  # fmt: skip
    assert fused.get_submodule("blocks.0.attn.qkv").deltas["default"].parts == 1


def test_dropout_and_drop_path_act_on_the_branch_in_training_only():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    d = SnellaDelta(layer, SnellaConfig(r=4, dropout=0.5, drop_path=0.5))
    x = torch.randn(64, 6)
    d.eval()
    torch.testing.assert_close(d(x, layer), nn.functional.linear(x, layer.weight + d.delta_weight(layer), layer.bias))
    d.train()
    with torch.no_grad():
        d.a.mul_(50)  # a visible branch
    branch = d(x, layer) - layer(x)
    dropped = (branch.abs().sum(1) == 0).float().mean()
    assert 0.2 < dropped < 0.8  # drop-path zeroes whole samples' branch, about half of them


@pytest.mark.parametrize(("start", "end"), list(itertools.product([0.0, 0.01], [0.3, 0.76])))
def test_budget_runs_from_the_start_to_the_final_sparsity(start, end):
    net = nn.Sequential(nn.Linear(16, 10), nn.Linear(6, 14))
    model = adapters.create("snella", net, rank=4, targets=["0", "1"], sparsity=start, final_sparsity=end)
    alloc = BudgetAllocator(model, total_steps=5)
    assert alloc.keep_fraction(0) == pytest.approx(1 - start)
    assert alloc.keep_fraction(5) == pytest.approx(1 - end)
    sp = alloc.step(5)
    sizes = alloc.sizes
    assert sum(s * n for s, n in zip(sp, sizes, strict=True)) / sum(sizes) == pytest.approx(end, abs=2 / sum(sizes))
