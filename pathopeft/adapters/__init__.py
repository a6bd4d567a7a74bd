"""Parameter-efficient adapters for timm vision models: SALT, WaRA, SNELLA (ours) and PEFT's LoRA family.

    from pathopeft import adapters
    model = adapters.create("salt", timm_model, rank=8, targets="attn")   # or "wara", "snella", "lora", …
    ...train...
    adapters.save(model, "runs/salt-adapter")            # adapter_config.json + adapter_model.safetensors
    plain = model.merge_and_unload()                     # a plain timm model, base-model inference cost

Why our methods are not PEFT tuners, and how the two kinds are kept interchangeable: see
:mod:`pathopeft.adapters.core`; the files and their base-model checks: :mod:`pathopeft.adapters.serialization`.
Every method and its capabilities (``conv``, ``backend``, ``identity_at_init``, ``callback``, ``needs_data``) is
an entry of :data:`ADAPTERS`.
"""

from pathopeft.adapters.core import ADAPTERS, AdapterConfig, AdapterMethod, AdapterModel, Delta
from pathopeft.adapters.registry import create, list_methods, load, register, save
from pathopeft.adapters.salt import SaltConfig
from pathopeft.adapters.serialization import AdapterLoadError
from pathopeft.adapters.snella import BudgetAllocator, SnellaBudgetCallback, SnellaConfig
from pathopeft.adapters.targets import PRESETS, resolve_targets
from pathopeft.adapters.wara import WaraConfig, WaraSubbandConfig

__all__ = [
    "ADAPTERS",
    "PRESETS",
    "AdapterConfig",
    "AdapterLoadError",
    "AdapterMethod",
    "AdapterModel",
    "BudgetAllocator",
    "Delta",
    "SaltConfig",
    "SnellaBudgetCallback",
    "SnellaConfig",
    "WaraConfig",
    "WaraSubbandConfig",
    "create",
    "list_methods",
    "load",
    "register",
    "resolve_targets",
    "save",
]
