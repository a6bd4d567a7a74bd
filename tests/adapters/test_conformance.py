"""The adapter conformance matrix: every registered method × every toy model, the same checks.

The matrix iterates ``ADAPTERS`` and asks each entry's capabilities: a method registered with
``pathopeft.adapters.register`` (or a PEFT entry) is in the matrix without touching this file; the CNN toy
runs only for ``conv=True`` entries, identity at init is checked for entries that claim it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import timm
import torch
from torch import nn

from pathopeft import adapters
from pathopeft.adapters import ADAPTERS
from pathopeft.adapters.core import AdaptedLayer, AdapterConfig, Delta, weight_2d

METHODS = list(ADAPTERS)
RANK = 4


class TinyCNN(nn.Module):
    """A small CNN: Conv2d targets for methods that adapt convolutions."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, width, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * width, width, 1)
        )
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(torch.relu(self.conv0(x)))
        return self.head(h.mean(dim=(2, 3)))


def _vit(**kw):
    base = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 5}
    return timm.create_model("vit_tiny_patch16_224", **{**base, **kw})


TOYS = {
    # name: (builder, targets, input shape)
    "vit": (lambda: _vit(), "attn+mlp", (2, 3, 32, 32)),
    "vit_odd": (lambda: _vit(embed_dim=33, num_heads=3), "all-linear", (2, 3, 32, 32)),
    "samvit": (
        lambda: timm.create_model(
            "samvit_base_patch16",
            img_size=32,
            patch_size=16,
            embed_dim=32,
            depth=2,
            num_heads=2,
            global_attn_indexes=(1,),
            window_size=1,
            neck_chans=16,
            num_classes=0,
        ),
        "attn",
        (2, 3, 32, 32),
    ),
    "cnn": (TinyCNN, "all-conv", (2, 3, 16, 16)),
}
# options that change a method's computation run through the same matrix
VARIANTS = {
    "salt[relu=singular_values]": ("salt", {"relu": "singular_values"}),
    "wara[db2]": ("wara", {"wavelet": "db2"}),
    "wara-subband[db2,level=2]": ("wara-subband", {"wavelet": "db2", "level": 2}),
    "snella[kernel=distance]": ("snella", {"kernel": "distance", "kept_value": "plain"}),
}
ALL = [*METHODS, *VARIANTS]


def spec(method: str) -> tuple[str, dict]:
    return VARIANTS.get(method, (method, {}))


def caps(method: str) -> dict:
    return ADAPTERS.entry(spec(method)[0]).caps


CASES = [(m, t) for m in ALL for t in TOYS if t != "cnn" or caps(m)["conv"]]


def build(toy: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TOYS[toy][0]().eval()


def wrap(method: str, toy: str, seed: int = 0) -> nn.Module:
    model = build(toy, seed)
    torch.manual_seed(1234)  # adapter init independent of the base seed
    name, kw = spec(method)
    return adapters.create(name, model, rank=RANK, targets=TOYS[toy][1], **kw).eval()


def x_for(toy: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(*TOYS[toy][2], generator=g)


def train_steps(model: nn.Module, x: torch.Tensor, steps: int = 3, lr: float = 0.5) -> list[float]:
    """A few steps that must move the adapter; the loss pushes outputs towards a random target."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr * 0.02)
    target = torch.randn_like(model(x))
    losses = []
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        for p in params:
            assert p.grad is not None, "a trainable parameter got no gradient"
            assert torch.isfinite(p.grad).all()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def expected_trainable(method: str, model: nn.Module, targets: str) -> int:
    method, kw = spec(method)
    mods = dict(model.named_modules())
    total = 0
    for name in adapters.resolve_targets(model, targets):
        layer = mods[name]
        out_f, in_f = weight_2d(layer).shape
        ours = ADAPTERS.get(method)
        if ours.delta_cls is not None:
            cfg = ours.config_cls(r=RANK, target_modules=[name], **kw).for_layer(name)
            total += ours.delta_cls.expected_trainable(out_f, in_f, cfg)
        elif method == "adalora":  # P (r₀ × in), Q (out × r₀) and Λ (r₀) at the initial rank r₀ = 1.5 r
            r0 = max(RANK + 1, round(1.5 * RANK))
            total += r0 * (in_f + out_f + 1)
        else:  # PEFT's LoRA family: A (r × in·kh·kw) and B (out × r); DoRA adds a magnitude per output
            total += RANK * (in_f + out_f) + (out_f if method == "dora" else 0)
    return total


@pytest.mark.parametrize(("method", "toy"), CASES)
class TestConformance:
    def test_forward_shape_and_identity_at_init(self, method, toy):
        x = x_for(toy)
        ref = build(toy)(x)
        out = wrap(method, toy)(x)
        assert out.shape == ref.shape
        if caps(method)["identity_at_init"]:
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
        else:  # e.g. SNELLA: ΔW is not zero at init (the method does not claim identity)
            assert torch.isfinite(out).all()

    def test_trainable_parameter_count(self, method, toy):
        model = build(toy)
        expected = expected_trainable(method, model, TOYS[toy][1])
        name, kw = spec(method)
        wrapped = adapters.create(name, model, rank=RANK, targets=TOYS[toy][1], **kw)
        trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        assert trainable == expected

    def test_training_changes_only_adapter(self, method, toy):
        x = x_for(toy)
        model = wrap(method, toy)
        frozen = base_weights(model)
        before = model(x).detach()
        losses = train_steps(model, x)
        assert all(torch.isfinite(torch.tensor(losses)))
        for n, p in model.named_parameters():
            if n in frozen:
                assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"
        assert not torch.allclose(model(x), before), "training did not change the adapted model"

    def test_merge_unmerge_and_unload(self, method, toy):
        x = x_for(toy)
        model = wrap(method, toy)
        train_steps(model, x)
        frozen = base_weights(model)
        unmerged = model(x).detach()
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-4)
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in frozen:
                torch.testing.assert_close(p, frozen[n], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-5)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
        assert not any("lora_" in n for n, _ in plain.named_parameters())
        assert type(plain) is type(build(toy))
        torch.testing.assert_close(plain(x), unmerged, atol=1e-5, rtol=1e-4)

    def test_save_load_round_trip(self, method, toy, tmp_path):
        x = x_for(toy)
        model = wrap(method, toy)
        train_steps(model, x)
        expected = model(x).detach()
        saved = adapters.save(model, tmp_path / "adapter")
        assert (saved / "adapter_model.safetensors").is_file()
        assert (saved / "adapter_config.json").is_file()
        loaded = adapters.load(build(toy), tmp_path / "adapter").eval()
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-4)

    def test_wrong_base_model_is_refused(self, method, toy, tmp_path):
        model = wrap(method, toy)
        adapters.save(model, tmp_path / "adapter")
        other = _vit(embed_dim=48, num_heads=2) if toy != "vit" else _vit(embed_dim=64, num_heads=2)
        with pytest.raises(adapters.AdapterLoadError, match="adapter"):
            adapters.load(other, tmp_path / "adapter")


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_on_gpu(method):
    """The same model under bf16 autocast: finite gradients, merged ≈ unmerged at bf16 tolerance."""
    model = wrap(method, "vit").cuda()
    x = x_for("vit").cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(x).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        unmerged = model(x).float()
        model.merge_adapter()
        merged = model(x).float()
    torch.testing.assert_close(merged, unmerged, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("method", ADAPTERS.names(conv=False))
def test_linear_only_methods_refuse_conv_targets(method):
    with pytest.raises(ValueError, match=r"adapts nn\.Linear only"):
        adapters.create(method, build("cnn"), rank=RANK, targets="all-conv")


def test_wrong_base_error_names_both_models(tmp_path):
    model = wrap("salt", "vit")
    adapters.save(model, tmp_path / "a")
    with pytest.raises(adapters.AdapterLoadError, match=r"made for base model 'vit_tiny_patch16_224'.*fingerprint"):
        adapters.load(_vit(embed_dim=48, num_heads=2), tmp_path / "a")


def test_several_named_adapters_on_one_model(tmp_path):
    x = x_for("vit")
    model = wrap("salt", "vit")
    train_steps(model, x)
    out_default = model(x).detach()
    model.add_adapter("second", adapters.WaraConfig(r=2, target_modules="attn"))
    assert model.active_adapter == "second"
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".deltas.default." in n)
    train_steps(model, x)
    out_second = model(x).detach()
    assert not torch.allclose(out_second, out_default)
    model.set_adapter("default")
    torch.testing.assert_close(model(x), out_default)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), build("vit")(x))
    model.save_pretrained(tmp_path / "both")
    assert (tmp_path / "both" / "adapter_config.json").is_file()
    assert (tmp_path / "both" / "second" / "adapter_config.json").is_file()
    fresh = adapters.AdapterModel.from_pretrained(build("vit"), tmp_path / "both")
    fresh.load_adapter(tmp_path / "both" / "second", "second")
    fresh.set_adapter("second")
    torch.testing.assert_close(fresh(x), out_second, atol=1e-5, rtol=1e-4)


def test_unfreeze_trains_and_saves_extra_parameters(tmp_path):
    """SALT's paper setting also trains norms and the positional embedding; they travel in the adapter file."""
    x = x_for("vit")
    model = build("vit")
    wrapped = adapters.create("salt", model, rank=RANK, targets="attn", unfreeze=["norm", "pos_embed"])
    names = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert "base_model.pos_embed" in names
    assert any(".norm" in n for n in names)
    train_steps(wrapped, x)
    expected = wrapped(x).detach()
    adapters.save(wrapped, tmp_path / "a")
    loaded = adapters.load(build("vit"), tmp_path / "a")
    torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-4)


def test_unknown_method_and_target_errors():
    with pytest.raises(ValueError, match="unknown adapter method 'nope'"):
        adapters.create("nope", build("vit"))
    with pytest.raises(ValueError, match=r"matches no nn.Linear/nn.Conv2d.*presets"):
        adapters.create("salt", build("vit"), targets="does_not_exist")


def test_other_peft_methods_by_name():
    """PEFT methods we do not rewrite (WaveFT, MiSS, …) come from PEFT through the same factory."""
    x = x_for("vit")
    model = adapters.create(
        "ia3", build("vit"), targets="attn+mlp", feedforward_modules=["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    )
    assert model(x).shape == (2, 5)
    assert 0 < sum(p.numel() for p in model.parameters() if p.requires_grad) < 1000


def test_copy_of_wrapped_model_is_independent():
    model = wrap("wara", "vit")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        next(p for p in clone.parameters() if p.requires_grad).add_(1.0)
    assert not torch.allclose(model(x_for("vit")), clone(x_for("vit")))


# --- the registry: capabilities are claims the entries keep ----------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_entry_capabilities_match_what_create_builds(method):
    """``backend`` says which wrapper comes back, ``identity_at_init=False`` really moves the output at init, and
    a ``callback`` is a factory of a Lightning callback."""
    import peft

    entry = ADAPTERS.entry(method)
    model = wrap(method, "vit")
    assert isinstance(model, adapters.AdapterModel if entry.caps["backend"] == "pathopeft" else peft.PeftModel)
    if not entry.caps["identity_at_init"]:
        assert not torch.allclose(model(x_for("vit")), build("vit")(x_for("vit")), atol=1e-4)
    if entry.caps["callback"] is not None:
        assert isinstance(entry.caps["callback"](), pl.Callback)
    assert entry.obj.summary, "pathopeft adapters list needs a one-line summary"


@dataclass
class ToyConfig(AdapterConfig):
    """Toy: a dense trainable ΔW, zero at init."""

    adapter_type: ClassVar[str] = "toy-dense"


class ToyDelta(Delta):
    def __init__(self, base: nn.Module, config: ToyConfig) -> None:
        super().__init__(base, config)
        self.dw = nn.Parameter(torch.zeros(self.out_features, self.in_features))

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.dw

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: ToyConfig) -> int:
        return out_features * in_features


@pytest.fixture
def toy_method():
    adapters.register("toy-dense", ToyConfig, ToyDelta, conv=True, identity_at_init=True)
    yield "toy-dense"
    ADAPTERS.remove("toy-dense")


def test_a_registered_method_is_created_saved_loaded_and_listed(toy_method, tmp_path, capsys):
    """One register() call is the whole integration: factory, files, reload and ``pathopeft adapters list``."""
    from pathopeft.cli import main

    assert toy_method in adapters.list_methods(include_peft=False)
    x = x_for("cnn")
    model = adapters.create(toy_method, build("cnn"), targets="all-conv")
    torch.testing.assert_close(model(x), build("cnn")(x))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_trainable(
        toy_method, build("cnn"), "all-conv"
    )
    train_steps(model, x)
    adapters.save(model, tmp_path / "toy")
    torch.testing.assert_close(adapters.load(build("cnn"), tmp_path / "toy")(x), model(x), atol=1e-5, rtol=1e-4)
    assert main(["adapters", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ADAPTERS:
        line = next((ln for ln in lines if ln.split()[:1] == [name]), None)
        assert line is not None, f"{name} missing from `pathopeft adapters list`"
        assert line.split()[1] == ADAPTERS.entry(name).caps["backend"]
    assert any("Toy: a dense trainable" in ln for ln in lines)


def test_pathopeft_files_of_an_unknown_or_peft_type_are_refused(tmp_path):
    adapters.save(wrap("salt", "vit"), tmp_path / "a")
    cfg = tmp_path / "a" / "adapter_config.json"
    for bad, why in (("nope", r"unknown adapter method 'nope'.*known: salt"), ("lora", r"'lora' is PEFT's")):
        cfg.write_text(cfg.read_text().replace('"adapter_type": "salt"', f'"adapter_type": "{bad}"', 1))
        with pytest.raises(adapters.AdapterLoadError, match=why):
            adapters.load(build("vit"), tmp_path / "a")
        cfg.write_text(cfg.read_text().replace(f'"adapter_type": "{bad}"', '"adapter_type": "salt"', 1))
