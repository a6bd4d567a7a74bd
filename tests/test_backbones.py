import re

import pytest
import torch
from safetensors.torch import save_file

from pathopeft.backbones import (
    ENCODERS,
    BackboneError,
    create_backbone,
    encoder_family,
    load_state_dict_file,
    safe_name,
)
from tests._tiny import TINY_VIT, tiny_backbone


def _kw():
    kw = dict(TINY_VIT)
    return kw.pop("name"), kw


def test_tiny_backbone_contract():
    bb = tiny_backbone()
    assert bb.dim == 32
    assert bb.input_size == 32
    assert bb.is_random_init
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = bb.model(bb.normalize(x))
    assert out.shape == (2, 32)


def test_encoder_families_dispatch_by_prefix():
    assert list(ENCODERS) == ["timm", "hf-hub", "local-dir"]
    assert encoder_family("vit_small_patch16_224").name == "timm"
    assert encoder_family("hf-hub:org/name").name == "hf-hub"
    assert encoder_family("local-dir:/x").name == "local-dir"
    assert encoder_family("toy:thing").name == "timm"  # no family claims it: timm's own error follows


def test_a_registered_family_builds_its_names():
    """A family (named foundation models, say) is one registered builder; create_backbone does the rest."""
    import timm

    def toy(name, weights, **kw):
        return timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, depth=1, embed_dim=24), "toy.pt"

    ENCODERS.add("toy", toy, prefix="toy:")
    try:
        bb = create_backbone("toy:tiny")
        assert (bb.name, bb.dim, bb.input_size, bb.weights) == ("toy:tiny", 24, 32, "toy.pt")
    finally:
        ENCODERS.remove("toy")
    with pytest.raises(BackboneError, match=r"backbone 'toy:tiny'"):  # back to timm, which knows no 'toy:' source
        create_backbone("toy:tiny")


def test_random_init_is_announced(caplog):
    with caplog.at_level("WARNING"):
        tiny_backbone()
    assert "RANDOM WEIGHTS" in caplog.text


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_round_trip(tmp_path, suffix):
    name, kw = _kw()
    src = create_backbone(name, **kw)
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    sd["head.weight"] = torch.zeros(10, 32)  # a classifier head in the checkpoint is ignored
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    torch.manual_seed(123)  # a different random init …
    dst = create_backbone(name, weights=path, **kw)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst.model(x), src.model(x))  # … replaced by the file's weights
    assert dst.weights == str(path)
    assert not dst.is_random_init


def test_weights_errors_are_clear(tmp_path):
    name, kw = _kw()
    with pytest.raises(FileNotFoundError, match="never downloads"):
        create_backbone(name, weights=tmp_path / "missing.safetensors", **kw)
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"bad\.safetensors: weights do not fit"):
        create_backbone(name, weights=tmp_path / "bad.safetensors", **kw)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(BackboneError, match=r"list\.pth: expected a state dict, found list"):
        load_state_dict_file(tmp_path / "list.pth")


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown timm architecture"):
        create_backbone("not_a_model_xyz")


def test_normalisation_override():
    name, kw = _kw()
    bb = create_backbone(name, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **kw)
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    assert torch.allclose(bb.normalize(x), torch.ones(1, 3, 2, 2))


@pytest.mark.shared
def test_real_densenet_weights_load(shared_dir):
    """The one real pretrained CNN available offline loads as a headless backbone."""
    w = shared_dir / "weights" / "capricorn_densenet121" / "capricorn0.1_densenet121_timm.safetensors"
    if not w.is_file():
        pytest.skip(f"{w} missing")
    bb = create_backbone("densenet121", weights=w, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    assert bb.dim == 1024
    ref = load_state_dict_file(w)["features.conv0.weight"]
    torch.testing.assert_close(bb.model.state_dict()["features.conv0.weight"], ref)


@pytest.mark.parametrize("method", ["salt", "lora"])
def test_adapter_is_merged_for_feature_extraction(tmp_path, method):
    """`--adapter DIR` (ours or PEFT's) gives the fine-tuned encoder, merged to base-model cost."""
    from pathopeft import adapters
    from pathopeft.backbones import apply_adapter

    torch.manual_seed(0)
    tuned = adapters.create(method, tiny_backbone().model, rank=2, targets="attn")
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    expected = tuned(x)
    adapters.save(tuned, tmp_path / "ad")
    torch.manual_seed(0)
    bb = apply_adapter(tiny_backbone(), tmp_path / "ad")
    assert not any("lora_" in n or ".deltas." in n for n, _ in bb.model.named_parameters())
    torch.testing.assert_close(bb.model(x), expected, atol=1e-5, rtol=1e-4)


# --- Hugging Face cache (issue 9) ------------------------------------------------------------------------------
HUB_ID = "testorg/tiny-path-vit"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF hub cache under tmp_path; huggingface_hub reads its env once at import, so patch both."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def _no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("pathopeft tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _cache_tiny_vit(cache, repo_id: str = HUB_ID) -> dict[str, torch.Tensor]:
    """Write a seeded tiny ViT into the cache as timm's hub layout (config.json + model.safetensors)."""
    import json

    name, kw = _kw()
    torch.manual_seed(42)
    sd = {k: v.clone() for k, v in create_backbone(name, **kw).model.state_dict().items()}
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    config = {
        "architecture": name,
        "num_classes": 0,
        "num_features": 32,
        "global_pool": "token",
        "model_args": {k: v for k, v in kw.items()},
        "pretrained_cfg": {"input_size": [3, 32, 32], "mean": list(IMAGENET[0]), "std": list(IMAGENET[1])},
    }
    (snap / "config.json").write_text(json.dumps(config))
    save_file(sd, snap / "model.safetensors")
    return sd


def test_hf_hub_name_loads_the_cached_weights(hf_cache, monkeypatch, caplog):
    sd = _cache_tiny_vit(hf_cache)
    _no_network(monkeypatch)
    name, kw = _kw()
    ref = create_backbone(name, **kw).model
    ref.load_state_dict(sd)
    torch.manual_seed(0)  # a random init would differ from the cached weights
    caplog.clear()
    with caplog.at_level("WARNING"):
        bb = create_backbone(f"hf-hub:{HUB_ID}")
    assert "RANDOM WEIGHTS" not in caplog.text
    assert not bb.is_random_init
    assert str(bb.weights).endswith("model.safetensors")
    assert (bb.dim, bb.input_size, bb.mean, bb.std) == (32, 32, *IMAGENET)  # from the cached config.json
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bb.model(x), ref.eval()(x), atol=0, rtol=0)


def test_hf_hub_name_with_a_weights_file_uses_that_file(hf_cache, tmp_path, monkeypatch):
    _cache_tiny_vit(hf_cache)
    _no_network(monkeypatch)
    name, kw = _kw()
    torch.manual_seed(7)
    other = create_backbone(name, **kw).model
    save_file(other.state_dict(), tmp_path / "mine.safetensors")
    bb = create_backbone(f"hf-hub:{HUB_ID}", weights=tmp_path / "mine.safetensors")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(bb.model(x), other.eval()(x), atol=0, rtol=0)
    assert bb.weights == str(tmp_path / "mine.safetensors")


def test_hf_hub_name_not_in_cache_fails_without_network(hf_cache, monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(BackboneError, match=r"not in the local Hugging Face cache at .*models--testorg--absent.*never downloads"):  # fmt: skip
        create_backbone("hf-hub:testorg/absent")


def test_hf_hub_snapshot_without_weights_is_an_error_not_random(hf_cache, monkeypatch):
    _cache_tiny_vit(hf_cache)
    next(hf_cache.glob("models--*/snapshots/*/model.safetensors")).unlink()
    _no_network(monkeypatch)
    with pytest.raises(BackboneError, match=r"has no weights file"):
        create_backbone(f"hf-hub:{HUB_ID}")


def test_local_dir_name_loads_the_folder_weights(hf_cache, monkeypatch):
    """timm's ``local-dir:`` names are not plain names either: the folder's weights, never random ones."""
    sd = _cache_tiny_vit(hf_cache)
    folder = next(hf_cache.glob("models--*/snapshots/*"))
    _no_network(monkeypatch)
    bb = create_backbone(f"local-dir:{folder}")
    assert bb.weights == str(folder / "model.safetensors")
    torch.testing.assert_close(bb.model.state_dict()["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])
    with pytest.raises(BackboneError, match=r"nope.config\.json not found"):
        create_backbone(f"local-dir:{folder.parent / 'nope'}")


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("hf-hub:testorg/tiny-path-vit", "testorg--tiny-path-vit"),
        ("hf-hub:MahmoodLab/UNI2-h@main", "MahmoodLab--UNI2-h--main"),
        ("vit_small_patch16_224", "vit_small_patch16_224"),
        ("vit_small_patch16_224.augreg_in21k", "vit_small_patch16_224.augreg_in21k"),
        ("local-dir:/data/models/uni", "uni"),
        ("a b:c/d\\e", "a_b_c--d_e"),
        ("..", "__"),
    ],
)
def test_safe_name(name, slug):
    assert safe_name(name) == slug
    assert re.fullmatch(r"[A-Za-z0-9._-]+", slug)
    assert slug not in (".", "..")


def test_backbone_slug():
    assert tiny_backbone().slug == "vit_tiny_patch16_224"


# --- one-line errors (issue 9) ---------------------------------------------------------------------------------
def test_unknown_name_suggests_close_timm_names():
    with pytest.raises(BackboneError, match=r"unknown timm architecture 'vit_smol'; did you mean .*'vit_small_patch16_224'"):  # fmt: skip
        create_backbone("vit_smol")


def test_repo_id_without_prefix_points_to_hf_hub():
    with pytest.raises(BackboneError, match=r"'hf-hub:testorg/tiny'"):
        create_backbone("testorg/tiny")


def test_bad_model_kwargs_are_a_backbone_error():
    with pytest.raises(BackboneError, match=r"backbone 'vit_tiny_patch16_224': .*bogus"):
        create_backbone("vit_tiny_patch16_224", bogus=1)


def test_missing_weights_file_is_a_backbone_error_and_file_not_found(tmp_path):
    name, kw = _kw()
    with pytest.raises(BackboneError, match=r"missing\.pth not found.*never downloads") as info:
        create_backbone(name, weights=tmp_path / "missing.pth", **kw)
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(BackboneError, match=r"is a folder"):
        create_backbone(name, weights=tmp_path, **kw)


@pytest.mark.parametrize(
    ("filename", "content", "problem"),
    [
        ("garbage.safetensors", b"\x00garbage" * 64, r"not a readable safetensors file"),
        ("garbage.pth", b"\x00garbage" * 64, r"not a readable PyTorch checkpoint file"),
        ("empty.pth", b"", r"not a readable PyTorch checkpoint file"),
    ],
)
def test_garbage_weights_name_the_file(tmp_path, filename, content, problem):
    (tmp_path / filename).write_bytes(content)
    name, kw = _kw()
    with pytest.raises(BackboneError, match=re.escape(str(tmp_path / filename)) + ": " + problem):
        create_backbone(name, weights=tmp_path / filename, **kw)


def test_checkpoint_without_a_state_dict_is_named(tmp_path):
    torch.save({"student": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / "dino.pth")
    with pytest.raises(BackboneError, match=r"dino\.pth: expected a state dict .*'student'"):
        load_state_dict_file(tmp_path / "dino.pth")


def test_weights_of_another_width_are_a_backbone_error(tmp_path):
    name, kw = _kw()
    wide = create_backbone(name, **{**kw, "embed_dim": 48})
    save_file(wide.model.state_dict(), tmp_path / "wide.safetensors")
    with pytest.raises(BackboneError, match=r"wide\.safetensors: weights do not fit VisionTransformer: .*wrong shape"):
        create_backbone(name, weights=tmp_path / "wide.safetensors", **kw)


def test_missing_adapter_folder_is_an_adapter_load_error(tmp_path):
    from pathopeft import adapters
    from pathopeft.backbones import apply_adapter

    with pytest.raises(adapters.AdapterLoadError, match=r"nope: adapter folder not found"):
        apply_adapter(tiny_backbone(), tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(adapters.AdapterLoadError, match=r"empty.adapter_config\.json: no adapter config"):
        apply_adapter(tiny_backbone(), tmp_path / "empty")


@pytest.mark.parametrize("method", ["salt", "lora"])
@pytest.mark.parametrize("broken", ["adapter_config.json", "adapter_model.safetensors"])
def test_corrupt_adapter_files_are_named(tmp_path, method, broken):
    from pathopeft import adapters
    from pathopeft.backbones import apply_adapter

    adapters.save(adapters.create(method, tiny_backbone().model, rank=2, targets="attn"), tmp_path / "ad")
    (tmp_path / "ad" / broken).write_bytes(b"{\x00 not what it should be")
    with pytest.raises(adapters.AdapterLoadError, match=re.escape(str(tmp_path / "ad" / broken)) + ": "):
        apply_adapter(tiny_backbone(), tmp_path / "ad")


def test_embed_is_normalise_resize_forward():
    """Backbone.embed is the one tile → feature path (WSI extraction and bag building both use it)."""
    import torch

    from tests._tiny import tiny_backbone

    bb = tiny_backbone()
    tiles = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)  # not the 32-px input size
    x = bb.normalize(tiles)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    with torch.inference_mode():
        expected = bb.model(x)
    got = bb.embed(tiles)
    assert got.shape == (3, bb.dim)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
