"""Saving and reloading PEFT adapters on full-depth models (issue 9).

A 12-block ViT with ``targets="attn"`` has 24 targets: PEFT ≥ 0.14 saves ≥ 20 explicit names condensed into
suffixes (``["qkv", "attn.proj"]``), which the 1-block toys of the conformance matrix never reach.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch

from pathopeft import adapters
from pathopeft.adapters.registry import BASE_INFO_NAME

PEFT_METHODS = ["lora", "dora", "pissa"]


def vit(seed: int = 0, **kw) -> torch.nn.Module:
    """Real depth (12 blocks), narrow width: the layer names of a ViT-S/B, in milliseconds."""
    torch.manual_seed(seed)
    base = {"img_size": 32, "patch_size": 16, "depth": 12, "embed_dim": 32, "num_heads": 2, "num_classes": 0}
    return timm.create_model("vit_tiny_patch16_224", **{**base, **kw}).eval()


def trained(method: str) -> torch.nn.Module:
    """An adapter that is not a no-op (LoRA's B starts at zero), as after training."""
    torch.manual_seed(1234)
    model = adapters.create(method, vit(), rank=2, targets="attn").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=PEFT_METHODS)
def saved(request, tmp_path_factory):
    """(method, adapter folder, input, the trained model's output) for one method, saved once."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    model = trained(request.param)
    with torch.no_grad():
        expected = model(x)
        assert not torch.allclose(expected, vit()(x), atol=1e-3)  # the adapter changes the output
    folder = adapters.save(model, tmp_path_factory.mktemp(request.param) / "adapter")
    return request.param, folder, x, expected


def test_peft_condenses_the_saved_targets(saved):
    """The precondition of the bug: the saved config no longer lists full module names."""
    _, folder, _, _ = saved
    targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
    assert len(targets) < 24
    assert not any(t.startswith("blocks.") for t in targets)


def test_reload_onto_an_identical_model_gives_identical_outputs(saved):
    _, folder, x, expected = saved
    loaded = adapters.load(vit(), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-4)


def test_merged_reload_for_feature_extraction(saved):
    """`--adapter DIR` on a full-depth backbone: the merged model gives the adapted features."""
    _, folder, x, expected = saved
    plain = adapters.load(vit(), folder).merge_and_unload().eval()
    assert not any("lora_" in n for n, _ in plain.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, atol=1e-5, rtol=1e-4)


def test_other_width_is_refused_as_a_different_base_model(saved):
    _, folder, _, _ = saved
    with pytest.raises(adapters.AdapterLoadError) as info:
        adapters.load(vit(embed_dim=48), folder)
    msg = str(info.value)
    assert msg.startswith(f"{folder}: the base model differs")
    assert "made for base model 'vit_tiny_patch16_224' (fingerprint " in msg
    assert "lacks" not in msg


def test_shallower_model_is_refused_as_a_different_base_model(saved):
    _, folder, _, _ = saved
    with pytest.raises(adapters.AdapterLoadError, match=r"the base model differs: .*lacks 12 of its 24 target layers"):
        adapters.load(vit(depth=6), folder)


def test_deeper_model_is_refused_although_the_24_layers_match(saved):
    """Same 24 layers and shapes, but PEFT's suffixes would also adapt blocks.12: not the model it was made for."""
    _, folder, _, _ = saved
    with pytest.raises(adapters.AdapterLoadError, match=r"the base model differs: PEFT would adapt 26 layers"):
        adapters.load(vit(depth=13), folder)


def test_folder_saved_before_targets_were_stored_still_loads(saved, tmp_path):
    """pathopeft_base.json without ``targets`` (older saves): PEFT's own matcher stands in for the list."""
    import shutil

    _, folder, x, expected = saved
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    info = json.loads((old / BASE_INFO_NAME).read_text())
    del info["targets"]
    (old / BASE_INFO_NAME).write_text(json.dumps(info))
    with torch.no_grad():
        torch.testing.assert_close(adapters.load(vit(), old).eval()(x), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(adapters.AdapterLoadError, match=r"the base model differs"):
        adapters.load(vit(embed_dim=48), old)


def test_plain_peft_folder_on_another_model_is_an_adapter_load_error(tmp_path):
    """Without pathopeft_base.json PEFT's own size mismatch is the only signal: one line naming the folder."""
    import peft

    pm = peft.get_peft_model(vit(depth=2), peft.LoraConfig(r=2, target_modules=["qkv"]))
    pm.save_pretrained(tmp_path / "plain")
    with pytest.raises(adapters.AdapterLoadError, match=r"plain: this adapter does not fit .*size mismatch"):
        adapters.load(vit(depth=2, embed_dim=48), tmp_path / "plain")


def test_missing_weights_are_named(tmp_path):
    for method in ("salt", "lora"):
        folder = adapters.save(adapters.create(method, vit(depth=1), rank=2), tmp_path / method)
        (folder / "adapter_model.safetensors").unlink()
        with pytest.raises(adapters.AdapterLoadError, match=rf"{method}.adapter_model\.safetensors: adapter weights not found"):  # fmt: skip
            adapters.load(vit(depth=1), folder)


def test_config_that_is_not_an_object_is_named(tmp_path):
    folder = adapters.save(adapters.create("salt", vit(depth=1), rank=2), tmp_path / "a")
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(adapters.AdapterLoadError, match=r"adapter_config\.json: expected a JSON object, found list"):
        adapters.load(vit(depth=1), folder)
