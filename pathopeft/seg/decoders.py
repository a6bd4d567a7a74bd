"""Segmentation decoders and the :data:`SEG_DECODERS` registry of decoder families.

A family (:class:`SegDecoderSpec`) says which encoders it accepts (told apart by the timm model itself) and how
it builds, loads and reads them; :class:`~pathopeft.seg.model.SegModel` asks its entry instead of branching on
the encoder type. ``vit-progressive`` (:class:`ViTProgressiveSpec`) reshapes ViT patch tokens to a map for a
:class:`ProgressiveDecoder`; ``unet`` (:class:`UNetSpec`) feeds ``features_only`` CNN pyramids to a
:class:`UNetDecoder`. :func:`choose_decoder` resolves ``decoder="auto"`` to the first family that accepts the
encoder.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.errors import UserError
from pathopeft.registry import Registry
from pathopeft.seg.encoder import is_vit_like, load_encoder_weights


# --- decoder modules --------------------------------------------------------------------------------------
def conv_norm_act(c_in: int, c_out: int, kernel: int = 3) -> nn.Sequential:
    """Conv-GroupNorm-ReLU. GroupNorm, not BatchNorm: no running statistics to checkpoint, and it behaves
    the same at the small batch sizes of tile training."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
        nn.GroupNorm(math.gcd(8, c_out), c_out),
        nn.ReLU(inplace=True),
    )


class ProgressiveDecoder(nn.Module):
    """Token map at stride ``2**n_up`` → logits: 1×1 + 3×3 conv, then ``n_up`` × (2× bilinear upsample + conv).

    The 1×1 projection first keeps the decoder small for wide encoders (ViT-B: 0.1 M parameters, not 0.5 M),
    which matters when its parameters are counted against an adapter's. Widths halve per stage from
    ``channels`` (floor 16), so the full-resolution convolutions stay cheap. A patch size that is not a power
    of two (e.g. 14) ends with one bilinear resize to the input size.
    """

    def __init__(self, in_channels: int, n_classes: int, channels: int = 64, n_up: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_norm_act(in_channels, channels, kernel=1), conv_norm_act(channels, channels))
        widths = [channels] + [max(channels >> (i + 1), 16) for i in range(n_up)]
        self.stages = nn.ModuleList(conv_norm_act(widths[i], widths[i + 1]) for i in range(n_up))
        self.head = nn.Conv2d(widths[-1], n_classes, 1)

    def forward(self, feature: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.stem(feature)
        for stage in self.stages:
            x = stage(F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False))
        x = self.head(x)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


class UNetDecoder(nn.Module):
    """Multi-scale CNN features (shallow → deep) → logits at the input resolution.

    Deepest map → 1×1 conv to ``channels``; at every shallower scale: upsample to the skip's size,
    concatenate the skip (projected to ``channels`` by a 1×1 conv, so wide skips such as DenseNet's 1024
    channels do not inflate the 3×3 convs), conv3x3. Then one more upsample to the input size and conv (half
    width) + 1×1 head.
    """

    def __init__(self, encoder_channels: Sequence[int], n_classes: int, channels: int = 64) -> None:
        super().__init__()
        skips = list(reversed(encoder_channels[:-1]))
        self.center = conv_norm_act(encoder_channels[-1], channels, kernel=1)
        self.laterals = nn.ModuleList(conv_norm_act(c, channels, kernel=1) for c in skips)
        self.stages = nn.ModuleList(conv_norm_act(2 * channels, channels) for _ in skips)
        half = max(channels // 2, 8)
        self.final = conv_norm_act(channels, half)
        self.head = nn.Conv2d(half, n_classes, 1)

    def forward(self, features: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        x = self.center(features[-1])
        for skip, lateral, stage in zip(reversed(features[:-1]), self.laterals, self.stages, strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = stage(torch.cat([x, lateral(skip)], dim=1))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return self.head(self.final(x))


# --- encoder helpers of the families ----------------------------------------------------------------
def _accepts_kwarg(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes ``name``, following ``**kwargs`` up the MRO (deit's distilled ViT)."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        if name in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return False
    return False


def _without_stem(model: nn.Module, names: list[str]) -> list[str]:
    """Drop the first convolution (the stem): timm's ``features_only`` flattens names (``features_conv0``)
    so the ``all-conv`` preset's stem rule does not see it."""
    stem = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    return [n for n in names if n != stem]


# --- decoder families: which encoders, how built and read -------------------------------------------------
class DecoderError(UserError, ValueError):
    """A decoder that does not take the chosen encoder (or none that does); the message names both."""


class SegDecoderSpec:
    """A decoder family: which encoders it accepts, how it builds, loads and reads them, and how its decoder
    module turns their features into logits. :class:`SegModel` asks its entry instead of branching on the
    encoder type; one instance per model holds the encoder geometry it reads (patch size, layout …)."""

    @staticmethod
    def accepts(probe: nn.Module) -> bool:
        """Whether this family takes the encoder (``probe``: the plain timm model, built on the meta device)."""
        raise NotImplementedError

    def create_encoder(
        self, encoder: str, probe: nn.Module, enc_kw: dict[str, Any], img_size: int | None
    ) -> nn.Module:
        raise NotImplementedError

    def load_weights(self, model: nn.Module, path: str | os.PathLike[str]) -> None:
        raise NotImplementedError

    def adapter_targets(self, model: nn.Module, targets: str | list[str] | None) -> str | list[str]:
        """The adapter targets to use on ``model`` (``targets`` as given, or this family's default)."""
        raise NotImplementedError

    def build(self, model: nn.Module, n_classes: int, channels: int) -> nn.Module:
        """Read the encoder's geometry (before an adapter wraps it) and return the decoder module."""
        raise NotImplementedError

    def encode(self, model: nn.Module, x: torch.Tensor, encoder: str) -> list[torch.Tensor]:
        """Normalised images → feature maps (NCHW) the decoder takes; ``encoder`` names it in errors."""
        raise NotImplementedError

    def decode(self, decoder: nn.Module, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


#: Segmentation decoders by name; ``encoders`` says what each accepts (for messages and listings).
SEG_DECODERS: Registry[type[SegDecoderSpec]] = Registry("segmentation decoder", {"encoders": ""})


@SEG_DECODERS.register("vit-progressive", encoders="ViT-like encoders (patch_embed + blocks: vit_*, deit_*, samvit_*)")
class ViTProgressiveSpec(SegDecoderSpec):
    """Patch tokens → map at stride ``patch_size`` → :class:`ProgressiveDecoder`; adapters default to ``attn``."""

    patch_size: tuple[int, int]
    num_prefix_tokens: int
    fixed_size: tuple[int, int] | None

    @staticmethod
    def accepts(probe: nn.Module) -> bool:
        return is_vit_like(probe)

    def create_encoder(
        self, encoder: str, probe: nn.Module, enc_kw: dict[str, Any], img_size: int | None
    ) -> nn.Module:
        import timm

        if img_size is not None:
            enc_kw.setdefault("img_size", img_size)
        if _accepts_kwarg(type(probe), "dynamic_img_size"):
            enc_kw.setdefault("dynamic_img_size", True)
        return timm.create_model(encoder, pretrained=False, num_classes=0, **enc_kw)

    def load_weights(self, model: nn.Module, path: str | os.PathLike[str]) -> None:
        load_encoder_weights(model, path, vit=True)

    def adapter_targets(self, model: nn.Module, targets: str | list[str] | None) -> str | list[str]:
        return targets or "attn"

    def build(self, model: nn.Module, n_classes: int, channels: int) -> nn.Module:
        ps = model.patch_embed.patch_size
        self.patch_size = (int(ps[0]), int(ps[1])) if isinstance(ps, Sequence) else (ps, ps)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        fixed = not getattr(model, "dynamic_img_size", False) and getattr(model.patch_embed, "strict_img_size", False)
        self.fixed_size = tuple(model.patch_embed.img_size) if fixed else None
        n_up = max(1, int(math.log2(min(self.patch_size))))
        return ProgressiveDecoder(model.num_features, n_classes, channels, n_up)

    def encode(self, model: nn.Module, x: torch.Tensor, encoder: str) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(
                f"input {h}×{w} is not a multiple of the patch size {ph}×{pw} of {encoder}: "
                "use crops (and padding) of a multiple of the patch size"
            )
        if self.fixed_size is not None and (h, w) != self.fixed_size:
            raise ValueError(
                f"{encoder} is built for {self.fixed_size[0]}×{self.fixed_size[1]} inputs, got "
                f"{h}×{w}: set img_size to the crop size"
            )
        out = model.forward_features(x)
        if out.ndim == 3:  # tokens (B, N, D): drop class/distillation/register tokens, back to a map
            tokens = out[:, self.num_prefix_tokens :]
            out = tokens.transpose(1, 2).reshape(out.shape[0], out.shape[-1], h // ph, w // pw)
        return [out]  # samvit: its neck returns (B, C, h, w) already

    def decode(self, decoder: nn.Module, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return decoder(feats[0], size)


@SEG_DECODERS.register("unet", encoders="CNN feature pyramids (timm features_only: resnet*, densenet*, convnext*)")
class UNetSpec(SegDecoderSpec):
    """``features_only`` multi-scale maps → :class:`UNetDecoder`; adapters default to every conv but the stem."""

    channels_last: bool

    @staticmethod
    def accepts(probe: nn.Module) -> bool:
        return not is_vit_like(probe)

    def create_encoder(
        self, encoder: str, probe: nn.Module, enc_kw: dict[str, Any], img_size: int | None
    ) -> nn.Module:
        import timm

        return timm.create_model(encoder, pretrained=False, features_only=True, **enc_kw)

    def load_weights(self, model: nn.Module, path: str | os.PathLike[str]) -> None:
        load_encoder_weights(model, path, vit=False)

    def adapter_targets(self, model: nn.Module, targets: str | list[str] | None) -> str | list[str]:
        from pathopeft.adapters import resolve_targets

        tg = targets or "all-conv"
        if tg in ("all-conv", "all"):
            tg = _without_stem(model, resolve_targets(model, tg))
        return tg

    def build(self, model: nn.Module, n_classes: int, channels: int) -> nn.Module:
        self.channels_last = str(getattr(model, "output_fmt", "NCHW")).endswith("NHWC")
        return UNetDecoder(model.feature_info.channels(), n_classes, channels)

    def encode(self, model: nn.Module, x: torch.Tensor, encoder: str) -> list[torch.Tensor]:
        feats = model(x)
        feats = list(feats.values()) if isinstance(feats, dict) else list(feats)
        if self.channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return feats

    def decode(self, decoder: nn.Module, feats: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        return decoder(feats, size)


def choose_decoder(name: str, probe: nn.Module, encoder: str) -> str:
    """The registered decoder for ``encoder``: ``name``, or with ``"auto"`` the first that accepts it."""
    fits = [n for n in SEG_DECODERS if SEG_DECODERS.get(n).accepts(probe)]
    if name.lower() == "auto":
        if not fits:
            raise DecoderError(
                f"no segmentation decoder accepts encoder {encoder!r} (known: {', '.join(SEG_DECODERS)})"
            )
        return fits[0]
    entry = SEG_DECODERS.entry(name)  # UnknownPluginError lists the known decoders
    if entry.name not in fits:
        raise DecoderError(
            f"decoder {entry.name!r} takes {entry.caps['encoders']}; encoder {encoder!r} is not one "
            f"(decoders that take it: {', '.join(fits) or 'none'}; or decoder='auto')"
        )
    return entry.name
