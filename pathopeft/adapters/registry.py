"""``create(name, model, ...)``: one factory for our adapters and PEFT's, so configs switch methods by a string.

Every method is an entry of :data:`ADAPTERS` (defined in :mod:`pathopeft.adapters.core`) with its
capabilities. Ours (``salt``, ``wara``, ``snella``, ``owlora``, ``svfit``, ``hydra``, ``nola``, ``loldu``, ``sorsa``, ``lorasb``, ``miss-core``, ``tlora``, ``loca``, ``randlora-core``, ``blocklora``, ``tera``, the issue-16 rank-allocation methods) register in their own packages, which this
module imports only to trigger that; PEFT's LoRA family (``lora``, ``dora``, ``pissa``) registers below with
our rank/alpha/targets. Any other PEFT method (``waveft``, ``miss``, ``randlora``, ``vera``, …) is found by
its PEFT name with its own config keywords. A new method of ours is one ``Delta`` + config package that
calls :func:`register` with its capabilities; the conformance tests pick it up from :data:`ADAPTERS`.

:func:`save` and :func:`load` work for both kinds and write/check the base-model fingerprint, so an adapter
cannot be loaded onto the wrong model by accident.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

# our methods register on import, in this order (the listing order: keep it, not alphabetical)
# fmt: off
from pathopeft.adapters import salt, wara, snella, owlora, svfit, hydra, nola, loldu, sorsa, lorasb, miss, tlora  # noqa: F401  # isort: skip
from pathopeft.adapters import loca, randlora, blocklora, tera  # noqa: F401  # isort: skip
from pathopeft.adapters import dylora, sora, codyra, sltrain, increlora, allora, pego, orthoadapt  # noqa: F401  # isort: skip
from pathopeft.adapters import diffora, bayesbits_lora  # noqa: F401  # isort: skip
# fmt: on
from pathopeft.adapters.core import ADAPTERS, AdapterMethod, AdapterModel, our_method, register
from pathopeft.adapters.lorapro import lora_pro_optimizer
from pathopeft.adapters.serialization import (
    BASE_INFO_NAME,
    WEIGHTS_NAME,
    AdapterLoadError,
    adapter_config_path,
    architecture_name,
    check_base_model,
    fingerprint,
    read_json,
)
from pathopeft.adapters.targets import resolve_targets
from pathopeft.io import atomic_write_text
from pathopeft.registry import UnknownPluginError

__all__ = ["ADAPTERS", "BASE_INFO_NAME", "create", "list_methods", "load", "register", "save"]


# --- PEFT's LoRA family as entries ------------------------------------------------------------------------
def _lora_family(variant: str) -> Callable[..., Any]:
    """The ``peft.LoraConfig`` builder of ``variant`` (``lora``, ``dora``: ``use_dora``, ``pissa``: its init)."""

    def build(targets: list[str], rank: int | None, alpha: float | None, **kw: Any) -> Any:
        import peft

        r = rank or 8
        return peft.LoraConfig(
            r=r,
            lora_alpha=alpha if alpha is not None else r,
            target_modules=targets,
            use_dora=variant == "dora",
            init_lora_weights="pissa" if variant == "pissa" else kw.pop("init_lora_weights", True),
            **kw,
        )

    return build


def _keep_pissa_init(pm: nn.Module, adapter_name: str) -> None:
    """PiSSA rewrites the base weights; keep the initial adapter so a save can be converted into a plain LoRA
    that applies to the *original* base model (PEFT's documented conversion, see :func:`save`)."""
    init_dir = Path(tempfile.mkdtemp(prefix="pathopeft-pissa-init-"))
    pm.peft_config[adapter_name].init_lora_weights = True
    pm.save_pretrained(init_dir, selected_adapters=[adapter_name])
    pm.peft_config[adapter_name].init_lora_weights = "pissa"
    pm._pathopeft_pissa_init = init_dir


ADAPTERS.add(
    "lora",
    AdapterMethod(peft_config=_lora_family("lora"), doc="LoRA from PEFT (rank-r A·B update, B zero at init)"),
    backend="peft",
    conv=True,
    identity_at_init=True,
)
ADAPTERS.add(
    "dora",
    AdapterMethod(peft_config=_lora_family("dora"), doc="DoRA from PEFT (LoRA + a learned magnitude, use_dora)"),
    backend="peft",
    conv=True,
    identity_at_init=True,
)
ADAPTERS.add(
    "pissa",
    AdapterMethod(
        peft_config=_lora_family("pissa"),
        after_create=_keep_pissa_init,
        doc="PiSSA from PEFT (LoRA from the top singular vectors, init_lora_weights='pissa')",
    ),
    backend="peft",
    conv=False,  # PEFT's PiSSA initialisation is defined for nn.Linear only
    identity_at_init=True,  # residual + principal part = W
)

ADAPTERS.add(
    "lorapro",
    AdapterMethod(
        peft_config=_lora_family("lora"),
        doc="LoRA-Pro: PEFT's LoRA trained by the LoRA-Pro optimiser (equivalent gradient closest to full Adam)",
    ),
    backend="peft",
    conv=True,
    identity_at_init=True,
    optimizer=lora_pro_optimizer,
)
from pathopeft.adapters import adalora  # noqa: F401  # isort: skip  (PEFT's AdaLoRA, after its LoRA family)


def list_methods(include_peft: bool = True) -> list[str]:
    """Registered methods in registration order: ours, then PEFT's LoRA family (the conformance matrix)."""
    return ADAPTERS.names() if include_peft else ADAPTERS.names(backend="pathopeft")


def is_ours(model: nn.Module) -> bool:
    return isinstance(model, AdapterModel)


def _other_peft_config(name: str, targets: list[str], rank: int | None, **kw: Any) -> Any:
    """The config of a PEFT method that is not an entry, by its PEFT name (``ia3``, ``vera``, ``waveft`` …)."""
    import peft

    try:
        cfg_cls = peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType(name.upper())]
    except (ValueError, KeyError) as e:
        known = sorted({*ADAPTERS, *(t.value.lower() for t in peft.PeftType)})
        raise UnknownPluginError(f"unknown adapter method {name!r}; known: {known}") from e
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    if rank is not None:
        if "r" not in fields:  # FourierFT / WaveFT (n_frequency), OSF (effective_rank), C3A (block_size), …
            sizes = sorted(fields & SIZE_ARGUMENTS)
            raise ValueError(
                f"adapter method {name!r} has no rank: pass its size argument "
                + (" or ".join(f"{a}=…" for a in sizes) if sizes else "(see PEFT's " + cfg_cls.__name__ + ")")
                + " instead of rank"
            )
        kw.setdefault("r", rank)
    return cfg_cls(target_modules=targets, **kw)


@functools.cache
def peft_adapts_conv(name: str) -> bool:
    """Whether PEFT's method ``name`` adapts an ``nn.Conv2d`` correctly: asked of PEFT itself, on one-layer probes
    with the method's default config (so a new PEFT release answers for itself, no hand-kept list). A method
    that is the identity at init on a Linear but not on a Conv2d counts as not adapting convs."""
    import peft

    cfg_cls = peft.PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType(name.upper())]

    def wraps(layer: nn.Module, x: torch.Tensor) -> tuple[bool, bool]:
        """(PEFT wraps it, its output at init equals the layer's)."""
        torch.manual_seed(0)
        model = nn.Sequential(layer)
        ref = model(x).detach()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = peft.get_peft_model(model, cfg_cls(target_modules=["0"]))(x)
        except Exception:  # noqa: BLE001 — any refusal (ValueError, TypeError, NotImplementedError …)
            return False, False
        return True, bool(torch.allclose(out, ref, atol=1e-4))

    conv_ok, conv_identity = wraps(nn.Conv2d(8, 8, 3), torch.randn(2, 8, 6, 6))
    linear_ok, linear_identity = wraps(nn.Linear(8, 8), torch.randn(2, 8))
    if not linear_ok:  # the default config needs arguments: let PEFT itself answer on the real model
        return True
    # identity at init on a Linear but not on a Conv2d is a broken conv path (PEFT 0.21's OFT): refuse it
    return conv_ok and (conv_identity or not linear_identity)


#: Size arguments of PEFT methods that have no ``r`` (named in the error when ``rank`` is passed to one).
SIZE_ARGUMENTS = frozenset({"n_frequency", "effective_rank", "block_size", "oft_block_size", "boft_block_size"})


def _default_targets(config_cls: type) -> str | list[str]:
    return next(f.default for f in dataclasses.fields(config_cls) if f.name == "target_modules")


def create(
    name: str,
    model: nn.Module,
    rank: int | None = None,
    targets: str | list[str] | None = None,
    alpha: float | None = None,
    adapter_name: str = "default",
    **kwargs: Any,
) -> nn.Module:
    """Wrap ``model`` with adapter ``name``; returns an :class:`AdapterModel` (ours) or a ``PeftModel``.

    ``rank`` is each method's ``r``; ``targets`` a preset (``"attn"``, ``"attn+mlp"``, ``"all-linear"``,
    ``"all-conv"``, ``"all"``) or module names (None: the method's own default, e.g. SALT's and SNELLA's
    official ``"attn+mlp"``; ``"attn"`` for PEFT's methods); ``kwargs`` go to the method's config (e.g. ``r_lora=4`` for
    SALT, ``wavelet="db2"`` for WaRA, ``sparsity=0.95`` for SNELLA, ``lora_dropout`` for PEFT's LoRA).
    """
    name = name.lower()
    entry = ADAPTERS.entry(name) if name in ADAPTERS else None
    if targets is None:
        ours = entry is not None and entry.caps["backend"] == "pathopeft"
        targets = _default_targets(our_method(name).config_cls) if ours else "attn"
    names = resolve_targets(model, targets)
    convs = [n for n in names if isinstance(model.get_submodule(n), nn.Conv2d)]
    if convs and not (entry.caps["conv"] if entry is not None else peft_adapts_conv(name)):
        label = name if entry is not None else f"{name} (PEFT)"
        raise ValueError(f"{label} adapts nn.Linear only; these targets are Conv2d: {convs[:4]}")
    if entry is not None and entry.caps["backend"] == "pathopeft":
        cfg_kw = dict(kwargs)
        if rank is not None:
            cfg_kw["r"] = rank
        if alpha is not None:
            cfg_kw["alpha"] = alpha
        config = our_method(name).config_cls(target_modules=names, **cfg_kw)
        return AdapterModel(model, config, adapter_name)

    import peft

    if entry is not None:
        config = entry.obj.peft_config(names, rank, alpha, **kwargs)
    else:
        config = _other_peft_config(name, names, rank, **kwargs)
    pm = peft.get_peft_model(model, config, adapter_name=adapter_name)
    # the full target list, because PEFT condenses >= 20 names into suffixes on save (see load)
    pm._pathopeft_base = {
        "architecture": architecture_name(model),
        "fingerprint": fingerprint(model, names),
        "targets": names,
    }
    if entry is not None and entry.obj.after_create is not None:
        entry.obj.after_create(pm, adapter_name)
    return pm


def save(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Save the active adapter (safetensors + JSON config + base-model fingerprint) into ``directory``."""
    d = Path(directory)
    if is_ours(model):
        model.save_pretrained(d, selected_adapters=[model.active_adapter])
        return d
    name = model.active_adapter
    init = getattr(model, "_pathopeft_pissa_init", None)
    if init is not None:
        model.save_pretrained(d, selected_adapters=[name], path_initial_model_for_weight_conversion=str(init))
    else:
        model.save_pretrained(d, selected_adapters=[name])
    sub = d if name == "default" else d / name
    info = dict(getattr(model, "_pathopeft_base", {}))
    atomic_write_text(sub / BASE_INFO_NAME, json.dumps(info, indent=2) + "\n")
    return sub


def peft_targets(model: nn.Module, directory: Path) -> list[str]:
    """The module names of ``model`` that PEFT will adapt from ``directory``'s config, in model order.

    Uses PEFT's own matcher (``check_target_module_exists``: exact names, ``.``-suffixes, regexes, excluded
    modules), so it agrees with ``PeftModel.from_pretrained`` also for the condensed suffix lists PEFT ≥ 0.14
    writes for ≥ 20 targets (``MIN_TARGET_MODULES_FOR_OPTIMIZATION``).
    """
    import peft
    from peft.tuners.tuners_utils import check_target_module_exists

    try:
        config = peft.PeftConfig.from_pretrained(str(directory))
    except (TypeError, ValueError, KeyError) as e:
        raise AdapterLoadError(f"{directory / 'adapter_config.json'}: PEFT cannot read this config ({e})") from e
    return [n for n, _ in model.named_modules() if n and check_target_module_exists(config, n)]


def _check_peft_base(model: nn.Module, d: Path, info: dict[str, Any]) -> None:
    """Refuse a PEFT adapter whose ``pathopeft_base.json`` says it was made for another base model.

    Why the full target list is stored at save time: PEFT saves ≥ 20 explicit targets as suffixes
    (``["qkv", "attn.proj"]``), so the saved config alone cannot be compared with module names, and a
    suffix also matches a wider model. The fingerprint is checked over the stored full names (folders saved
    before they were stored fall back to what PEFT's matcher selects), and the layers PEFT will actually adapt
    here must be exactly those names.
    """
    matched = peft_targets(model, d)
    targets = list(info.get("targets") or matched)
    check_base_model(model, targets, info, d)
    if set(matched) != set(targets):
        extra, lacking = sorted(set(matched) - set(targets)), sorted(set(targets) - set(matched))
        raise AdapterLoadError(
            f"{d}: the base model differs: PEFT would adapt {len(matched)} layers of this "
            f"{architecture_name(model)!r}, the adapter was made for {len(targets)} "
            f"(extra here: {extra[:3]}, not selected here: {lacking[:3]})"
        )


def load(model: nn.Module, directory: str | os.PathLike[str], is_trainable: bool = False) -> nn.Module:
    """Load an adapter saved by :func:`save` onto a fresh ``model`` (ours or PEFT's, told by the config).

    Every bad folder is an :class:`AdapterLoadError` naming the file: missing folder or config, unreadable
    JSON or weights, an adapter made for another base model.
    """
    d = Path(directory)
    cfg_path = adapter_config_path(d)
    cfg = read_json(cfg_path)
    if "adapter_type" in cfg:
        return AdapterModel.from_pretrained(model, d, is_trainable=is_trainable)
    if "peft_type" not in cfg:
        raise AdapterLoadError(f"{cfg_path}: neither a pathopeft nor a PEFT adapter config")
    import peft

    weights = d / WEIGHTS_NAME
    if weights.is_file():  # PEFT would fail on a corrupt file with safetensors' own message, naming nothing
        from safetensors import safe_open

        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as e:  # SafetensorError / OSError: the file is at fault
            raise AdapterLoadError(f"{weights}: not a readable safetensors file ({e})") from e
    elif not (d / "adapter_model.bin").is_file():
        raise AdapterLoadError(f"{weights}: adapter weights not found")
    info_path = d / BASE_INFO_NAME
    if info_path.is_file():
        _check_peft_base(model, d, read_json(info_path))
    try:
        return peft.PeftModel.from_pretrained(model, d, is_trainable=is_trainable)
    except RuntimeError as e:  # a plain PEFT folder (no pathopeft_base.json) on another model: size mismatch
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise AdapterLoadError(
            f"{d}: this adapter does not fit this {architecture_name(model)!r} ({' '.join(lines[:2])})"
        ) from e
