"""The published patch encoders (pathopeft.encoders), a matrix generated from the registry: each builds from random
weights saved in its published layout, in a temporary Hugging Face cache and as a local file, loads strictly,
and gives the published dimension and preprocessing; a missing or foreign file is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pathopeft.backbones import BackboneError, WeightsNotFoundError, create_backbone
from pathopeft.encoders import IMAGENET, NOT_BUILDABLE, PATCH_ENCODERS, EncoderSpec

NAMES = list(PATCH_ENCODERS)

#: Published sizes (model cards / papers), millions of parameters at full depth: pins each architecture.
PUBLISHED_MPARAMS = {"uni_v1": 303, "uni_v2": 681, "virchow": 631, "virchow2": 631, "hoptimus0": 1135,
                     "hoptimus1": 1135, "gigapath": 1135, "kaiko-vits16": 21.7, "kaiko-vits8": 21.7,
                     "kaiko-vitb16": 85.8, "kaiko-vitb8": 85.8, "kaiko-vitl14": 304, "lunit-vits8": 21.7,
                     "phikon": 86.4, "phikon_v2": 303, "resnet50": 8.5}  # fmt: skip
#: Published embedding sizes and normalisations.
PUBLISHED = {"uni_v1": (1024, IMAGENET[0]), "uni_v2": (1536, IMAGENET[0]), "virchow": (2560, IMAGENET[0]),
             "virchow2": (2560, IMAGENET[0]), "hoptimus0": (1536, (0.707223, 0.578729, 0.703617)),
             "hoptimus1": (1536, (0.707223, 0.578729, 0.703617)), "gigapath": (1536, IMAGENET[0]),
             "kaiko-vits16": (384, (0.5,) * 3), "kaiko-vits8": (384, (0.5,) * 3), "kaiko-vitb16": (768, (0.5,) * 3),
             "kaiko-vitb8": (768, (0.5,) * 3), "kaiko-vitl14": (1024, (0.5,) * 3),
             "lunit-vits8": (384, (0.70322989, 0.53606487, 0.66096631)), "phikon": (768, IMAGENET[0]),
             "phikon_v2": (1024, IMAGENET[0]), "resnet50": (1024, IMAGENET[0])}  # fmt: skip


def _tiny(spec: EncoderSpec) -> dict:
    """Depth 1 (same widths, so the same dimension and per-block key layout), or nothing for the ResNet."""
    if spec.backend == "transformers":
        return {"num_hidden_layers": 1}
    return {} if spec.name == "resnet50" else {"depth": 1}


def _published_file(spec: EncoderSpec, folder: Path) -> Path:
    """Random weights in the published layout, under the published file name, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if spec.backend == "transformers":
        spec.build(**_tiny(spec)).save_pretrained(folder)  # config.json + model.safetensors, pooler included
        return folder / "model.safetensors"
    if spec.name == "resnet50":  # the published ImageNet ResNet-50 has layer4 and the classifier
        import timm

        sd = timm.create_model("resnet50", pretrained=False).state_dict()
    else:
        sd = spec.build(**_tiny(spec)).state_dict()
    path = folder / spec.weights_files[0]
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


def _hf_cache(root: Path, spec: EncoderSpec) -> Path:
    """A Hugging Face hub cache holding ``spec.hf_repo`` at one revision, as `hf download` leaves it."""
    repo = root / f"models--{spec.hf_repo.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return _published_file(spec, repo / "snapshots" / ("0" * 40))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("name", NAMES)
def test_encoder_loads_strictly_from_the_hf_cache_with_its_published_preprocessing(name, hf_cache):
    spec = PATCH_ENCODERS.get(name)
    path = _hf_cache(hf_cache, spec)
    bb = create_backbone(name, **_tiny(spec))
    dim, mean = PUBLISHED[name]
    assert (bb.dim, bb.mean) == (dim, pytest.approx(mean))
    assert Path(bb.weights) == path
    assert not bb.is_random_init
    assert bb.slug == name  # features_<TRIDENT's name>/
    with torch.no_grad():
        out = bb.embed(torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8))
    assert out.shape == (2, dim)
    assert torch.isfinite(out).all()
    # the loaded tensors are the file's (strict load, not a fresh init)
    from pathopeft.backbones import load_state_dict_file

    sd = load_state_dict_file(path)
    key = next(k for k in sd if k.endswith("weight") and not k.startswith(spec.drop_prefixes))
    inner = bb.model.model if hasattr(bb.model, "model") else bb.model
    assert torch.equal(inner.state_dict()[key], sd[key])


@pytest.mark.parametrize("name", NAMES)
def test_encoder_loads_from_a_local_file_and_its_architecture_has_the_published_size(name, tmp_path):
    spec = PATCH_ENCODERS.get(name)
    path = _published_file(spec, tmp_path / "weights")
    bb = create_backbone(name, weights=path, **_tiny(spec))
    assert bb.dim == PUBLISHED[name][0]
    assert Path(bb.weights) == path
    with torch.device("meta"):  # full depth, no memory: the parameter count of the published model
        full = spec.build()
    assert sum(p.numel() for p in full.parameters()) / 1e6 == pytest.approx(PUBLISHED_MPARAMS[name], rel=0.01)


def test_missing_weights_name_where_they_were_looked_for_never_random(hf_cache, tmp_path):
    with pytest.raises(
        WeightsNotFoundError, match=r"uni_v1.*not in the local Hugging Face cache at .*models--MahmoodLab--UNI"
    ):
        create_backbone("uni_v1")
    with pytest.raises(WeightsNotFoundError, match=r"weights file .*nope.bin not found"):
        create_backbone("uni_v1", weights=tmp_path / "nope.bin")


def test_another_models_weights_are_refused_with_the_file_named(tmp_path):
    lunit = _published_file(PATCH_ENCODERS.get("lunit-vits8"), tmp_path / "lunit")
    with pytest.raises(BackboneError, match=r"lunit.*model.safetensors: not kaiko-vitb16's published weights"):
        create_backbone("kaiko-vitb16", weights=lunit, depth=1)


def test_virchow_embedding_is_cls_and_mean_of_patch_tokens_without_registers(tmp_path):
    spec = PATCH_ENCODERS.get("virchow2")
    bb = create_backbone("virchow2", weights=_published_file(spec, tmp_path), depth=1)
    x = bb.preprocess(torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8))
    with torch.no_grad():
        tokens = bb.model.model.forward_features(x)
        expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)  # 1 CLS + 4 registers first
        assert bb.model.model.num_prefix_tokens == 5
        torch.testing.assert_close(bb.model(x), expected)


def test_gigapath_resizes_to_256_then_centre_crops_224(tmp_path):
    bb = create_backbone("gigapath", weights=_published_file(PATCH_ENCODERS.get("gigapath"), tmp_path), depth=1)
    assert (bb.resize_px, bb.input_size, bb.interpolation) == (256, 224, "bicubic")
    tile = torch.zeros(1, 3, 256, 256, dtype=torch.uint8)
    tile[..., 16:240, 16:240] = 255  # a white square exactly where the crop falls
    x = bb.preprocess(tile)
    assert x.shape[-2:] == (224, 224)
    torch.testing.assert_close(x, bb.normalize(torch.full((1, 3, 224, 224), 255, dtype=torch.uint8)))


def test_unbuildable_encoders_are_listed_with_a_reason_and_not_registered():
    assert NOT_BUILDABLE
    assert all(reason for reason in NOT_BUILDABLE.values())
    assert not set(NOT_BUILDABLE) & set(PATCH_ENCODERS)


def test_cli_encoder_without_weights_is_one_line_naming_the_cache(hf_cache, tmp_path, capsys):
    from pathopeft.cli import main
    from pathopeft.wsi.pyramid import write_pyramid
    from tests._tiny import blob_image

    slide = write_pyramid(blob_image(256, 256), tmp_path / "s.tiff", mpp=0.5)
    rc = main(["wsi", "process", "--slides", str(slide), "--out", str(tmp_path / "run"), "--encoder", "uni_v1",
               "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("error: encoder 'uni_v1' (MahmoodLab/UNI): not in the local Hugging Face cache at")
    assert "Traceback" not in "\n".join(err)
    assert not list((tmp_path / "run").glob("features_*/*.h5"))  # nothing written from random weights
