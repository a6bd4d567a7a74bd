import pytest
import torch
from safetensors.torch import save_file

from pathopeft.backbones import create_backbone, load_state_dict_file
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
    with pytest.raises(TypeError, match="expected a state dict"):
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
