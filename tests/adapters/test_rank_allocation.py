"""Defining properties of the rank-allocation methods (issue 16): each test fails if the method is not the paper's."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pathopeft import adapters
from tests.adapters.test_zoo import _delta, _mlp


# --- DyLoRA -------------------------------------------------------------------------------------------------
def _trained_dylora(r: int = 6):
    model = adapters.create("dylora", _mlp(), rank=r, targets=["0", "2"])
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_(0, 0.2)
    return model


def test_dylora_uses_the_first_b_ranks_scaled_by_alpha_over_b_and_frozen_mode_trains_only_the_bth():
    model = _trained_dylora()
    delta, base = _delta(model)
    model.train()
    for b in (1, 3, 6):
        delta.train_rank = b
        expected = (6 / b) * delta.B[:, :b] @ delta.A[:b]  # alpha = r = 6
        torch.testing.assert_close(delta.delta_weight(base), expected)
    delta.train_rank = 3
    model.zero_grad()
    model(torch.randn(4, 24)).pow(2).sum().backward()
    rows = delta.A.grad.abs().sum(1)
    cols = delta.B.grad.abs().sum(0)
    assert rows[2] > 0
    assert cols[2] > 0
    assert float(rows[[0, 1, 3, 4, 5]].abs().sum()) == 0.0  # ranks 1, 2 detached; 4..6 unused
    assert float(cols[[0, 1, 3, 4, 5]].abs().sum()) == 0.0


def test_dylora_rank_sampler_draws_one_uniform_rank_per_step_for_every_layer():
    from pathopeft.adapters.dylora import DyLoraRankSampler

    model = _trained_dylora(r=4)
    sampler = DyLoraRankSampler()
    torch.manual_seed(0)
    seen = []
    for i in range(400):
        sampler.on_train_batch_start(None, model, None, i)
        ranks = {d.train_rank for d in model.modules() if hasattr(d, "train_rank")}
        assert len(ranks) == 1  # one b for the whole model
        seen.append(ranks.pop())
    counts = torch.bincount(torch.tensor(seen), minlength=5)
    assert counts[0] == 0
    assert (counts[1:] > 70).all()
    sampler.on_train_end(None, model)
    assert all(d.train_rank is None for d in model.modules() if hasattr(d, "train_rank"))


def test_a_truncated_dylora_file_is_its_slice_and_loads_as_the_rank_b_adapter(tmp_path):
    from safetensors.torch import load_file

    from pathopeft.adapters.dylora import set_rank, truncate_adapter

    model = _trained_dylora(r=6).eval()
    adapters.save(model, tmp_path / "full")
    x = torch.randn(5, 24)
    for b in (1, 2, 5):
        set_rank(model, b)
        expected = model(x)
        truncate_adapter(tmp_path / "full", tmp_path / f"r{b}", b)
        full = load_file(str(tmp_path / "full" / "adapter_model.safetensors"))
        part = load_file(str(tmp_path / f"r{b}" / "adapter_model.safetensors"))
        for k, v in part.items():
            sliced = full[k][:b] if k.endswith(".A") else full[k][:, :b] if k.endswith(".B") else full[k]
            assert torch.equal(v, sliced)
        loaded = adapters.load(_mlp(), tmp_path / f"r{b}").eval()
        torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=1e-6)
    set_rank(model, 6)
    with pytest.raises(ValueError, match=r"outside 1\.\.6"):
        set_rank(model, 7)
    with pytest.raises(ValueError, match=r"outside 1\.\.6"):
        truncate_adapter(tmp_path / "full", tmp_path / "r7", 7)


# --- SoRA and CoDyRA: the gated LoRA -------------------------------------------------------------------------
def test_sora_gate_threshold_is_the_soft_threshold_and_the_l1_term_is_the_mean_gate_magnitude():
    from pathopeft.adapters.sora import sora_loss

    model = adapters.create("sora", _mlp(), rank=4, targets=["0"], l1=0.01)
    delta, base = _delta(model)
    with torch.no_grad():
        delta.gate.copy_(torch.tensor([0.5, -0.3, 1.5e-3, -2e-3]))
        delta.B.normal_()
    torch.testing.assert_close(sora_loss(model), 0.01 * delta.gate.abs().mean())
    delta.threshold(1e-3)
    torch.testing.assert_close(delta.gate.detach(), torch.tensor([0.499, -0.299, 5e-4, -1e-3]))  # not zeroed < 2ξ
    torch.testing.assert_close(delta.delta_weight(base), (delta.B * delta.gate) @ delta.A)  # alpha = r: scale 1
    delta.threshold(1e-3)
    assert delta.gate[2] == 0
    assert delta.gate[3] == 0
    assert delta.live_ranks() == 2


def test_sora_schedule_is_dense_then_rises_to_xi_max_in_equal_phases():
    from pathopeft.adapters.sora import phase_threshold

    xs = [phase_threshold(s, 100, 6e-4, 6, 0.4) for s in range(100)]
    assert xs[:40] == [0.0] * 40
    assert xs[40] == pytest.approx(1e-4)
    assert xs[-1] == pytest.approx(6e-4)
    assert all(a <= b for a, b in itertools.pairwise(xs))
    assert len(set(xs[40:])) == 6


def test_sora_training_zeroes_ranks_monotonically_and_pruning_gives_a_smaller_lora_with_the_same_output():
    from pathopeft.adapters.sora import GateThreshold, live_ranks, phase_threshold, prune_to_lora

    model = adapters.create("sora", _mlp(), rank=8, targets=["0", "2"], xi_max=0.02, levels=4, dense_fraction=0.25)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    x, target = torch.randn(32, 24), torch.randn(32, 10)
    counts = [live_ranks(model)]
    model.train()
    for step in range(40):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()
        for d in model.modules():
            if hasattr(d, "threshold"):
                d.threshold(phase_threshold(step, 40, 0.02, 4, 0.25))
        counts.append(live_ranks(model))
    assert counts[0] == 16
    assert 0 < counts[-1] < 16
    assert all(a >= b for a, b in itertools.pairwise(counts))  # the count only falls
    assert GateThreshold is adapters.ADAPTERS.entry("sora").caps["callback"]
    model.eval()
    xq = torch.randn(6, 24)
    expected = model(xq)
    lora = prune_to_lora(model)
    torch.testing.assert_close(lora(xq), expected, atol=1e-5, rtol=1e-5)
    n_lora = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    kept = counts[-1]
    assert 0 < n_lora < 8 * (24 + 16) + 8 * (16 + 10)
    assert n_lora <= kept * (24 + 16)  # ranks of the 24→16 layer cost 40, of the 16→10 layer 26


def test_sora_prunes_conv_layers_into_peft_conv_lora():
    from pathopeft.adapters.sora import prune_to_lora

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    model = adapters.create("sora", net, rank=4, targets=["0", "2"]).eval()
    with torch.no_grad():
        for d in model.modules():
            if hasattr(d, "gate"):
                d.B.normal_()
                d.gate[1] = 0.0
    x = torch.randn(2, 3, 12, 12)
    expected = model(x)
    torch.testing.assert_close(prune_to_lora(model)(x), expected, atol=1e-5, rtol=1e-5)


def test_codyra_task_boundary_merges_live_ranks_into_w_and_restarts_without_changing_the_model():
    from pathopeft.adapters.codyra import next_task

    model = adapters.create("codyra", _mlp(), rank=4, targets=["0"]).eval()
    delta, base = _delta(model)
    with torch.no_grad():
        delta.B.normal_()
        delta.gate[2] = 0.0
    torch.testing.assert_close(delta.delta_weight(base), (delta.B * delta.gate) @ delta.A)  # no α/r scale
    x = torch.randn(5, 24)
    before = model(x)
    w0 = base.weight.detach().clone()
    expected_w = w0 + delta.delta_weight(base).detach()
    assert next_task(model) == 3
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)  # same function across the boundary
    torch.testing.assert_close(base.weight.detach(), expected_w)
    assert float(delta.B.detach().abs().sum()) == 0.0
    assert delta.live_ranks() == 4
    plain = model.merge_and_unload()  # no inference cost: a plain model with the past tasks in its weights
    assert not any("deltas" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(x), before, atol=1e-6, rtol=1e-6)


# --- SLTrain ------------------------------------------------------------------------------------------------
def test_sltrain_support_is_fixed_its_count_is_the_formula_and_its_gradient_is_the_gathered_dense_one():
    model = adapters.create("sltrain", _mlp(), rank=2, targets=["0", "2"], delta=0.1)
    delta, base = _delta(model)
    nnz = int(0.1 * 16 * 24)
    assert delta.values.numel() == nnz
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (16 + 24) + nnz + 2 * (10 + 16) + 16
    other, _ = _delta(model, "2")
    assert not torch.equal(delta.support[:16], other.support[:16])  # each layer draws its own support
    support = delta.support.clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x, target = torch.randn(8, 24), torch.randn(8, 10)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        opt.step()
    assert torch.equal(delta.support, support)  # never re-drawn
    s = delta.sparse().detach().reshape(-1)
    off = torch.ones_like(s, dtype=torch.bool)
    off[support] = False
    assert float(s[off].abs().sum()) == 0.0 and float(s[support].abs().sum()) > 0  # noqa: PT018
    # d loss / d values = the dense gradient of W gathered at the support
    model.zero_grad()
    w = (base.weight + delta.delta_weight(base)).detach().requires_grad_(True)
    loss = nn.functional.linear(x, w, base.bias).pow(2).sum()
    loss.backward()
    dense = w.grad.reshape(-1)[support]
    model.zero_grad()
    model.base_model[0](x).pow(2).sum().backward()
    torch.testing.assert_close(delta.values.grad, dense)


def test_sltrain_pretrain_mode_replaces_the_weight_by_the_low_rank_plus_sparse_product():
    import math

    model = adapters.create("sltrain", _mlp(), rank=3, targets=["0"], delta=0.05, mode="pretrain", alpha=6)
    delta, base = _delta(model)
    assert float(delta.values.detach().abs().max()) <= 1 / math.sqrt(24)  # nn.Linear's bound, as the code
    with torch.no_grad():
        delta.B.normal_()
    w = 2.0 * delta.B @ delta.A + delta.sparse()  # alpha / r = 2
    x = torch.randn(4, 24)
    torch.testing.assert_close(model.base_model[0](x), x @ w.T + base.bias, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(base.weight.detach(), w.detach(), atol=1e-6, rtol=1e-6)
    with pytest.raises(RuntimeError, match="cannot be unmerged"):
        model.unmerge_adapter()


# --- LoRA-Pro -----------------------------------------------------------------------------------------------
def _lorapro_case(m: int = 6, n: int = 5, r: int = 2, s: float = 2.0):
    g = torch.Generator().manual_seed(0)
    A, B, G = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((r, n), (m, r), (m, n)))
    return A, B, G, s, s * B.T @ G, s * G @ A.T  # the LoRA gradients of a loss whose dL/dW is G


def test_lorapro_step_is_the_least_squares_projection_of_the_full_gradient_and_the_minimum_norm_pair():
    from pathopeft.adapters.lorapro import equivalent_gradient, project

    A, B, G, s, gA_raw, gB_raw = _lorapro_case()
    gA, gB = project(A, B, gA_raw, gB_raw, s)
    # brute force: every (gA, gB) as one vector, the linear map to s(B gA + gB A), least squares against G
    cols = []
    for i in range(gA.numel()):
        e = torch.zeros_like(gA).reshape(-1)
        e[i] = 1
        cols.append(equivalent_gradient(A, B, e.reshape(gA.shape), torch.zeros_like(gB), s).reshape(-1))
    for i in range(gB.numel()):
        e = torch.zeros_like(gB).reshape(-1)
        e[i] = 1
        cols.append(equivalent_gradient(A, B, torch.zeros_like(gA), e.reshape(gB.shape), s).reshape(-1))
    M = torch.stack(cols, 1)
    best = torch.linalg.pinv(M) @ G.reshape(-1)  # the minimum-norm least-squares solution
    torch.testing.assert_close(torch.cat([gA.reshape(-1), gB.reshape(-1)]), best, atol=1e-6, rtol=1e-6)
    eq = equivalent_gradient(A, B, gA, gB, s)
    torch.testing.assert_close(eq.reshape(-1), M @ best, atol=1e-6, rtol=1e-6)
    vanilla = equivalent_gradient(A, B, gA_raw, gB_raw, s)
    assert torch.linalg.norm(eq - G) <= torch.linalg.norm(vanilla - G)
    for _ in range(20):  # and no other LoRA step comes closer
        other = equivalent_gradient(A, B, torch.randn_like(gA), torch.randn_like(gB), s)
        assert torch.linalg.norm(eq - G) <= torch.linalg.norm(other - G) + 1e-9


def test_lorapro_optimizer_trains_a_peft_lora_and_its_entry_names_it():
    from pathopeft.adapters.lorapro import LoraProAdamW, lora_pairs, lora_pro_optimizer

    torch.manual_seed(0)
    model = adapters.create("lorapro", _mlp(), rank=4, targets=["0", "2"])
    assert adapters.ADAPTERS.entry("lorapro").caps["optimizer"] is lora_pro_optimizer
    pairs = lora_pairs(model)
    assert len(pairs) == 2
    opt = lora_pro_optimizer(model, lr=1e-2)
    assert isinstance(opt, LoraProAdamW)
    x, target = torch.randn(64, 24), torch.randn(64, 10)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert opt.state[pairs[0][0]]["exp_avg"].shape == (16, 24)  # Adam moments of the full m×n equivalent gradient


def test_lorapro_names_divergence_instead_of_failing_inside_an_svd():
    from pathopeft.adapters.lorapro import lora_pairs, lora_pro_optimizer

    torch.manual_seed(0)
    model = adapters.create("lorapro", _mlp(), rank=4, targets=["0", "2"])
    opt = lora_pro_optimizer(model, lr=1e-2)
    nn.functional.mse_loss(model(torch.randn(8, 24)), torch.randn(8, 10)).backward()
    with torch.no_grad():
        lora_pairs(model)[0][1].fill_(float("nan"))  # B of the first layer blown up, as after a diverged step
    with pytest.raises(FloatingPointError, match="diverged; lower the learning rate"):
        opt.step()


# --- IncreLoRA ----------------------------------------------------------------------------------------------
def test_increlora_growth_leaves_the_output_unchanged_and_the_importance_is_the_codes_sensitivity():
    model = adapters.create("increlora", _mlp(), rank=4, targets=["0", "2"], init_rank=2)
    delta, base = _delta(model)
    assert delta.rank == 2
    with torch.no_grad():
        delta.E.normal_()
    x = torch.randn(5, 24)
    before = model(x)
    assert delta.grow(3) == 3
    assert delta.rank == 5
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=1e-6)  # new ranks at E = 0, old E rescaled
    model.train()
    out = model(x).pow(2).sum()
    dw = delta.delta_weight(base).detach()
    w = (base.weight + dw).detach().requires_grad_(True)  # dL/dΔW = dL/dW, computed independently
    y = nn.functional.linear(x, w, base.bias)
    model.base_model[2](nn.functional.relu(y)).pow(2).sum().backward()
    out.backward()
    torch.testing.assert_close(
        delta._sensitivity, float((dw * w.grad).abs().sum() / dw.numel() ** 0.5), rtol=1e-5, atol=0
    )


def test_increlora_adds_ranks_to_the_most_important_layers_and_never_past_the_budget():
    from pathopeft.adapters.increlora import allocate, increlora_deltas, total_rank

    model = adapters.create("increlora", _mlp(), rank=2, targets=["0", "2"], init_rank=1, warmup_steps=0,
                            interval=1, top_h=1, ranks_per_step=3)  # fmt: skip
    first, second = increlora_deltas(model)
    first.ema_ipt, first.ema_unc, second.ema_ipt, second.ema_unc = 1.0, 1.0, 2.0, 2.0
    assert allocate(model, 1) == 2  # budget 2 x 2 = 4, 2 in use: the addition of 3 is cut to 2
    assert (first.rank, second.rank) == (1, 3)  # to the higher score only (top_h 1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    x, target = torch.randn(16, 24), torch.randn(16, 10)
    model.train()
    for step in range(2, 12):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), target).backward()
        allocate(model, step)
        opt.step()
        assert total_rank(model) <= 4
    assert total_rank(model) == 4


# --- ALLoRA -------------------------------------------------------------------------------------------------
def test_allora_scales_each_output_rows_gradient_by_its_norm_and_leaves_the_input_gradient_alone():
    model = adapters.create("allora", _mlp(), rank=3, targets=["0"], eta_sq=2.0)
    delta, base = _delta(model)
    with torch.no_grad():
        delta.B.normal_(0, 0.5)
    x = torch.randn(6, 24, requires_grad=True)
    model.train()
    model(x).pow(2).sum().backward()
    dw = (delta.B @ delta.A).detach()
    # the plain gradient of the same loss w.r.t. ΔW, computed without the adapter's hook
    w = (base.weight + dw).detach().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    model.base_model[2](nn.functional.relu(nn.functional.linear(x2, w, base.bias))).pow(2).sum().backward()
    scale = 1.0 / torch.sqrt(dw.norm(dim=1) + 1.0 / 2.0)  # 1/sqrt(||(BA)_i|| + 1/eta^2), the norm not squared
    g = w.grad * scale[:, None]
    torch.testing.assert_close(delta.B.grad, g @ delta.A.detach().T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta.A.grad, delta.B.detach().T @ g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)  # earlier layers see the plain gradient
    assert not torch.allclose(scale, scale[0].expand_as(scale))  # rows really differ
    torch.testing.assert_close(delta.delta_weight(base), delta.B @ delta.A)  # no alpha/r


# --- PEGO ---------------------------------------------------------------------------------------------------
def test_pego_regulariser_is_zero_exactly_when_members_are_orthogonal_to_w_and_to_each_other():
    from pathopeft.adapters.pego import pego_loss

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 16))
    model = adapters.create("pego", net, rank=2, targets=["0"], members=2, reg_weight=1.0)
    delta, base = _delta(model)
    # an orthonormal basis of R^24 whose first 16 vectors span W's rows: the other 8 are orthogonal to W
    Q, _ = torch.linalg.qr(torch.cat([base.weight.detach().T, torch.randn(24, 8)], 1))
    free = Q[:, 16:].T  # 8 directions orthogonal to every row of W
    with torch.no_grad():
        delta.A[0, 0] = free[:2]  # member 0 in directions 0-1, member 1 in directions 2-3: mutually orthogonal
        delta.A[1, 0] = free[2:4]
        delta.B.normal_()
    assert float(pego_loss(model).detach()) < 1e-4
    torch.testing.assert_close(delta.delta_weight(base), delta.B[0, 0] @ delta.A[0, 0] + delta.B[1, 0] @ delta.A[1, 0])
    with torch.no_grad():
        delta.A[1, 0, 0] = free[0]  # member 1 now shares a direction with member 0: diversify > 0
    dws = delta.member_updates()[:, 0].detach()
    assert float(pego_loss(model).detach()) == pytest.approx(float((dws[0] @ dws[1].T).abs().sum()), rel=1e-4)
    with torch.no_grad():
        delta.A[1, 0] = free[2:4] + 0.1 * base.weight.detach()[:2]  # back to orthogonal members, but into W's rows
    w = base.weight.detach()
    expected = sum(float((w @ dws_i.T).abs().sum()) for dws_i in delta.member_updates()[:, 0].detach())
    assert float(pego_loss(model).detach()) >= expected > 1e-3  # the preserve term


def test_pego_adapts_q_and_v_of_a_fused_qkv_layer_only():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", depth=1, num_classes=0, img_size=32, patch_size=16)
    model = adapters.create("pego", vit, rank=2, targets=["blocks.0.attn.qkv"], members=2)
    layer = model.base_model.get_submodule("blocks.0.attn.qkv")
    delta = layer.deltas["default"]
    with torch.no_grad():
        delta.B.normal_()
    dw = delta.delta_weight(layer.base_layer)
    third = dw.shape[0] // 3
    assert float(dw[third : 2 * third].abs().sum()) == 0.0  # k untouched
    assert float(dw[:third].abs().sum()) > 0 and float(dw[2 * third :].abs().sum()) > 0  # noqa: PT018


# --- DiffoRA ------------------------------------------------------------------------------------------------
def _diffora(candidates=(0, 2, 4), keep_fraction=0.5):
    model = _mlp()
    model = nn.Sequential(model[0], nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), model[2])
    model = adapters.create("diffora", model, rank=4, targets=["0", "2", "4", "6"], candidates=list(candidates),
                            keep_fraction=keep_fraction)  # fmt: skip
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith((".B", ".logits")):
                p.normal_(0, 0.5)
    return model


def test_diffora_relaxed_update_is_the_softmax_weighted_sum_over_weight_shared_candidates():
    model = _diffora()
    delta, base = _delta(model)
    p = torch.softmax(delta.logits, 0)
    expected = sum(pc * delta.scale * (delta.B[:, :c] @ delta.A[:c]) for pc, c in zip(p, (0, 2, 4), strict=True))
    torch.testing.assert_close(delta.delta_weight(base), expected)
    assert delta.logits.requires_grad
    assert delta.logits.numel() == 3
    x = torch.randn(5, 24)
    loss = model(x).square().sum()
    loss.backward()
    assert delta.logits.grad is not None
    assert delta.logits.grad.abs().sum() > 0


def test_diffora_discretisation_keeps_exactly_the_budgeted_layers_with_the_supernet_weights():
    from pathopeft.adapters.diffora import chosen_ranks, diffora_deltas, discretise

    model = _diffora(keep_fraction=0.5)
    deltas = diffora_deltas(model)
    prob = {n: float(d.adapter_probability().detach()) for n, d in deltas.items()}
    before = {n: (d.A.detach().clone(), d.B.detach().clone()) for n, d in deltas.items()}
    best = {n: max((float(p), c) for p, c in zip(torch.softmax(d.logits, 0), d.candidates, strict=True) if c)[1]
            for n, d in deltas.items()}  # fmt: skip
    chosen = discretise(model)
    assert chosen == chosen_ranks(model)
    kept = {n for n, c in chosen.items() if c}
    assert len(kept) == 2  # round(0.5 · 4)
    assert kept == set(sorted(prob, key=prob.get, reverse=True)[:2])
    for n, d in deltas.items():
        base = model.base_model.get_submodule(n.removeprefix("base_model.")).base_layer
        A, B = before[n]
        c = chosen[n]
        if c:
            assert c == best[n]
            torch.testing.assert_close(d.delta_weight(base), d.scale * (B[:, :c] @ A[:c]))
        else:
            assert not d.delta_weight(base).any()
            assert not d.A.requires_grad
            assert not d.B.requires_grad
        assert not d.logits.requires_grad


def test_diffora_search_callback_discretises_after_the_search_share_and_a_saved_adapter_reloads_discretised(tmp_path):
    from types import SimpleNamespace

    from pathopeft.adapters.diffora import DifforaSearch, chosen_ranks

    assert adapters.ADAPTERS.entry("diffora").caps["callback"] is DifforaSearch
    model = _diffora(candidates=(), keep_fraction=0.25)  # [] → candidates {0, r}
    cb = DifforaSearch()
    for step in (0, 3):
        cb.on_train_batch_end(SimpleNamespace(max_steps=10, global_step=step), model)
        assert set(chosen_ranks(model).values()) == {-1}  # still relaxed before 0.5 · 10 steps
    cb.on_train_batch_end(SimpleNamespace(max_steps=10, global_step=5), model)
    ranks = chosen_ranks(model)
    assert sorted(ranks.values()) == [0, 0, 0, 4]
    x = torch.randn(4, 24)
    expected = model(x)
    model.save_pretrained(tmp_path)
    fresh = adapters.load(_diffora_base(), tmp_path)
    assert chosen_ranks(fresh) == ranks
    torch.testing.assert_close(fresh(x), expected)


def _diffora_base() -> nn.Module:
    model = _mlp()
    return nn.Sequential(model[0], nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), model[2])


def test_diffora_refuses_candidates_without_the_empty_choice_or_beyond_the_rank():
    for bad in ([2, 4], [0, 9], [0, 2, 2]):
        with pytest.raises(ValueError, match="candidates"):
            adapters.create("diffora", _mlp(), rank=4, targets=["0"], candidates=bad)


@pytest.mark.parametrize("method", ["sora", "codyra", "increlora", "diffora"])
def test_rank_allocating_methods_report_the_rank_of_every_adapted_layer(method):
    model = adapters.create(method, _mlp(), rank=4, targets=["0", "2"])
    ranks = adapters.ADAPTERS.entry(method).caps["layer_ranks"](model)
    assert sorted(n.rsplit(".", 1)[-1] for n in ranks) == ["0", "2"]
    start = {"sora": 4, "codyra": 4, "increlora": 1, "diffora": 4}[method]  # IncreLoRA starts at init_rank 1
    assert set(ranks.values()) == {start}
    for m in model.modules():  # switch one rank off (a zero gate, an inactive reserve rank, a discrete cut)
        if hasattr(m, "gate"):
            with torch.no_grad():
                m.gate[0] = 0
            break
    else:
        if method == "diffora":
            from pathopeft.adapters.diffora import discretise

            discretise(model, keep_fraction=0.5)
            assert sorted(adapters.ADAPTERS.entry(method).caps["layer_ranks"](model).values()) == [0, 4]
        return
    assert sorted(adapters.ADAPTERS.entry(method).caps["layer_ranks"](model).values()) == [3, 4]
