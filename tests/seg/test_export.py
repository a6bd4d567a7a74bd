"""A segmentation run's encoder adapter exported for the WSI stage loads onto the plain timm backbone and
gives the same adapted weights (and, for ViTs, the same features) as inside the SegModel."""

from __future__ import annotations

import copy

import pytest
import torch

from pathopeft import adapters
from pathopeft.backbones import apply_adapter, create_backbone
from pathopeft.seg.export import ExportError, _plain_name, export_encoder_adapter
from pathopeft.seg.model import SegModel

TOYS = {
    "vit": ({"encoder": "vit_tiny_patch16_224", "img_size": 32, "encoder_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}},
            {"img_size": 32, "depth": 2, "embed_dim": 32, "num_heads": 2}),
    "cnn": ({"encoder": "test_resnet"}, {}),
}  # fmt: skip


def _adapts_conv(method: str) -> bool:
    from pathopeft.adapters.registry import ADAPTERS

    return bool(ADAPTERS.entry(method).caps.get("conv"))


CASES = [
    (toy, m)
    for toy in TOYS
    for m in adapters.list_methods()
    if m not in ("pissa", "owlora") and (toy == "vit" or _adapts_conv(m))
]


def _merged(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in copy.deepcopy(module).merge_and_unload().state_dict().items()}


@pytest.mark.parametrize(("toy", "method"), CASES)
def test_exported_adapter_loads_onto_the_plain_backbone(toy, method, tmp_path):
    seg_kw, bb_kw = TOYS[toy]
    torch.manual_seed(0)
    frozen = SegModel(n_classes=2, **seg_kw)  # the same seeded random encoder, without an adapter
    model = SegModel(n_classes=2, adapter=method, adapter_kwargs={"rank": 2}, **seg_kw)
    with torch.no_grad():  # a trained adapter, not the identity
        g = torch.Generator().manual_seed(1)
        for p in model.encoder.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    folder = export_encoder_adapter(model, tmp_path / "adapter")

    bb = create_backbone(seg_kw["encoder"], **bb_kw)
    plain = set(bb.model.state_dict())
    base = {_plain_name(k, plain): v for k, v in frozen.encoder.state_dict().items()}
    loaded = bb.model.load_state_dict({k: v for k, v in base.items() if k is not None}, strict=False)
    assert not [k for k in loaded.missing_keys if "fc" not in k and "head" not in k and "norm" not in k.split(".")[0]]
    apply_adapter(bb, folder)  # what `wsi process --adapter <folder>` does

    want = {_plain_name(k, plain): v for k, v in _merged(model.encoder).items()}
    got = bb.model.state_dict()
    targets = [
        n.removesuffix(".weight")
        for n in plain
        if n.endswith(("qkv.weight", "proj.weight", "conv1.weight", "conv2.weight"))
    ]
    compared = 0
    for name in targets:
        key = f"{name}.weight"
        if key in want and key in got:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
            compared += 1
    assert compared > 0
    changed = sum(not torch.equal(got[f"{n}.weight"], base[f"{n}.weight"]) for n in targets if f"{n}.weight" in base)
    assert changed > 0  # the adapter really did something
    if toy == "vit":
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            ref = copy.deepcopy(model.encoder).merge_and_unload().eval().forward_features(x)
            torch.testing.assert_close(bb.model.eval().forward_features(x), ref, rtol=1e-4, atol=1e-5)


def test_nothing_to_export_is_a_clear_error(tmp_path):
    seg_kw, _ = TOYS["vit"]
    with pytest.raises(ExportError, match="no adapter to export"):
        export_encoder_adapter(SegModel(n_classes=2, **seg_kw), tmp_path / "a")
