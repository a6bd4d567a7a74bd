"""What each of our methods claims beyond the shared matrix: the maths in their docstrings."""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from pathopeft import adapters
from pathopeft.adapters.salt import SaltConfig, SaltDelta
from pathopeft.adapters.snella import BudgetAllocator, SnellaBudgetCallback, SnellaConfig, SnellaDelta
from pathopeft.adapters.snella.layer import sparsify
from pathopeft.adapters.wara import WaraConfig, WaraDelta, WaraSubbandConfig, WaraSubbandDelta
from pathopeft.adapters.wara.wavelets import analysis_matrix, dwt2, idwt2, subbands_2d
from tests.adapters.test_conformance import _vit, build, x_for


# --- wavelets ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("wavelet", "level", "shape"), [("haar", 1, (8, 12)), ("haar", 2, (16, 8)), ("db2", 1, (8, 8)), ("db2", 2, (32, 16)), ("db2", 1, (2, 4))])  # fmt: skip
def test_dwt_is_orthogonal_with_perfect_reconstruction(wavelet, level, shape):
    for n in shape:
        d = analysis_matrix(n, wavelet, level, dtype=torch.float64)
        torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64))
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(idwt2(dwt2(x, wavelet, level), wavelet, level), x)
    idwt2(dwt2(x, wavelet, level), wavelet, level).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))  # differentiable, and the round trip is identity


@pytest.mark.parametrize(("wavelet", "level"), [("haar", 1), ("db2", 1), ("db2", 2), ("db4", 2), ("sym4", 1)])
def test_dwt_matrices_are_pywavelets_periodization(wavelet, level):
    """The filters' order and alignment are PyWavelets' (``mode="periodization"``), so "db2" means the
    standard transform, not a shifted one."""
    pywt = pytest.importorskip("pywt")
    n = 16
    basis = np.eye(n)
    theirs = np.stack([np.concatenate(pywt.wavedec(basis[i], wavelet, "periodization", level)) for i in range(n)], 1)
    np.testing.assert_allclose(analysis_matrix(n, wavelet, level, dtype=torch.float64).numpy(), theirs, atol=1e-12)


def test_haar_of_a_constant_is_all_in_ll():
    c = dwt2(torch.ones(8, 8, dtype=torch.float64), "haar", 1)
    assert c[:4, :4].abs().min() > 0
    c[:4, :4] = 0
    assert c.abs().max() < 1e-12


def test_subbands_tile_the_coefficient_matrix():
    covered = torch.zeros(16, 8, dtype=torch.int64)
    bands = subbands_2d(16, 8, level=2)
    assert [b[0] for b in bands] == ["LL2", "LH2", "HL2", "HH2", "LH1", "HL1", "HH1"]
    for _, rows, cols in bands:
        covered[rows, cols] += 1
    assert torch.equal(covered, torch.ones_like(covered))


def test_unknown_wavelet_fails_at_config_time():
    with pytest.raises(ValueError, match="wavelet 'nope'"):
        WaraConfig(wavelet="nope")


# --- WaRA (the paper's Figure 1) -------------------------------------------------------------------------------
def _trained_wara(layer: nn.Module, **kw) -> WaraDelta:
    torch.manual_seed(0)
    delta = WaraDelta(layer, WaraConfig(**kw)).double()
    with torch.no_grad():
        delta.B.normal_()
    return delta


@pytest.mark.parametrize("wavelet", ["haar", "db2"])
def test_wara_is_figure_1_on_the_input_embedding(wavelet):
    """Oracle: PyWavelets' 2-D DWT of X (features × tokens), the shared B·A on each of the four subbands, the
    inverse DWT: must equal ΔW X from the factored weight-space path."""
    pywt = pytest.importorskip("pywt")
    d_in, d_out, k, r = 12, 10, 6, 3
    layer = nn.Linear(d_in, d_out).double()
    delta = _trained_wara(layer, r=r, wavelet=wavelet, alpha=2 * r)
    x = torch.randn(d_in, k, dtype=torch.float64)
    ll, (lh, hl, hh) = pywt.dwt2(x.numpy(), wavelet, mode="periodization")
    ba = (delta.B @ delta.A).detach().numpy() * delta.scaling
    out = pywt.idwt2((ba @ ll, (ba @ lh, ba @ hl, ba @ hh)), wavelet, mode="periodization")
    dw = delta.delta_weight(layer)
    torch.testing.assert_close(dw @ x, torch.from_numpy(out))
    xb = torch.randn(4, d_in, dtype=torch.float64)  # the layer's forward is base + that update
    torch.testing.assert_close(delta(xb, layer), layer(xb) + xb @ dw.T)


def test_wara_weight_update_is_the_inverse_dwt_of_its_assembled_coefficients():
    """ΔW = IDWT2(C) with C's LL = HH = (α/r)·BA and LH = HL = 0, from the plain transform, not the factors."""
    layer = nn.Linear(16, 8).double()
    delta = _trained_wara(layer, r=2, wavelet="db2")
    ba = (delta.B @ delta.A).detach()
    c = torch.zeros(8, 16, dtype=torch.float64)
    c[:4, :8], c[4:, 8:] = ba, ba
    torch.testing.assert_close(delta.delta_weight(layer), idwt2(c, "db2", 1))


def test_haar_ll_only_update_is_blockwise_constant_and_hh_only_is_a_checkerboard():
    m = torch.randn(4, 6, dtype=torch.float64)
    c = torch.zeros(8, 12, dtype=torch.float64)
    c[:4, :6] = m
    ll = idwt2(c, "haar", 1)
    torch.testing.assert_close(ll, torch.kron(m, torch.ones(2, 2, dtype=torch.float64)) / 2)
    c.zero_()
    c[4:, 6:] = m
    hh = idwt2(c, "haar", 1)
    sign = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(hh, torch.kron(m, sign) / 2)


def test_haar_wara_blocks_are_ll_plus_hh_only():
    """Figure 1's shared pair puts the update in LL and HH: every 2×2 block of ΔW is [[p, q], [q, p]]."""
    layer = nn.Linear(12, 8).double()
    dw = _trained_wara(layer, r=2).delta_weight(layer)
    assert dw.abs().max() > 0
    torch.testing.assert_close(dw[0::2, 0::2], dw[1::2, 1::2])
    torch.testing.assert_close(dw[0::2, 1::2], dw[1::2, 0::2])


def test_wara_rank_and_parameters_against_lora():
    """Rank up to 2r for r·(out + in)/2 parameters: LoRA's count at rank r/2."""
    r, out_f, in_f = 4, 24, 16
    layer = nn.Linear(in_f, out_f).double()
    delta = _trained_wara(layer, r=r)
    n = sum(p.numel() for p in delta.parameters())
    assert n == WaraDelta.expected_trainable(out_f, in_f, WaraConfig(r=r)) == r * (out_f + in_f) // 2
    assert torch.linalg.matrix_rank(delta.delta_weight(layer)) == 2 * r


def test_wara_on_conv_runs_the_wavelet_over_input_channels():
    """Tap-major im2col: with Haar, input channels 2m and 2m+1 pair at the same kernel tap; ΔW equals the
    Linear form on the (out × kh·kw·in) view, permuted back to PyTorch's layout."""
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    delta = _trained_wara(conv, r=2)
    dw = delta.delta_weight(conv).view(6, 4, 3, 3)
    p, q = delta.factors()
    torch.testing.assert_close(dw.permute(0, 2, 3, 1).reshape(6, -1), p @ q)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(delta(x, conv), nn.functional.conv2d(x, conv.weight + dw, conv.bias, padding=1))


def test_old_wara_files_with_a_level_point_to_wara_subband():
    with pytest.raises(ValueError, match="wara-subband"):
        WaraConfig.from_dict({"adapter_type": "wara", "r": 4, "level": 1})


# --- wara-subband (pathopeft's per-subband design) ----------------------------------------------------------------
def _randomised_subband(out_f: int, in_f: int, r: int, only: str | None = None) -> torch.Tensor:
    layer = nn.Linear(in_f, out_f).double()
    delta = WaraSubbandDelta(layer, WaraSubbandConfig(r=r)).double()
    with torch.no_grad():
        for (name, _, _), b in zip(delta.bands, delta.B, strict=True):
            b.copy_(torch.randn_like(b) if only in (None, name) else torch.zeros_like(b))
    return delta.delta_weight(layer)


def test_wara_subband_is_not_lora():
    """Per-subband factors reach rank 4r; LoRA with the same parameter count (rank 2r) cannot exceed 2r."""
    r, out_f, in_f = 2, 24, 16
    dw = _randomised_subband(out_f, in_f, r)
    lora_rank_same_params = WaraSubbandDelta.expected_trainable(out_f, in_f, WaraSubbandConfig(r=r)) // (out_f + in_f)
    assert lora_rank_same_params == 2 * r
    assert torch.linalg.matrix_rank(dw) == 4 * r


@pytest.mark.parametrize(("band", "sign"), [("LL1", [[1, 1], [1, 1]]), ("HH1", [[1, -1], [-1, 1]])])
def test_wara_subband_layout(band, sign):
    """An LL-only update is constant on 2×2 blocks, an HH-only one has the checkerboard sign (catches a swapped
    or transposed subband layout)."""
    dw = _randomised_subband(8, 12, 2, only=band)
    block = dw[0::2, 0::2]
    for a, b in itertools.product(range(2), range(2)):
        torch.testing.assert_close(dw[a::2, b::2], sign[a][b] * block)


def test_wara_subband_factored_forward_equals_dense_delta():
    layer = nn.Linear(10, 14)  # odd/non-power sizes: padded to even and cropped
    delta = WaraSubbandDelta(layer, WaraSubbandConfig(r=3, wavelet="db2"))
    with torch.no_grad():
        for b in delta.B:
            b.normal_()
    x = torch.randn(5, 10)
    dense = nn.functional.linear(x, layer.weight + delta.delta_weight(layer), layer.bias)
    torch.testing.assert_close(delta(x, layer), dense, atol=1e-5, rtol=1e-5)


# --- SALT ----------------------------------------------------------------------------------------------------
def test_salt_takes_the_svd_of_weights_loaded_after_wrapping():
    """Users load checkpoints into a wrapped model; SALT's SVD must see them (it is taken at first use)."""
    x = x_for("vit")
    model = adapters.create("salt", build("vit", seed=0), rank=4, targets="attn")
    other = build("vit", seed=1)
    sd = {k.replace(".base_layer", ""): v for k, v in other.state_dict().items()}
    for name, p in model.base_model.named_parameters():
        if ".deltas." not in name:
            with torch.no_grad():
                p.copy_(sd[name.replace(".base_layer", "")])
    torch.testing.assert_close(model(x), other(x), atol=2e-5, rtol=1e-4)


def test_salt_update_matches_the_svd_formula_and_clips_negative_entries():
    torch.manual_seed(0)
    layer = nn.Linear(6, 8)
    d = SaltDelta(layer, SaltConfig(r=2, r_lora=2))
    with torch.no_grad():
        d.alpha.fill_(-1.0)  # α·s + β < 0: the ReLU must zero these singular values
        d.Y.normal_()
    w = layer.weight.detach()
    _U, S, _Vh = torch.linalg.svd(w, full_matrices=False)
    dw = d.delta_weight(layer)
    sigma = torch.zeros(6, 6)
    sigma[2:, 2:] = torch.diag(S[2:]) + d.X @ d.Y
    sigma = torch.relu(sigma)  # top block: ReLU(−s) = 0
    ref = d.U @ sigma @ d.Vh - w
    torch.testing.assert_close(dw, ref, atol=1e-5, rtol=1e-5)
    assert (torch.relu(torch.diag(S[2:]) + d.X @ d.Y) != torch.diag(S[2:]) + d.X @ d.Y).any()  # clipping happened


def test_salt_normal_init_is_not_identity_and_zero_init_is():
    layer = nn.Linear(16, 16)
    assert SaltDelta(layer, SaltConfig(init="zero")).delta_weight(layer).abs().max() == 0
    assert SaltDelta(layer, SaltConfig(init="normal")).delta_weight(layer).abs().max() > 0


def test_salt_sign_convention_makes_the_svd_reproducible():
    layer = nn.Linear(12, 9)
    d1, d2 = SaltDelta(layer, SaltConfig(r=3)), SaltDelta(layer, SaltConfig(r=3))
    d1._ensure_svd(layer)
    d2._ensure_svd(layer)
    idx = d1.Vh.abs().argmax(dim=1)
    assert (d1.Vh.gather(1, idx[:, None]) > 0).all()
    torch.testing.assert_close(d1.U @ torch.diag(d1.S) @ d1.Vh, layer.weight.detach(), atol=1e-5, rtol=1e-5)


# --- SNELLA --------------------------------------------------------------------------------------------------
def test_sparsify_keeps_the_requested_fraction():
    k = torch.randn(40, 50)
    out = sparsify(k, 0.9, weighted=False)
    assert (out != 0).sum() == 200
    kept = out != 0
    assert k.abs()[kept].min() >= k.abs()[~kept].max()
    torch.testing.assert_close(sparsify(k, 0.0, weighted=True), k * k.abs())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_snella_checkpointing_gives_the_same_gradients(dropout):
    """Merged form (dropout 0) and branch form (dropout > 0, here in eval mode) with and without checkpoint."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    x = torch.randn(4, 12)
    grads = []
    for ckpt in (True, False):
        torch.manual_seed(1)
        d = SnellaDelta(layer, SnellaConfig(r=4, checkpoint=ckpt, sparsity=0.5, dropout=dropout)).eval()
        d(x, layer).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in d.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_budget_schedule_and_allocation():
    model = adapters.create("snella", build("vit"), rank=4, targets="attn+mlp", sparsity=0.5)
    alloc = BudgetAllocator(model, total_steps=10, target_keep=0.1)
    assert alloc.keep_fraction(0) == pytest.approx(0.5)
    assert alloc.keep_fraction(10) == pytest.approx(0.1)
    fr = [alloc.keep_fraction(t) for t in range(11)]
    assert all(a >= b for a, b in itertools.pairwise(fr))
    total = sum(alloc.sizes) // 4
    shares = alloc.allocate(total)
    assert sum(shares) == total
    assert all(0 <= s <= n for s, n in zip(shares, alloc.sizes, strict=True))


def test_budget_follows_importance():
    model = adapters.create("snella", build("vit"), rank=4, targets="attn", sparsity=0.5)
    alloc = BudgetAllocator(model, total_steps=4, target_keep=0.2)
    x = x_for("vit")
    model(x).pow(2).sum().backward()
    alloc.update_importance()
    scores = alloc.scores()
    best = max(range(len(scores)), key=scores.__getitem__)
    shares = alloc.allocate(sum(alloc.sizes) // 5)
    dens = [s / n for s, n in zip(shares, alloc.sizes, strict=True)]
    assert dens[best] == max(dens)


class _Fit(pl.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, _):
        return self.model(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def test_budget_callback_in_a_lightning_fit(tmp_path):
    model = adapters.create("snella", _vit(), rank=4, targets="attn", sparsity=0.5)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32)), batch_size=2)
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[SnellaBudgetCallback(target_keep=0.1)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(_Fit(model), data)
    deltas = [m for m in model.modules() if isinstance(m, SnellaDelta)]
    kept = sum((1 - d.sparsity) * d.out_features * d.in_features for d in deltas)
    total = sum(d.out_features * d.in_features for d in deltas)
    assert kept / total == pytest.approx(0.1, abs=0.01)  # 0.5 kept at the start → 0.1 at the last step
    assert len({round(d.sparsity, 6) for d in deltas}) > 1  # layers competed: budgets differ


def test_salt_singular_value_relu_is_the_diagonal_clipped_update_in_factored_form():
    torch.manual_seed(0)
    layer = nn.Linear(10, 7)
    d = SaltDelta(layer, SaltConfig(r=2, r_lora=3, relu="singular_values"))
    with torch.no_grad():
        d.Y.normal_(std=3.0)  # large enough that some residual singular values would turn negative
        d.alpha[0] = -1.0
    d._ensure_svd(layer)
    k = 7
    sigma = torch.zeros(k, k)
    sigma[:2, :2] = torch.diag(d.alpha * d.S[:2] + d.beta)
    sigma[2:, 2:] = torch.diag(d.S[2:]) + d.X @ d.Y
    sigma = sigma - torch.diag(torch.diag(sigma)) + torch.diag(torch.relu(torch.diag(sigma)))
    ref = d.U @ sigma @ d.Vh - layer.weight.detach()
    torch.testing.assert_close(d.delta_weight(layer), ref, atol=1e-4, rtol=1e-4)
    x = torch.randn(3, 10)
    torch.testing.assert_close(
        d(x, layer), nn.functional.linear(x, layer.weight + ref, layer.bias), atol=1e-4, rtol=1e-4
    )
    assert (torch.diag(d.S[2:]) + d.X @ d.Y).diagonal().min() < 0  # the correction path was exercised


def test_snella_layer_sparsity_travels_with_the_adapter_file(tmp_path):
    model = adapters.create("snella", build("vit"), rank=4, targets="attn", sparsity=0.5)
    deltas = [m for m in model.modules() if isinstance(m, SnellaDelta)]
    deltas[0].sparsity = 0.8  # as the budget allocator would
    adapters.save(model, tmp_path / "a")
    loaded = adapters.load(build("vit"), tmp_path / "a")
    got = [m.sparsity for m in loaded.modules() if isinstance(m, SnellaDelta)]
    assert got[0] == pytest.approx(0.8)
    assert got[1] == pytest.approx(0.5)


def test_a_peft_method_without_a_rank_names_its_size_argument():
    with pytest.raises(ValueError, match=r"'fourierft' has no rank: pass its size argument n_frequency="):
        adapters.create("fourierft", build("vit", seed=0), rank=4, targets="attn")
    model = adapters.create("fourierft", build("vit", seed=0), targets="attn", n_frequency=16)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_a_linear_only_peft_method_on_a_conv_is_one_error_before_wrapping():
    """Which PEFT methods adapt Conv2d is asked of PEFT (a probe), not kept in a hand list."""
    from pathopeft.adapters.registry import peft_adapts_conv

    assert not peft_adapts_conv("vera")
    assert peft_adapts_conv("loha")
    # OFT is why it is a probe: PEFT 0.21's OFT on Conv2d was not the identity at init (refused), 0.22's is (adapted)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"vera \(PEFT\) adapts nn.Linear only; these targets are Conv2d: \['2'\]"):
        adapters.create("vera", cnn, rank=4, targets=["2"])
    assert not any(isinstance(m, nn.Module) and type(m).__name__.startswith("Vera") for m in cnn.modules())
