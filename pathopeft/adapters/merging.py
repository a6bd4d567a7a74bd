"""Merging LoRAs into one: LoRA-LEGO's rank-wise clustering, and the plain-LoRA export every merge ends in.

A LoRA here is its factors per layer, ``{layer name: (B, A)}`` with ΔW = B A (B: out×r, A: r×in; PEFT's scale
folded into B). :func:`peft_lora_factors` reads them from a PEFT model, :func:`lora_from_factors` writes any such
dict back as a PEFT LoRA (per-layer ranks), so a merged or pruned adapter is an ordinary LoRA file.

LoRA-LEGO (Zhao et al., "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through
Rank-Wise Clustering", ICLR 2025, arXiv 2409.16167). Every rank of every LoRA is a unit (bᵢ, aᵢ) contributing
bᵢaᵢᵀ; the units of all LoRAs of a layer are pooled (stacking them is exactly summing the LoRAs, and their order
does not matter), clustered into k groups by k-means, and each cluster's centroid becomes one rank of the merged
rank-k LoRA; "parameter reweighting" rescales each centroid to its members' average norm (an average of
dissimilar vectors is shorter than they are). The paper's method section was not reachable here (abstract and
reviews only), so these details are our reading, stated for the test that pins them: units are clustered on
[a/‖a‖; b/‖b‖] after fixing each unit's sign (a's largest-magnitude entry positive; (b, a) and (−b, −a) are
the same unit), the centroid is the mean of the raw [a; b], rescaled to the members' mean L2 norm; the paper's
"output reweighting" is not applied. With k equal to the total rank every unit is its own cluster and the merge
is PEFT's ``add_weighted_adapter(combination_type="cat")`` exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pathopeft.adapters.core import active_deltas

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def peft_lora_factors(model: nn.Module, adapter_name: str = "default") -> Factors:
    """(s·B, A) of every PEFT LoRA layer of ``model`` holding ``adapter_name`` (conv kernels on the out ×
    in·kh·kw view), keyed by the layer's name in the unwrapped base model."""
    from peft.tuners.lora import LoraLayer

    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: Factors = {}
    for name, m in root.named_modules():
        if isinstance(m, LoraLayer) and adapter_name in m.lora_A:
            a = m.lora_A[adapter_name].weight.detach()
            b = m.lora_B[adapter_name].weight.detach()
            out[name] = (m.scaling[adapter_name] * b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1))
    return out


@torch.no_grad()
def lora_from_factors(base: nn.Module, factors: Factors, adapter_name: str = "default") -> nn.Module:
    """A PEFT LoRA on ``base`` (a plain model, modified in place) with ΔW = B A for every layer of ``factors``
    (per-layer ranks through ``rank_pattern``; scale 1 through ``alpha_pattern``). Empty factors: ``base``."""
    import peft

    factors = {n: f for n, f in factors.items() if f[0].shape[1] > 0}
    if not factors:
        return base
    ranks = {n: int(b.shape[1]) for n, (b, _) in factors.items()}
    cfg = peft.LoraConfig(
        r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=list(factors), lora_dropout=0.0,
        rank_pattern={f"^{n}$": k for n, k in ranks.items()}, alpha_pattern={f"^{n}$": k for n, k in ranks.items()},
    )  # fmt: skip
    model = peft.get_peft_model(base, cfg, adapter_name=adapter_name)
    for name, (B, A) in factors.items():
        layer = model.base_model.model.get_submodule(name)
        a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        a.copy_(A.reshape(a.shape))
        b.copy_(B.reshape(b.shape))
    return model


@torch.no_grad()
def prune_gated_to_lora(adapter_model: nn.Module, delta_cls: type) -> nn.Module:
    """A plain PEFT LoRA from a rank-gated adapter (SoRA's, the Bayesian-Bits gates): per layer, the ranks whose
    gate ``d.rank_gates()`` is non-zero, with gate and scale folded into B, so the outputs are the gated adapter's
    (in eval). Layers with no live rank get no adapter. ``adapter_model`` is unloaded (its base model is reused)."""

    kept = {}
    for name, d in active_deltas(adapter_model.base_model, delta_cls).items():
        gates = d.rank_gates()
        keep = gates != 0
        kept[name] = ((d.scale * d.B[:, keep] * gates[keep]).clone(), d.A[keep].clone())
    return lora_from_factors(adapter_model.unload(), kept)


def _units(B: torch.Tensor, A: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Sign-fixed units [a; b] (one row each) and their clustering features [a/‖a‖; b/‖b‖]."""
    a, b = A.double().numpy(), B.T.double().numpy()  # (r, in), (r, out)
    sign = np.sign(a[np.arange(len(a)), np.abs(a).argmax(1)])
    sign[sign == 0] = 1
    a, b = a * sign[:, None], b * sign[:, None]
    raw = np.concatenate([a, b], 1)
    feats = np.concatenate([a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12),
                            b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)], 1)  # fmt: skip
    return raw, feats


def lego_merge(loras: Sequence[Factors], k: int, seed: int = 0) -> Factors:
    """LoRA-LEGO: pool every layer's rank-1 units from ``loras``, k-means them into ``k`` clusters, and return the
    rank-k LoRA of the norm-reweighted centroids (layers where the pool has ≤ k units keep every unit)."""
    from scipy.cluster.vq import kmeans2

    layers = dict.fromkeys(n for lora in loras for n in lora)
    merged: Factors = {}
    for name in layers:
        parts = [lora[name] for lora in loras if name in lora]
        raw, feats = (np.concatenate(x, 0) for x in zip(*(_units(B, A) for B, A in parts), strict=True))
        n_in = parts[0][1].shape[1]
        if len(raw) <= k:
            cents = raw
        else:
            _, labels = kmeans2(feats, k, minit="++", seed=seed)
            cents = []
            for c in range(k):
                members = raw[labels == c]
                if not len(members):
                    continue
                mean = members.mean(0)
                scale = np.linalg.norm(members, axis=1).mean() / max(np.linalg.norm(mean), 1e-12)
                cents.append(mean * scale)  # parameter reweighting: back to the members' average norm
            cents = np.stack(cents)
        cents_t = torch.from_numpy(cents).to(parts[0][1].dtype)
        merged[name] = (cents_t[:, n_in:].T.contiguous(), cents_t[:, :n_in].contiguous())
    return merged


def delta_weights(factors: Factors) -> dict[str, torch.Tensor]:
    """ΔW = B A per layer."""
    return {n: B @ A for n, (B, A) in factors.items()}


# --- merging saved PEFT LoRA folders (``pathopeft adapters merge``) -------------------------------------------
_PREFIX = "base_model.model."


def read_peft_lora(directory: str | os.PathLike[str]) -> tuple[Factors, dict[str, tuple[tuple, tuple]], dict]:
    """(factors with PEFT's scale folded into B, each layer's (A, B) tensor shapes, the config) of a saved PEFT
    LoRA folder; anything else is an :class:`~pathopeft.adapters.serialization.AdapterLoadError` naming the file."""
    from pathopeft.adapters.serialization import AdapterLoadError, read_json, read_safetensors

    d = Path(directory)
    cfg = read_json(d / "adapter_config.json")
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise AdapterLoadError(f"{d / 'adapter_config.json'}: not a PEFT LoRA adapter (peft_type "
                               f"{cfg.get('peft_type')!r}{', DoRA' if cfg.get('use_dora') else ''})")  # fmt: skip
    tensors = read_safetensors(d / "adapter_model.safetensors")
    factors: Factors = {}
    shapes: dict[str, tuple[tuple, tuple]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight").removeprefix(_PREFIX)
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            raise AdapterLoadError(f"{d / 'adapter_model.safetensors'}: {key} has no lora_B")
        r = a.shape[0]
        alpha = _pattern(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", r))
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        factors[name] = (scale * b.float().reshape(b.shape[0], -1), a.float().reshape(r, -1))
        shapes[name] = (tuple(a.shape), tuple(b.shape))
    if not factors:
        raise AdapterLoadError(f"{d / 'adapter_model.safetensors'}: no LoRA weights in it")
    return factors, shapes, cfg


def _pattern(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: the first key that matches the end of the layer's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key.removeprefix('^').removesuffix('$')})$", name):
            return value
    return default


def read_compatible_loras(
    dirs: Sequence[str | os.PathLike[str]],
) -> tuple[list[tuple[Factors, dict[str, tuple[tuple, tuple]], dict]], list[dict | None]]:
    """:func:`read_peft_lora` of every folder (at least two) and its base-model fingerprint, refusing (naming the
    folder) any made for another base model or other layers than the first."""
    from pathopeft.adapters.serialization import AdapterLoadError, read_json

    if len(dirs) < 2:
        raise AdapterLoadError("adapters merge: give at least two adapter folders")
    loaded = [read_peft_lora(d) for d in dirs]
    bases = [read_json(Path(d) / "pathopeft_base.json") if (Path(d) / "pathopeft_base.json").is_file() else None
             for d in dirs]  # fmt: skip
    for d, b, (f, _, _) in zip(dirs[1:], bases[1:], loaded[1:], strict=True):
        if b != bases[0] or set(loaded[0][0]) != set(f):
            raise AdapterLoadError(f"{d}: made for another base model or other layers than {dirs[0]}")
    return loaded, bases


def merge_lora_dirs(
    dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], method: str = "cat",
    k: int | None = None, weights: Sequence[float] | None = None, seed: int = 0,
) -> Path:  # fmt: skip
    """Merge saved PEFT LoRA folders of one base model into one PEFT LoRA folder at ``out``: ``cat`` (Σ λᵢ ΔWᵢ
    exactly, ranks concatenated: PEFT's ``combination_type="cat"``) or ``lego`` (LoRA-LEGO at rank ``k``)."""
    from pathopeft.adapters.serialization import AdapterLoadError

    lams = [1.0] * len(dirs) if weights is None else [float(w) for w in weights]
    if len(lams) != len(dirs):
        raise AdapterLoadError(f"adapters merge: {len(dirs)} folders but {len(lams)} weights")
    loaded, bases = read_compatible_loras(dirs)
    sets = [{n: (lam * B, A) for n, (B, A) in f.items()} for (f, _, _), lam in zip(loaded, lams, strict=True)]
    if method == "cat":
        merged = {n: (torch.cat([s[n][0] for s in sets], 1), torch.cat([s[n][1] for s in sets], 0)) for n in sets[0]}
    elif method == "lego":
        if not k:
            raise AdapterLoadError("adapters merge --method lego needs --k (the merged rank)")
        merged = lego_merge(sets, k, seed=seed)
    else:
        raise AdapterLoadError(f"adapters merge: unknown method {method!r} (cat | lego)")
    return write_peft_lora(out, merged, loaded[0][1], loaded[0][2], bases[0])


def write_peft_lora(
    out: str | os.PathLike[str], factors: Factors, shapes: dict[str, tuple[tuple, tuple]], cfg: dict,
    base: dict | None = None,
) -> Path:  # fmt: skip
    """Write ``factors`` (scale folded into B) as a PEFT LoRA folder at ``out`` with the tensor layouts of
    ``shapes`` (as :func:`read_peft_lora` returns them), per-layer ranks at scale 1, and ``cfg``'s other keys;
    ``base`` is the base-model fingerprint to keep beside it."""
    from pathopeft.adapters.serialization import write_tensor_folder
    from pathopeft.io import atomic_write_text

    tensors, ranks = {}, {}
    for name, (B, A) in factors.items():
        (a_shape, b_shape), r = shapes[name], A.shape[0]
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = A.reshape(r, *a_shape[1:]).contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = B.reshape(b_shape[0], r, *b_shape[2:]).contiguous()
        ranks[name] = r
    top = max(ranks.values())
    cfg = dict(cfg)
    cfg.update(r=top, lora_alpha=top, use_rslora=False, rank_pattern={f"^{n}$": r for n, r in ranks.items()},
               alpha_pattern={f"^{n}$": r for n, r in ranks.items()}, target_modules=sorted(ranks))  # fmt: skip
    o = write_tensor_folder(out, "adapter_model.safetensors", tensors, "adapter_config.json", cfg)
    if base is not None:
        atomic_write_text(o / "pathopeft_base.json", json.dumps(base, indent=2) + "\n")
    return o


__all__ = ["Factors", "delta_weights", "lego_merge", "lora_from_factors", "merge_lora_dirs", "peft_lora_factors",
           "read_compatible_loras", "read_peft_lora", "write_peft_lora"]  # fmt: skip
