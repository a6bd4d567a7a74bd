"""Export a segmentation run's encoder adapter as a folder that ``pathopeft wsi process --adapter`` loads.

A :class:`~pathopeft.seg.model.SegModel` adapts its encoder as it is built for segmentation: a ViT exactly as
timm builds it headless, a CNN as timm's ``features_only`` wrapper, which renames modules (``features.conv0`` →
``features_conv0``). The WSI stage loads adapters onto the plain headless model
(:func:`pathopeft.backbones.create_backbone`). So the export re-hosts the adapter: the same method and
settings are created on the headless architecture with the targets renamed, every adapter tensor (and the
targeted base weights, which methods such as SALT decompose) is copied across, and the result is saved with
:func:`pathopeft.adapters.save` — fingerprint included, so it refuses a wrong base like any adapter folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pathopeft.errors import UserError
from pathopeft.seg.encoder import FEATURES_ONLY_KWARGS
from pathopeft.seg.model import SegModel


class ExportError(UserError):
    """The model has nothing to export, or its adapter cannot be re-hosted."""


def _target_names(wrapped: nn.Module) -> list[str]:
    """The layer names an adapter wrapper adapts (ours: AdapterModel._targets; PEFT: the modules it replaced)."""
    from pathopeft.adapters.core import AdapterModel

    if isinstance(wrapped, AdapterModel):
        return list(wrapped._targets[wrapped.active_adapter])
    prefix = "base_model.model."
    return [
        n.removeprefix(prefix) for n, m in wrapped.named_modules() if n.startswith(prefix) and hasattr(m, "base_layer")
    ]


def _plain_name(name: str, plain: set[str]) -> str | None:
    """``features_denseblock1.denselayer1.conv1`` → ``features.denseblock1.denselayer1.conv1`` (timm's flattening)."""
    if name in plain:
        return name
    head, _, rest = name.partition(".")
    for i, ch in enumerate(head):
        if ch == "_":
            cand = f"{head[:i]}.{head[i + 1 :]}" + (f".{rest}" if rest else "")
            if cand in plain:
                return cand
    return None


def _strip(key: str) -> tuple[str, str]:
    """(wrapper prefix, module path) of a wrapper state-dict key."""
    for prefix in ("base_model.model.", "base_model."):
        if key.startswith(prefix):
            return prefix, key[len(prefix) :]
    return "", key


def export_encoder_adapter(model: SegModel, directory: str | os.PathLike[str]) -> Path:
    """Save ``model``'s encoder adapter so it loads onto ``create_backbone(model.config["encoder"])``.

    Returns the folder. Raises :class:`ExportError` for a model without an adapter (frozen or full
    fine-tuning: there the encoder weights themselves are what changed) and for PiSSA (its saved form is
    relative to the initial decomposition, which a re-hosted copy cannot reproduce).
    """
    import timm

    from pathopeft import adapters

    cfg = model.config
    if model.mode != "adapter":
        raise ExportError(f"this SegModel has no adapter to export (mode {model.mode!r}; adapter={cfg['adapter']!r})")
    if cfg["adapter"].lower() == "pissa":
        raise ExportError("pissa adapters cannot be exported for feature extraction yet; train with lora or dora")
    kwargs = {k: v for k, v in cfg["encoder_kwargs"].items() if k not in FEATURES_ONLY_KWARGS}
    if model.is_vit and cfg["img_size"] is not None:
        kwargs.setdefault("img_size", cfg["img_size"])
    base = timm.create_model(cfg["encoder"], pretrained=False, num_classes=0, **kwargs)
    base_keys = set(base.state_dict())  # before the adapter wraps (and renames) its layers
    plain = {n for n, _ in base.named_modules()}
    seg_targets = _target_names(model.encoder)
    mapping = {t: _plain_name(t, plain) for t in seg_targets}
    if lost := [t for t, p in mapping.items() if p is None]:
        raise ExportError(f"cannot find the headless {cfg['encoder']}'s layers for targets {lost[:3]}")
    rehosted = adapters.create(
        cfg["adapter"], base, targets=[mapping[t] for t in seg_targets], **dict(cfg["adapter_kwargs"])
    )
    inverse = sorted(((p, t) for t, p in mapping.items()), key=lambda pt: len(pt[0]), reverse=True)
    source = model.encoder.state_dict()
    state, missing = {}, []
    for key, value in rehosted.state_dict().items():
        prefix, path = _strip(key)
        for plain_name, seg_name in inverse:  # a layer of a target: rename the target part
            if path.startswith(plain_name + "."):
                path = seg_name + path[len(plain_name) :]
                break
        src = prefix + path
        if src in source and source[src].shape == value.shape:
            state[key] = source[src]
        elif _strip(key)[1].replace(".base_layer", "") not in base_keys:  # an adapter tensor: it must be found
            missing.append(key)
    if missing:
        raise ExportError(f"adapter tensors without a source in the segmentation encoder: {missing[:3]}")
    with torch.no_grad():
        rehosted.load_state_dict(state, strict=False)
    return adapters.save(rehosted, directory)
