"""A small adapter core with PEFT's surface, for methods PEFT cannot register.

Why not PEFT's own tuner classes: peft's ``register_peft_method`` only accepts names already in its closed
``PeftType`` enum (``register_peft_method(name="salt")`` raises ``Unknown PEFT type SALT`` in peft 0.21),
and ``PeftModel.from_pretrained`` dispatches on that enum. Making PEFT know our types would mean patching a
library enum and several private mappings, which breaks silently across PEFT releases. So our methods live
in this core and copy PEFT's user surface and file format instead:

* ``AdapterModel(model, config)`` ≈ ``get_peft_model``; ``forward`` calls the wrapped model;
* ``save_pretrained(dir)`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` (adapter
  parameters only); ``AdapterModel.from_pretrained(model, dir)`` loads them;
* ``merge_adapter`` / ``unmerge_adapter`` / ``merge_and_unload`` (a plain timm model back) / ``unload``;
* several named adapters: ``add_adapter``, ``set_adapter``, ``delete_adapter``, ``disable_adapter()``;
* ``get_nb_trainable_parameters`` / ``print_trainable_parameters``.

PEFT's own methods (LoRA, DoRA, PiSSA, …) stay PEFT models; :func:`pathopeft.adapters.create` hides the
difference. A method here is one :class:`Delta` subclass (its parameters and ΔW) plus an
:class:`AdapterConfig` subclass, registered by its own package with :func:`register` into :data:`ADAPTERS`
together with its capabilities (which the pipelines and the test matrix ask instead of keeping name lists).

The file format (what ``save_pretrained`` writes, the base-model fingerprint every file carries and the
checks ``from_pretrained`` makes) is :mod:`pathopeft.adapters.serialization`; the methods here only call it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.adapters.targets import resolve_targets
from pathopeft.registry import Registry


@dataclass
class AdapterConfig:
    """Fields every method shares. Subclasses add theirs and set ``adapter_type``."""

    adapter_type: ClassVar[str] = ""
    r: int = 8
    target_modules: str | list[str] = "attn"
    unfreeze: list[str] = field(default_factory=list)  # param-name substrings also trained (e.g. "norm")

    def to_dict(self) -> dict[str, Any]:
        return {"adapter_type": self.adapter_type, **dataclasses.asdict(self)}

    def for_layer(self, name: str) -> AdapterConfig:
        """The config of the adapter on layer ``name`` (a method whose rank depends on the layer, as OWLoRA's
        qkv layers do, returns a copy with that layer's rank)."""
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        d = {k: v for k, v in d.items() if k not in ("adapter_type", "base_model", "pathopeft_version")}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
        return cls(**d)


def weight_2d(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a matrix (out, in·kh·kw): the view every method adapts, Conv2d included."""
    return layer.weight.reshape(layer.weight.shape[0], -1)


@torch.no_grad()
def signed_svd(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, Vh`` of ``w`` (float32) with a sign convention — the largest-magnitude entry of each
    right singular vector is positive — so frozen singular vectors recomputed from the base weight on another
    machine match the ones an adapter was trained with."""
    U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
    idx = Vh.abs().argmax(dim=1)
    sign = torch.sign(Vh.gather(1, idx[:, None]))[:, 0]
    sign[sign == 0] = 1
    return U * sign, S, Vh * sign[:, None]


def base_forward_with_weight(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Run ``layer`` with ``weight`` in place of its own (same bias, stride, padding …)."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return F.linear(x, weight, layer.bias)


class Delta(nn.Module):
    """One adapter on one layer: its trainable parameters and the weight update ΔW they define.

    ``delta_weight()`` returns ΔW as a matrix shaped like :func:`weight_2d` of the base layer; merging adds it
    to the weight, so merged inference costs exactly the base model. ``forward(x, base)`` returns the adapted
    layer's output; the default runs the base layer once with W + ΔW, and methods override it where a
    factored path is cheaper.
    """

    def __init__(self, base: nn.Module, config: AdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.out_features = base.weight.shape[0]
        self.in_features = weight_2d(base).shape[1]

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def delta_from_merged(self, base: nn.Module) -> torch.Tensor:
        """ΔW to subtract when unmerging, with ``base`` holding W + ΔW; the default recomputes ΔW (right for
        every method whose ΔW does not depend on the base weight; Hydra's does, and overrides this)."""
        return self.delta_weight(base)

    @classmethod
    def build_shared(cls, config: AdapterConfig, layers: dict[str, nn.Module]) -> nn.Module | None:
        """Hook: frozen state shared by every layer of one adapter (RandLoRA's bases, TeRA's factors), built
        once from all target ``layers``; :meth:`AdapterModel.add_adapter` hands it to each Delta as
        ``self.shared``, one object, so it is stored once and moves with the model. None: nothing shared."""
        return None

    def before_load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Hook: reshape this adapter to fit saved ``tensors`` (keys relative to it) before they are copied."""

    def forward(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        w = base.weight + self.delta_weight(base).to(base.weight.dtype).view_as(base.weight)
        return base_forward_with_weight(base, x, w)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: AdapterConfig) -> int:
        """The method's parameter-count formula for one layer (the conformance tests check it)."""
        raise NotImplementedError


# --- the registry of methods ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterMethod:
    """What an :data:`ADAPTERS` entry holds: our config + :class:`Delta` classes, or how to build PEFT's config.

    ``peft_config(targets, rank, alpha, **kw)`` returns a ``peft.PeftConfig``; ``after_create(peft_model,
    adapter_name)`` runs once on the new PEFT model (PiSSA keeps its initial adapter there).
    """

    config_cls: type[AdapterConfig] | None = None
    delta_cls: type[Delta] | None = None
    peft_config: Callable[..., Any] | None = None
    after_create: Callable[[nn.Module, str], None] | None = None
    doc: str = ""

    @property
    def summary(self) -> str:
        """One line for ``pathopeft adapters list``: ``doc``, else the first line of the config's docstring."""
        text = self.doc or (self.config_cls.__doc__ if self.config_cls is not None else "") or ""
        return text.strip().splitlines()[0] if text.strip() else ""


#: Every adapter method by name, ours and PEFT's, with what pipelines and tests need to know about it:
#: ``backend`` ("pathopeft": an :class:`AdapterModel`; "peft": a ``PeftModel``), ``conv`` (adapts
#: ``nn.Conv2d`` too), ``identity_at_init`` (output equals the base model's before training), ``callback``
#: (factory of the Lightning callback training needs, e.g. SNELLA's budget schedule; None: none),
#: ``needs_data`` (inputs must be collected before a task, OWLoRA's protected subspaces), ``regularizer``
#: (``model -> loss term`` that training adds, already weighted by the method's config: SALT's; None: none),
#: ``variants`` (``model -> {label: context factory}``: extra evaluations of one trained model that ``seg compare``
#: scores, DyLoRA's ranks; None: none), ``optimizer`` (``(model, lr, weight_decay) -> Optimizer`` that training
#: must use instead of AdamW: LoRA-Pro's; None: AdamW), ``layer_ranks`` (``model -> {layer: rank}``: the ranks a
#: rank-allocating method gave each layer, for ``seg compare``'s per-layer rank plots; None: fixed ranks).
ADAPTERS: Registry[AdapterMethod] = Registry(
    "adapter method",
    {
        "backend": "pathopeft",
        "conv": False,
        "identity_at_init": False,
        "callback": None,
        "needs_data": False,
        "regularizer": None,
        "variants": None,
        "optimizer": None,
        "layer_ranks": None,
    },
)


def register(name: str, config_cls: type[AdapterConfig], delta_cls: type[Delta], **caps: Any) -> AdapterMethod:
    """Register one of our methods with its capabilities; called by the method's own package on import."""
    if config_cls.adapter_type != name:
        raise ValueError(f"{config_cls.__name__}.adapter_type is {config_cls.adapter_type!r}, not {name!r}")
    method = AdapterMethod(config_cls=config_cls, delta_cls=delta_cls)
    ADAPTERS.add(name, method, **{**caps, "backend": "pathopeft"})
    return method


def our_method(name: str) -> AdapterMethod:
    """The registered method ``name`` if it is one of ours (a config and a Delta), else a ``ValueError``."""
    method = ADAPTERS.get(name)  # UnknownPluginError lists the known names
    if method.config_cls is None or method.delta_cls is None:
        raise ValueError(f"adapter method {name!r} is PEFT's, not a pathopeft adapter type")
    return method


class AdaptedLayer(nn.Module):
    """Wraps a frozen ``nn.Linear``/``nn.Conv2d`` and holds one :class:`Delta` per adapter name."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.active: str | None = None
        self.merged: list[str] = []
        self.disabled = False

    @property
    def weight(self) -> torch.Tensor:  # timm code sometimes reads layer.weight (dtype checks, fused attn)
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                raise RuntimeError("cannot disable adapters while they are merged; unmerge_adapter() first")
            return self.base_layer(x)
        if self.active is None or self.active in self.merged:
            return self.base_layer(x)
        return self.deltas[self.active](x, self.base_layer)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        w = self.base_layer.weight
        w.add_(self.deltas[name].delta_weight(self.base_layer).to(w.dtype).view_as(w))
        self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        w = self.base_layer.weight
        while self.merged:
            name = self.merged.pop()
            w.sub_(self.deltas[name].delta_from_merged(self.base_layer).to(w.dtype).view_as(w))


def active_layers(model: nn.Module, delta_cls: type[Delta]) -> dict[str, AdaptedLayer]:
    """The adapted layers of ``model`` whose active adapter is a ``delta_cls``, by name (the set a method's
    callback, regulariser or rank report works on)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, AdaptedLayer) and m.active is not None
            and isinstance(m.deltas[m.active], delta_cls)}  # fmt: skip


def active_deltas(model: nn.Module, delta_cls: type[Delta]) -> dict[str, Delta]:
    """The active ``delta_cls`` adapters of ``model`` by layer name."""
    return {n: m.deltas[m.active] for n, m in active_layers(model, delta_cls).items()}


def planned_steps(trainer: Any) -> int:
    """The optimiser steps a Lightning run will take: ``max_steps`` when set, else Lightning's estimate (what a
    schedule over the run — SoRA's phases, DiffoRA's search, AdaLoRA's budget — is laid out on)."""
    steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
    return int(steps)


class AdapterModel(nn.Module):
    """A model with named adapters of one registered method family; see the module docstring."""

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = model
        self.peft_config: dict[str, AdapterConfig] = {}
        self.active_adapter: str | None = None
        self._targets: dict[str, list[str]] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config)

    # --- construction -----------------------------------------------------------------------------------
    def _layers(self) -> dict[str, AdaptedLayer]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, AdaptedLayer)}

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Add a new adapter (and make it active) on the layers its ``target_modules`` select."""
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} exists already")
        delta_cls = our_method(config.adapter_type).delta_cls
        names = resolve_targets(self.base_model, config.target_modules)
        layers: dict[str, AdaptedLayer] = {}
        for name in dict.fromkeys(names):
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            layer = getattr(parent, child)
            if not isinstance(layer, AdaptedLayer):
                layer = AdaptedLayer(layer)
                setattr(parent, child, layer)
            layers[name] = layer
        shared = delta_cls.build_shared(config, {n: layer.base_layer for n, layer in layers.items()})
        for name, layer in layers.items():
            delta = delta_cls(layer.base_layer, config.for_layer(name)).to(layer.base_layer.weight.device)
            if shared is not None:
                delta.shared = shared.to(layer.base_layer.weight.device)  # a submodule of every Delta, one object
            layer.deltas[adapter_name] = delta
        self._targets[adapter_name] = list(dict.fromkeys(names))
        self.peft_config[adapter_name] = config
        self.set_adapter(adapter_name)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one used in forward and the only one trainable (as in PEFT)."""
        if adapter_name not in self.peft_config:
            raise KeyError(f"no adapter {adapter_name!r}; have {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        for layer in self._layers().values():
            layer.active = adapter_name if adapter_name in layer.deltas else None
            for n, d in layer.deltas.items():
                d.requires_grad_(n == adapter_name)
        patterns = self.peft_config[adapter_name].unfreeze
        for n, p in self.base_model.named_parameters():
            if ".deltas." not in n and ".base_layer." not in n:
                p.requires_grad_(any(s in n for s in patterns))

    def delete_adapter(self, adapter_name: str) -> None:
        for layer in self._layers().values():
            if adapter_name in layer.merged:
                raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge_adapter() first")
            layer.deltas.pop(adapter_name, None)
        del self.peft_config[adapter_name], self._targets[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None
            for layer in self._layers().values():
                layer.active = None

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model without adapters inside the ``with`` block."""
        layers = self._layers().values()
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)  # forward_features, default_cfg … as on the timm model

    # --- merging ----------------------------------------------------------------------------------------
    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (inference costs exactly the base model)."""
        for layer in self._layers().values():
            if layer.active is not None:
                layer.merge(layer.active)

    def unmerge_adapter(self) -> None:
        for layer in self._layers().values():
            layer.unmerge()

    def _replace_layers(self, merge: bool) -> nn.Module:
        for name, layer in self._layers().items():
            if merge and layer.active is not None:
                layer.merge(layer.active)
            parent_name, _, child = name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name) if parent_name else self.base_model
            setattr(parent, child, layer.base_layer)
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        """The plain base model with the active adapter merged in; this wrapper is unusable afterwards."""
        return self._replace_layers(merge=True)

    def unload(self) -> nn.Module:
        """The plain base model without any adapter (unmerges first)."""
        self.unmerge_adapter()
        return self._replace_layers(merge=False)

    # --- parameters -------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for n, p in self.named_parameters() if ".deltas." not in n)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,} || all params: {a:,} || trainable%: {100 * t / a:.4f}")

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Only what the adapter trains: its Delta parameters and the ``unfreeze`` parameters."""
        name = adapter_name or self.active_adapter
        cfg = self.peft_config[name]
        out: dict[str, torch.Tensor] = {}
        marker = f".deltas.{name}."
        for n, p in self.base_model.state_dict(keep_vars=True).items():  # parameters and persistent buffers
            if marker in n:
                out[n.replace(marker, f".{cfg.adapter_type}.")] = p.detach()
            elif ".deltas." not in n and ".base_layer." not in n and any(s in n for s in cfg.unfreeze):
                out[n] = p.detach()
        return out

    # --- files: the format lives in pathopeft.adapters.serialization (imported here, not at module level) ---
    def save_pretrained(
        self, save_directory: str | os.PathLike[str], selected_adapters: list[str] | None = None
    ) -> None:
        """PEFT's layout: the ``default`` adapter in ``save_directory``, others in ``save_directory/<name>``."""
        from pathopeft.adapters.serialization import save_adapters

        save_adapters(self, save_directory, selected_adapters)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
    ) -> AdapterModel:
        """Wrap ``model`` and load the adapter saved in ``model_id`` (a folder from ``save_pretrained``)."""
        from pathopeft.adapters.serialization import load_pretrained

        return load_pretrained(cls, model, model_id, adapter_name, is_trainable)

    def load_adapter(self, model_id: str | os.PathLike[str], adapter_name: str, is_trainable: bool = False) -> None:
        from pathopeft.adapters.serialization import load_adapter

        load_adapter(self, model_id, adapter_name, is_trainable)
