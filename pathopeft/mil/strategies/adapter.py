"""What the adapter strategies (comel, owlora, lora) share: one adapter per task after the first.

Task 1 trains the whole net; before every later task an adapter is added on all linear layers (bag and
instance classifiers included) and the earlier weights are frozen, after recording the previous task's
layer inputs (OWLoRA keeps later adapters orthogonal to them). In the task-incremental setting the task id
switches on the adapters up to that task (adapter ``s`` serves task ``s + 1``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pathopeft.mil.strategies.base import Strategy

if TYPE_CHECKING:
    from torch import nn


class AdapterStrategy(Strategy):
    """Base of the adapter strategies; subclasses choose the adapter's settings (:meth:`adapter_kwargs`)."""

    def adapter_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the ``owlora`` adapter (the config's ``owlora`` section)."""
        return dict(self.cfg.owlora)

    def before_task(self, net: nn.Module, t: int) -> nn.Module:
        if t == 0:
            return net
        from pathopeft import adapters
        from pathopeft.adapters.owlora import collect_inputs, next_task, protect_current

        cfg = self.cfg
        prev = self.data.loaded(self.data.bags(cfg.tasks[t - 1], "train"), cfg.collect_bags)

        def forward(bag: dict[str, Any]) -> None:
            net(bag["features"], bag["coords"].float())

        if t == 1:
            net = adapters.create("owlora", net, targets="all-linear", **self.adapter_kwargs())
            collect_inputs(net, prev, forward)
            protect_current(net)
        else:
            collect_inputs(net, prev, forward)
            next_task(net)
        return net

    def active_adapters(self, t_eval: int) -> list[int] | None:
        return list(range(t_eval)) if self.cfg.setting == "task" else None
