"""Which layers an adapter goes on: presets by name, resolved to full module names.

Presets match module-name suffixes of timm vision models, so the same preset works on ``vit_*``, ``deit_*``,
``samvit_*`` (timm's SAM image encoder) and most hybrids:

* ``"attn"``       — ``attn.qkv``, ``attn.proj`` (the SAM/LoRA convention)
* ``"attn+mlp"``   — plus ``mlp.fc1``, ``mlp.fc2``
* ``"all-linear"`` — every ``nn.Linear`` except the classifier head
* ``"all-conv"``   — every ``nn.Conv2d`` with a kernel > 1×1 or more than one input channel group, except the
  stem (patch embedding / first conv), for CNN encoders such as DenseNet
* ``"all"``        — ``all-linear`` + ``all-conv``

A list of names is taken as it is (full names, or suffixes matched at a ``.`` boundary); a single string that
is not a preset is a regular expression matched against full module names with ``re.fullmatch``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("attn.qkv", "attn.proj"),
    "attn+mlp": ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"),
}
ADAPTABLE = (nn.Linear, nn.Conv2d)
_HEAD_NAMES = ("head", "fc", "classifier", "head.fc", "head.proj")


def _is_head(name: str) -> bool:
    return name in _HEAD_NAMES or name.startswith("head.")


def _is_stem(name: str) -> bool:
    return name.startswith(("patch_embed", "stem", "conv1", "features.conv0", "features_conv0", "conv_stem"))


def _suffix_match(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Full names of the ``nn.Linear``/``nn.Conv2d`` modules that ``targets`` selects, in model order.

    Raises ``ValueError`` when nothing matches, naming the preset and a few of the model's layer names.
    """
    # an already adapted layer keeps its original name (its wrapper holds the real layer as ``base_layer``)
    layers = {n.removesuffix(".base_layer"): m for n, m in model.named_modules() if isinstance(m, ADAPTABLE)}
    if isinstance(targets, str) and targets in PRESETS:
        names = [n for n in layers if _suffix_match(n, PRESETS[targets])]
    elif targets in ("all-linear", "all-conv", "all"):
        want_lin, want_conv = targets != "all-conv", targets != "all-linear"
        names = [
            n
            for n, m in layers.items()
            if (want_lin and isinstance(m, nn.Linear) and not _is_head(n))
            or (want_conv and isinstance(m, nn.Conv2d) and not _is_stem(n))
        ]
    elif isinstance(targets, str):
        rx = re.compile(targets)
        names = [n for n in layers if rx.fullmatch(n)]
    else:
        names = [n for n in layers if _suffix_match(n, list(targets))]
    if not names:
        sample = ", ".join(list(layers)[:6])
        raise ValueError(
            f"target {targets!r} matches no nn.Linear/nn.Conv2d of {type(model).__name__} "
            f"(presets: {sorted([*PRESETS, 'all-linear', 'all-conv', 'all'])}; layers look like: {sample}, …)"
        )
    return names
