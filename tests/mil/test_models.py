"""MIL model zoo: the MILModel contract for every registered model, plus model-specific properties
(permutation invariance, grid-GDAT grouping, Nyström attention) and linear memory in the bag size. The official
GDAT's own properties (agents, attentions, parity with the authors' code) are in ``test_cdat.py``."""

from __future__ import annotations

import contextlib
import resource
import sys
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pathopeft.mil.models import (
    ABMIL,
    GDAT,
    MIL_MODELS,
    GridGDAT,
    MILModel,
    MILOutput,
    TransMIL,
    create_mil_model,
    list_mil_models,
    mil_model_class,
    register_mil_model,
)
from pathopeft.mil.models.gdat import assign_groups, group_means
from pathopeft.mil.models.transmil import NystromAttention, moore_penrose_pinv
from pathopeft.registry import UnknownPluginError

D, H, C = 24, 32, 3  # small: the matrix is about the contract, not capacity
MODELS = list(MIL_MODELS)
# Per-model settings that keep the matrix fast but still exercise every code path: TransMIL with 32 landmarks
# uses exact attention at N ≤ 25 (sequence ≤ 32) and the Nyström path at N = 300 (the m×m pseudo-inverse
# costs O(m³), which at the default m = 256 would dominate these tiny bags).
SMALL = {"transmil": {"landmarks": 32}}


def make(name: str, **kw: object) -> MILModel:
    torch.manual_seed(0)
    return create_mil_model(name, in_dim=D, n_classes=C, **{"hidden_dim": H, **SMALL.get(name, {}), **kw})


def bag(n: int, d: int = D, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and integer level-0 coordinates on a 256-px tile grid (as a tiler writes them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    coords = torch.randint(0, 200, (n, 2), generator=g) * 256
    return x, coords


def check_output(out: MILOutput, n: int, hidden: int = H, classes: int = C) -> None:
    assert isinstance(out, MILOutput)
    assert out.bag_logits.shape == (classes,)
    assert out.attention.shape == (n,)
    assert out.instance_features.shape == (n, hidden)
    assert out.bag_feature.shape == (hidden,)
    for t in (out.bag_logits, out.attention, out.instance_features, out.bag_feature):
        assert torch.isfinite(t).all()
    assert (out.attention >= 0).all()
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)


# --- registry ---------------------------------------------------------------------------------------------------


def test_registry_lists_the_zoo() -> None:
    assert set(MODELS) >= {"abmil", "transmil", "gdat", "gdat-grid"}
    assert mil_model_class("ABMIL") is ABMIL
    assert mil_model_class("gdat") is GDAT
    assert mil_model_class("gdat-grid") is GridGDAT
    assert mil_model_class("transmil") is TransMIL


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown MIL model 'nope'.*abmil.*gdat.*transmil"):
        create_mil_model("nope", D, C)
    with pytest.raises(UnknownPluginError, match=r"did you mean 'abmil'"):  # a UserError: one line in the CLI
        mil_model_class("abmi")


def test_a_decorated_class_is_a_model_of_the_registry() -> None:
    @register_mil_model("Toy-Mean")
    class ToyMean(ABMIL):
        pass

    try:
        assert list_mil_models()[-1] == "toy-mean"
        assert isinstance(create_mil_model("toy-mean", D, C, hidden_dim=H), ToyMean)
    finally:
        MIL_MODELS.remove("toy-mean")
    assert "toy-mean" not in list_mil_models()


def test_register_rejects_duplicates_and_non_models() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @register_mil_model("abmil")
        class Other(ABMIL):
            pass

    with pytest.raises(TypeError, match="MILModel subclass"):
        register_mil_model("linear")(nn.Linear)  # type: ignore[arg-type]
    assert "linear" not in list_mil_models()


@pytest.mark.parametrize("name", MODELS)
def test_constructor_contract(name: str) -> None:
    model = create_mil_model(name, in_dim=D, n_classes=5, hidden_dim=H, dropout=0.0)
    assert (model.in_dim, model.n_classes, model.hidden_dim) == (D, 5, H)
    assert isinstance(model.classifier, nn.Linear)
    assert (model.classifier.in_features, model.classifier.out_features) == (H, 5)
    with pytest.raises(TypeError):
        create_mil_model(name, D, C, no_such_option=1)


# --- the contract matrix ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_coords", [False, True], ids=["no-coords", "coords"])
@pytest.mark.parametrize("n", [1, 7, 300])
@pytest.mark.parametrize("name", MODELS)
def test_output_shapes_and_attention(name: str, n: int, with_coords: bool) -> None:
    model = make(name).eval()
    x, coords = bag(n)
    with torch.no_grad():
        out = model(x, coords if with_coords else None)
    check_output(out, n)
    torch.testing.assert_close(out.bag_logits, model.classifier(out.bag_feature))


@pytest.mark.parametrize("name", MODELS)
def test_batched_input_of_one_bag_is_accepted(name: str) -> None:
    model = make(name).eval()
    x, coords = bag(50)
    with torch.no_grad():
        a, b = model(x, coords), model(x[None], coords)
    check_output(b, 50)
    torch.testing.assert_close(a.bag_logits, b.bag_logits)
    torch.testing.assert_close(a.attention, b.attention)


@pytest.mark.parametrize("name", MODELS)
def test_float_coords_are_accepted(name: str) -> None:
    x, coords = bag(40)
    with torch.no_grad():
        check_output(make(name).eval()(x, coords.double() / 1e4), 40)


@pytest.mark.parametrize(
    ("shape", "coords_shape", "match"),
    [
        ((10, D + 1), None, r"expected a bag of shape \(N, 24\), got \(10, 25\)"),
        ((2, 10, D), None, r"expected a bag of shape \(N, 24\), got \(2, 10, 24\)"),
        ((D,), None, r"expected a bag of shape \(N, 24\)"),
        ((0, D), None, r"empty bag"),
        ((10, D), (10, 3), r"coords must be \(N, 2\) = \(10, 2\), got \(10, 3\)"),
        ((10, D), (9, 2), r"coords must be \(N, 2\) = \(10, 2\), got \(9, 2\)"),
    ],
)
@pytest.mark.parametrize("name", MODELS)
def test_bad_shapes_raise(name: str, shape: tuple, coords_shape: tuple | None, match: str) -> None:
    model = make(name)
    coords = None if coords_shape is None else torch.zeros(coords_shape)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(shape), coords)


@pytest.mark.parametrize("with_coords", [False, True], ids=["no-coords", "coords"])
@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_parameter(name: str, with_coords: bool) -> None:
    model = make(name).train()
    x, coords = bag(300)
    out = model(x, coords if with_coords else None)
    loss = nn.functional.cross_entropy(out.bag_logits[None], torch.tensor([1])) + out.instance_features.pow(2).mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    zero = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    assert not zero, f"zero gradient for {zero}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_in_eval(name: str) -> None:
    model = make(name, dropout=0.5).eval()
    x, coords = bag(300)
    a, b = model(x, coords), model(x, coords)
    assert torch.equal(a.bag_logits, b.bag_logits)
    assert torch.equal(a.attention, b.attention)
    assert torch.equal(a.instance_features, b.instance_features)


@pytest.mark.parametrize("name", MODELS)
def test_train_mode_uses_dropout(name: str) -> None:
    """Dropout is wired in (so eval/train matters): two train passes differ."""
    model = make(name, dropout=0.5).train()
    x, coords = bag(100)
    assert not torch.equal(model(x, coords).bag_logits, model(x, coords).bag_logits)


# --- permutation invariance ---------------------------------------------------------------------------------------


def test_abmil_is_permutation_invariant() -> None:
    model = make("abmil").eval()
    x, _ = bag(300)
    perm = torch.randperm(300)
    with torch.no_grad():
        a, b = model(x), model(x[perm])
    torch.testing.assert_close(b.bag_logits, a.bag_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.attention, a.attention[perm], atol=1e-6, rtol=1e-5)


def test_grid_gdat_with_coords_is_invariant_to_permuting_instances_with_their_coords() -> None:
    """pathopeft's own grid variant; the official GDAT lays instances out in storage order (order-dependent)."""
    model = make("gdat-grid").eval()
    x, coords = bag(300)
    perm = torch.randperm(300)
    with torch.no_grad():
        a, b = model(x, coords), model(x[perm], coords[perm])
    torch.testing.assert_close(b.bag_logits, a.bag_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(b.attention, a.attention[perm], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(b.instance_features, a.instance_features[perm], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["gdat", "gdat-grid"])
def test_gdat_checkpoint_gives_the_same_gradients(name: str) -> None:
    x, coords = bag(300)
    grads = []
    for ckpt in (False, True):
        model = make(name, checkpoint=ckpt, dropout=0.0)
        model(x, coords).bag_logits.sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for param, g in grads[0].items():
        torch.testing.assert_close(grads[1][param], g, msg=param)


# --- GDAT grouping ------------------------------------------------------------------------------------------------


def test_gdat_grid_grouping_on_a_regular_tile_grid() -> None:
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], dim=1) * 512  # (x, y), a 16×16 tile grid
    ids, m = assign_groups(256, 64, coords)
    assert m == 64  # 8×8 cells of 2×2 tiles each
    assert torch.bincount(ids).tolist() == [4] * 64
    assert ids[0] == ids[1] == ids[16] == ids[17]  # one 2×2 block
    assert ids[2] != ids[0]
    h = torch.arange(256, dtype=torch.float32)[:, None].expand(256, 3)
    g = group_means(h, ids, m)
    assert g.shape == (64, 3)
    torch.testing.assert_close(g[0], torch.full((3,), (0 + 1 + 16 + 17) / 4))


def test_gdat_grouping_drops_empty_cells_and_handles_degenerate_boxes() -> None:
    coords = torch.tensor([[0, 0], [10, 10], [1000, 1000], [990, 1000]])  # two opposite corners: 2 groups
    ids, m = assign_groups(4, 64, coords)
    assert m == 2
    assert ids.tolist() == [0, 0, 1, 1]
    ids, m = assign_groups(5, 64, torch.full((5, 2), 7))  # a single point
    assert m == 1
    ids, m = assign_groups(5, 64, torch.tensor([[3, 0], [3, 1], [3, 2], [3, 3], [3, 4]]))  # a vertical line
    assert m == 5
    assert ids.tolist() == [0, 1, 2, 3, 4]


def test_gdat_grouping_without_coords_is_contiguous_chunks() -> None:
    ids, m = assign_groups(10, 4)
    assert m == 4
    assert ids.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    ids, m = assign_groups(3, 64)
    assert (m, ids.tolist()) == (3, [0, 1, 2])


def test_gdat_group_count_never_exceeds_grid() -> None:
    _, coords = bag(5000)
    for n_groups, cap in [(1, 1), (10, 16), (64, 64), (100, 100)]:
        _, m = assign_groups(5000, n_groups, coords)
        assert 1 <= m <= cap


# --- TransMIL internals -------------------------------------------------------------------------------------------


def test_moore_penrose_iteration_converges_to_pinv() -> None:
    a = torch.softmax(torch.randn(2, 32, 32, dtype=torch.float64) * 3, dim=-1)
    torch.testing.assert_close(moore_penrose_pinv(a, 40), torch.linalg.pinv(a), atol=1e-6, rtol=1e-6)


def test_nystrom_attention_approximates_softmax_attention() -> None:
    attn = NystromAttention(32, heads=4, landmarks=64, dropout=0.0, value_residual=False).eval()
    x = torch.cumsum(torch.randn(1, 1000, 32) * 0.1, dim=1)  # a smooth sequence, as neighbouring tiles are
    with torch.no_grad():
        approx, _ = attn(x)
        attn.landmarks = 10**6  # ≥ n: exact softmax attention
        exact, _ = attn(x)
    assert ((approx - exact).norm() / exact.norm()) < 0.05


@pytest.mark.parametrize("n", [10, 300])  # exact attention / Nyström path (32 landmarks)
def test_transmil_attention_is_the_cls_row_over_real_instances(n: int) -> None:
    """attention = mean over heads of softmax_i(q_cls·k_i/√d) over the N real keys of the last layer only."""
    model = make("transmil").eval()
    x, _ = bag(n)  # padded to a square grid with copies of the first instances
    seen: dict[str, torch.Tensor] = {}
    model.layer2.attn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        out = model(x)
        attn = model.layer2.attn
        seq = seen["x"][0]
        heads, dh = attn.heads, attn.dim_head
        q, k, _ = attn.qkv(seq).view(seq.shape[0], 3, heads, dh).unbind(1)  # (1 + side², heads, dh) each
        scores = torch.einsum("hd,nhd->hn", q[0], k[1 : 1 + n]) / dh**0.5
        expected = torch.softmax(scores, dim=-1).mean(0)
    assert seq.shape[0] > n + 1  # there was padding to exclude
    check_output(out, n)
    torch.testing.assert_close(out.attention, expected, atol=1e-6, rtol=1e-4)


# --- scaling: linear in N, never N×N ------------------------------------------------------------------------------


class MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op returns (views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


@contextlib.contextmanager
def address_space_headroom(gib: float) -> Iterator[None]:
    """Cap this process's virtual memory at its current size + ``gib`` (Linux), so a big allocation fails."""
    if not sys.platform.startswith("linux"):
        yield
        return
    with open("/proc/self/status") as f:
        vm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_kib * 1024 + int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_grid_gdat_at_20000_instances_is_fast_and_linear() -> None:
    model = create_mil_model("gdat-grid", in_dim=64, n_classes=2).eval()
    x, _ = bag(20000, d=64)
    with torch.no_grad(), MaxNumel() as probe:
        out = model(x)  # contiguous chunks; the 60000 test below groups by coords
    check_output(out, 20000, hidden=256, classes=2)
    assert probe.max <= 8 * 64 * 20000  # heads × groups × N: the largest score tensor


def test_gdat_at_20000_instances_is_linear() -> None:
    """Official GDAT (H = 512): the largest tensor is the MLP's N × 4H; no score tensor of heads × 256 agents ×
    the 144² padded square (47 M) is kept (fused attention), and nothing N × N."""
    model = create_mil_model("gdat", in_dim=64, n_classes=2).eval()
    x, _ = bag(20000, d=64)
    with torch.no_grad(), MaxNumel() as probe:
        out = model(x)
    check_output(out, 20000, hidden=512, classes=2)
    assert probe.max <= 4 * 512 * 20000


@pytest.mark.parametrize(("name", "hidden"), [("gdat", 512), ("gdat-grid", 256)])
def test_gdat_at_60000_instances_never_builds_n_by_n(name: str, hidden: int) -> None:
    """An N×N float tensor would need 14 GB (bool: 3.6 GB); the forward gets 2 GiB of address space."""
    model = create_mil_model(name, in_dim=64, n_classes=2).eval()
    x, coords = bag(60000, d=64)
    with torch.no_grad(), address_space_headroom(2.0):
        out = model(x, coords)
    check_output(out, 60000, hidden=hidden, classes=2)


def test_transmil_at_20000_instances_runs() -> None:
    model = create_mil_model("transmil", in_dim=64, n_classes=2).eval()
    x, _ = bag(20000, d=64)
    with torch.no_grad(), MaxNumel() as probe, address_space_headroom(2.0):
        out = model(x)
    check_output(out, 20000, hidden=256, classes=2)
    assert probe.max <= 8 * 256 * (142**2 + 1)  # heads × landmarks × (cls + 142×142 padded grid)
