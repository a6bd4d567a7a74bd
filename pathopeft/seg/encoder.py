"""The timm encoder of a :class:`~pathopeft.seg.model.SegModel`: which family it is, how a local checkpoint is
loaded into it (a ViT built for the crop size, a ``features_only`` CNN with renamed modules), and how the keys
of an adapter-wrapped encoder map back to the plain timm ones."""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.backbones import HEAD_PREFIXES, BackboneError, load_state_dict_file

log = logging.getLogger(__name__)

#: ``timm.create_model`` arguments that only a ``features_only`` model takes
FEATURES_ONLY_KWARGS = ("out_indices", "feature_cls", "feature_cfg", "flatten_sequential", "output_fmt")


def is_vit_like(model: nn.Module) -> bool:
    """timm's plain ViT family (``vit_*``, ``deit_*``, ``samvit_*``, eva …): a patch embedding + a block stack."""
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


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
