"""``SegModel``: a timm encoder (frozen, adapted or fully trained) + a small decoder to per-pixel logits.

Decoders are the entries of :data:`SEG_DECODERS`; each knows which encoders it accepts (told apart by the
timm model itself) and how it builds, loads and reads them. ``decoder="auto"`` takes the first that accepts
the encoder:

* ``vit-progressive``, for **ViT-like** encoders (``patch_embed`` + ``blocks``: ``vit_*``, ``deit_*``,
  ``samvit_*`` …): ``forward_features`` gives patch tokens at stride ``patch_size``; prefix tokens (class,
  distillation, registers) are dropped and the rest is reshaped to a map (SAM's neck already returns one).
  A :class:`ProgressiveDecoder` upsamples it 2× at a time.
* ``unet``, for **CNN feature pyramids** (``resnet*``, ``densenet*``, …): ``features_only=True``
  multi-scale maps feed a :class:`UNetDecoder` (upsample, concatenate the skip, conv).

How the encoder trains is one switch: ``adapter=None`` → frozen (decoder-only baseline), ``adapter="full"``
→ full fine-tuning, any other name → :func:`pathopeft.adapters.create` on the encoder only. The model takes
images in [0, 1] and normalises them itself, so data code never has to know an encoder's statistics.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.backbones import HEAD_PREFIXES, BackboneError, close_names, load_state_dict_file
from pathopeft.errors import UserError
from pathopeft.registry import Registry

log = logging.getLogger(__name__)

Mode = Literal["frozen", "adapter", "full"]
#: ``timm.create_model`` arguments that only a ``features_only`` model takes
FEATURES_ONLY_KWARGS = ("out_indices", "feature_cls", "feature_cfg", "flatten_sequential", "output_fmt")


# --- decoders ---------------------------------------------------------------------------------------------
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


# --- encoder construction ---------------------------------------------------------------------------------
def is_vit_like(model: nn.Module) -> bool:
    """timm's plain ViT family (``vit_*``, ``deit_*``, ``samvit_*``, eva …): a patch embedding + a block stack."""
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


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


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Fixed RNG inside the block, global RNG untouched: a random-init frozen encoder is rebuilt identically
    from its config, which is what lets checkpoints omit it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _without_stem(model: nn.Module, names: list[str]) -> list[str]:
    """Drop the first convolution (the stem): timm's ``features_only`` flattens names (``features_conv0``)
    so the ``all-conv`` preset's stem rule does not see it."""
    stem = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    return [n for n in names if n != stem]


def _fit_vit_state_dict(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own checkpoint filter (pos-embed/patch-embed resampling, foreign layouts), then resample what it
    leaves at another size: SAM's NHWC pos-embed and relative-position tables (checkpoints of 1024 px)."""
    from timm.layers import resample_abs_pos_embed_nhwc

    filt = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filt is not None:
        sd = filt(sd, model)
    own = model.state_dict()
    out = dict(sd)
    for k, v in sd.items():
        if k not in own or own[k].shape == v.shape:
            continue
        if k.endswith("pos_embed") and v.ndim == 4:
            out[k] = resample_abs_pos_embed_nhwc(v, list(own[k].shape[1:3]))
        elif "rel_pos" in k and v.ndim == 2 and v.shape[1] == own[k].shape[1]:
            out[k] = F.interpolate(v.T[None].float(), size=own[k].shape[0], mode="linear").squeeze(0).T.to(v.dtype)
    return out


def _features_only_keys(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, str]:
    """Map each key of the ``features_only`` model to its key in a plain timm checkpoint.

    timm flattens top-level ``nn.Sequential``s (``features.conv0`` → ``features_conv0``); the split point is
    found by trying each ``_`` of the first name component.
    """
    mapping: dict[str, str] = {}
    for key in model.state_dict():
        candidates = [key, key.removeprefix("model.")]
        head, _, rest = key.partition(".")
        candidates += [f"{head[:i]}.{head[i + 1 :]}.{rest}" for i, ch in enumerate(head) if ch == "_"]
        found = next((c for c in candidates if c in sd), None)
        if found is not None:
            mapping[key] = found
    return mapping


def load_encoder_weights(model: nn.Module, path: str | os.PathLike[str], vit: bool) -> None:
    """Load a local timm-format checkpoint into the encoder (read with :func:`pathopeft.backbones.load_state_dict_file`).

    ``backbones.load_weights`` does not fit here: a ViT built for the crop size needs its position embedding
    resampled, and a ``features_only`` CNN has renamed modules and lacks the layers after its last stage.
    Every tensor of the encoder must come from the file (else ``ValueError``); for a CNN, file tensors of
    layers the encoder dropped are reported, not fatal.
    """
    sd = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(HEAD_PREFIXES)}
    own = model.state_dict()
    if vit:
        sd = _fit_vit_state_dict(sd, model)
        mapping = {k: k for k in own if k in sd}
    else:
        mapping = _features_only_keys(sd, model)
    missing = [k for k in own if k not in mapping and not k.endswith("num_batches_tracked")]
    unused = sorted(set(sd) - set(mapping.values()))
    wrong = [k for k, src in mapping.items() if sd[src].shape != own[k].shape]
    if missing or wrong or (vit and unused):
        raise BackboneError(
            f"{path}: weights do not fit encoder {type(model).__name__}: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(wrong)} of another shape (e.g. {[(k, tuple(sd[mapping[k]].shape), tuple(own[k].shape)) for k in wrong[:2]]}), "
            f"{len(unused) if vit else 0} unexpected (e.g. {unused[:3] if vit else []})"
        )
    if unused:
        log.info(
            "%s: %d tensors of layers after the last feature stage not used (e.g. %s)", path, len(unused), unused[:3]
        )
    model.load_state_dict({k: sd[src] for k, src in mapping.items()}, strict=False)


def _base_key(name: str) -> str:
    """A wrapped encoder's state-dict key → the plain timm key (strip the adapter wrappers' prefixes)."""
    for prefix in ("base_model.model.", "base_model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.replace(".base_layer.", ".")


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


# --- the model --------------------------------------------------------------------------------------------
class SegModel(nn.Module):
    """Encoder + decoder: ``forward(x in [0, 1], (B, 3, H, W)) -> logits (B, n_classes, H, W)``.

    Args:
        encoder: any timm architecture name.
        n_classes: output classes, background included.
        weights: local checkpoint of the encoder (timm format). ``None`` = random init, seeded by
            ``init_seed`` so the same config rebuilds the same encoder; logged as a warning.
        adapter: ``None`` (frozen encoder, decoder-only; or full training with ``freeze_encoder=False``),
            ``"full"`` (full fine-tuning) or an adapter method (:func:`pathopeft.adapters.list_methods`).
        adapter_kwargs: for :func:`pathopeft.adapters.create` (``rank``, ``alpha``, method options).
        targets: adapter targets; default ``"attn"`` for ViTs, ``"all-conv"`` (stem excluded) for CNNs.
        img_size: the crop size a ViT is built for (its position embedding; other multiples of the patch
            size still work where timm supports ``dynamic_img_size``, switched on by default).
        encoder_kwargs: more ``timm.create_model`` arguments (``depth``, ``out_indices``, …).
        mean, std: input normalisation; default from the timm pretrained config. The capricorn DenseNet-121
            wants ``mean=(0, 0, 0), std=(1, 1, 1)``.
        decoder_channels: decoder width.
        decoder: a :data:`SEG_DECODERS` name, or ``"auto"``: the first registered decoder that accepts the
            encoder (``vit-progressive`` for ViT-like encoders, ``unet`` for CNNs). The config keeps the
            resolved name, so a checkpoint rebuilds the same decoder.
        freeze_encoder: only with ``adapter=None``: ``False`` trains the whole encoder (same as ``"full"``).
        bn_eps: override every encoder BatchNorm's eps (Keras-converted weights use 1.001e-5).
        init_seed: seed of a random-init encoder (ignored with ``weights``).
    """

    def __init__(
        self,
        encoder: str,
        n_classes: int,
        weights: str | os.PathLike[str] | None = None,
        adapter: str | None = None,
        adapter_kwargs: dict[str, Any] | None = None,
        targets: str | list[str] | None = None,
        img_size: int | None = None,
        encoder_kwargs: dict[str, Any] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        decoder_channels: int = 64,
        decoder: str = "auto",
        *,
        freeze_encoder: bool = True,
        bn_eps: float | None = None,
        init_seed: int = 0,
    ) -> None:
        super().__init__()
        import timm

        if n_classes < 2:
            raise ValueError(f"n_classes={n_classes}: softmax segmentation needs background + ≥ 1 class")
        if not timm.is_model(encoder):
            hint = close_names(encoder, timm.list_models())
            raise BackboneError(
                f"unknown timm architecture {encoder!r}"
                + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else "")
            )
        #: constructor arguments, JSON-friendly: the module's hparams, so a checkpoint rebuilds this model
        self.config: dict[str, Any] = {
            "encoder": encoder,
            "n_classes": n_classes,
            "weights": str(weights) if weights is not None else None,
            "adapter": adapter,
            "adapter_kwargs": dict(adapter_kwargs or {}),
            "targets": targets if isinstance(targets, str) or targets is None else list(targets),
            "img_size": img_size,
            "encoder_kwargs": dict(encoder_kwargs or {}),
            "mean": list(mean) if mean is not None else None,
            "std": list(std) if std is not None else None,
            "decoder_channels": decoder_channels,
            "decoder": decoder,
            "freeze_encoder": freeze_encoder,
            "bn_eps": bn_eps,
            "init_seed": init_seed,
        }
        self.n_classes = n_classes
        enc_kw = dict(encoder_kwargs or {})
        probe_kw = {k: v for k, v in enc_kw.items() if k not in FEATURES_ONLY_KWARGS}
        try:
            with torch.device("meta"):  # no memory, no init cost: only to tell the family apart
                probe = timm.create_model(encoder, pretrained=False, num_classes=0, **probe_kw)
        except TypeError as e:  # a keyword the architecture does not take (a typo in encoder_kwargs)
            raise BackboneError(f"encoder {encoder!r}: {e}") from None
        self.is_vit = is_vit_like(probe)  # for callers; the code below asks the decoder entry
        self.config["decoder"] = choose_decoder(decoder, probe, encoder)
        #: the decoder family (a :data:`SEG_DECODERS` entry) that builds and reads this encoder
        self.decoder_spec: SegDecoderSpec = SEG_DECODERS.get(self.config["decoder"])()

        with _seeded(None if weights is not None else init_seed):
            model = self.decoder_spec.create_encoder(encoder, probe, enc_kw, img_size)
        del probe
        if bn_eps is not None:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eps = bn_eps
        if weights is not None:
            self.decoder_spec.load_weights(model, weights)
            log.info("encoder %s: weights from %s", encoder, weights)
        else:
            log.warning(
                "RANDOM WEIGHTS: segmentation encoder %r has no weights file; it is randomly initialised "
                "(seed %d). Results are only a lower bound.",
                encoder,
                init_seed,
            )
        cfg = timm.data.resolve_model_data_config(model)
        mean_t = torch.tensor(list(mean if mean is not None else cfg["mean"]), dtype=torch.float32)
        std_t = torch.tensor(list(std if std is not None else cfg["std"]), dtype=torch.float32)
        self.register_buffer("mean", mean_t.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, 3, 1, 1), persistent=False)

        # encoder geometry, read before an adapter wraps it
        self.decoder: nn.Module = self.decoder_spec.build(model, n_classes, decoder_channels)
        self._base_keys = frozenset(model.state_dict())

        name = adapter.lower() if adapter is not None else None
        if name is None:
            self.mode: Mode = "frozen" if freeze_encoder else "full"
        elif name == "full":
            self.mode = "full"
        else:
            self.mode = "adapter"
        if targets is not None and self.mode != "adapter":
            log.warning("targets=%r ignored: no adapter (mode %s)", targets, self.mode)
        if self.mode == "frozen":
            model.requires_grad_(False)
        elif self.mode == "adapter":
            from pathopeft import adapters

            tg = self.decoder_spec.adapter_targets(model, targets)
            model = adapters.create(name, model, targets=tg, **(adapter_kwargs or {}))
        self.encoder = model
        self.train()

    # --- modes ----------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> SegModel:
        """Like ``nn.Module.train``, but a frozen encoder stays in eval mode, and an adapted one keeps its
        BatchNorm layers in eval: their running statistics belong to the frozen base model, and updating them
        from fine-tuning batches would change the base features (and not be saved in the checkpoint)."""
        super().train(mode)
        if mode and self.mode == "frozen":
            self.encoder.eval()
        elif mode and self.mode == "adapter":
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # --- forward --------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images → encoder feature maps (NCHW), shallow to deep (a single map for ViTs)."""
        return self.decoder_spec.encode(self.encoder, x, self.config["encoder"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], (B, 3, H, W) → logits (B, n_classes, H, W)."""
        if not x.is_floating_point():
            raise TypeError(f"SegModel wants float images in [0, 1], got {x.dtype} (divide uint8 by 255)")
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"SegModel wants (B, 3, H, W) images, got shape {tuple(x.shape)}")
        size = (int(x.shape[-2]), int(x.shape[-1]))
        x = (x - self.mean) / self.std
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode != "frozen"):
            feats = self.encode(x)
        return self.decoder_spec.decode(self.decoder, feats, size)

    # --- what training changes ------------------------------------------------------------------------
    def _is_trained_key(self, key: str) -> bool:
        if not key.startswith("encoder."):
            return True  # decoder
        if self.mode == "full":
            return True
        # adapter-owned tensors (deltas, LoRA matrices, OWLoRA's saved subspaces …) are not in the plain encoder
        return self.mode == "adapter" and _base_key(key.removeprefix("encoder.")) not in self._base_keys

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes: trainable parameters (adapter + decoder; all of the encoder when fully
        trained), plus the tensors that go with them (adapter buffers, and BatchNorm statistics of a fully
        trained encoder). The frozen base is left out: it is rebuilt from ``weights``/``init_seed``."""
        out: dict[str, Any] = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}
        for k, v in self.state_dict(keep_vars=True).items():
            if k not in out and self._is_trained_key(k):
                out[k] = v.detach() if isinstance(v, torch.Tensor) else v  # `_extra_state` may be any object
        return out

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` saved into a freshly built model of the same config."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        wrong = [
            k for k in expected if k in sd and getattr(sd[k], "shape", None) != getattr(expected[k], "shape", None)
        ]
        if missing or unexpected or wrong:
            raise ValueError(
                f"trainable state does not fit this SegModel ({self.config['encoder']}, mode {self.mode}, adapter "
                f"{self.config['adapter']!r}): {len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} "
                f"unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})"
            )
        self.load_state_dict(dict(sd), strict=False)

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def n_total(self) -> int:
        return sum(p.numel() for p in self.parameters())
