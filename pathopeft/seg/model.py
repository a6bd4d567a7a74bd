"""``SegModel``: a timm encoder (frozen, adapted or fully trained) + a small decoder to per-pixel logits.

Decoders are the entries of :data:`~pathopeft.seg.decoders.SEG_DECODERS`; each knows which encoders it accepts
(told apart by the timm model itself) and how it builds, loads and reads them. ``decoder="auto"`` takes the first
that accepts the encoder:

* ``vit-progressive``, for **ViT-like** encoders (``patch_embed`` + ``blocks``: ``vit_*``, ``deit_*``,
  ``samvit_*`` …): ``forward_features`` gives patch tokens at stride ``patch_size``; prefix tokens (class,
  distillation, registers) are dropped and the rest is reshaped to a map (SAM's neck already returns one).
  A :class:`~pathopeft.seg.decoders.ProgressiveDecoder` upsamples it 2× at a time.
* ``unet``, for **CNN feature pyramids** (``resnet*``, ``densenet*``, …): ``features_only=True``
  multi-scale maps feed a :class:`~pathopeft.seg.decoders.UNetDecoder` (upsample, concatenate the skip, conv).

How the encoder trains is one switch: ``adapter=None`` → frozen (decoder-only baseline), ``adapter="full"``
→ full fine-tuning, any other name → :func:`pathopeft.adapters.create` on the encoder only. The model takes
images in [0, 1] and normalises them itself, so data code never has to know an encoder's statistics.

The decoders and their families are :mod:`pathopeft.seg.decoders`; loading encoder weights is
:mod:`pathopeft.seg.encoder`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from pathopeft.backbones import BackboneError, close_names
from pathopeft.seg.decoders import SEG_DECODERS, SegDecoderSpec, choose_decoder
from pathopeft.seg.encoder import FEATURES_ONLY_KWARGS, _base_key, is_vit_like

log = logging.getLogger(__name__)

Mode = Literal["frozen", "adapter", "full"]


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
        decoder: a :data:`~pathopeft.seg.decoders.SEG_DECODERS` name, or ``"auto"``: the first registered decoder that accepts the
            encoder (``vit-progressive`` for ViT-like encoders, ``unet`` for CNNs). The config keeps the
            resolved name, so a checkpoint rebuilds the same decoder.
        freeze_encoder: only with ``adapter=None``: ``False`` trains the whole encoder (same as ``"full"``).
        train_norms: with an adapter, also train the encoder's normalisation layers and position embeddings
            (:func:`train_norms_and_positions`), as the SALT recipe does for every method it compares.
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
        train_norms: bool = False,
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
            "train_norms": train_norms,
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
        #: the decoder family (a :data:`~pathopeft.seg.decoders.SEG_DECODERS` entry) that builds and reads this encoder
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
            if train_norms:
                train_norms_and_positions(model)
        elif train_norms:
            log.warning("train_norms ignored: no adapter (mode %s)", self.mode)
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


def train_norms_and_positions(encoder: nn.Module) -> int:
    """Make the base encoder's norm parameters (LayerNorm/BatchNorm affine, any ``norm`` in the name) and
    position embeddings trainable beside the adapter, for every method alike; returns how many tensors."""
    n = 0
    for name, p in encoder.named_parameters():
        leaf = name.lower()
        if ".deltas." in leaf or "lora_" in leaf or ".base_layer." in leaf:
            continue
        if "norm" in leaf or "pos_embed" in leaf:
            p.requires_grad_(True)
            n += 1
    return n
