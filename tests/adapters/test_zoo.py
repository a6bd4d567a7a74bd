"""Defining properties of the adapter-zoo methods (issue 15): each test fails if the method is not the paper's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pathopeft import adapters
from pathopeft.adapters.core import AdaptedLayer


def _mlp(width_in: int = 24, width_out: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width_in, width_out), nn.ReLU(), nn.Linear(width_out, 10))


def _delta(model: nn.Module, name: str = "0"):
    layer = model.base_model.get_submodule(name)
    assert isinstance(layer, AdaptedLayer)
    return layer.deltas["default"], layer.base_layer


def test_svfit_update_lies_in_the_top_singular_subspaces_and_moves_only_the_top_values():
    model = adapters.create("svfit", _mlp(), rank=3, targets=["0"])
    delta, base = _delta(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 3
    with torch.no_grad():
        delta.delta.copy_(torch.tensor([0.5, -0.2, 0.3]))
    dw = delta.delta_weight(base)
    U, S, Vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)  # an independent SVD
    Ur, Vr = U[:, :3], Vh[:3].T
    torch.testing.assert_close(dw - Ur @ (Ur.T @ dw), torch.zeros_like(dw), atol=1e-5, rtol=0)
    torch.testing.assert_close(dw - (dw @ Vr) @ Vr.T, torch.zeros_like(dw), atol=1e-5, rtol=0)
    new = torch.linalg.svdvals(base.weight.detach() + dw)
    expected = torch.cat([S[:3] + torch.tensor([0.5, -0.2, 0.3]), S[3:]]).sort(descending=True).values
    torch.testing.assert_close(new, expected, atol=1e-5, rtol=0)


def test_hydra_merges_to_parallel_plus_sequential_branches_and_unmerges_exactly():
    model = adapters.create("hydra", _mlp(), rank=4, targets=["0"])
    delta, base = _delta(model)
    with torch.no_grad():
        for p in (delta.B_p, delta.B_s):
            p.normal_(0, 0.1)
    w0, b = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(5, 24)
    y0 = x @ w0.T  # the frozen layer's output without bias: what the sequential branch reads
    by_hand = y0 + b + x @ (delta.B_p @ delta.A_p).T + y0 @ (delta.B_s @ delta.A_s).T
    torch.testing.assert_close(model.base_model[0](x), by_hand, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(
        base.weight.detach(), w0 + delta.B_p @ delta.A_p + delta.B_s @ delta.A_s @ w0, atol=1e-6, rtol=1e-6
    )
    model.unmerge_adapter()
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in delta.parameters()) == 4 * (24 + 3 * 16)


def test_nola_trains_k_plus_l_per_layer_whatever_rank_and_size_and_saves_coefficients_only(tmp_path):
    for rank in (2, 16):
        model = adapters.create("nola", _mlp(), rank=rank, targets=["0", "2"], num_basis_a=7, num_basis_b=5)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (7 + 5)
    d0, b0 = _delta(model, "0")
    d2, _ = _delta(model, "2")
    with torch.no_grad():
        d0.coef_b.normal_()
        d2.coef_b.normal_()
    assert not torch.equal(d0.basis_a[:, :, :10], d2.basis_a[:, :, :10])  # every layer has its own bases
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(t.numel() for t in saved.values()) == [5, 5, 7, 7]  # coefficients only; bases from the seed
    again = adapters.load(_mlp(), tmp_path)
    e0, c0 = _delta(again, "0")
    torch.testing.assert_close(e0.delta_weight(c0), d0.delta_weight(b0), atol=0, rtol=0)
    other = adapters.create("nola", _mlp(), rank=16, targets=["0", "2"], num_basis_a=7, num_basis_b=5, seed=1)
    f0, _ = _delta(other, "0")
    assert not torch.equal(f0.basis_a, d0.basis_a)  # the seed decides the bases


def test_loldu_freezes_a_unit_triangular_ldu_slice_and_trains_its_diagonal_and_a_scale():
    from pathopeft.adapters.loldu import ldu

    w = torch.randn(16, 24)
    P, L, D, U = ldu(w)
    torch.testing.assert_close(P @ L @ torch.diag(D) @ U, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.diagonal(L), torch.ones(16))
    torch.testing.assert_close(torch.diagonal(U), torch.ones(16))
    assert torch.equal(L.triu(1), torch.zeros_like(L))  # unit lower
    assert torch.equal(U[:, :16].tril(-1), torch.zeros(16, 16))  # unit upper
    model = adapters.create("loldu", _mlp(), rank=4, targets=["0"])
    delta, base = _delta(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 + 1
    torch.testing.assert_close(delta.delta_weight(base), torch.zeros(16, 24), atol=1e-6, rtol=0)  # W' = W at init
    with torch.no_grad():
        delta.z.mul_(2.0)  # doubling the diagonal adds s0 * P L_r diag(D_r) U_r once more
    expected = delta.s0 * delta.P @ delta.L @ torch.diag(delta.D) @ delta.U
    torch.testing.assert_close(delta.delta_weight(base), expected, atol=1e-5, rtol=1e-5)


def test_loldu_warns_when_a_near_zero_pivot_makes_its_frozen_factor_explode():
    mlp = _mlp()
    with torch.no_grad():  # the second input column nearly a multiple of the first: the second pivot ~ 1e-7
        w = mlp[0].weight
        w[:, 1] = 2.0 * w[:, 0] + 1e-7 * torch.randn(16)
    with pytest.warns(RuntimeWarning, match="pivots include one near zero"):
        adapters.create("loldu", mlp, rank=4, targets=["0"])


def test_sorsa_is_identity_at_init_and_its_regulariser_restores_orthonormality():
    from pathopeft.adapters.sorsa import sorsa_loss, sorsa_regularizer

    model = adapters.create("sorsa", _mlp(), rank=4, targets=["0"])
    delta, base = _delta(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * (16 + 24) + 4
    torch.testing.assert_close(delta.delta_weight(base), torch.zeros(16, 24), atol=1e-5, rtol=0)
    assert float(sorsa_regularizer(model).detach()) < 1e-5  # singular vectors are orthonormal at init
    with torch.no_grad():
        delta.A.add_(0.2 * torch.randn_like(delta.A))
        delta.B.add_(0.2 * torch.randn_like(delta.B))
    a_err, b_err = delta.orthonormality()
    eye = torch.eye(4)
    torch.testing.assert_close(
        sorsa_regularizer(model), ((delta.A @ delta.A.T - eye).norm() + (delta.B.T @ delta.B - eye).norm()) / 2
    )
    before = float(a_err + b_err)
    opt = torch.optim.SGD([delta.A, delta.B], lr=0.05)
    for _ in range(20):  # gradient steps on the regulariser alone
        opt.zero_grad()
        sorsa_loss(model).backward()
        opt.step()
    assert float(sum(delta.orthonormality())) < 0.5 * before


def test_lora_sb_starts_at_the_rank_r_approximation_of_the_first_full_step_and_trains_r_squared():
    from pathopeft.adapters.lorasb import lora_sb_init

    torch.manual_seed(1)
    batches = [(torch.randn(6, 24), torch.randn(6, 10)) for _ in range(3)]

    def loss_fn(m, batch):
        x, y = batch
        return ((m(x) - y) ** 2).sum()

    ref = _mlp()  # the full fine-tuning gradient of the same model
    grad = torch.zeros(16, 24)
    for batch in batches:
        ref.zero_grad()
        (loss_fn(ref, batch) / 6).backward()
        grad += ref[0].weight.grad
    step = -1e-2 * torch.sign(grad)
    U, S, Vh = torch.linalg.svd(step)
    best = (U[:, :3] * S[:3]) @ Vh[:3]  # Eckart–Young

    model = adapters.create("lorasb", _mlp(), rank=3, targets=["0"])
    delta, base = _delta(model)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 9
    torch.testing.assert_close(delta.delta_weight(base), torch.zeros(16, 24))  # identity until initialised
    assert lora_sb_init(model, batches, loss_fn, lr=1e-2) == 3
    torch.testing.assert_close(delta.delta_weight(base), best, atol=1e-5, rtol=1e-5)
    assert not base.weight.requires_grad
    # dL/dR = s * B^T (dL/dW') A^T
    x, y = batches[0]
    loss_fn(model, (x, y)).backward()
    full = _mlp()
    with torch.no_grad():
        full[0].weight.add_(delta.delta_weight(base))
    loss_fn(full, (x, y)).backward()
    torch.testing.assert_close(
        delta.R.grad, delta.scale * delta.B.T @ full[0].weight.grad @ delta.A.T, atol=1e-4, rtol=1e-4
    )


def test_miss_core_equals_peft_miss_on_linear_layers_and_adapts_convs():
    import peft

    for width_in in (24, 26):  # r divides the input width, and not
        ours = adapters.create("miss-core", _mlp(width_in), rank=4, targets=["0"])
        theirs = peft.get_peft_model(_mlp(width_in), peft.MissConfig(r=4, target_modules=["0"]))
        block = torch.randn(4, 16)
        with torch.no_grad():
            _delta(ours)[0].miss_block.copy_(block)
            theirs.base_model.model[0].miss_block["default"].copy_(block)
        x = torch.randn(5, width_in)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
        ours.merge_adapter()
        theirs.merge_adapter()
        torch.testing.assert_close(ours.base_model[0].base_layer.weight, theirs.base_model.model[0].base_layer.weight)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3))
    model = adapters.create("miss-core", conv, rank=4, targets=["0"])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 4 * 8


def test_tlora_transform_is_a_kronecker_product_starting_at_identity_and_diagonal_t_scales_columns():
    from pathopeft.adapters.tlora import factorize

    assert factorize(768) == [8, 8, 12]
    assert factorize(24) == [2, 3, 4]
    model = adapters.create("tlora", _mlp(), rank=4, targets=["0"])
    delta, base = _delta(model)
    assert sum(p.numel() for p in delta.parameters()) == (4 + 9 + 16) + 4 * (16 + 24)
    torch.testing.assert_close(delta.transform(), torch.eye(24))
    torch.testing.assert_close(delta.delta_weight(base), torch.zeros(16, 24))
    with torch.no_grad():  # diagonal factors: W0 T scales W0's columns by the Kronecker product of the diagonals
        for f in delta.factors:
            f.copy_(torch.diag(torch.rand(f.shape[0]) + 0.5))
    d = torch.diagonal(delta.transform())
    w0 = base.weight.detach().clone()
    torch.testing.assert_close(w0 + delta.delta_weight(base), w0 * d, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        delta.B.normal_()
    model.merge_adapter()
    model.unmerge_adapter()
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-4, rtol=1e-4)


def test_loca_dct_update_keeps_the_frobenius_norm_and_its_location_step_follows_the_larger_gradient():
    from pathopeft.adapters.loca import dct_matrix

    c = dct_matrix(12)
    torch.testing.assert_close(c @ c.T, torch.eye(12), atol=1e-5, rtol=0)
    model = adapters.create("loca", _mlp(), targets=["0"], n=5, alpha=2.0, location_steps=100)
    delta, base = _delta(model)
    assert sum(p.numel() for p in delta.parameters()) == 3 * 5
    with torch.no_grad():
        delta.coef.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5]))
        delta.loc.copy_(torch.tensor([[2 / 15, 0.3, 0.5, 0.7, 0.9], [0.2, 0.4, 0.6, 0.8, 0.95]]))  # distinct cells
    dw = delta.delta_weight(base)
    torch.testing.assert_close(dw.norm(), 2.0 * delta.coef.norm(), atol=1e-5, rtol=1e-5)
    # the schedule: step 0 coefficients, then 10 coefficient steps / 20 location steps per cycle, frozen after B_s
    phases = []
    for it in (0, 5, 10, 29, 30, 45, 100, 150):
        delta.step.fill_(it)
        phases.append(delta.phase())
    assert phases == [(True, False), (True, False), (False, True), (False, True), (True, False), (False, True),
                      (True, False), (True, False)]  # fmt: skip
    # a location step: K larger in magnitude below coefficient 0's row than above, so its row moves down
    delta.step.fill_(15)  # a location phase
    rows, cols = delta.locations()
    r, col = int(rows[0]), int(cols[0])
    k = torch.zeros(16, 24)
    k[r + 1, col] = -5.0  # moving coefficient 0 (a = 1) one row down lowers the loss by about 5
    g = delta.C_out.T @ k @ delta.C_in / 2.0  # so that K = alpha C_out G C_in^T
    delta.train()
    (delta.delta_weight(base) * g).sum().backward()
    assert delta.coef.grad.abs().sum() == 0  # locations only in this phase
    assert delta.loc.grad[0, 0] < 0  # gradient descent raises p, i.e. moves the row to r + 1
    with torch.no_grad():
        delta.loc -= delta.loc.grad / 15**2  # grad -1 (clamped) x (out - 1): one row
    assert int(delta.locations()[0][0]) == r + 1


def test_loca_diverged_locations_give_nan_outputs_not_an_index_error():
    model = adapters.create("loca", _mlp(), targets=["0"], n=5)
    delta, _base = _delta(model)
    with torch.no_grad():
        delta.loc.fill_(float("nan"))  # what a non-finite loss leaves after one optimiser step
        delta.coef.fill_(float("nan"))
    assert torch.isnan(model(torch.randn(2, 24))).all()


def test_randlora_core_equals_peft_randlora_on_linear_layers_shares_one_basis_and_adapts_convs(tmp_path):
    import peft

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 12))  # in < out, then out < in

    ours = adapters.create("randlora-core", mlp(), rank=4, targets=["0", "2"])
    theirs = peft.get_peft_model(mlp(), peft.RandLoraConfig(r=4, randlora_alpha=80, target_modules=["0", "2"]))
    g = torch.Generator().manual_seed(3)
    for name in ("0", "2"):
        delta, _ = _delta(ours, name)
        peft_layer = theirs.base_model.model.get_submodule(name)
        assert delta.lam.shape == peft_layer.randlora_lambda["default"].shape
        assert delta.gamma.shape == peft_layer.randlora_gamma["default"].shape
        torch.testing.assert_close(delta.gamma, peft_layer.randlora_gamma["default"])  # same init
        lam, gam = torch.randn(delta.lam.shape, generator=g) / 10, torch.randn(delta.gamma.shape, generator=g) / 10
        with torch.no_grad():
            delta.lam.copy_(lam), delta.gamma.copy_(gam)
            peft_layer.randlora_lambda["default"].copy_(lam), peft_layer.randlora_gamma["default"].copy_(gam)
        torch.testing.assert_close(delta.delta_weight(None), peft_layer.get_delta_weight("default"))
    x = torch.randn(5, 24, generator=g)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-5)
    first, second = _delta(ours, "0")[0], _delta(ours, "2")[0]
    assert first.shared is second.shared  # one set of bases for the model
    ours.to(torch.float64)
    assert first.shared.B.data_ptr() == second.shared.B.data_ptr()  # still one after a dtype move
    # full rank from r·n + n·min trainable numbers: rank 12 from 4·3 + 3·12 = 48 on the 40 → 12 layer
    assert torch.linalg.matrix_rank(second.delta_weight(None)) == 12
    assert sum(p.numel() for p in second.parameters() if p.requires_grad) == 48
    ours.save_pretrained(tmp_path)
    assert not any("shared" in k for k in load_file(tmp_path / "adapter_model.safetensors"))  # rebuilt from seed
    conv = adapters.create("randlora-core", nn.Sequential(nn.Conv2d(3, 8, 3)), rank=4, targets=["0"])
    assert sum(p.numel() for p in conv.parameters() if p.requires_grad) == 4 * 2 + 2 * 8  # 8 × 27 view


def test_blocklora_adds_the_input_chunks_before_one_shared_down_projection():
    for width_in in (24, 26):  # n divides the input width, and not (the last chunk is zero-padded)
        model = adapters.create("blocklora", _mlp(width_in), rank=3, targets=["0"], n_blocks=4)
        delta, base = _delta(model)
        chunk = -(-width_in // 4)
        assert delta.A_s.shape == (3, chunk)
        assert sum(p.numel() for p in delta.parameters()) == 3 * chunk + 3 * 16  # r·⌈in/n⌉ + r·out
        with torch.no_grad():
            delta.B.normal_()
        x = torch.randn(5, width_in)
        xp = nn.functional.pad(x, (0, 4 * chunk - width_in))
        block_sum = sum(xp[:, j * chunk : (j + 1) * chunk] @ delta.A_s.T @ delta.B.T for j in range(4))
        torch.testing.assert_close(delta(x, base) - base(x), block_sum, atol=1e-5, rtol=1e-5)  # the block sum
        a = delta.down_projection()
        for j in range(4):  # every chunk of the full down-projection is the one shared block
            seg = a[:, j * chunk : (j + 1) * chunk]
            assert torch.equal(seg, delta.A_s[:, : seg.shape[1]])
        torch.testing.assert_close(delta(x, base), base(x) + x @ delta.delta_weight(base).T, atol=1e-5, rtol=1e-5)


def test_tera_shares_one_frozen_network_across_layers_and_trains_only_diagonals_for_a_high_rank_update(tmp_path):
    from pathopeft.adapters.tera import modes

    model = adapters.create("tera", nn.Sequential(nn.Linear(96, 96), nn.Linear(96, 96), nn.Linear(96, 40)),
                            targets=["0", "1", "2"])  # fmt: skip
    (d0, base0), (d1, _), (d2, _) = (_delta(model, n) for n in ("0", "1", "2"))
    assert modes(96, 96) == [8, 12, 8, 12]
    assert d0.shared is d1.shared is d2.shared
    assert d0.core() is d1.core()  # the same core tensor object for two layers of one shape
    assert d0.factors()[0] is d2.factors()[2]  # and the 8-wide factor of the 96 → 40 layer's input
    assert not any(p.requires_grad for p in d0.shared.buffers())
    trainable = sum(p.numel() for p in d0.parameters())
    assert trainable == 8 + 12 + 8 + 12
    assert torch.count_nonzero(d0.delta_weight(base0)) == 0  # ΔW = 0 at init
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in d0.scales:
            s.copy_(1 + torch.rand(s.shape, generator=g))
    assert torch.linalg.matrix_rank(d0.delta_weight(base0)) == 96  # full rank from 40 trainable numbers
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert modes(40, 96) == [5, 8, 8, 12]
    assert sum(t.numel() for t in saved.values()) == 40 + 40 + (5 + 8 + 8 + 12)  # the scales, nothing shared
