"""The adapter file format: what :meth:`AdapterModel.save_pretrained` writes and ``from_pretrained`` checks.

PEFT's layout: ``adapter_config.json`` (the method's config, plus ``base_model`` and ``pathopeft_version``) and
``adapter_model.safetensors`` (the adapter's parameters only, keys ``<layer>.<adapter_type>.<param>``) in the
folder of the ``default`` adapter, other adapters in ``<folder>/<name>``. A PEFT adapter saved by
:func:`pathopeft.adapters.save` has PEFT's own files and :data:`BASE_INFO_NAME` beside them.

Every adapter file carries the base model's architecture name and a :func:`fingerprint` of the targeted
weights' shapes, so loading it onto a different model is one :class:`AdapterLoadError` ("the base model
differs", naming both) instead of a silent mis-load; every unreadable file is one too, naming the file. Every
file is written through :mod:`pathopeft.io` (temporary name, atomic rename, ``DiskFullError`` on a full disk).

This module builds on :mod:`pathopeft.adapters.core` (which imports it only inside the thin
``AdapterModel`` methods), never the other way round at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from pathopeft.adapters.core import AdapterConfig, AdapterModel, our_method
from pathopeft.errors import UserError
from pathopeft.io import atomic_write_bytes, atomic_write_text

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BASE_INFO_NAME = "pathopeft_base.json"  # beside PEFT's own files: the fingerprint and full targets PEFT does not keep


class AdapterLoadError(UserError, ValueError):
    """An adapter file that does not belong to this base model (or is not an adapter file)."""


# --- the base-model fingerprint ---------------------------------------------------------------------------
def architecture_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def fingerprint(model: nn.Module, target_names: list[str]) -> str:
    """Hash of (name, weight shape) of the targeted layers: equal for the same architecture and size."""
    modules = dict(model.named_modules())
    items = []
    for n in target_names:
        m = modules[n]
        m = getattr(m, "base_layer", m)
        items.append(f"{n}:{tuple(m.weight.shape)}")
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def check_base_model(model: nn.Module, targets: list[str], saved: dict[str, Any], where: Path) -> None:
    """Refuse an adapter made for another architecture or another size: "the base model differs", naming both.

    ``targets`` are the full names of the layers the adapter was made for; when this model lacks some of them
    it is a different base model too, so that is reported the same way (not as "missing layers").
    """
    if not saved:
        return
    modules = dict(model.named_modules())
    lacking = [t for t in targets if not hasattr(getattr(modules.get(t), "base_layer", modules.get(t)), "weight")]
    arch = architecture_name(model)
    fp = None if lacking else fingerprint(model, targets)
    if lacking or saved.get("architecture") != arch or saved.get("fingerprint") != fp:
        why = (
            f"this model lacks {len(lacking)} of its {len(targets)} target layers (e.g. {lacking[:3]})"
            if lacking
            else "the targeted layers differ in names or shapes"
        )
        raise AdapterLoadError(
            f"{where}: the base model differs: this adapter was made for base model {saved.get('architecture')!r} "
            f"(fingerprint {saved.get('fingerprint')}), not for this {arch!r} (fingerprint {fp or 'n/a'}): {why}"
        )


# --- reading ----------------------------------------------------------------------------------------------
def adapter_config_path(model_id: str | os.PathLike[str]) -> Path:
    """``model_id/adapter_config.json``, or an :class:`AdapterLoadError` saying which of the two is missing."""
    d = Path(model_id)
    if not d.is_dir():
        raise AdapterLoadError(f"{d}: adapter folder not found" + (" (it is a file)" if d.exists() else ""))
    path = d / CONFIG_NAME
    if not path.is_file():
        raise AdapterLoadError(f"{path}: no adapter config here (expected a folder written by adapters.save())")
    return path


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; anything unreadable is an :class:`AdapterLoadError` naming the file."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterLoadError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(d, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an adapter weights file; missing or corrupt is an :class:`AdapterLoadError` naming it."""
    if not path.is_file():
        raise AdapterLoadError(f"{path}: adapter weights not found")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError): the file is at fault
        raise AdapterLoadError(f"{path}: not a readable safetensors file ({e})") from e


def read_adapter_config(model_id: str | os.PathLike[str]) -> AdapterConfig:
    path = adapter_config_path(model_id)
    d = read_json(path)
    if "adapter_type" not in d:
        raise AdapterLoadError(f"{path}: not a pathopeft adapter config (no 'adapter_type'; a PEFT one?)")
    try:
        return our_method(str(d["adapter_type"])).config_cls.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:  # unknown method, unknown or ill-typed fields
        raise AdapterLoadError(f"{path}: {e.args[0] if e.args else e}") from e


def write_tensor_folder(
    out: str | os.PathLike[str], tensors_name: str, tensors: dict[str, torch.Tensor], meta_name: str, meta: dict
) -> Path:
    """A folder of one safetensors file and one JSON file, each written atomically (a merged LoRA, an RMM basis, a
    LoRA generator); returns the folder."""
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(o / tensors_name, safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_text(o / meta_name, json.dumps(meta, indent=2) + "\n")
    return o


def read_method_folder(
    directory: str | os.PathLike[str], tensors_name: str, meta_name: str, method: str, what: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a :func:`write_tensor_folder` folder whose metadata's ``method`` is ``method``;
    anything else is an :class:`AdapterLoadError` naming the file (``what``: "an RMM basis", …)."""
    d = Path(directory)
    meta = read_json(d / meta_name)
    if meta.get("method") != method:
        raise AdapterLoadError(f"{d / meta_name}: not {what} (method {meta.get('method')!r})")
    return meta, read_safetensors(d / tensors_name)


# --- AdapterModel's save_pretrained / from_pretrained / load_adapter --------------------------------------
def save_adapters(
    model: AdapterModel, save_directory: str | os.PathLike[str], selected_adapters: list[str] | None = None
) -> None:
    """PEFT's layout: the ``default`` adapter in ``save_directory``, others in ``save_directory/<name>``."""
    from pathopeft import __version__

    root = Path(save_directory)
    for name in selected_adapters or list(model.peft_config):
        d = root if name == "default" else root / name
        d.mkdir(parents=True, exist_ok=True)
        cfg = model.peft_config[name].to_dict()
        cfg["base_model"] = {
            "architecture": architecture_name(model.base_model),
            "fingerprint": fingerprint(model.base_model, model._targets[name]),
        }
        cfg["pathopeft_version"] = __version__
        tensors = {k: v.contiguous().cpu() for k, v in model.adapter_state_dict(name).items()}
        meta = {
            "format": "pt",
            "adapter_type": cfg["adapter_type"],
            **{k: str(v) for k, v in cfg["base_model"].items()},
        }
        atomic_write_bytes(d / WEIGHTS_NAME, safetensors_bytes(tensors, metadata=meta))
        atomic_write_text(d / CONFIG_NAME, json.dumps(cfg, indent=2, default=list) + "\n")


def load_pretrained(
    cls: type[AdapterModel],
    model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> AdapterModel:
    """Wrap ``model`` in ``cls`` and load the adapter saved in ``model_id`` (a folder from ``save_pretrained``)."""
    config = read_adapter_config(model_id)
    try:
        wrapped = cls(model, config, adapter_name)
    except ValueError as e:  # the saved targets do not exist in this model
        raise AdapterLoadError(f"{model_id}: this adapter does not fit this {architecture_name(model)!r}: {e}") from e
    load_weights(wrapped, model_id, adapter_name)
    if not is_trainable:
        for p in wrapped.parameters():
            p.requires_grad_(False)
    return wrapped


def load_adapter(
    model: AdapterModel, model_id: str | os.PathLike[str], adapter_name: str, is_trainable: bool = False
) -> None:
    """Add the adapter saved in ``model_id`` to ``model`` as ``adapter_name`` (frozen unless ``is_trainable``)."""
    model.add_adapter(adapter_name, read_adapter_config(model_id))
    load_weights(model, model_id, adapter_name)
    if not is_trainable:
        for layer in model._layers().values():
            if adapter_name in layer.deltas:
                layer.deltas[adapter_name].requires_grad_(False)


def load_weights(model: AdapterModel, model_id: str | os.PathLike[str], adapter_name: str) -> None:
    """Copy the saved tensors into ``model``'s adapter ``adapter_name`` after checking the base model."""
    d = Path(model_id)
    saved = read_json(d / CONFIG_NAME).get("base_model", {})
    check_base_model(model.base_model, model._targets[adapter_name], saved, d)
    tensors = read_safetensors(d / WEIGHTS_NAME)
    cfg = model.peft_config[adapter_name]
    tag = f".{cfg.adapter_type}."
    for layer_name, layer in model._layers().items():
        if adapter_name in layer.deltas:
            prefix = f"{layer_name}{tag}"
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            layer.deltas[adapter_name].before_load(own)
    params = model.base_model.state_dict(keep_vars=True)
    for key, value in tensors.items():
        name = key.replace(tag, f".deltas.{adapter_name}.", 1)
        if name not in params:
            raise AdapterLoadError(f"{d / WEIGHTS_NAME}: tensor {key!r} has no place in this model")
        if params[name].shape != value.shape:
            raise AdapterLoadError(
                f"{d / WEIGHTS_NAME}: {key!r} has shape {tuple(value.shape)}, the model wants "
                f"{tuple(params[name].shape)}"
            )
        with torch.no_grad():
            params[name].copy_(value)
