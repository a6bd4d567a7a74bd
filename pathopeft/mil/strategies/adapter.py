"""What the adapter strategies (comel, owlora, lora) share: one OWLoRA-layer LoRA per task after the first.

As the official CoMEL trainer does it (``cdatmil_ppl_owlora_trainer.py`` L58–95, L285–313, L369–398, @ 9fd6679):
task 0 trains the whole net; before task 1 every ``nn.Linear`` except the bag classifier and one-output layers
(the attention scorer) gets an OWLoRA adapter (base weights SVD-truncated to 99 % energy) and everything is
frozen but the newest LoRA and the bag classifier, which trains directly in every task; before every later task
the current LoRA is frozen and a new one opened. During training the strategy adds the orthonormality penalty
(:meth:`extra_losses`) and projects the newest factors' gradients against the earlier tasks'
(:meth:`after_backward`). In the task-incremental setting the task id switches on the adapters up to that task
(adapter ``s`` serves task ``s + 1``). ``owlora: {protect_inputs: true}`` adds pathopeft's input-subspace
protection, which needs the previous task's layer inputs (collected here).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pathopeft.mil.strategies.base import Strategy

if TYPE_CHECKING:
    import torch
    from torch import nn


def adapted_layers(net: nn.Module) -> list[str]:
    """The official wrapping rule (``cdatmil_owlora.py`` L281–283): every ``nn.Linear`` whose name does not
    contain ``classifier`` and that has more than one output."""
    from torch import nn

    return [
        n for n, m in net.named_modules() if isinstance(m, nn.Linear) and "classifier" not in n and m.out_features > 1
    ]


def wrap_with_adapter(net: nn.Module, method: str, **kwargs: Any) -> nn.Module:
    """``net`` with adapter ``method`` on the official recipe's layers (:func:`adapted_layers`) and the bag
    classifier left trainable: how every adapter strategy wraps the net before its second task."""
    from pathopeft import adapters

    return adapters.create(method, net, targets=adapted_layers(net), unfreeze=["classifier"], **kwargs)


class AdapterStrategy(Strategy):
    """Base of the adapter strategies; subclasses choose the adapter's settings (:meth:`adapter_kwargs`)."""

    def adapter_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the ``owlora`` adapter (the config's ``owlora`` section)."""
        return dict(self.cfg.owlora)

    @functools.cached_property
    def _opts(self) -> Any:
        """The adapter's config, built once per run (``extra_losses`` reads it on every training bag)."""
        from pathopeft.adapters.owlora import OwloraConfig

        return OwloraConfig(**self.adapter_kwargs())

    def before_task(self, net: nn.Module, t: int) -> nn.Module:
        if t == 0:
            return net
        from pathopeft.adapters.owlora import collect_inputs, next_task, protect_current

        cfg, kw = self.cfg, self.adapter_kwargs()
        protect = self._opts.protect_inputs

        def gather() -> None:
            prev = self.data.loaded(self.data.bags(cfg.tasks[t - 1], "train"), cfg.collect_bags)
            collect_inputs(net, prev, lambda bag: net(bag["features"], bag["coords"].float()))

        if t == 1:
            net = wrap_with_adapter(net, "owlora", **kw)
            if protect:
                gather()
                protect_current(net)
        else:
            if protect:
                gather()
            next_task(net)
        return net

    def extra_losses(
        self, net: nn.Module, batch: dict[str, Any], out: Any, allowed: list[int], t: int
    ) -> dict[str, torch.Tensor]:
        opts = self._opts
        if t == 0 or opts.projection == "none" or not opts.ortho_weight:
            return {}
        from pathopeft.adapters.owlora import orthonormality_penalty

        return {"ortho": opts.ortho_weight * orthonormality_penalty(net)}

    def after_backward(self, net: nn.Module, t: int) -> None:
        if t > 0:
            from pathopeft.adapters.owlora import project_gradients

            project_gradients(net)

    def active_adapters(self, t_eval: int) -> list[int] | None:
        return list(range(t_eval)) if self.cfg.setting == "task" else None
