"""timm backbones by name with weights from a local file — never a hub download.

:func:`create_backbone` returns the model together with the input size and normalisation it expects
(TRIDENT's encoder contract), so feature extraction never guesses preprocessing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Classifier-head parameter prefixes dropped when loading a checkpoint into a headless backbone.
HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_dist.", "last_linear.")


@dataclass
class Backbone:
    """A feature extractor: ``model(x) -> (B, dim)`` for ``x`` normalised with ``mean``/``std``."""

    model: nn.Module
    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str | None  # path of the loaded weights; None = random initialisation

    @property
    def is_random_init(self) -> bool:
        return self.weights is None

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → float, scaled to [0, 1] then standardised."""
        mean = torch.tensor(self.mean, device=x_uint8.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x_uint8.device).view(1, 3, 1, 1)
        return (x_uint8.float().div_(255.0) - mean) / std


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` checkpoint into a flat state dict."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file {p} not found (pathopeft never downloads weights: pass a local file)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: Any = load_file(str(p))
    else:
        sd = torch.load(p, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "module"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    if not isinstance(sd, dict):
        raise TypeError(f"{p}: expected a state dict, found {type(sd).__name__}")
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in sd.items()}


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load local weights into ``model``; classifier heads are ignored, any other mismatch is an error."""
    sd = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(HEAD_PREFIXES)}
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not fit {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected "
            f"(e.g. {result.unexpected_keys[:3]})"
        )


def create_backbone(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    **model_kwargs: Any,
) -> Backbone:
    """Build ``timm`` model ``name`` as a headless feature extractor, with weights from a local file.

    Args:
        name: any timm architecture (``timm.list_models()``), e.g. ``"vit_small_patch16_224"``.
        weights: local ``.safetensors``/``.pth`` file. ``None`` means random initialisation, which is logged
            as a warning because such features are only a lower bound.
        mean, std: override the normalisation from timm's default config (e.g. ``(0, 0, 0)``/``(1, 1, 1)``
            for models trained on [0, 1] inputs).
        **model_kwargs: passed to ``timm.create_model`` (``img_size``, ``depth``, …).

    Example:
        >>> bb = create_backbone("vit_tiny_patch16_224", img_size=64, depth=2)
        >>> bb.dim
        192
    """
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
    except RuntimeError as e:
        raise ValueError(f"unknown timm architecture {name!r} ({e})") from e
    if weights is not None:
        load_weights(model, weights)
    else:
        log.warning(
            "RANDOM WEIGHTS: backbone %r has no --weights; features come from a randomly initialised model "
            "and are only a lower bound.",
            name,
        )
    cfg = timm.data.resolve_model_data_config(model)
    input_size = int(cfg["input_size"][-1])
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size:  # a ViT built with img_size=... keeps the pretrained cfg's 224; trust the module
        input_size = int(img_size[-1] if isinstance(img_size, (tuple, list)) else img_size)
    model.eval()
    return Backbone(
        model=model,
        name=name,
        dim=int(model.num_features),
        input_size=input_size,
        mean=tuple(mean if mean is not None else cfg["mean"]),
        std=tuple(std if std is not None else cfg["std"]),
        weights=str(weights) if weights is not None else None,
    )


def apply_adapter(backbone: Backbone, adapter_dir: str | os.PathLike[str]) -> Backbone:
    """Load an adapter folder (ours or PEFT's) onto the backbone and merge it, for fine-tuned features.

    Merged, extraction costs exactly the base model; a folder made for another model fails with
    :class:`pathopeft.adapters.AdapterLoadError` naming both.
    """
    from pathopeft import adapters

    wrapped = adapters.load(backbone.model, adapter_dir)
    backbone.model = wrapped.merge_and_unload().eval()
    return backbone
